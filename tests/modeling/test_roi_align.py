"""The vectorized CPU RoIAlign backward (mae_det.modeling.roi_align) against torchvision's kernel, bit for bit."""
import copy

import pytest
import torch
from detectron2.layers import ROIAlign as D2ROIAlign
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import roi_align

import mae_det.modeling.roi_align as vectorized
from mae_det.engine.det_trainer import Trainer
from tests.engine.test_det_trainer import tiny_cfg


def random_rois(n_images: int, n: int, size: int, seed: int) -> torch.Tensor:
    """Boxes of every kind: inside, crossing the border, wholly outside, degenerate (zero width), inverted and
    larger than the image, in image coordinates of a ``size`` px image."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 1.4 * size - 0.2 * size
    wh = torch.rand(n, 2, generator=g) * size * torch.tensor([[1.5, 0.6]])
    wh[::7, 0] = 0.0
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[1::9] = torch.tensor([-3.0 * size, -3.0 * size, -2.0 * size, -2.0 * size])
    boxes[4::11] = boxes[4::11][:, [2, 3, 0, 1]]  # inverted on both axes: no sample in torchvision's loops
    index = torch.randint(0, n_images, (n, 1), generator=g).float()
    return torch.cat([index, boxes], 1)


def torchvision_grads(x, rois, grad, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = roi_align(x, rois, **kw)
    (gx,) = torch.autograd.grad(out, x, grad)
    return out, gx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("spatial_scale", [0.5, 0.125])
def test_backward_equals_torchvision_bit_for_bit(monkeypatch, dtype, aligned, sampling_ratio, spatial_scale):
    monkeypatch.setattr(vectorized, "_MIN_VECTOR_WORK", 0)  # the vector path even for this small case
    monkeypatch.setattr(vectorized, "_CHUNK", 37)  # several chunks, the last one partial
    size = 64
    side = int(size * spatial_scale)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, side, side + 3, generator=g, dtype=dtype)
    rois = random_rois(3, 40, size, seed=2).to(dtype)
    grad = torch.randn(40, 5, 7, 6, generator=g, dtype=dtype)
    kw = dict(output_size=(7, 6), spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)
    out, expected = torchvision_grads(x, rois, grad, **kw)
    got = vectorized.roi_align_backward(grad, rois, spatial_scale, 7, 6, tuple(x.shape), sampling_ratio, aligned)
    assert expected.abs().sum() > 0
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, expected)


def test_half_precision_gradients_outside_autocast_are_torchvisions(monkeypatch):
    # torchvision accumulates fp16 in another order: the vector path gave 40 % of the elements other bits (its CPU
    # kernel has no bf16 at all)
    dtype = torch.float16
    monkeypatch.setattr(vectorized, "_MIN_VECTOR_WORK", 0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    rois = random_rois(2, 30, 32, seed=4).to(dtype)
    grad = torch.randn(30, 4, 7, 7, generator=g).to(dtype)
    kw = dict(output_size=(7, 7), spatial_scale=0.5, sampling_ratio=0, aligned=True)
    _, expected = torchvision_grads(x, rois, grad, **kw)
    got = vectorized.roi_align_backward(grad, rois, 0.5, 7, 7, tuple(x.shape), 0, True)
    assert torch.equal(got, expected)


def test_module_forward_and_backward_equal_detectron2s_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32, 32).bfloat16()
    rois = random_rois(2, 64, 64, seed=3)
    rois[:, 1:] = rois[:, 1:].clamp(-8, 72)
    ours, theirs = vectorized.ROIAlign((7, 7), 0.5, 0, True), D2ROIAlign((7, 7), 0.5, 0, True)
    grad = torch.randn(64, 64, 7, 7).bfloat16()
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi, rois)
        out.backward(grad)
        results.append((out, xi.grad))
    (a, ga), (b, gb) = results
    assert a.dtype == b.dtype == torch.bfloat16
    assert ga.dtype == torch.bfloat16
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_backward_is_the_same_on_two_threads(monkeypatch):
    # index_add_ may run in parallel over threads; every pixel must still get its terms in torchvision's order.
    monkeypatch.setattr(vectorized, "_CHUNK", 100_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(4, 64, 32, 32, generator=g)
        rois = random_rois(4, 256, 64, seed=6)
        grad = torch.randn(256, 64, 7, 7, generator=g)
        expected = torchvision_grads(x, rois, grad, output_size=7, spatial_scale=0.5, sampling_ratio=0, aligned=True)[1]
        assert torch.equal(vectorized.roi_align_backward(grad, rois, 0.5, 7, 7, tuple(x.shape), 0, True), expected)
    finally:
        torch.set_num_threads(threads)


def test_small_calls_and_inference_use_torchvisions_kernel():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    rois = torch.tensor([[0.0, 2.0, 2.0, 10.0, 12.0]])
    grad = torch.randn(1, 4, 7, 7)
    assert 1 * 49 * 2 * 2 * 4 < vectorized._MIN_VECTOR_WORK
    got = vectorized.roi_align_backward(grad, rois, 1.0, 7, 7, (1, 4, 16, 16), 0, True)
    assert torch.equal(got, torchvision_grads(x, rois, grad, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                                              aligned=True)[1])
    with torch.no_grad():
        out = vectorized.ROIAlign((7, 7), 1.0, 0, True)(x, rois)
    assert out.grad_fn is None
    assert torch.equal(out, roi_align(x.detach(), rois, 7, 1.0, 0, True))


def _batch(n_images: int = 2, size: int = 64):
    g = torch.Generator().manual_seed(4)
    batch = []
    for _ in range(n_images):
        inst = Instances((size, size))
        xy = torch.rand(3, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + 10 + torch.rand(3, 2, generator=g) * 20], 1)
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, 1, 0])
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.randint(0, 255, (3, size, size), generator=g).float(), "instances": inst,
                      "height": size, "width": size})
    return batch


def test_trainer_model_trains_exactly_as_detectron2s_on_cpu():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    ours = Trainer.build_model(cfg)
    levels = [m for m in ours.modules() if isinstance(m, D2ROIAlign)]
    assert levels and all(type(m) is vectorized.ROIAlign for m in levels)
    theirs = build_model(cfg)
    theirs.load_state_dict(ours.state_dict())
    assert vectorized.use_vectorized_roi_align(copy.deepcopy(theirs)) == len(levels)
    grads = []
    for model in (ours, theirs):
        torch.manual_seed(1)  # the RoI sampler draws from the global generator
        with EventStorage(0):
            losses = model(_batch())
        sum(losses.values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    pooled = [n for n in grads[0] if "backbone" in n]
    assert pooled and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
