"""torch.compile in the training loops: same losses as eager, no recompiles after warm-up, interchangeable
checkpoints, and the eager fallback on a compile error.

Most tests use Dynamo with the ``aot_eager`` backend: the same graph capture, guards, recompiles and AOT-autograd
forward/backward split as Inductor, without its C++ compilation (tens of seconds per graph on a CPU); the Inductor
equality test is marked slow.
"""
import copy
import shutil

import pytest
import torch
from torch import nn
from detectron2.config import get_cfg

from mae_det.checkpoint import load_checkpoint
from mae_det.config.vit_backbone import add_vit_config
from mae_det.engine import compile as C
from mae_det.engine import finetune_cls as F
from mae_det.engine import pretrain as P
from mae_det.engine.det_trainer import backbone_compile_enabled
from tests.engine.test_finetune_cls import color_folders, tiny_cfg as cls_cfg
from tests.engine.test_pretrain import make_cfg, records, write_textures
from tests.modeling.test_backbone import build as build_backbone, tiny_cfg as backbone_cfg


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every model here is new: Dynamo's cache of earlier tests' models would count as recompiles."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_textures(tmp_path_factory.mktemp("compile_data") / "imgs", 32)


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler on this machine")


def _drawing_then_broken_backend(gm, example_inputs):
    torch.rand(8)  # Dynamo restores the global generator after a failed compile: the forward's draws count
    raise RuntimeError("no C++ compiler on this machine")


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        from torch._inductor.exc import CppCompileError

        raise CppCompileError(["c++"], "no C++ compiler on this machine")


def _backward_fails_backend(gm, example_inputs):
    """Runs the forward (drawing drop path from the global generator) and fails as a lazily compiled backward can."""
    def run(*args):
        return tuple(_FailingBackward.apply(o) if isinstance(o, torch.Tensor) and o.requires_grad else o
                     for o in gm(*args))
    return run


def _strict_after_first_step(monkeypatch):
    """From the second optimizer step on, any recompile raises instead of silently running eagerly."""
    real, calls = P.Pretrainer._optimizer_step, {"n": 0}

    def step(self):
        real(self)
        calls["n"] += 1
        if calls["n"] == 1:
            torch.compiler.set_stance("fail_on_recompile")

    monkeypatch.setattr(P.Pretrainer, "_optimizer_step", step)
    return calls


def test_resolve_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [C.resolve_compile(v, cpu) for v in ("auto", "on", "off")] == [False, True, False]
    assert [C.resolve_compile(v, cuda) for v in ("auto", "on", "off")] == [True, True, False]
    cfg = add_vit_config(get_cfg())
    assert not backbone_compile_enabled(cfg)  # auto on CPU
    cfg.MODEL.DEVICE, cfg.MODEL.VIT.SQUARE_PAD = "cuda", 1024
    assert backbone_compile_enabled(cfg)
    cfg.MODEL.VIT.SQUARE_PAD = 0  # unpadded inputs: every new size would recompile
    assert not backbone_compile_enabled(cfg)
    cfg.MODEL.DEVICE, cfg.MODEL.VIT.COMPILE = "cpu", "on"
    assert backbone_compile_enabled(cfg)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_pretrain_compiled_equals_eager_without_recompiles(images, tmp_path, monkeypatch, backend):
    for split in ("train", "val"):
        for cls, seed in (("a", 0), ("b", 50)):
            write_textures(tmp_path / "knn" / split / cls, 4, size=32, seed=seed + (split == "val"))
    opts = ["SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "4", "SOLVER.ACCUM_ITER", "2", "MONITOR.KNN.ENABLED", "True",
            "MONITOR.KNN.PERIOD", "1", "MONITOR.KNN.TRAIN_ROOT", str(tmp_path / "knn" / "train"),
            "MONITOR.KNN.VAL_ROOT", str(tmp_path / "knn" / "val"), "MONITOR.KNN.K", "3"]
    P.run_pretrain(make_cfg(images, tmp_path / "eager", *opts, "SOLVER.COMPILE", "off"))
    monkeypatch.setattr(C, "BACKEND", backend)
    steps = _strict_after_first_step(monkeypatch)
    # 8 optimizer steps of 2 micro-batches, a kNN monitor pass (eval mode, other batch size) after each epoch
    P.run_pretrain(make_cfg(images, tmp_path / "compiled", *opts, "SOLVER.COMPILE", "on"))
    assert steps["n"] == 8
    torch.compiler.set_stance("default")
    eager, compiled = (records(tmp_path / n, "train") for n in ("eager", "compiled"))
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    knn = [[r["knn_top1"] for r in records(tmp_path / n, "epoch")] for n in ("eager", "compiled")]
    assert knn[0] == knn[1]

    # checkpoints are interchangeable: same keys (no "_orig_mod."), and each side resumes the other's
    ce, cc = (load_checkpoint(tmp_path / n / "checkpoint_0002.pth")["model"] for n in ("eager", "compiled"))
    assert list(ce) == list(cc)
    assert all(torch.allclose(ce[k], cc[k], atol=1e-4) for k in ce)
    shutil.copytree(tmp_path / "compiled", tmp_path / "resumed")
    P.run_pretrain(make_cfg(images, tmp_path / "resumed", *opts, "SOLVER.EPOCHS", "3", "SOLVER.COMPILE", "off"),
                   resume=True)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint_0003.pth")["global_step"] == 12
    t = P.Pretrainer(make_cfg(images, tmp_path / "eager", *opts, "SOLVER.COMPILE", "on"))
    assert C.is_compiled(t.model) and t.load_last_checkpoint()
    assert all(torch.equal(v, ce[k]) for k, v in t.model.state_dict().items())


