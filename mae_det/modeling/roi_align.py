"""RoIAlign whose CPU backward scatters all channels at once, bit for bit what torchvision's CPU kernel computes.

torchvision's CPU backward walks every ``(roi, channel, bin, sample)`` one float at a time and recomputes the
bilinear weights for every channel; on the CPU demo (64-channel features, 256 box RoIs of 1-3 samples a side per
iteration) it is a quarter of a Mask R-CNN iteration, seven times the forward. :class:`ROIAlign` keeps torchvision's
forward and computes the same gradient as vector ops over the channel axis: the sample points and weights once per
``(roi, bin, sample)``, in torchvision's float32 order of operations, then one ``index_add_`` that adds the
contributions to every input pixel in the order torchvision's loop does. Same operations, same order, same bits
(``tests/modeling/test_roi_align.py`` checks ``torch.equal`` against the kernel), so a run gives the same numbers
either way; only the time changes. Small calls (few samples, where the fixed cost of the vector ops dominates) and
non-CPU tensors use torchvision's own kernel.
"""
from __future__ import annotations

import torch
from detectron2.layers import ROIAlign as D2ROIAlign
from detectron2.modeling.poolers import ROIPooler
from torch import nn

# Below this many scattered floats (samples x channels) torchvision's loop is the faster of the two: ~1 ms of fixed
# cost here against ~11 ns a float there (2-core Xeon VM, tools/benchmark_det.py --roi-align).
_MIN_VECTOR_WORK = 100_000
_CHUNK = 512  # samples per index_add_: their (512, 4, C) contributions stay in L2


def _interpolation(v: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """torchvision's ``bilinear_interpolate_gradient`` along one axis: (outside, low, high, weight of high,
    weight of low) for sample coordinates ``v``."""
    outside = (v < -1.0) | (v > size)
    v = v.clamp(min=0.0)
    low = v.to(torch.int64)
    edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(edge, low, low + 1)
    v = torch.where(edge, low.to(v.dtype), v)
    frac = v - low.to(v.dtype)
    return outside, low, high, frac, 1.0 - frac


def roi_align_backward(grad: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
                       pooled_width: int, input_shape: tuple[int, int, int, int], sampling_ratio: int,
                       aligned: bool) -> torch.Tensor:
    """The gradient of ``torchvision.ops.roi_align`` w.r.t. its input, equal to ``torchvision::_roi_align_backward``.

    Args:
        grad: (R, C, PH, PW) gradient of the pooled output.
        rois: (R, 5) ``[batch index, x1, y1, x2, y2]`` in input-image coordinates, ``grad``'s dtype.
        spatial_scale, sampling_ratio, aligned: as given to the forward.
        pooled_height, pooled_width: PH, PW.
        input_shape: (N, C, H, W) of the forward's input.

    Returns:
        (N, C, H, W) gradient of the input.
    """
    N, C, H, W = input_shape
    R, dt = rois.shape[0], grad.dtype
    # Every expression below is torchvision's, in its order, in ``dt``: the same rounding at every step.
    scale = torch.tensor(spatial_scale, dtype=dt)
    offset = 0.5 if aligned else 0.0
    start_w, start_h = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_w = (rois[:, 3] * scale - offset) - start_w
    roi_h = (rois[:, 4] * scale - offset) - start_h
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((R,), sampling_ratio, dtype=torch.int64)
    else:
        # clamped: an inverted box (x2 < x1 and y2 < y1) gives two negative counts whose product is positive,
        # while torchvision's loops run no sample for it
        grid_h = torch.ceil(roi_h / pooled_height).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / pooled_width).long().clamp(min=0)
    per_roi = pooled_height * pooled_width * grid_h * grid_w
    S = int(per_roi.sum())
    # fp16 / bf16 gradients outside autocast: torchvision accumulates them differently, so its own kernel runs
    if S * C < _MIN_VECTOR_WORK or dt not in (torch.float32, torch.float64):
        return torch.ops.torchvision._roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width,
                                                         N, C, H, W, sampling_ratio, aligned)

    # One row per sample, in torchvision's loop order (roi, ph, pw, iy, ix).
    n = torch.repeat_interleave(torch.arange(R), per_roi)
    j = torch.arange(S) - torch.repeat_interleave(per_roi.cumsum(0) - per_roi, per_roi)
    gh, gw = grid_h[n], grid_w[n]
    ix, iy = j % gw, (j // gw) % gh
    pw, ph = (j // (gw * gh)) % pooled_width, j // (gw * gh * pooled_width)
    y = (start_h[n] + ph.to(dt) * bin_h[n]) + ((iy.to(dt) + 0.5) * bin_h[n]) / gh.to(dt)
    x = (start_w[n] + pw.to(dt) * bin_w[n]) + ((ix.to(dt) + 0.5) * bin_w[n]) / gw.to(dt)
    out_y, y0, y1, ly, hy = _interpolation(y, H)
    out_x, x0, x1, lx, hx = _interpolation(x, W)

    # The four corners of each sample, in torchvision's order: (S, 4) pixel rows of the (N*H*W, C) gradient.
    base = rois[:, 0].long()[n] * (H * W)
    pixel = torch.stack([base + y0 * W + x0, base + y0 * W + x1, base + y1 * W + x0, base + y1 * W + x1], 1)
    weight = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], 1)
    count = (gh * gw).to(dt)
    bin_row = (n * pooled_height + ph) * pooled_width + pw
    inside = ~(out_y | out_x)
    if not bool(inside.all()):
        pixel, weight, count, bin_row = pixel[inside], weight[inside], count[inside], bin_row[inside]

    grad_bins = grad.permute(0, 2, 3, 1).reshape(R * pooled_height * pooled_width, C)
    grad_input = grad.new_zeros(N * H * W, C)
    for a in range(0, bin_row.numel(), _CHUNK):
        b = a + _CHUNK
        part = grad_bins.index_select(0, bin_row[a:b])[:, None, :] * weight[a:b, :, None]  # (s, 4, C)
        part.div_(count[a:b, None, None])
        # index_add_ adds its rows one after the other: each pixel gets its terms in torchvision's order.
        grad_input.index_add_(0, pixel[a:b].reshape(-1), part.reshape(-1, C))
    return grad_input.view(N, H, W, C).permute(0, 3, 1, 2).contiguous()


