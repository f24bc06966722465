#!/usr/bin/env python
"""Train or evaluate Mask / Cascade R-CNN or UperNet semantic segmentation with the ViT backbone from a yacs config.

    python tools/train_net.py --config-file configs/COCO/mask_rcnn_vit_b_mae.yaml --num-gpus 8 \\
        MODEL.WEIGHTS mae_pretrain_vit_base.pth
    python tools/train_net.py --config-file configs/COCO/mask_rcnn_vit_b_mae.yaml --resume       # continue
    python tools/train_net.py --config-file configs/COCO/mask_rcnn_vit_b_mae.yaml --eval-only \\
        MODEL.WEIGHTS output/coco/vit_b_mae/model_final.pth

OUTPUT_DIR receives config.yaml, run_info.json, log.txt, metrics.json, TensorBoard events, model_*.pth +
last_checkpoint, inference/ and ap_results.json (COCO datasets) or sem_seg_results.json (semantic datasets:
mIoU, fwIoU, mean and pixel accuracy, per-class IoU; the evaluator follows the dataset's evaluator_type).
Without a GPU, MODEL.DEVICE falls back to cpu and
``--num-gpus N`` starts N CPU processes (gloo). Exit codes: 0 done, 2 bad config / dataset / checkpoint (one
``error:`` line), 3 training stopped on a non-finite loss (the last checkpoint is kept).
"""
import contextlib
import functools
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from detectron2.engine import default_argument_parser, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from mae_det.config.detection import load_det_cfg, setup_det_cfg  # noqa: E402
from mae_det.data.detection import register_datasets  # noqa: E402
from mae_det.config.pretrain import ConfigError  # noqa: E402
from mae_det.data.semantic import check_task_datasets, is_semantic, register_sem_seg_datasets  # noqa: E402
from mae_det.engine.det_trainer import (  # noqa: E402
    RANK_ERRORS_ENV, Trainer, completed_iterations, load_trained, rank_errors, run_with_exit_codes,
    write_det_run_info,
)
from mae_det.engine.launch import (  # noqa: E402
    check_launch_args, clear_file_store, init_detectron2_distributed, launched_externally, output_dir_lock,
    threads_per_process,
)
from mae_det.engine.pretrain import describe_rank_failure  # noqa: E402
from mae_det.utils.dist import leave_process_group  # noqa: E402


def main(args):
    if args.eval_only:  # an evaluation may run beside the training it evaluates
        return train_or_evaluate(args)
    # Held by the main process from before any rank writes into OUTPUT_DIR (config.yaml, log.txt, log.txt.rank<n>);
    # a refusal reaches every rank before it does.
    with contextlib.ExitStack() as held:
        refused = None
        if comm.is_main_process():
            try:
                held.enter_context(output_dir_lock(load_det_cfg(args.config_file, args.opts).OUTPUT_DIR, sys.argv))
            except ConfigError as e:
                refused = str(e)
        refused = comm.all_gather(refused)[0]
        if refused is not None:
            raise ConfigError(refused)
        return train_or_evaluate(args)


def train_or_evaluate(args):
    cfg = setup_det_cfg(args)
    register_sem_seg_datasets(cfg, training=not args.eval_only)
    register_datasets(cfg, training=not args.eval_only)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        extra = load_trained(cfg, model, "--eval-only", resume=args.resume,
                             how=", or add --resume to evaluate the last checkpoint of OUTPUT_DIR")
        if comm.is_main_process():  # only once the weights are known to be a trained model
            write_det_run_info(cfg, eval_only=True)
        results = Trainer.test(cfg, model, iteration=completed_iterations(extra))
    else:
        if comm.is_main_process():
            write_det_run_info(cfg, eval_only=False)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    leave_process_group()
    return results


def rank_main(threads, args):
    """:func:`main` in one spawned process, with its share of the cores (Detectron2's launch sets none)."""
    torch.set_num_threads(threads)
    return main(args)


def check_datasets(cfg, training=True):
    """Dataset paths and every test image (also checked by tools/submit.py before it submits a job); without
    ``training`` (``--eval-only``) the test sets only."""
    register_sem_seg_datasets(cfg, decode_test_sets=True, training=training)
    register_datasets(cfg, decode_test_sets=True, training=training)
    check_task_datasets(cfg)


def check_batch_norm_batch(cfg, processes):
    """Refuses unsynchronized BatchNorm in the semantic head with one image per process and step: the 1x1 bin of
    POOL_SCALES then batch-normalizes one value per channel, which fails at the first step (the single-process
    case, one image a step, is refused at config load: :func:`~mae_det.config.semantic.validate_sem_seg_config`)."""
    h = cfg.MODEL.SEM_SEG_HEAD
    per_process = cfg.SOLVER.IMS_PER_BATCH // processes
    if is_semantic(cfg) and h.NORM == "BN" and 1 in h.POOL_SCALES and per_process == 1 and processes > 1:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} over {processes} processes with "
                          "MODEL.SEM_SEG_HEAD.NORM 'BN': the 1x1 bin of POOL_SCALES batch-normalizes one value per "
                          "channel in each process; train with 2 or more images per process, NORM 'SyncBN' or 'GN', "
                          "or POOL_SCALES without 1")


def check_inputs(args):
    """Config, dataset paths and every test image, checked once before any process is started."""
    check_launch_args(args.num_gpus, args.num_machines, args.machine_rank)
    training = not args.eval_only
    cfg = load_det_cfg(args.config_file, args.opts, training=training)
    if training:  # torchrun says how many processes it started; our launch starts num_gpus per machine
        check_batch_norm_batch(cfg, int(os.environ.get("WORLD_SIZE", 0)) or args.num_gpus * args.num_machines)
    check_datasets(cfg, training=training)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    run_with_exit_codes(check_inputs, args)
    if launched_externally():  # torchrun or a submitit job: this process is one rank already
        init_detectron2_distributed("cuda" if torch.cuda.is_available() else "cpu")
        run_with_exit_codes(main, args)
        sys.exit(0)
    clear_file_store(args.dist_url, args.num_machines)
    errors = tempfile.TemporaryDirectory(prefix="mae_det_rank_errors_")
    os.environ[RANK_ERRORS_ENV] = errors.name  # inherited by the spawned ranks
    try:
        launch(
            run_with_exit_codes, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
            dist_url=args.dist_url, args=(functools.partial(rank_main, threads_per_process(args.num_gpus)), args),
        )
    except mp.ProcessExitedException as e:
        lines = rank_errors(errors.name)
        if e.exit_code is not None and e.exit_code > 0 and lines:  # the ranks' error lines, and their code
            print("\n" + "\n".join(f"error: {line}" for line in lines), file=sys.stderr)
            sys.exit(e.exit_code)
        print(f"\nerror: {describe_rank_failure(e)[0]}", file=sys.stderr)  # killed: 247 (-9) and no line before
        sys.exit(e.exit_code if e.exit_code is not None and e.exit_code > 0 else 1)
    except mp.ProcessRaisedException as e:  # raised outside the trainer (e.g. the process group's port was taken)
        line, code = describe_rank_failure(e)
        print(f"\nerror: {line}", file=sys.stderr)
        sys.exit(code)
