"""The SEEDED_DRAWS train loader: batches depend on (seed, rank, iteration) only, not on workers or restarts."""
import itertools
import random

import numpy as np
import pytest
import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from torch.utils.data import get_worker_info

from mae_det.config.detection import recorded_seed
from mae_det.data.detection import DatasetError
from mae_det.data.seeded_loader import SeededBatches, build_seeded_train_loader
from mae_det.data.seeding import sample_seed


def _dataset(n=10):
    # every third image is wide, the others tall or square
    return [{"file_name": f"{i}.png", "width": 80 if i % 3 == 0 else 64, "height": 64, "index": i} for i in range(n)]


def _draws(d):
    """A mapper drawing from all three global generators, as Detectron2's and torchvision's transforms do; it
    notes the loader worker that mapped the sample (None: the main process)."""
    worker = get_worker_info()
    return {"index": d["index"], "np": float(np.random.rand()), "py": random.random(), "torch": float(torch.rand(())),
            "worker": None if worker is None else worker.id}


def _batches(loader, n, mapped_by=None):
    """The first ``n`` batches' draws; ``mapped_by`` gets the set of workers that mapped each batch."""
    batches = list(itertools.islice(loader, n))
    if mapped_by is not None:
        mapped_by += [{s["worker"] for s in batch} for batch in batches]
    return [[(s["index"], s["np"], s["py"], s["torch"]) for s in batch] for batch in batches]


def _loader(num_workers=0, mapper=_draws, seed=3, dataset=None):
    return build_seeded_train_loader(dataset or _dataset(), TrainingSampler(10, seed=seed), mapper, batch_size=3,
                                     seed=seed, rank=0, group_by_aspect=True, num_workers=num_workers)


def test_plan_groups_by_aspect_and_reads_no_image():
    batches = SeededBatches(_dataset(), TrainingSampler(10, seed=3), _draws, batch_size=3, seed=3, rank=0,
                            group_by_aspect=True)
    stream = list(itertools.islice(iter(TrainingSampler(10, seed=3)), 60))
    plan = list(itertools.islice(batches.plan(), 12))
    for batch in plan:
        assert len(batch) == 3 and len({i % 3 == 0 for _, i in batch}) == 1  # one aspect group per batch
        assert all(stream[p] == i for p, i in batch)  # positions index the sampler's stream
    positions = [p for batch in plan for p, _ in batch]
    assert len(set(positions)) == len(positions)
    ungrouped = SeededBatches(_dataset(), TrainingSampler(10, seed=3), _draws, batch_size=3, seed=3, rank=0,
                              group_by_aspect=False)
    assert [[i for _, i in b] for b in itertools.islice(ungrouped.plan(), 4)] == [stream[k:k + 3] for k in range(0, 12, 3)]


def test_grouping_needs_width_and_height():
    with pytest.raises(DatasetError, match="needs every dataset dict's width and height; b.png has none"):
        SeededBatches([{"file_name": "a.png", "width": 1, "height": 1}, {"file_name": "b.png"}],
                      TrainingSampler(2, seed=0), _draws, batch_size=1, seed=0, rank=0, group_by_aspect=True)


def test_batches_do_not_depend_on_workers_and_a_restart_continues_them():
    in_main, in_workers, after_restart = [], [], []
    ref = _batches(_loader(), 8, in_main)
    assert _batches(_loader(num_workers=2), 8, in_workers) == ref
    resumed = _loader(num_workers=2)
    resumed.dataset.start = 5
    assert _batches(resumed, 3, after_restart) == ref[5:]
    # worker w of 2 maps whole batches w, w + 2, ... counted from the restart
    assert in_main == [{None}] * 8 and in_workers == [{0}, {1}] * 4 and after_restart == [{0}, {1}, {0}]
    assert _batches(_loader(seed=4), 8) != ref
    # one sample's draws differ from the next one's: each is seeded by its own position
    assert len({s[1] for batch in ref for s in batch}) == 24


def test_mapping_leaves_the_callers_generators_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = torch.rand(()), np.random.rand(), random.random()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    _batches(_loader(), 2)
    assert (torch.rand(()), np.random.rand(), random.random()) == expected


def test_unusable_images_are_replaced_by_the_samples_own_draw():
    def mapper(d):
        return None if d["index"] in (2, 7) else _draws(d)

    mapped_by = []
    a, b = _batches(_loader(mapper=mapper), 10), _batches(_loader(num_workers=2, mapper=mapper), 10, mapped_by)
    assert a == b and mapped_by == [{0}, {1}] * 5
    assert all(s[0] not in (2, 7) for batch in a for s in batch)
    with pytest.raises(RuntimeError, match="64 training images in a row could not be used"):
        _batches(_loader(mapper=lambda d: None), 1)


def test_sample_seed_keeps_the_three_key_digest():
    assert sample_seed(0, 3, 7) == 5064768637123383963  # the pretraining draws of every committed run
    assert len({sample_seed(0, 1, 2), sample_seed(0, 1, 2, -1), sample_seed(0, 2, 1), sample_seed(1, 1, 2)}) == 4


def test_a_resumed_run_reuses_the_recorded_seed(tmp_path):
    assert recorded_seed(str(tmp_path)) is None
    (tmp_path / "config.yaml").write_text("SEED: 1234\nOUTPUT_DIR: x\n")
    assert recorded_seed(str(tmp_path)) == 1234
    (tmp_path / "config.yaml").write_text("SEED: -1\n")
    assert recorded_seed(str(tmp_path)) is None
    (tmp_path / "config.yaml").write_text("[not, a, mapping")
    assert recorded_seed(str(tmp_path)) is None


def test_a_repeat_factor_sampler_streams_the_same_way_each_time():
    factors = torch.tensor([1.0, 3.0, 1.0, 0.5] * 3)  # LVIS-style: rare images drawn more often
    batches = SeededBatches(_dataset(12), RepeatFactorTrainingSampler(factors, seed=5), _draws, batch_size=3,
                            seed=5, rank=0, group_by_aspect=True)
    first = list(itertools.islice(batches.plan(), 20))
    assert first == list(itertools.islice(batches.plan(), 20))
    counts = np.bincount([i for batch in first for _, i in batch], minlength=12)
    assert counts[1::4].sum() > counts[0::4].sum()  # repeat factor 3 vs 1
