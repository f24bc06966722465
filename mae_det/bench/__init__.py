"""Speed benchmarks (pretraining step, detection backbone and iteration): applications above engine/ and modeling/."""

import signal


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. from ``timeout`` in scripts/gpu_benchmark.sh) raises KeyboardInterrupt in the main thread, so a
    benchmark stopped at its time limit can still print what it measured."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def error_line(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters: how a benchmark table names a
    variant that failed (a compile error's message runs to many lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]
