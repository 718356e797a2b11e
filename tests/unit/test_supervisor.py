"""The local supervisor: a service that exits by itself is started again, with growing delays;
a stop is passed on to the service and ends the supervising."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from deploy.local.processes import ManagedProcess
from deploy.local.supervisor import Supervisor

# Counts its runs in a file; exits with status 3 on its first ``crashes`` runs, then runs until
# SIGTERM (exit 0), or ignores SIGTERM when asked to.
SERVICE = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    runs, crashes, stubborn = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    n = int(runs.read_text()) if runs.exists() else 0
    runs.write_text(str(n + 1))
    if n < crashes:
        sys.exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else (lambda *_: sys.exit(0)))
    pathlib.Path(sys.argv[1] + ".up").write_text(str(n + 1))
    while True:
        time.sleep(0.05)
    """
)


def service(tmp_path: Path, crashes: int, stubborn: bool = False) -> list[str]:
    runs = tmp_path / "runs"
    return [sys.executable, "-c", SERVICE, str(runs), str(crashes), "1" if stubborn else "0"]


def wait_for(check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def supervised_until(supervisor: Supervisor, check) -> int | None:  # type: ignore[no-untyped-def]
    """Run ``supervisor`` in a thread until ``check()`` holds, stop it; its run's result."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()))
    thread.start()
    try:
        wait_for(check)
    finally:
        supervisor.stop()
        thread.join(20)
    assert not thread.is_alive()
    return result[0] if result else None


def delays(said: list[str]) -> list[str]:
    return [re.search(r"in ([0-9.]+) s", line).group(1) for line in said]  # type: ignore[union-attr]


def test_a_service_that_exits_by_itself_is_started_again_until_it_stays_up(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    supervisor = Supervisor("svc", service(tmp_path, crashes=2), min_delay=0.01, say=said.append)
    runs = tmp_path / "runs"
    status = supervised_until(
        supervisor, lambda: (tmp_path / "runs.up").exists() and runs.read_text() == "3"
    )
    assert status == 0  # the service's own status after the stop
    assert supervisor.restarts == 2
    assert all("svc exited (status 3)" in line for line in said)
    assert [re.search(r"restart (\d+)", line).group(1) for line in said] == ["1", "2"]  # type: ignore[union-attr]
    assert (tmp_path / "runs").read_text() == "3"  # not started again after the stop


def test_the_delay_doubles_up_to_its_maximum_and_a_steady_run_resets_it(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = Supervisor(
        "svc", service(tmp_path, crashes=99), min_delay=0.01, max_delay=0.04, say=said.append
    )
    supervised_until(supervisor, lambda: len(said) >= 5)
    assert [float(d) for d in delays(said)][:5] == [0.01, 0.02, 0.04, 0.04, 0.04]

    said.clear()
    steady = Supervisor(
        "svc", service(tmp_path, crashes=99), min_delay=0.01, steady=0.0, say=said.append
    )
    supervised_until(steady, lambda: len(said) >= 3)
    assert set(delays(said)) == {"0.01"}


def test_sigterm_to_the_supervisor_process_stops_the_service_and_nothing_restarts(
    tmp_path: Path,
) -> None:
    command = [
        *(sys.executable, "-m", "deploy.local.supervisor", "--name", "svc"),
        *("--min-delay", "0.01", "--", *service(tmp_path, crashes=1)),
    ]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    wait_for((tmp_path / "runs.up").exists)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "svc exited (status 3)" in err and "restart 1" in err
    assert (tmp_path / "runs").read_text() == "2"


def test_a_stop_that_must_kill_takes_the_supervised_service_with_it(tmp_path: Path) -> None:
    managed = ManagedProcess(
        "svc", tmp_path / "svc.pid", tmp_path / "svc.log", marker=str(tmp_path / "marker")
    )
    managed.start(
        [
            *(sys.executable, "-m", "deploy.local.supervisor", "--name", "svc"),
            *("--tag", managed.marker, "--", *service(tmp_path, crashes=0, stubborn=True)),
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    wait_for((tmp_path / "runs.up").exists)
    children = Path(f"/proc/{managed.pid()}/task/{managed.pid()}/children").read_text().split()
    assert len(children) == 1
    child = int(children[0])

    assert managed.stop(timeout=1.0)  # the service ignores SIGTERM: SIGKILL for the group

    wait_for(lambda: not _alive(child), timeout=10)
    assert not managed.running()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("argv", [[], ["--"]])
def test_a_supervisor_needs_a_command_line(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy.local.supervisor", "--name", "svc", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "command line" in result.stderr
