"""The registration-check benchmark (mae_det.bench.data) on a few files: its generated data passes the check."""
import json

import pytest
from PIL import Image

from mae_det.bench.data import (
    format_cache_report, format_loader_report, format_report, make_dataset, run, time_decoded_cache, time_train_loaders,
    train_loader,
)


def test_generated_dataset_declares_sizes_as_read(tmp_path):
    ann = make_dataset(tmp_path, 21, (12, 8))
    images = json.loads(ann.read_text())["images"]
    rotated = [i for i in images if (i["width"], i["height"]) == (8, 12)]
    assert [i["file_name"] for i in rotated] == ["000000.jpg", "000020.jpg"]  # EXIF-rotated: declared as read
    with Image.open(tmp_path / "images" / "000020.jpg") as im:
        assert im.size == (12, 8) and im.getexif()[0x0112] == 6
    assert sum(i["file_name"].endswith(".png") for i in images) == 10


def test_run_times_both_checks_and_extrapolates(tmp_path):
    result = run(tmp_path, header_images=12, decode_images=3, decode_size=(32, 24))
    assert result["header"]["images"] == 12 and result["decode"]["images"] == 3
    assert all(result[k][t] > 0 for k in ("header", "decode") for t in ("check_s", "parse_s"))
    report = format_report(result)
    assert "COCO train2017, 118,287 images" in report and "COCO val2017, 5,000 images" in report


def test_train_loader_timing_covers_both_loaders_and_worker_counts(tmp_path):
    ann = make_dataset(tmp_path, 6, (64, 48), png=False)
    result = time_train_loaders(ann, tmp_path / "images", batches=2, workers=(0, 1), rounds=1, image_size=64)
    assert set(result["s_per_batch"]) == {"detectron2_w0", "detectron2_w1", "seeded_w0", "seeded_w1"}
    assert all(t > 0 for t in result["s_per_batch"].values())
    ratio = result["seeded_over_detectron2"]["w0"]
    assert ratio == result["s_per_batch"]["seeded_w0"] / result["s_per_batch"]["detectron2_w0"]
    assert "0 loader worker(s): Detectron2's loader" in format_loader_report(result)


def test_both_timed_loaders_read_the_same_images_in_the_same_order(tmp_path):
    ann = make_dataset(tmp_path, 12, (64, 48), png=False)

    def files(seeded):
        it = iter(train_loader(ann, tmp_path / "images", seeded=seeded, workers=0, batch_size=2, image_size=64))
        return [[d["file_name"] for d in next(it)] for _ in range(6)]

    assert files(False) == files(True)


def test_decoded_cache_timing_compares_both_reads_on_the_same_batches(tmp_path):
    ann = make_dataset(tmp_path, 12, (20, 20))
    result = time_decoded_cache(ann, tmp_path / "images", batches=3, rounds=2, batch_size=4, img_size=16)
    assert result["identical"] is True and (result["images"], result["batches"], result["rounds"]) == (12, 3, 2)
    assert set(result["s_per_batch"]) == {"decode", "cache"} and all(v > 0 for v in result["s_per_batch"].values())
    assert result["cache_over_decode"] == result["s_per_batch"]["cache"] / result["s_per_batch"]["decode"]
    assert "identical tensors: True" in format_cache_report(result)


def _tool():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "benchmark_data_tool", Path(__file__).resolve().parents[2] / "tools" / "benchmark_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_a_check_count_of_zero_skips_that_check(tmp_path, capsys):
    # --header-check 0 was a ZeroDivisionError once every other timing had run
    _tool().main(["--header-check", "0", "--decode-check", "2", "--decode-size", "32", "24", "--root", str(tmp_path)])
    *report, last = capsys.readouterr().out.strip().splitlines()
    result = json.loads(last)
    assert "header" not in result and result["decode"]["images"] == 2
    assert report[0].startswith("full decode (test sets): 2 images (32x24 JPEG)") and len(report) == 2
    assert format_report(run(tmp_path / "h", 3, 0, (32, 24))).startswith("header check (training sets): 3 images")


@pytest.mark.parametrize("args,message", [
    (["--header-check", "-1"], "--header-check: expected >= 0 (0: skip), got -1"),
    (["--decode-check", "-5"], "--decode-check: expected >= 0 (0: skip), got -5"),
    (["--decode-size", "0", "0"], "--decode-size: expected at least 1, got 0 0"),  # was a ValueError traceback
    (["--decoded-cache", "2", "--cache-size", "0"], "--cache-size: expected at least 1, got 0"),
    (["--loader-workers", "-1"], "--loader-workers: expected >= 0, got -1"),
    (["--decode-check", "0", "--train-loader", "2"],
     "--train-loader: times batches of the --decode-check images, but --decode-check is 0"),
    (["--header-check", "0", "--decode-check", "0"],
     "nothing to time: --header-check, --decode-check and --decoded-cache are all 0"),
])
def test_bad_counts_are_usage_errors_before_any_timing(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        _tool().parse_args(args)
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_a_reused_root_times_only_the_images_of_this_run(tmp_path, capsys):
    """--decoded-cache listed the folder: a second run with fewer --cache-images timed the first run's files too."""
    for n in (40, 10):
        _tool().main(["--header-check", "0", "--decode-check", "1", "--decode-size", "32", "24", "--decoded-cache",
                      "1", "--cache-images", str(n), "--cache-size", "16", "--root", str(tmp_path)])
    *report, last = capsys.readouterr().out.strip().splitlines()
    assert json.loads(last)["decoded_cache"]["images"] == 10
    assert report[-1].startswith("pretraining batches of 16 at 64 px from 10 files,")
