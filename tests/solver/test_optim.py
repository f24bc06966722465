import torch

from mae_det.solver.optim import adamw


def test_adamw_is_fused_and_steps_like_the_for_loop_adamw():
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    fused, plain = adamw([a], **kw), torch.optim.AdamW([b], foreach=False, **kw)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step(), plain.step()
    assert not torch.equal(a.detach(), w)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
