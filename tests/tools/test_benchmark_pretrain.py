"""tools/benchmark_pretrain.py --quick, and the all-tokens baseline it compares MAE against."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_det.modeling import MaskedAutoencoderViT
from mae_det.bench.pretrain import AllTokensMAE
from mae_det.utils.precision import bf16_native
from mae_det.utils.flops import count_forward_macs

ROOT = Path(__file__).resolve().parents[2]


def tiny_mae() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def test_quick_run_prints_table_and_json():
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    text = "\n".join(lines[:-1])
    assert f"CPU capability: {torch.backends.cpu.get_cpu_capability()}" in text
    assert "bf16 native:" in text and "matmul peak: fp32" in text and "3 x 2 x forward multiply-adds" in text
    assert "skipped fp16: fp16 autocast with a gradient scaler is a GPU recipe" in text
    precisions = ["fp32", "bf16"] if bf16_native("cpu") else ["fp32"]
    if not bf16_native("cpu"):
        assert "skipped bf16: no native bf16" in text
    rows = {(r["variant"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {(v, p) for v in ("visible-only", "all-tokens") for p in precisions}
    for (variant, precision), r in rows.items():
        assert any(line.startswith(f"{variant:<14}{precision:<11}") for line in lines), (variant, precision)
        assert r["images_per_s"] > 0 and 0 < r["mfu"] and r["achieved_gflops"] > 0
        assert abs(r["images_per_s"] * r["ms_per_step"] / 1e3 - result["batch_size"]) < 1e-6
    # All-tokens runs the whole sequence through both halves: more work per image than visible-only.
    gflop = {v: rows[(v, "fp32")]["train_gflop_per_image"] for v in ("visible-only", "all-tokens")}
    assert gflop["all-tokens"] > gflop["visible-only"]
    assert set(result["speedups"]["visible_vs_all_tokens"]) == set(precisions)
    assert ("bf16_vs_fp32" in result["speedups"]) == bf16_native("cpu")


def test_all_tokens_encoder_never_sees_masked_pixels():
    mae = tiny_mae()
    model = AllTokensMAE(mae).eval()
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    _, pred, mask = model(imgs, 0.75)
    assert mask.sum(1).tolist() == [12.0, 12.0] and pred.shape == (2, 16, 192)
    changed = imgs.clone()
    removed = mae.unpatchify(mask[..., None].expand(-1, -1, 192)).bool()
    changed[removed] += 3.0
    torch.manual_seed(1)
    _, pred2, mask2 = model(changed, 0.75)
    torch.testing.assert_close(mask2, mask, atol=0, rtol=0)
    torch.testing.assert_close(pred2, pred, atol=1e-5, rtol=1e-5)
    changed[~removed] += 3.0
    torch.manual_seed(1)
    assert not torch.allclose(model(changed, 0.75)[1], pred, atol=1e-3)


def test_all_tokens_counts_full_sequence_attention_and_trains_its_mask_token():
    mae = tiny_mae()
    model = AllTokensMAE(mae)
    report = count_forward_macs(model, torch.randn(1, 3, 32, 32), mask_ratio=0.75)
    assert report.attention_macs == 2 * 2 * 17 * 17 * 64 + 2 * 17 * 17 * 32
    loss = model(torch.randn(2, 3, 32, 32), 0.75)[0]
    loss.backward()
    assert model.encoder_mask_token.grad.abs().sum() > 0 and mae.blocks[0].attn.qkv.weight.grad is not None


def test_a_sigterm_prints_the_rows_measured_so_far():
    """scripts/gpu_benchmark.sh's `timeout` sends SIGTERM: the rows measured before it are printed, not lost."""
    import signal

    proc = subprocess.Popen([sys.executable, "tools/benchmark_pretrain.py", "--model", "mae_vit_tiny_patch16",
                             "--img-size", "32", "--batch-size", "2", "--iters", "300", "--warmup", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # logged when the first row (visible-only fp32, seconds of steps) is done
        if line.startswith("timing all-tokens fp32"):
            break
    proc.send_signal(signal.SIGTERM)  # during the second row
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    *table, last = out.strip().splitlines()
    result = json.loads(last)
    assert result["interrupted"] is True
    assert [(r["variant"], r["precision"]) for r in result["rows"]] == [("visible-only", "fp32")]
    assert result["speedups"] == {"visible_vs_all_tokens": {}}
    text = "\n".join(table)
    assert "STOPPED by a signal after 1 row(s)" in text and any(line.startswith("visible-only  fp32") for line in table)


def test_precisions_and_compile_mode_select_the_rows(tmp_path):
    # aot_eager: Dynamo's capture without Inductor's C++ builds; the mode is Inductor's and is left out there
    env = {**__import__("os").environ, "MAE_DET_COMPILE_BACKEND": "aot_eager"}
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--quick", "--precisions", "fp32",
                           "--compile-modes", "reduce-overhead"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    *table, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["compile_mode"] == "reduce-overhead" and result["skipped"] == {}
    assert [(r["variant"], r["precision"]) for r in result["rows"]] == [("visible-only", "fp32"),
                                                                       ("all-tokens", "fp32")]
    assert "| torch.compile mode reduce-overhead" in table[2]
    for bad, why in ((["--precisions", "fp8"], "error: precisions: expected some of ('fp32', 'bf16', 'fp16'), "
                      "got ['fp8']"),
                     (["--compile-modes", "max-autotune"], "error: compile mode: expected one of ('default', "
                      "'reduce-overhead'), got 'max-autotune'"),
                     (["--compile-modes", "default,reduce-overhead"], "--compile-modes: one mode without "
                      "--against-official, got default,reduce-overhead")):
        proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--quick", *bad], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == why


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_pretrain_tool", ROOT / "tools" / "benchmark_pretrain.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_against_official_takes_the_architecture_of_model():
    from mae_det.bench.pretrain import mae_arch
    from mae_det.modeling import MAE_FACTORIES

    mae = MAE_FACTORIES["mae_vit_tiny_patch16"](img_size=32)
    assert mae_arch("mae_vit_tiny_patch16") == dict(
        patch_size=mae.patch_size, embed_dim=mae.embed_dim, depth=len(mae.blocks),
        num_heads=mae.blocks[0].attn.num_heads, decoder_embed_dim=mae.decoder_embed.out_features,
        decoder_depth=len(mae.decoder_blocks), decoder_num_heads=mae.decoder_blocks[0].attn.num_heads)
    assert mae_arch("mae_vit_huge_patch14") == dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def test_counts_below_one_are_usage_errors(capsys):
    tool = _tool()
    for args, message in ((["--batch-size", "0"], "--batch-size: expected >= 1, got 0"),  # was a ZeroDivisionError
                          (["--iters", "0"], "--iters: expected >= 1, got 0"),
                          (["--warmup", "-1"], "--warmup: expected >= 0, got -1"),
                          (["--against-official", "x", "--rounds", "0"], "--rounds: expected >= 1, got 0")):
        with pytest.raises(SystemExit) as e:
            tool.parse_args(args)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
    assert tool.parse_args(["--batch-size", "1", "--warmup", "0"]).batch_size == 1


def test_a_mask_ratio_outside_0_1_is_a_usage_error(capsys):
    # was rejected by the model only after the matmul peaks had been measured
    for ratio in ("1.0", "-0.1"):
        with pytest.raises(SystemExit) as e:
            _tool().parse_args(["--mask-ratio", ratio])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"error: --mask-ratio: expected a value in [0, 1), got {float(ratio)}")


def test_no_runnable_precision_is_an_error_naming_why(capsys):
    """--precisions fp16 on a CPU skipped every row and printed an empty table with exit 0."""
    with pytest.raises(SystemExit) as e:
        _tool().main(["--quick", "--precisions", "fp16"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: precisions: none of ['fp16'] runs on cpu: fp16: fp16 autocast with a gradient scaler is a GPU recipe")


def test_a_sigterm_during_the_matmul_peak_still_prints_a_report():
    """The time limit can land before the first row (matmul peak, model build, FLOP count): still a report, exit 0."""
    import signal

    proc = subprocess.Popen([sys.executable, "tools/benchmark_pretrain.py", "--precisions", "fp32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the peak runs 2048 and 4096 px products for at least 1 s each
        if line.startswith("measuring fp32 matmul peak"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    *table, last = out.strip().splitlines()
    result = json.loads(last)
    assert result["interrupted"] is True and result["rows"] == [] and result["matmul_peak_gflops"] == {}
    assert "matmul peak: not measured" in table and "STOPPED by a signal after 0 row(s)" in "\n".join(table)


def test_an_interrupt_while_counting_flops_keeps_the_peaks(monkeypatch):
    from mae_det.bench import pretrain

    def interrupted(*args, **kwargs):  # the SIGTERM handler raises this wherever the main thread is
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "count_forward_macs", interrupted)
    try:
        result = pretrain.run_benchmark(**{**_tool().QUICK, "precisions": ("fp32",)})
    except KeyboardInterrupt:  # uncaught, it would end the pytest session rather than fail the test
        pytest.fail("the interrupt escaped run_benchmark: no report")
    assert result["interrupted"] is True and result["rows"] == [] and list(result["matmul_peak_gflops"]) == ["fp32"]
    assert "STOPPED by a signal after 0 row(s)" in pretrain.format_report(result)
