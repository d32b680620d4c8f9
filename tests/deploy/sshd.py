"""A real OpenSSH server (Debian's openssh-server) on a free loopback port: "another machine"
for cache-copy and cache-import.

It has its own host key, a throw-away client key and its own config, pid file and log under
one directory; it runs in the foreground in its own process group and is stopped by PID.
The client side is an ssh config file (``ssh -F``) that pins the host key, so ssh and scp
check it for real.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import Proc, free_port

SSHD = Path("/usr/sbin/sshd")
HOST_ALIAS = "comeapi-remote"


def sshd_missing() -> str | None:
    if not SSHD.is_file():
        return "sshd is not installed (make system-deps installs openssh-server)"
    return None


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "comeapi-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


@dataclass
class Sshd:
    """sshd -D on 127.0.0.1:port; ``ssh -F config_file comeapi-remote`` logs in as this user."""

    root: Path
    port: int = field(default_factory=free_port)
    user: str = field(default_factory=getpass.getuser)
    proc: Proc | None = None

    @property
    def config_file(self) -> Path:
        """The client's ssh config: what SSH_OPTS="-F ..." points at."""
        return self.root / "ssh_config"

    def start(self) -> Sshd:
        self.root.mkdir(parents=True, exist_ok=True)
        host_key, client_key = self.root / "host_key", self.root / "client_key"
        _keygen(host_key)
        _keygen(client_key)
        (self.root / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        host_pub = (self.root / "host_key.pub").read_text().split()
        (self.root / "known_hosts").write_text(
            f"[127.0.0.1]:{self.port} {' '.join(host_pub[:2])}\n"
        )
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The keys live in a temporary directory that sshd's owner checks would refuse.
            "StrictModes no",
            "PrintMotd no",
            # scp uses the SFTP protocol since OpenSSH 9.
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
        ]
        if "DOCKER_HOST" in os.environ:  # the "remote" docker is the same engine
            lines.append(f"SetEnv DOCKER_HOST={os.environ['DOCKER_HOST']}")
        (self.root / "sshd_config").write_text("\n".join(lines) + "\n")
        self.config_file.write_text(
            "\n".join(
                [
                    f"Host {HOST_ALIAS}",
                    "    HostName 127.0.0.1",
                    f"    Port {self.port}",
                    f"    User {self.user}",
                    f"    IdentityFile {client_key}",
                    "    IdentitiesOnly yes",
                    f"    UserKnownHostsFile {self.root / 'known_hosts'}",
                    "    StrictHostKeyChecking yes",
                    "    BatchMode yes",
                    "    ConnectTimeout 10",
                ]
            )
            + "\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        argv = [str(SSHD), "-D", "-e", "-f", str(self.root / "sshd_config")]
        self.proc = Proc(argv, self.root / "sshd.log")
        self.wait_ready()
        return self

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(self.config_file), HOST_ALIAS, command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, attempts: int = 50) -> None:
        assert self.proc is not None
        for _ in range(attempts):
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.popen.returncode}:\n{self.proc.log()}")
            if self.ssh("true", timeout=15).returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"cannot log in to sshd on port {self.port}:\n{self.proc.log()}")

    def log(self) -> str:
        return self.proc.log() if self.proc is not None else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
