"""cache.sh's Docker mode when Docker cannot do it: no engine answering, or a helper image
that is neither here nor pullable (no registry). A new user gets one line saying what to
do (start the engine, set HELPER_IMAGE), not Docker's own error. Issue 22, items 12 and 13.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.docker_engine import DockerEngine, docker
from tests.deploy.nginx_stack import CACHE_SH
from tests.helpers import REPO

pytestmark = pytest.mark.slow

DOCS = REPO / "docs" / "nginx.md"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    engine = DockerEngine.ensure(tmp_path_factory.mktemp("dockerd"))
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def volume(engine: DockerEngine) -> Iterator[str]:
    """A volume name no one uses; removed afterwards should anything have created it."""
    name = f"comeapi-test-cache-sh-{secrets.token_hex(4)}"
    yield name
    docker("volume", "rm", "-f", name, check=False)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("cache.sh: ")]
    assert len(lines) == 1, result.stderr
    assert "Error response from daemon" not in result.stderr, result.stderr
    return lines[0]


def test_a_helper_image_that_cannot_be_had_names_helper_image(volume: str, tmp_path: Path) -> None:
    absent = f"comeapi-test/absent-helper:{secrets.token_hex(4)}"
    direct = subprocess.run(
        ["bash", str(CACHE_SH), "count", "--volume", volume, "--image", absent],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    line = one_line_error(direct)
    assert absent in line and "HELPER_IMAGE" in line and "--image" in line, line
    through_make = subprocess.run(
        ["make", "-s", "cache-export", f"CACHE_VOLUME_NAME={volume}", f"HELPER_IMAGE={absent}",
         f"EXPORT_FILE={tmp_path / 'cache.tar.gz'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "set HELPER_IMAGE=" in one_line_error(through_make)
    assert not (tmp_path / "cache.tar.gz").exists()
    assert docker("volume", "inspect", volume, check=False).returncode != 0  # nothing made


def test_the_helper_image_message_holds_on_an_engine_with_no_tagged_image(tmp_path: Path) -> None:
    """With no tagged image on the engine, listing them for the message found nothing, and
    under ``set -o pipefail`` that ended cache.sh silently (exit 1, no line; seen on a fresh
    CI machine). A stand-in ``docker`` (this is about the script's own logic): the engine
    answers, the image is absent and cannot be pulled, only untagged images exist."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  info) exit 0 ;;\n"
        "  image|pull) exit 1 ;;\n"
        "  images) echo '<none>:<none>'; exit 0 ;;\n"
        '  *) echo "unexpected docker $*" >&2; exit 2 ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(CACHE_SH), "count", "--volume", "v", "--image", "absent:1"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    line = one_line_error(result)
    assert "absent:1" in line and "HELPER_IMAGE" in line and "images here" not in line, line


def test_an_engine_that_does_not_answer_points_to_how_to_start_it(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(CACHE_SH), "count", "--volume", "v"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/bin", "DOCKER_HOST": f"unix://{tmp_path}/no.sock"},
    )  # fmt: skip
    line = one_line_error(result)
    assert "engine is not running" in line and 'docs/nginx.md, "Docker mode"' in line, line
    # ...where the Docker mode says how to start it.
    text = DOCS.read_text()
    docker_mode = text[text.index("## Docker mode") : text.index("### What the Docker test runs")]
    assert "systemctl start docker" in docker_mode and "sudo dockerd" in docker_mode
