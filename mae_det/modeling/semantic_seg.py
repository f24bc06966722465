"""Detectron2's ``SemanticSegmentor`` with sliding-window inference (mmsegmentation's "slide" test mode).

Training and whole-image inference are Detectron2's own. With ``TEST.SLIDE.ENABLED``, each test image is cut into
``CROP_SIZE`` windows every ``STRIDE`` pixels (the last window of a row/column is shifted to end at the border;
an image smaller than a window is one window), every window is padded to the backbone's divisibility and run
through backbone + head, and the logits of overlapping windows are averaged per pixel. Windows are what the model
saw in training (crops), so slide inference keeps the relative-position and attention scales of training.
"""
from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of side ``crop`` covering ``[0, length)``; the last one ends at ``length``."""
    if length <= crop:
        return [0]
    n = (length - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


@META_ARCH_REGISTRY.register()
class SlidingWindowSegmentor(SemanticSegmentor):
    """``SemanticSegmentor`` whose inference can slide a window over each image (see the module docstring).

    Args:
        slide: use sliding-window inference (``TEST.SLIDE.ENABLED``); False = Detectron2's whole-image inference.
        crop_size: window side in pixels.
        stride: step between windows.
        **kwargs: ``SemanticSegmentor``'s arguments.
    """

    @configurable
    def __init__(self, *, slide: bool = False, crop_size: int = 512, stride: int = 341, **kwargs) -> None:
        super().__init__(**kwargs)
        self.slide = slide
        self.crop_size = crop_size
        self.stride = stride

    @classmethod
    def from_config(cls, cfg) -> dict:
        s = cfg.TEST.SLIDE
        return {**super().from_config(cfg), "slide": s.ENABLED, "crop_size": s.CROP_SIZE, "stride": s.STRIDE}

    def forward(self, batched_inputs: list[dict]) -> list[dict] | dict:
        if self.training or not self.slide:
            return super().forward(batched_inputs)
        results = []
        for x in batched_inputs:
            image = (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std  # (C, H, W)
            logits = self.slide_logits(image)  # (K, H, W)
            h, w = image.shape[-2:]
            results.append({"sem_seg": sem_seg_postprocess(logits, (h, w), x.get("height", h), x.get("width", w))})
        return results

    def slide_logits(self, image: torch.Tensor) -> torch.Tensor:
        """(C, H, W) normalized image -> (K, H, W) logits averaged over the windows covering each pixel."""
        H, W = image.shape[-2:]
        ch, cw = min(self.crop_size, H), min(self.crop_size, W)
        corners = [(y, x) for y in window_starts(H, ch, self.stride) for x in window_starts(W, cw, self.stride)]
        windows = ImageList.from_tensors(
            [image[:, y : y + ch, x : x + cw] for y, x in corners],
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        logits, _ = self.sem_seg_head(self.backbone(windows.tensor), None)  # (B, K, Hp, Wp)
        total = logits.new_zeros((logits.shape[1], H, W))
        count = logits.new_zeros((1, H, W))
        for (y, x), window_logits in zip(corners, logits):
            total[:, y : y + ch, x : x + cw] += window_logits[:, :ch, :cw]
            count[:, y : y + ch, x : x + cw] += 1
        return total / count
