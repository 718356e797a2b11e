"""Start, identify and stop the platform's own processes by recorded pid (never by name).

Also the set-up steps they share: running a command to completion, installing Debian packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Popen objects of the servers this process started, by pid: kept so that they are waited for
# (no zombie, no ResourceWarning) when this same process stops them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
# Debian's invoke-rc.d asks this program whether a package's maintainer script may start a service.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class PlatformError(RuntimeError):
    """A platform component could not be installed, started or reached; the message says why."""


@dataclass(frozen=True)
class ManagedProcess:
    """A long-running server the platform starts: its pid file, log file and a marker in its argv.

    The marker (a path unique to this checkout's state directory) is checked against
    /proc/<pid>/cmdline before any signal is sent, so a recycled pid is never killed.
    """

    name: str
    pid_file: Path
    log_file: Path
    marker: str

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                user=user,
                # Own session: the server outlives the CLI and a Ctrl-C in the terminal.
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        # Until exec() completes, /proc/<pid>/cmdline is still ours (Python's): wait for it, so
        # that running() is truthful from here on.
        deadline = time.monotonic() + 10
        while not self._is_ours(proc.pid) and proc.poll() is None:
            if time.monotonic() > deadline:
                raise PlatformError(f"{self.name}: started process never showed {self.marker}")
            time.sleep(0.02)
        return proc.pid

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL. Returns whether a process of ours was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            # Its own session (start): the group is it and what it started (a supervised
            # service), and none of that may outlive it.
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        self.pid_file.unlink(missing_ok=True)
        return True

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is gone for our purposes
            return False
        return self.marker.encode() in cmdline

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Reap it if it is our child (when started in this very process).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, proc: ManagedProcess | None = None
) -> None:
    """Poll ``check`` until true; fail with the process's log tail if it died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.running():
            raise PlatformError(f"{what}: process exited during start-up\n{proc.log_tail()}")
        time.sleep(0.25)
    tail = f"\n{proc.log_tail()}" if proc is not None else ""
    raise PlatformError(f"{what}: not ready after {timeout:.0f}s{tail}")


def run(argv: Sequence[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a set-up command to completion; on failure raise with its output."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        out = (result.stdout + result.stderr).strip()[-4000:]
        raise PlatformError(f"{what} failed (exit {result.returncode}): {' '.join(argv)}\n{out}")
    return result


def apt_install(packages: Sequence[str], what: str) -> None:
    """Install Debian packages with apt-get (root only), without starting any of their services.

    The maintainer scripts of server packages (orthanc, prometheus) start a system daemon through
    invoke-rc.d. Without systemd that would be a stray process on the very ports the platform
    wants, with /etc's configuration and no pid file of ours, so the install runs under a
    policy-rc.d that denies every service action. A failed install is tried once more after
    ``apt-get update`` (a fresh image has no package lists). ``what`` names the component in
    the errors, which tell the operator what to run instead.
    """
    _require_apt(packages, what)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    with _services_denied():
        try:
            run(argv, f"installing {what}", env=env)
        except PlatformError:
            run(["apt-get", "update", "-q"], "apt-get update", env=env)
            run(argv, f"installing {what}", env=env)


def _require_apt(packages: Sequence[str], what: str) -> None:
    """Fail with the command to run by hand where this process cannot install (no apt, no root)."""
    command = f"apt-get install -y --no-install-recommends {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        raise PlatformError(
            f"{what} is not installed and there is no apt-get here; install the equivalent of: "
            f"{command}"
        )
    if os.geteuid() != 0:
        raise PlatformError(f"{what} is not installed and this is not root: {command}")


@contextlib.contextmanager
def _services_denied() -> Iterator[None]:
    """A policy-rc.d that denies every service action (exit 101) for the duration, then none.

    A machine that already has one keeps it: its own policy stands (Debian's container images
    ship one that denies with 101), and it is not ours to remove afterwards.
    """
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# beeldportaal: no services started by apt\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def http_ready(url: str) -> bool:
    """Whether ``url`` (a /readyz) answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False
