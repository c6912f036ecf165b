"""CARROT against a deliberately naive per-class loop written from the formulas."""
import math

import pytest
import torch

from carrot_zzz import CarrotRegularizer, carrot_regularizer

EPS = 1e-12


def naive_carrot(z, labels, rank_norm='dim'):
    """Loop over classes, svdvals of each centred class: the design's formulas taken literally."""
    dim = z.shape[1]
    s_bar = ((z - z.mean(0)) ** 2).sum(1).mean()
    var_terms, rank_terms = [], []
    for c in torch.unique(labels).tolist():
        xc = z[labels == c]
        n = xc.shape[0]
        if n < 2:
            continue
        xc = xc - xc.mean(0)
        s_c = (xc ** 2).sum(1).mean()
        lam = torch.linalg.svdvals(xc) ** 2 / n                     # eigenvalues of Cov_c
        p = lam / lam.sum().clamp_min(EPS)
        erank = torch.exp(-(p * torch.log(p.clamp_min(EPS))).sum())
        norm = dim if rank_norm == 'dim' else min(n - 1, dim)
        var_terms.append(-torch.log(s_c.clamp_min(EPS) / s_bar.clamp_min(EPS)))
        rank_terms.append(-torch.log(erank / norm))
    if not var_terms:
        return z.sum() * 0, z.sum() * 0
    return torch.stack(var_terms).mean(), torch.stack(rank_terms).mean()


def balanced_labels(num_classes, per_class, generator=None):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(labels.numel(), generator=generator)]


def compare(z, labels, rank_norm='dim', rtol=1e-8, **bounds):
    z1 = z.detach().clone().requires_grad_(True)
    reg, stats = carrot_regularizer(z1, labels, rank_norm=rank_norm, **bounds)
    reg.backward()
    z2 = z.detach().clone().requires_grad_(True)
    r_var, r_rank = naive_carrot(z2, labels, rank_norm)
    (r_var + r_rank).backward()
    torch.testing.assert_close(stats['R_var'], r_var.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(stats['R_rank'], r_rank.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(reg.detach(), (r_var + r_rank).detach(), rtol=rtol, atol=rtol)
    scale = max(z2.grad.abs().max().item(), 1.0)   # a value of order 1 in inputs of order 1
    torch.testing.assert_close(z1.grad, z2.grad.to(z1.grad.dtype), rtol=rtol, atol=rtol * scale)
    return reg, stats


LABEL_CASES = {
    '16x4': lambda g: balanced_labels(16, 4, g),
    'random200': lambda g: torch.randint(0, 200, (64,), generator=g),
    'uneven': lambda g: torch.tensor([3, 3, 3, 3, 3, 3, 0, 7, 7, 1, 1, 1, 9, 5, 5, 5, 5, 5, 5, 5, 5, 2]),
    'one_class': lambda g: torch.zeros(12, dtype=torch.long),
    'pairs': lambda g: balanced_labels(8, 2, g),
}


@pytest.mark.parametrize('case', list(LABEL_CASES))
@pytest.mark.parametrize('rank_norm', ['dim', 'attainable'])
@pytest.mark.parametrize('dim', [1, 5, 48])
def test_matches_naive_float64(case, rank_norm, dim):
    g = torch.Generator().manual_seed(0)
    labels = LABEL_CASES[case](g)
    z = torch.randn(labels.numel(), dim, dtype=torch.float64, generator=g)
    compare(z, labels, rank_norm)


@pytest.mark.parametrize('offset', [0.0, 10.0])
def test_matches_naive_float32(offset):
    """float32 against float64; an offset common to all embeddings (post-ReLU features sit far from 0) must not
    cost precision in S_bar, taken as within- plus between-class scatter."""
    g = torch.Generator().manual_seed(1)
    labels = balanced_labels(32, 4, g)
    z = torch.randn(labels.numel(), 96, dtype=torch.float64, generator=g) + offset
    z1 = z.float().requires_grad_(True)
    reg, _ = carrot_regularizer(z1, labels)
    reg.backward()
    z2 = z.clone().requires_grad_(True)
    ref = sum(naive_carrot(z2, labels))
    ref.backward()
    assert reg.dtype == torch.float32
    torch.testing.assert_close(reg.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z1.grad.double(), z2.grad, rtol=1e-3, atol=1e-4 * z2.grad.abs().max().item())


def test_static_bounds_give_the_same_value():
    g = torch.Generator().manual_seed(2)
    labels = balanced_labels(16, 4, g)
    z = torch.randn(64, 32, dtype=torch.float64, generator=g)
    exact, _ = compare(z, labels)
    for bounds in (dict(max_classes=16, max_per_class=4), dict(max_classes=40, max_per_class=9),
                   dict(max_per_class=4)):
        bounded, _ = compare(z, labels, **bounds)
        torch.testing.assert_close(bounded, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('bounds', [dict(max_classes=16, max_per_class=3), dict(max_classes=15, max_per_class=4)])
def test_bounds_too_small_fail(bounds):
    labels = balanced_labels(16, 4)
    with pytest.raises(RuntimeError, match='max_classes or more samples of a class than max_per_class'):
        carrot_regularizer(torch.randn(64, 8), labels, **bounds)


def _count_host_syncs(monkeypatch):
    calls = []
    for name in ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__int__', '__float__', '__index__'):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, __original=original, __name=name, **kwargs):
            calls.append(__name)
            return __original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_host_syncs(monkeypatch):
    labels = torch.randint(0, 20, (64,))
    z = torch.randn(64, 16, requires_grad=True)
    calls = _count_host_syncs(monkeypatch)
    reg, stats = carrot_regularizer(z, labels)
    reg.backward()
    assert calls == ['tolist'], calls                      # the one sync that sizes the buffer
    calls.clear()
    reg, stats = carrot_regularizer(z, labels, max_classes=64, max_per_class=64)
    reg.backward()
    assert calls == [], calls
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())


def test_soft_targets_count_for_their_dominant_class():
    g = torch.Generator().manual_seed(3)
    labels = balanced_labels(8, 4, g)
    z = torch.randn(32, 16, generator=g)
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    smoothed = one_hot * 0.8 + 0.2 / 10                    # label smoothing
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)       # mixup with lambda 0.7
    expected, _ = carrot_regularizer(z, labels)
    for target in (one_hot, smoothed, mixed):
        got, _ = carrot_regularizer(z, target)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_stats():
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])          # class 2 has one sample: skipped
    z = torch.randn(8, 6, dtype=torch.float64, generator=g)
    reg, stats = carrot_regularizer(z, labels)
    s_bar = ((z - z.mean(0)) ** 2).sum(1).mean()
    ratios, eranks = [], []
    for c in (0, 1):
        xc = z[labels == c] - z[labels == c].mean(0)
        ratios.append(((xc ** 2).sum(1).mean() / s_bar).item())
        p = torch.linalg.svdvals(xc) ** 2
        p = p / p.sum()
        p = p[p > 0]
        eranks.append(torch.exp(-(p * p.log()).sum()).item())
    assert stats['classes_used'].item() == 2
    assert stats['min_r'].item() == pytest.approx(min(ratios), rel=1e-10)
    assert stats['min_erank_frac'].item() == pytest.approx(min(eranks) / 6, rel=1e-8)
    assert stats['R'].item() == pytest.approx(stats['R_var'].item() + stats['R_rank'].item(), rel=1e-12)
    expected_var = sum(-math.log(r) for r in ratios) / 2
    assert stats['R_var'].item() == pytest.approx(expected_var, rel=1e-10)


