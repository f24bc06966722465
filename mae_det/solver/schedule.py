"""Learning-rate schedules, built from fvcore/Detectron2 parameter schedulers."""
from __future__ import annotations

import torch
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler, ParamScheduler


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> ParamScheduler:
    """Multiplier of the MAE recipe: linear from 0 over ``warmup_steps``, then a half cosine from 1 to
    ``min_ratio`` over the remaining steps (the cosine's interval starts where the warmup ends)."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    cosine = CosineParamScheduler(1.0, min_ratio)
    if warmup_steps == 0:
        return cosine
    return WarmupParamScheduler(cosine, 0.0, warmup_steps / total_steps, "linear", rescale_interval=True)


def build_warmup_cosine_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> LRMultiplier:
    """A per-step scheduler multiplying each group's initial lr by :func:`warmup_cosine`.

    Its ``state_dict`` is plain numbers (``base_lrs``, ``last_epoch`` = steps taken), safe for ``weights_only``.
    """
    return LRMultiplier(optimizer, warmup_cosine(total_steps, warmup_steps, min_ratio), max_iter=total_steps)


def configured_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings (lr, weight decay, betas, ...) as the config built them, to hand to
    :func:`keep_configured_settings` after a checkpoint's optimizer state is loaded."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def keep_configured_settings(optimizer: torch.optim.Optimizer, scheduler: LRMultiplier,
                             configured: list[dict]) -> None:
    """Puts the config's group settings back after a resume loaded a checkpoint's optimizer and scheduler states.

    torch's ``Optimizer.load_state_dict`` restores the checkpoint's group settings and the scheduler its
    ``base_lrs``: a run resumed with another SOLVER lr or weight decay logged the new values and trained with the
    old ones. The moments and the step count stay the checkpoint's, and the current lr is the schedule's at that
    step; with unchanged settings every number is the same, bit for bit.
    """
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
