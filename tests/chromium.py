"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed by
``make system-deps``) driven by Selenium, offline, in a fresh profile; stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.wait import WebDriverWait

from tests.helpers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# No network beyond loopback here: nothing in the background may try to reach out.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)

T = TypeVar("T")


@contextlib.contextmanager
def headless_chromium(profile: Path, *, width: int = 1280, height: int = 900) -> Iterator[Browser]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            raise RuntimeError(f"{path} is missing: run `make system-deps` (chromium-driver)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    # chromedriver in a process group of its own, with Chromium under it: one killpg stops
    # whatever quit() leaves behind.
    service = Service(
        executable_path=CHROMEDRIVER,
        port=free_port(),
        log_output=str(profile.parent / "chromedriver.log"),
        popen_kw={"start_new_session": True},
    )
    driver = webdriver.Chrome(service=service, options=options)
    pid = service.process.pid
    try:
        yield Browser(driver)
    finally:
        try:
            driver.quit()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


class Browser:
    def __init__(self, driver: webdriver.Chrome):
        self.driver = driver

    def wait_for(self, condition: Callable[[], T], timeout: float = 30.0, what: str = "") -> T:
        """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda _: condition(), message=f"timed out waiting for {what or condition}"
        )

    def script(self, source: str) -> object:
        return self.driver.execute_script(source)