def test_pretrain_compile_error_redoes_the_first_step_eagerly(images, tmp_path, monkeypatch):
    opts = ["SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "4", "SOLVER.ACCUM_ITER", "2", "MODEL.DROP_PATH", "0.1"]
    P.run_pretrain(make_cfg(images, tmp_path / "eager", *opts, "SOLVER.COMPILE", "off"))
    monkeypatch.setattr(C, "BACKEND", _broken_backend)
    P.run_pretrain(make_cfg(images, tmp_path / "fallback", *opts, "SOLVER.COMPILE", "on"))
    warnings = [ln for ln in (tmp_path / "fallback" / "log.txt").read_text().splitlines() if "torch.compile" in ln]
    assert len(warnings) == 1 and "redoing that step eagerly" in warnings[0] and "no C++ compiler" in warnings[0]
    # the redone step is the eager step: same seeds, same batches, bit for bit
    a, b = (load_checkpoint(tmp_path / n / "checkpoint_0002.pth") for n in ("eager", "fallback"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["loss"] for r in records(tmp_path / "eager", "train")] == \
        [r["loss"] for r in records(tmp_path / "fallback", "train")]


def test_finetune_compiled_matches_eager_and_falls_back(tmp_path, monkeypatch, caplog):
    color_folders(tmp_path / "data", 8, 2)
    over = {"SOLVER.EPOCHS": 2, "AUG.RAND_AUGMENT": "", "MODEL.DROP_PATH": 0.0}
    real_compile, models = F.compile_in_place, []
    monkeypatch.setattr(F, "compile_in_place", lambda model: models.append(model) or real_compile(model))
    eager = F.finetune(cls_cfg(tmp_path / "data", tmp_path / "eager", **over, **{"SOLVER.COMPILE": "off"}),
                       progress=False)
    assert models == []
    monkeypatch.setattr(C, "BACKEND", "aot_eager")
    compiled = F.finetune(cls_cfg(tmp_path / "data", tmp_path / "compiled", **over, **{"SOLVER.COMPILE": "on"}),
                          progress=False)
    assert len(models) == 1 and C.is_compiled(models[0])  # trained compiled to the end: no fallback
    assert compiled["finetune_top1"] == eager["finetune_top1"]
    ke, kc = (load_checkpoint(tmp_path / n / "checkpoint_0002.pth")["model"] for n in ("eager", "compiled"))
    assert list(ke) == list(kc) and all(torch.allclose(ke[k], kc[k], atol=1e-4) for k in ke)
    torch._dynamo.reset()
    monkeypatch.setattr(C, "BACKEND", _broken_backend)
    with caplog.at_level("WARNING", logger="mae_det"):
        F.finetune(cls_cfg(tmp_path / "data", tmp_path / "fallback", **over, **{"SOLVER.COMPILE": "on"}),
                   progress=False)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "redoing that step eagerly" in warnings[0] and "no C++ compiler" in warnings[0]
    assert len(models) == 2 and not C.is_compiled(models[1])  # compiled, then back to eager
    kf = load_checkpoint(tmp_path / "fallback" / "checkpoint_0002.pth")["model"]
    assert all(torch.allclose(ke[k], kf[k], atol=1e-5) for k in ke)


def test_finetune_fallback_after_a_drawing_attempt_equals_eager_bit_for_bit(tmp_path, monkeypatch):
    # Before 2026-12-08 the redone step drew drop path from where the failed attempt left the generator.
    color_folders(tmp_path / "data", 8, 2)
    over = {"SOLVER.EPOCHS": 1, "AUG.RAND_AUGMENT": "", "MODEL.DROP_PATH": 0.2}
    F.finetune(cls_cfg(tmp_path / "data", tmp_path / "eager", **over, **{"SOLVER.COMPILE": "off"}), progress=False)
    monkeypatch.setattr(C, "BACKEND", _backward_fails_backend)
    F.finetune(cls_cfg(tmp_path / "data", tmp_path / "fallback", **over, **{"SOLVER.COMPILE": "on"}), progress=False)
    ke, kf = (load_checkpoint(tmp_path / n / "checkpoint_0001.pth")["model"] for n in ("eager", "fallback"))
    assert all(torch.equal(ke[k], kf[k]) for k in ke)


def test_compiled_backbone_same_features_and_keys(monkeypatch):
    eager, compiled = build_backbone(backbone_cfg()), build_backbone(backbone_cfg())
    keys = list(compiled.state_dict())
    monkeypatch.setattr(C, "BACKEND", "aot_eager")
    C.compile_in_place(compiled, dynamic=None)
    x = torch.randn(2, 3, 128, 128)
    a, b = eager(x), compiled(x)
    assert C.is_compiled(compiled) and a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    sum(v.sum() for v in b.values()).backward()
    assert all(p.grad is not None for p in compiled.parameters() if p.requires_grad)
    assert list(compiled.state_dict()) == keys and type(compiled) is type(eager)


def test_detection_step_trainer_redoes_a_failed_compiled_step_eagerly(monkeypatch, caplog):
    import copy
    import itertools

    from detectron2.utils.events import EventStorage

    from mae_det.engine.det_trainer import AutocastTrainer

    class Backbone(torch.nn.Module):  # a module of its own: torch 2.11's Dynamo skips compiling a bare nn.Linear
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    class Detector(torch.nn.Module):  # the trainer's contract: data list in, dict of losses out
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()

        def forward(self, data):  # dropout: the redone step must draw what the eager step draws
            x = nn.functional.dropout(torch.stack([d["x"] for d in data]), 0.5)
            return {"loss_x": self.backbone(x).pow(2).mean()}

    torch.manual_seed(0)
    model, data = Detector(), [{"x": torch.randn(4)} for _ in range(2)]
    eager = copy.deepcopy(model)
    monkeypatch.setattr(C, "BACKEND", _drawing_then_broken_backend)
    C.compile_in_place(model.backbone)
    trainers = [AutocastTrainer(m, itertools.repeat(data), torch.optim.SGD(m.parameters(), lr=0.1), compiled=c)
                for m, c in ((model, model.backbone), (eager, None))]
    with EventStorage(0):
        for t in trainers:
            t.iter = 0
            torch.manual_seed(1)  # as the seeded-draws hook does before every step
            t.run_step()
    assert not C.is_compiled(model.backbone) and trainers[0].unproven_compiled is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    assert [r.message for r in caplog.records if "torch.compile failed" in r.message]


def test_reduce_overhead_mode_reaches_inductor_and_matches_eager_on_cpu(monkeypatch):
    # CUDA graphs are CUDA-only: on a CPU Inductor skips them and the mode compiles as the default, same numbers
    monkeypatch.setattr(C, "BACKEND", "inductor")
    real_compile, options = torch.compile, []

    def compile(*args, **kwargs):  # what nn.Module.compile hands torch.compile
        options.append(kwargs)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    compiled = copy.deepcopy(eager)
    C.compile_in_place(compiled, mode="reduce-overhead")
    assert options == [{"backend": "inductor", "dynamic": False, "mode": "reduce-overhead"}]
    assert C.is_compiled(compiled) and list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(3, 8)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for pe, pc in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6)
