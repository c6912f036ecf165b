"""ZZZHead against a deliberately naive dense implementation written from the formulas."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from carrot_zzz import ZZZHead


def gram_schmidt(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, r) of the columns of a, column by column (classical Gram-Schmidt, twice)."""
    cols = []
    for k in range(a.shape[1]):
        v = a[:, k]
        for _ in range(2):
            for q in cols:
                v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, 1) if cols else a.new_zeros(a.shape[0], 0)


def naive_logits(head: ZZZHead, feats: torch.Tensor) -> torch.Tensor:
    """Dense Sigma_c (d, d) per class, solve and slogdet: the design's formula taken literally."""
    x = feats / feats.norm(dim=1, keepdim=True)
    sigma2 = F.softplus(head.sigma2_raw) + head.sigma2_min
    d = head.feat_dim
    out = []
    for c in range(head.num_classes):
        m = head.mu[c] / head.mu[c].norm()
        if head.rank:
            u = gram_schmidt(head.A[c])
            v = F.softplus(head.v_raw[c]) + head.v_min
            sigma = u @ torch.diag(v) @ u.T + sigma2 * torch.eye(d, dtype=x.dtype)
        else:
            sigma = sigma2 * torch.eye(d, dtype=x.dtype)
        delta = x - m                                                        # (B, d)
        quad = (delta * torch.linalg.solve(sigma, delta.T).T).sum(1)
        logdet = torch.linalg.slogdet(sigma).logabsdet
        out.append(-0.5 * (quad + logdet) + head.bias[c])
    return torch.stack(out, 1)


def make_head(num_classes, feat_dim, rank, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    head = ZZZHead(num_classes, feat_dim, rank).to(dtype)
    with torch.no_grad():   # move away from the init so that every term matters
        head.mu.normal_()
        head.bias.normal_()
        head.sigma2_raw.fill_(-1.3)
        if rank:
            head.A.normal_()
            head.v_raw.normal_()
    return head


def grads(head, feats, logits_fn, weights):
    head.zero_grad()
    feats = feats.detach().clone().requires_grad_(True)
    logits = logits_fn(head, feats)
    (logits * weights).sum().backward()
    named = {n: p.grad.clone() for n, p in head.named_parameters()}
    named['feats'] = feats.grad.clone()
    return logits.detach(), named


CASES = [  # (B, C, d, r)
    (5, 7, 6, 0),
    (5, 7, 6, 1),
    (5, 7, 6, 3),
    (4, 3, 5, 5),      # rank == feat_dim
    (6, 1, 4, 2),      # one class
    (6, 1, 4, 1),      # one class, rank 1: A (1, d, 1) reordered to (d, C r) is a view of A; must not be reused
    (3, 1000, 8, 2),   # C = 1000
]


@pytest.mark.parametrize('B,C,d,r', CASES)
def test_matches_naive_float64(B, C, d, r):
    head = make_head(C, d, r)
    feats = torch.randn(B, d, dtype=torch.float64) * 3
    weights = torch.randn(B, C, dtype=torch.float64)
    ours, g_ours = grads(head, feats, lambda h, f: h(f), weights)
    ref, g_ref = grads(head, feats, naive_logits, weights)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())
    assert set(g_ours) == set(g_ref)
    for name in g_ref:
        scale = g_ref[name].abs().max().item()
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-8, atol=1e-8 * scale, msg=name)


def test_frozen_features_and_second_backward():
    """Features without gradient (a frozen backbone), and a graph kept for a second backward pass."""
    head = make_head(9, 6, 3)
    feats = torch.randn(5, 6, dtype=torch.float64)
    weights = torch.randn(5, 9, dtype=torch.float64)
    ref = torch.autograd.grad((naive_logits(head, feats) * weights).sum(), list(head.parameters()))
    loss = (head(feats) * weights).sum()
    first = torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(head.parameters()))
    for g_ref, g1, g2 in zip(ref, first, second):
        torch.testing.assert_close(g1, g_ref, rtol=1e-8, atol=1e-8 * g_ref.abs().max().item())
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)