def test_pairs_give_rank_term_log_dim_and_no_rank_gradient():
    # erank of two samples is exactly 1: -log(1/D) = log D for 'dim', 0 for 'attainable'
    labels = balanced_labels(6, 2)
    z = torch.randn(12, 10, dtype=torch.float64)
    _, stats = carrot_regularizer(z, labels)
    assert stats['R_rank'].item() == pytest.approx(math.log(10), rel=1e-10)
    _, stats = carrot_regularizer(z, labels, rank_norm='attainable')
    assert stats['R_rank'].item() == pytest.approx(0, abs=1e-10)
    # the gradient of R is the variance term's alone (the naive form's R_var)
    z1 = z.clone().requires_grad_(True)
    carrot_regularizer(z1, labels)[0].backward()
    z2 = z.clone().requires_grad_(True)
    naive_carrot(z2, labels)[0].backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-8, atol=1e-10)


def test_no_class_with_two_samples_gives_attached_zero():
    z = torch.randn(10, 8, requires_grad=True)
    reg, stats = carrot_regularizer(z, torch.arange(10))
    assert reg.item() == 0 and reg.requires_grad
    reg.backward()
    assert z.grad.abs().max() == 0
    assert stats['classes_used'].item() == 0
    assert math.isnan(stats['min_r'].item()) and math.isnan(stats['min_erank_frac'].item())


@pytest.mark.parametrize('name,z,labels', [
    ('identical class', torch.cat([torch.ones(4, 8), torch.randn(4, 8)]), torch.tensor([0] * 4 + [1] * 4)),
    ('identical batch', torch.ones(8, 8), torch.tensor([0] * 4 + [1] * 4)),
    ('D = 1', torch.randn(8, 1), torch.tensor([0] * 4 + [1] * 4)),
    ('D = 1, identical', torch.zeros(8, 1), torch.tensor([0] * 4 + [1] * 4)),
])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_degenerate_inputs_stay_finite(name, z, labels, dtype):
    z = z.detach().to(dtype).clone().requires_grad_(True)
    for rank_norm in ('dim', 'attainable'):
        reg, stats = carrot_regularizer(z, labels, rank_norm=rank_norm)
        reg.backward()
        assert torch.isfinite(reg), name
        assert torch.isfinite(z.grad.float()).all(), name
        assert z.grad.dtype == dtype
        z.grad = None


def test_runs_in_float32_under_autocast():
    g = torch.Generator().manual_seed(5)
    labels = balanced_labels(8, 4, g)
    z = torch.randn(32, 64, generator=g)
    ref, _ = carrot_regularizer(z, labels)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, _ = carrot_regularizer(z, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_gradcheck():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    z = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: carrot_regularizer(x, labels)[0], (z,))
    assert torch.autograd.gradcheck(lambda x: carrot_regularizer(x, labels, rank_norm='attainable')[0], (z,))


def test_module_wraps_the_function():
    module = CarrotRegularizer(rank_norm='attainable', max_classes=8, max_per_class=4)
    labels = balanced_labels(8, 4)
    z = torch.randn(32, 16)
    torch.testing.assert_close(module(z, labels)[0], carrot_regularizer(z, labels, rank_norm='attainable')[0])
    assert 'attainable' in repr(module)


@pytest.mark.parametrize('kwargs,target,match', [
    (dict(rank_norm='D'), torch.zeros(4, dtype=torch.long), 'rank_norm must be one of'),
    ({}, torch.zeros(5, dtype=torch.long), r'target must be class indices of shape \(4,\)'),
    ({}, torch.zeros(4), 'soft targets'),
])
def test_bad_input(kwargs, target, match):
    with pytest.raises(ValueError, match=match):
        carrot_regularizer(torch.randn(4, 3), target, **kwargs)
