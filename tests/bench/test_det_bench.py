"""The detection benchmark's measuring plumbing (mae_det.bench.det): CUDA device of the memory and timing calls,
and the labels of the compiled model's first-iteration rows."""
import pytest
import torch

from mae_det.bench import det


def test_peak_memory_and_timing_act_on_the_benchmarked_cuda_device(monkeypatch):
    """--device cuda:1: torch.cuda's calls without a device act on the current one (cuda:0), so each must name it.
    The recorders stand in for torch.cuda on a machine without a GPU: what is checked is the argument we pass."""
    calls = []

    def recorder(name, value=None):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return value
        return call

    for name, value in (("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 2**20),
                        ("max_memory_allocated", 5 * 2**20)):
        monkeypatch.setattr(torch.cuda, name, recorder(name, value))
    with det.PeakMemory("cuda:1") as mem:
        det._timed(lambda: None, "cuda:1")
    assert mem.mb == 4.0
    assert [name for name, *_ in calls] == ["synchronize", "reset_peak_memory_stats", "memory_allocated",
                                            "synchronize", "synchronize", "synchronize", "max_memory_allocated"]
    assert all(args == (torch.device("cuda", 1),) and not kwargs for _, args, kwargs in calls)


@pytest.mark.slow
def test_first_iteration_rows_say_whether_dynamo_compiled_in_them(monkeypatch):
    """The training iteration's backbone runs the graph the backbone step compiled (same shapes, grad mode): its
    first iteration was called "incl. compile" with no compile in it. Inference (no grad) does compile anew."""
    monkeypatch.setattr("mae_det.engine.compile.BACKEND", "aot_eager")  # Dynamo's capture, no C++ builds
    torch._dynamo.reset()
    results = det.run_benchmark(det.BenchmarkSettings(img_size=64, iters=1, quick=True, compile=True),
                                log=lambda msg: None)
    firsts = [k for k in results if k.startswith("first ")]
    assert firsts == ["first backbone fwd+bwd incl. compile, ours compiled (s)",
                      "first train iteration (no compile: graphs reused), ours compiled (s)",
                      "first inference incl. compile, ours compiled (s)"]
    assert all(results[k]["ours"] > 0 and results[k]["theirs"] > 0 for k in firsts)
