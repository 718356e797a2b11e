"""Run a module under cProfile and write the profile when it ends, SIGTERM included.

    python -m benchmarks.profiled OUT.prof MODULE [ARGS...]

``python -m cProfile`` loses the profile of a server stopped by SIGTERM: uvicorn re-raises the
signal after its graceful shutdown, and the default action ends the process before cProfile
writes. Here SIGTERM's handler (which uvicorn restores before re-raising) writes the profile
first. Only the main thread is profiled (the event loop; not the I/O thread pools).
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
from types import FrameType


def main() -> None:
    out, module, *args = sys.argv[1:]
    profile = cProfile.Profile()

    def write_and_exit(signum: int, _frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(out)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, write_and_exit)
    sys.argv = [module, *args]
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
