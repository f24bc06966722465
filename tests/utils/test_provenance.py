"""run_info.json: config hash, seed, git state, versions, init checkpoint hash, command line."""
import hashlib
import json
import re
import subprocess
from datetime import datetime

import torch

from mae_det.config.pretrain import get_pretrain_cfg
from mae_det.utils.provenance import config_changes, config_sha256, cpu_model, git_state, machine_info, write_run_info


def test_write_run_info_fields(tmp_path):
    cfg = get_pretrain_cfg()
    init = tmp_path / "init.pth"
    init.write_bytes(b"weights")
    info = write_run_info(tmp_path / "out", cfg, seed=7, init_type="mae", init_checkpoint=init,
                          argv=["tools/x.py", "--flag"], extra={"note": "hi"})
    on_disk = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert on_disk == info
    assert info["config_sha256"] == hashlib.sha256(cfg.dump().encode()).hexdigest()
    assert info["seed"] == 7 and info["init_type"] == "mae" and info["note"] == "hi"
    assert info["init_checkpoint"] == str(init)
    assert info["init_checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert info["command"] == ["tools/x.py", "--flag"]
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["mae_det"]
    assert set(info["versions"]) >= {"torch", "torchvision", "timm", "detectron2", "mae_det", "python"}
    assert info["hostname"] and datetime.fromisoformat(info["time"]).tzinfo is not None
    assert info["machine"] == machine_info() and info["machine"]["cpu"] == cpu_model()
    assert info["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_cpu_model_reads_the_model_name_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9R14 96-Core Processor"


def test_cpu_model_falls_back_to_the_architecture(tmp_path):
    import platform

    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nmodel name\t:\n")  # aarch64 kernels leave it out or empty
    expected = platform.processor() or platform.machine()
    assert cpu_model(arm) == expected and cpu_model(tmp_path / "missing") == expected and expected


def test_config_hash_tracks_the_resolved_config():
    a, b = get_pretrain_cfg(), get_pretrain_cfg()
    assert config_sha256(a) == config_sha256(b)
    b.SOLVER.EPOCHS = 1
    assert config_sha256(a) != config_sha256(b)


def test_config_changes_name_each_changed_key_with_both_values():
    before = get_pretrain_cfg()
    after = before.clone()
    after.SOLVER.BASE_LR, after.DATA.SCALE, after.MODEL.MASK_RATIO = 3e-4, (0.5, 1.0), 0.75
    assert config_changes(before.dump(), before) == []
    assert config_changes(before.dump(), after) == [
        "DATA.SCALE: [0.2, 1.0] -> [0.5, 1.0]", f"SOLVER.BASE_LR: {before.SOLVER.BASE_LR} -> 0.0003"]
    older = before.dump().replace("  MASK_RATIO: 0.75\n", "")  # a key an earlier version did not have
    assert "MODEL.MASK_RATIO: (not set) -> 0.75" in config_changes(older, after)
    assert config_changes(None, after) == [] and config_changes("{unreadable: [", after) == []


def test_git_state_inside_and_outside_a_repository(tmp_path):
    inside = git_state()  # the mae_det sources
    assert inside["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", inside["commit"])
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "untracked": None}


def test_git_state_counts_untracked_files_apart_from_changes_to_tracked_ones(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("output/\n")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True, capture_output=True,
                          text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head) and git_state(tmp_path)["commit"] == head
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "log.txt").write_text("ignored\n")
    assert git_state(tmp_path)["dirty"] is False and git_state(tmp_path)["untracked"] == 0
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "head.py").write_text("y = 2\n")  # in an untracked folder: counted as a file
    assert {k: v for k, v in git_state(tmp_path).items() if k != "commit"} == {"dirty": False, "untracked": 1}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert {k: v for k, v in git_state(tmp_path).items() if k != "commit"} == {"dirty": True, "untracked": 1}


def test_missing_init_checkpoint_has_no_hash(tmp_path):
    info = write_run_info(tmp_path, get_pretrain_cfg(), seed=0, init_checkpoint=tmp_path / "absent.pth")
    assert info["init_checkpoint_sha256"] is None and info["init_type"] is None
