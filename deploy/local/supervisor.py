"""Keep one local service running: what `beeldportaal services up` (so `make up`) puts between
itself and each service, where a container platform has its kubelet or restart policy.

    python -m deploy.local.supervisor --name notify-worker --tag TAG -- python -m deploy.cli ...

- The service runs as this process's child, writing to the same log (stdout and stderr).
- A service that exits by itself (a worker's fatal error exits non-zero "so that its supervisor
  restarts it", see shared.stream; a crash; an OOM kill) is started again after a delay that
  doubles from ``--min-delay`` (1 s) to ``--max-delay`` (60 s), back to the shortest once a run
  lasted ``--steady`` (60 s). Every exit and restart is a line in the service's log.
- SIGTERM or SIGINT stops it: passed on to the service, which finishes what it has in hand
  (the workers commit their batch), and the supervisor exits with the service's status. A
  service is never restarted after that, nor while a stop is under way.

The supervisor is started in a session of its own (deploy.local.processes.ManagedProcess), so
the service is in its process group: a stop that has to resort to SIGKILL kills both.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

MIN_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 60.0
STEADY_SECONDS = 60.0


class Supervisor:
    """Run ``argv`` until stopped, starting it again whenever it exits by itself."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        min_delay: float = MIN_DELAY_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        steady: float = STEADY_SECONDS,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("nothing to supervise: the service's command line is empty")
        self.name = name
        self.argv = list(argv)
        self.min_delay, self.max_delay, self.steady = min_delay, max_delay, steady
        self.restarts = 0
        self._say = say or _say
        self._stopping = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Stop supervising and pass SIGTERM on to the running service (a signal handler)."""
        self._stopping.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Supervise until stopped; returns the exit status of the service's last run."""
        delay = self.min_delay
        status = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            self._child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
            if self._stopping.is_set():  # a stop that came while it was being started
                self._child.send_signal(signal.SIGTERM)
            status = self._child.wait()
            ran = time.monotonic() - started
            if self._stopping.is_set():
                break
            if ran >= self.steady:
                delay = self.min_delay
            self.restarts += 1
            self._say(
                f"{self.name} exited ({_describe(status)}) after {ran:.1f} s; starting it again "
                f"in {delay:g} s (restart {self.restarts})"
            )
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.max_delay)
        return status


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"status {status}"


def _say(message: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"{stamp} supervisor: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.supervisor")
    parser.add_argument("--name", required=True, help="the service's name, for the log")
    parser.add_argument("--tag", help="a label that makes this process recognisable")
    parser.add_argument("--min-delay", type=float, default=MIN_DELAY_SECONDS)
    parser.add_argument("--max-delay", type=float, default=MAX_DELAY_SECONDS)
    parser.add_argument("--steady", type=float, default=STEADY_SECONDS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the service's argv")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the service's command line after --")
    supervisor = Supervisor(
        args.name,
        command,
        min_delay=args.min_delay,
        max_delay=args.max_delay,
        steady=args.steady,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stop())
    status = supervisor.run()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