class _ROIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> torch.Tensor:
        # torchvision's autocast rule, spelled out: under CPU autocast the op runs in float32 (float64 stays) and
        # returns the input's dtype; autograd then sees the casts outside the op, as below.
        autocast = torch.is_autocast_enabled("cpu") and input.dtype != torch.float64
        dtype = torch.float32 if autocast else input.dtype
        rois = rois.to(dtype)
        ctx.save_for_backward(rois)
        ctx.args = (input.shape, input.dtype, dtype, output_size, spatial_scale, sampling_ratio, aligned)
        with torch.autocast("cpu", enabled=False):
            out = torch.ops.torchvision.roi_align(input.to(dtype), rois, spatial_scale, *output_size, sampling_ratio,
                                                  aligned)
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rois,) = ctx.saved_tensors
        shape, input_dtype, dtype, (ph, pw), spatial_scale, sampling_ratio, aligned = ctx.args
        grad_input = roi_align_backward(grad.to(dtype), rois, spatial_scale, ph, pw, tuple(shape), sampling_ratio,
                                        aligned)
        return grad_input.to(input_dtype), None, None, None, None, None


class ROIAlign(D2ROIAlign):
    """Detectron2's ``ROIAlign`` with :func:`roi_align_backward` as the CPU backward; elsewhere Detectron2's."""

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu" or input.is_quantized or not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        # Detectron2 rounds the boxes to the features' dtype before torchvision sees them; so does this.
        return _ROIAlignFunction.apply(input, rois.to(dtype=input.dtype), tuple(self.output_size),
                                       self.spatial_scale, self.sampling_ratio, self.aligned)


def use_vectorized_roi_align(model: nn.Module) -> int:
    """Replaces every Detectron2 ``ROIAlign`` in ``model``'s ``ROIPooler``s by :class:`ROIAlign` (no parameters,
    same results); returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        if isinstance(module, ROIPooler):
            for i, level in enumerate(module.level_poolers):
                if type(level) is D2ROIAlign:
                    module.level_poolers[i] = ROIAlign(level.output_size, level.spatial_scale, level.sampling_ratio,
                                                       level.aligned)
                    replaced += 1
    return replaced
