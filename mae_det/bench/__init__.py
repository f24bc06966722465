"""Speed benchmarks (pretraining step, detection backbone and iteration): applications above engine/ and modeling/."""

import signal


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. from ``timeout`` in scripts/gpu_benchmark.sh) raises KeyboardInterrupt in the main thread, so a
    benchmark stopped at its time limit can still print what it measured."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