@pytest.mark.parametrize('B,C,d,r', [(8, 20, 32, 4), (8, 200, 16, 8)])
def test_matches_naive_float32(B, C, d, r):
    head64 = make_head(C, d, r)
    head32 = copy.deepcopy(head64).float()
    feats = torch.randn(B, d, dtype=torch.float64)
    weights = torch.randn(B, C, dtype=torch.float64)
    ours, g_ours = grads(head32, feats.float(), lambda h, f: h(f), weights.float())
    ref, g_ref = grads(head64, feats, naive_logits, weights)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for name in g_ref:
        scale = g_ref[name].abs().max().item()
        torch.testing.assert_close(g_ours[name].double(), g_ref[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_rank0_is_cosine_classifier():
    head = make_head(6, 10, 0)
    assert not hasattr(head, 'A') and not hasattr(head, 'v_raw')
    assert {n for n, _ in head.named_parameters()} == {'mu', 'sigma2_raw', 'bias'}
    feats = torch.randn(4, 10, dtype=torch.float64)
    sigma2 = F.softplus(head.sigma2_raw) + head.sigma2_min
    cos = F.normalize(feats, dim=1) @ F.normalize(head.mu, dim=1).T
    # ||x - m||^2 = 2 - 2 cos for unit vectors
    expected = -0.5 * ((2 - 2 * cos) / sigma2 + 10 * torch.log(sigma2)) + head.bias
    torch.testing.assert_close(head(feats), expected, rtol=1e-10, atol=1e-10)


def test_parameters_and_init_follow_the_design():
    torch.manual_seed(0)
    head = ZZZHead(50, 64, rank=8)
    shapes = {n: tuple(p.shape) for n, p in head.named_parameters()}
    assert shapes == {'mu': (50, 64), 'A': (50, 64, 8), 'v_raw': (50, 8), 'sigma2_raw': (), 'bias': (50,)}
    assert abs(head.mu.std().item() - 0.02) < 0.002 and abs(head.A.std().item() - 0.02) < 0.002
    assert head.v_raw.abs().max() == 0 and head.bias.abs().max() == 0 and head.sigma2_raw.item() == 0
    assert head.sigma2().item() == pytest.approx(math.log(2) + 1e-4)
    torch.testing.assert_close(head.variances(), torch.full((50, 8), math.log(2) + 1e-4))
    u = head.basis()
    torch.testing.assert_close(u.transpose(1, 2) @ u, torch.eye(8).expand(50, 8, 8), atol=1e-5, rtol=0)


def test_gradcheck():
    head = make_head(3, 4, 2)
    feats = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = [head.mu, head.A, head.v_raw, head.sigma2_raw, head.bias]

    def fn(x, mu, a, v_raw, sigma2_raw, bias):
        return torch.func.functional_call(
            head, {'mu': mu, 'A': a, 'v_raw': v_raw, 'sigma2_raw': sigma2_raw, 'bias': bias}, (x,))

    assert torch.autograd.gradcheck(fn, (feats, *[p.detach().clone().requires_grad_(True) for p in params]))


def test_gradgradcheck():
    """Second derivatives (create_graph=True: Adahessian, gradient penalties on the input)."""
    head = make_head(3, 4, 2)
    feats = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    a = head.A.detach().clone().requires_grad_(True)
    mu = head.mu.detach().clone().requires_grad_(True)

    def fn(x, mu_, a_):
        return torch.func.functional_call(head, {'mu': mu_, 'A': a_}, (x,))

    assert torch.autograd.gradgradcheck(fn, (feats, mu, a))


def test_zero_variance_floor_keeps_gradients_finite():
    """v_min = 0 with v_raw far below 0: v underflows to exactly 0, the logits and gradients stay finite."""
    head = ZZZHead(5, 8, 2, v_min=0.0)
    with torch.no_grad():
        head.v_raw.fill_(-200.0)
    head(torch.randn(4, 8)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


class _Recorder(TorchDispatchMode):
    """Records every aten op, the largest tensor any op produced, and the matrices linalg ops factor."""

    def __init__(self):
        super().__init__()
        self.ops, self.max_numel, self.factored = set(), 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.add(name)
        if name.startswith('linalg') and 'norm' not in name or name in ('cholesky', 'logdet', 'inverse'):
            self.factored.add(tuple(args[0].shape[-2:]))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_closed_form_never_builds_bcd_tensor_or_inverse():
    B, C, d, r = 16, 50, 64, 4
    head = ZZZHead(C, d, r)
    feats = torch.randn(B, d, requires_grad=True)
    with _Recorder() as rec:
        head(feats).sum().backward()
    # nothing larger than A (C, d, r) or t (B, C, r); the literal form's delta is (B, C, d), 4x more
    assert rec.max_numel <= max(C * d * r, B * C * r) < B * C * d, rec.max_numel
    # no inverse, solve or determinant of a d x d matrix: only r x r factors (and r x r triangular solves)
    assert not rec.ops & {'linalg_inv', 'linalg_inv_ex', 'linalg_solve', 'linalg_det', 'linalg_slogdet', 'logdet'}
    assert rec.factored == {(r, r)}, rec.factored


def test_float32_inside_bf16_autocast():
    torch.manual_seed(0)
    head = ZZZHead(200, 96, rank=8)
    feats = torch.randn(32, 96)
    ref = head(feats)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = head(feats)
        out_bf16_in = head(feats.bfloat16())
    assert out.dtype == torch.float32 and out_bf16_in.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # bf16-rounded features: only the input rounding (relative 2^-8) reaches the logits, stated tolerance 0.05
    assert (out_bf16_in - ref).abs().max() < 0.05
    # the same head evaluated in bf16 loses far more: what the float32 guard is for
    with torch.no_grad():
        lowp = head.bfloat16()(feats.bfloat16()).float()
    assert (lowp - ref).abs().max() > (out_bf16_in - ref).abs().max()


def test_bf16_input_gradient_has_input_dtype():
    head = ZZZHead(10, 16, 2)
    feats = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    head(feats).sum().backward()
    assert feats.grad.dtype == torch.bfloat16 and torch.isfinite(feats.grad.float()).all()


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_classes=0, feat_dim=8), 'num_classes must be >= 1'),
    (dict(num_classes=3, feat_dim=8, rank=-1), r'rank must be in \[0, feat_dim=8\], got rank=-1'),
    (dict(num_classes=3, feat_dim=8, rank=9), r'rank must be in \[0, feat_dim=8\], got rank=9'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZZZHead(**kwargs)


def test_wrong_feature_size():
    head = ZZZHead(3, 8, 2)
    with pytest.raises(ValueError, match=r'expected features of shape \(B, 8\), got \(4, 9\)'):
        head(torch.randn(4, 9))
    with pytest.raises(ValueError, match=r'got \(8,\)'):
        head(torch.randn(8))
