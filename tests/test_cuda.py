"""CUDA checks: no host syncs with static bounds, float32 under autocast. Skipped without a GPU."""
import pytest
import torch

from carrot_zzz import ZZZHead, carrot_regularizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def test_carrot_static_bounds_make_no_host_sync():
    labels = torch.arange(16, device='cuda').repeat_interleave(4)
    z = torch.randn(64, 128, device='cuda', requires_grad=True)
    carrot_regularizer(z, labels, max_classes=16, max_per_class=4)[0].backward()   # warm-up: lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        reg, stats = carrot_regularizer(z, labels, max_classes=16, max_per_class=4)
        reg.backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    ref, _ = carrot_regularizer(z.detach().cpu().double(), labels.cpu())
    torch.testing.assert_close(reg.detach().cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_head_matches_cpu_and_stays_float32_under_autocast():
    torch.manual_seed(0)
    head = ZZZHead(200, 768, rank=8)
    feats = torch.randn(64, 768)
    ref = head.double()(feats.double())
    head = head.float().cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = head(feats.cuda())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-3)
    feats_cuda = feats.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        head(feats_cuda).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_cuda_graphed_carrot_matches_eager():
    from carrot_zzz import CarrotRegularizer
    graphed = CarrotRegularizer(max_classes=16, max_per_class=4, cuda_graph=True)
    eager = CarrotRegularizer(max_classes=16, max_per_class=4)
    labels = torch.arange(16, device='cuda').repeat_interleave(4)
    for step in range(3):   # the first call captures, later calls replay with new data
        z = torch.randn(64, 96, device='cuda') * (step + 1)
        z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        shuffled = labels[torch.randperm(64, device='cuda')]
        with torch.autocast('cuda', dtype=torch.bfloat16):   # a non-leaf input, inside autocast
            r1, _ = graphed(z1 * 1.0, shuffled)
        r1.backward()
        z0 = z.clone().requires_grad_(True)
        r0, _ = eager(z0, shuffled)
        r0.backward()
        torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z1.grad, z0.grad, rtol=1e-4, atol=1e-6)
        r2, s2 = eager(z2, labels)
        r2.backward()
        r3, s3 = graphed(z.clone().requires_grad_(True), labels)
        torch.testing.assert_close(r3, r2, rtol=1e-5, atol=1e-5)
        for k in s2:
            torch.testing.assert_close(s3[k].float(), s2[k].float(), rtol=1e-5, atol=1e-5, equal_nan=True)
        z3 = z.clone().requires_grad_(True)
        r4, _ = graphed(z3, labels)
        r4.backward()
        torch.testing.assert_close(z3.grad, z2.grad, rtol=1e-4, atol=1e-6)
    assert len(graphed._graphed) == 1
