"""Closed-form head starts (carrot_zzz.zzz_fit, carrot_zzz.linear_probe) against naive per-class loops written from the formulas."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carrot_zzz import ZZZHead
from carrot_zzz.linear_probe import fit_linear_head
from carrot_zzz.zzz_fit import fit_zzz_head


def class_gaussians(num_classes, dim, rank, per_class, noise=0.02, spread=0.05, seed=0, draw=0, scale=True):
    """Samples of known low-rank + isotropic Gaussians around unit means (means and bases from `seed`, samples
    from `draw`), each row rescaled by a random positive factor (the fit normalises) when scale.
    per_class: an int or a list of counts. Returns (feats (N, d) float64, labels (N,), means (C, d))."""
    gen = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(num_classes, dim, generator=gen, dtype=torch.float64), dim=1)
    bases = torch.linalg.qr(torch.randn(num_classes, dim, rank, generator=gen, dtype=torch.float64)).Q
    counts = torch.tensor(per_class if isinstance(per_class, list) else [per_class] * num_classes)
    labels = torch.arange(num_classes).repeat_interleave(counts)
    n = labels.numel()
    gen = torch.Generator().manual_seed(1000 + draw)
    coef = torch.randn(n, rank, 1, generator=gen, dtype=torch.float64) * math.sqrt(spread)
    feats = means[labels] + (bases[labels] @ coef).squeeze(2)
    feats = feats + torch.randn(n, dim, generator=gen, dtype=torch.float64) * math.sqrt(noise)
    if scale:
        feats = feats * torch.empty(n, 1, dtype=torch.float64).uniform_(0.5, 3.0, generator=gen)
    return feats, labels, means


def naive_ppca(feats, labels, rank, sigma2_min=1e-4, v_min=1e-4):
    """Per class in a loop: unit mean, eigh of the d x d scatter about it, pooled discarded variance."""
    x = feats / feats.norm(dim=1, keepdim=True)
    d = x.shape[1]
    out, discarded, total = {}, 0.0, 0
    for c in sorted(set(labels.tolist())):
        xc = x[labels == c]
        m = xc.sum(0) / xc.sum(0).norm()
        resid = xc - m
        scatter = resid.T @ resid / xc.shape[0]
        evals, evecs = torch.linalg.eigh(scatter)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        out[c] = dict(mean=m, lam=evals[:rank], basis=evecs[:, :rank], n=xc.shape[0])
        discarded += xc.shape[0] * evals[rank:].sum().item()
        total += xc.shape[0]
    sigma2 = max(discarded / (total * max(d - rank, 1)), sigma2_min)
    for ref in out.values():
        ref['v'] = (ref['lam'] - sigma2).clamp_min(v_min)
    return out, sigma2


def dense_logits(x, refs, sigma2, tau, bias=None):
    """Logits (N, C) with Sigma_c = tau (U diag(v) U^T + sigma2 I) formed densely: solve + slogdet per class."""
    x = x / x.norm(dim=1, keepdim=True)
    d = x.shape[1]
    cols = []
    for c in sorted(refs):
        ref = refs[c]
        sigma = tau * (ref['basis'] @ torch.diag(ref['v']) @ ref['basis'].T + sigma2 * torch.eye(d, dtype=x.dtype))
        delta = x - ref['mean']
        quad = (delta * torch.linalg.solve(sigma, delta.T).T).sum(1)
        cols.append(-0.5 * (quad + torch.linalg.slogdet(sigma).logabsdet) + (0.0 if bias is None else bias[c]))
    return torch.stack(cols, 1)


def projector(basis):
    return basis @ basis.transpose(-1, -2)


def make_head(num_classes, dim, rank, seed=0):
    torch.manual_seed(seed)
    return ZZZHead(num_classes, dim, rank).double()


@pytest.mark.parametrize('dim,per_class', [(16, 10), (6, 40)])   # Gram side (n < d), covariance side (n > d)
def test_ppca_matches_naive(dim, per_class):
    feats, labels, _ = class_gaussians(5, dim, 2, per_class)
    head = make_head(5, dim, 3)
    info = fit_zzz_head(head, feats, labels, temperature=False)
    refs, sigma2 = naive_ppca(feats, labels, 3)
    assert info['tau'] == 1.0 and info['classes_fitted'] == 5
    assert info['sigma2_ppca'] == pytest.approx(sigma2, rel=1e-9)
    assert head.sigma2().item() == pytest.approx(sigma2, rel=1e-6)
    basis, variances = head.basis(torch.float64), head.variances(torch.float64)
    for c, ref in refs.items():
        torch.testing.assert_close(F.normalize(head.mu[c], dim=0), ref['mean'], rtol=0, atol=1e-10)
        torch.testing.assert_close(projector(basis[c]), projector(ref['basis']), rtol=0, atol=1e-8)
        torch.testing.assert_close(variances[c], ref['v'], rtol=1e-6, atol=1e-10)
    with torch.no_grad():   # the head's logits are the dense Gaussian's
        torch.testing.assert_close(head(feats), dense_logits(feats, refs, sigma2, 1.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('calibrate', ['logits', 'covariance'])
def test_temperature_minimises_holdout_nll(calibrate):
    feats, labels, _ = class_gaussians(6, 12, 2, 12, noise=0.08, spread=0.1, seed=1)
    held, held_labels, _ = class_gaussians(6, 12, 2, 40, noise=0.08, spread=0.1, seed=1, draw=1)
    head = make_head(6, 12, 2)
    info = fit_zzz_head(head, feats, labels, holdout=(held, held_labels), calibrate=calibrate)
    refs, sigma2 = naive_ppca(feats, labels, 2)

    def held_logits(tau):   # logits: the generative logits / tau; covariance: Sigma scaled by tau alone
        if calibrate == 'logits':
            return dense_logits(held, refs, sigma2, 1.0) / tau
        return dense_logits(held, refs, sigma2, tau)

    def nll(tau):
        return F.cross_entropy(held_logits(tau), held_labels).item()

    grid = torch.logspace(-3, 4, 400, dtype=torch.float64).tolist()
    best = min(grid, key=nll)
    fine = torch.linspace(best / 1.05, best * 1.05, 400, dtype=torch.float64).tolist()
    best = min(fine, key=nll)
    assert info['tau'] == pytest.approx(best, rel=1e-3)
    assert info['tau'] > 1.5                                        # the generative fit is over-confident here
    assert nll(info['tau']) <= nll(best) + 1e-9
    assert info['nll_before'] == pytest.approx(nll(1.0), rel=1e-8)
    assert info['nll_after'] == pytest.approx(nll(info['tau']), rel=1e-8)
    assert info['nll_after'] < info['nll_before']
    with torch.no_grad():   # what was written is that model: same softmax
        torch.testing.assert_close(head(held).log_softmax(1), held_logits(info['tau']).log_softmax(1),
                                   rtol=1e-6, atol=1e-6)
    assert head.sigma2().item() == pytest.approx(info['tau'] * sigma2, rel=1e-6)
    for c, ref in refs.items():
        torch.testing.assert_close(head.variances(torch.float64)[c], info['tau'] * ref['v'], rtol=1e-6, atol=1e-9)
    if calibrate == 'logits':   # the ranking of the generative fit is kept
        plain = make_head(6, 12, 2)
        fit_zzz_head(plain, feats, labels, temperature=False)
        with torch.no_grad():
            assert torch.equal(head(held).argmax(1), plain(held).argmax(1))


def test_separable_holdout_keeps_tau_one():
    feats, labels, _ = class_gaussians(5, 16, 2, 10, noise=0.001, spread=0.002, seed=15)
    info = fit_zzz_head(make_head(5, 16, 2), feats, labels, holdout=(feats, labels))
    assert info['tau'] == 1.0 and info['nll_before'] < 1e-9


def test_carved_holdout_is_stratified_and_refit_uses_all():
    feats, labels, _ = class_gaussians(4, 10, 2, [10, 20, 5, 3], noise=0.1, spread=0.1, seed=2)
    head = make_head(4, 10, 2)
    info = fit_zzz_head(head, feats, labels, holdout_fraction=0.2, seed=3)
    assert info['holdout_samples'] == 2 + 4 + 1 + 0                # floor(0.2 n_c) per class
    refs, sigma2 = naive_ppca(feats, labels, 2)                    # refit on all features, then scaled by tau
    assert info['sigma2_ppca'] == pytest.approx(sigma2, rel=1e-9)
    assert head.sigma2().item() == pytest.approx(info['tau'] * sigma2, rel=1e-6)
    for c, ref in refs.items():
        torch.testing.assert_close(F.normalize(head.mu[c], dim=0), ref['mean'], rtol=0, atol=1e-10)
    again = make_head(4, 10, 2)
    assert fit_zzz_head(again, feats, labels, holdout_fraction=0.2, seed=3) == info   # seeded
    no_refit = make_head(4, 10, 2)
    fit_zzz_head(no_refit, feats, labels, holdout_fraction=0.2, seed=3, refit=False)
    assert not torch.allclose(no_refit.mu, head.mu)                # fitted on the 80 % only


def test_absent_classes_keep_parameters():
    feats, labels, _ = class_gaussians(6, 8, 2, 10, seed=3)
    keep = labels != 4
    head = make_head(7, 8, 2)
    before = {k: v.detach().clone() for k, v in head.named_parameters()}
    info = fit_zzz_head(head, feats[keep], labels[keep], temperature=False)
    assert info['classes_fitted'] == 5
    for name in ('mu', 'A', 'v_raw', 'bias'):
        param = getattr(head, name)
        for c in (4, 6):
            torch.testing.assert_close(param[c], before[name][c], rtol=0, atol=0)
        assert not torch.equal(param[0], before[name][0]) or name == 'bias'


def test_rank_zero_is_means_and_pooled_variance():
    feats, labels, _ = class_gaussians(4, 9, 2, 7, seed=4)
    head = make_head(4, 9, 0)
    info = fit_zzz_head(head, feats, labels, temperature=False)
    x = feats / feats.norm(dim=1, keepdim=True)
    total = 0.0
    for c in range(4):
        m = x[labels == c].sum(0)
        m = m / m.norm()
        torch.testing.assert_close(F.normalize(head.mu[c], dim=0), m, rtol=0, atol=1e-10)
        total += ((x[labels == c] - m) ** 2).sum().item()
    assert info['sigma2_ppca'] == pytest.approx(total / (x.shape[0] * 9), rel=1e-9)
    info = fit_zzz_head(make_head(4, 9, 0), feats, labels, holdout=(feats, labels))
    assert math.isfinite(info['tau']) and info['nll_after'] <= info['nll_before']


def test_rank_above_samples_floors_degenerate_directions():
    feats, labels, _ = class_gaussians(3, 10, 2, [3, 1, 4], seed=5)
    head = make_head(3, 10, 5)
    fit_zzz_head(head, feats, labels, temperature=False)
    refs, _ = naive_ppca(feats, labels, 5)
    basis, v = head.basis(torch.float64), head.variances(torch.float64)
    assert torch.isfinite(head.v_raw).all() and torch.isfinite(head.A).all()
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(5, dtype=torch.float64).expand(3, 5, 5),
                               rtol=0, atol=1e-10)
    for c, usable in ((0, 3), (1, 0), (2, 4)):          # scatter about the unit mean has rank min(n_c, d); 0 for n = 1
        torch.testing.assert_close(projector(basis[c, :, :usable]), projector(refs[c]['basis'][:, :usable]),
                                   rtol=0, atol=1e-8)
        assert torch.all(v[c, usable:] <= head.v_min * (1 + 1e-5))
        torch.testing.assert_close(v[c, :usable], refs[c]['v'][:usable], rtol=1e-6, atol=1e-10)
    with torch.no_grad():
        assert torch.isfinite(head(feats)).all()


def test_fitted_head_classifies_new_samples():
    feats, labels, _ = class_gaussians(8, 24, 3, 30, noise=0.01, spread=0.05, seed=6)
    fresh, fresh_labels, _ = class_gaussians(8, 24, 3, 50, noise=0.01, spread=0.05, seed=6, draw=1)
    head = ZZZHead(8, 24, 3)
    fit_zzz_head(head, feats.float(), labels)
    with torch.no_grad():
        acc = (head(fresh.float()).argmax(1) == fresh_labels).double().mean().item()
    assert acc > 0.95


def test_chunking_gives_the_same_fit():
    feats, labels, _ = class_gaussians(7, 12, 3, [4, 9, 2, 15, 6, 1, 8], noise=0.1, spread=0.2, seed=7)
    heads = [make_head(7, 12, 4) for _ in range(3)]
    infos = [fit_zzz_head(heads[0], feats, labels, holdout=(feats, labels)),
             fit_zzz_head(heads[1], feats, labels, holdout=(feats, labels), chunk_classes=2),
             fit_zzz_head(heads[2], feats, labels, holdout=(feats, labels), memory_budget_mb=1e-6)]
    for head, info in zip(heads[1:], infos[1:]):
        assert info['tau'] == pytest.approx(infos[0]['tau'], rel=1e-8) and info['tau'] != 1.0
        for name in ('mu', 'v_raw', 'sigma2_raw', 'bias'):
            torch.testing.assert_close(getattr(head, name), getattr(heads[0], name), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(projector(head.basis(torch.float64)), projector(heads[0].basis(torch.float64)),
                                   rtol=0, atol=1e-9)


def test_prior_bias_is_log_relative_count():
    feats, labels, _ = class_gaussians(3, 8, 1, [2, 4, 8], seed=8)
    head = make_head(3, 8, 1)
    fit_zzz_head(head, feats, labels, temperature=False, prior_bias=True)
    mean_count = 14 / 3
    expected = torch.tensor([math.log(n / mean_count) for n in (2, 4, 8)], dtype=torch.float64)
    torch.testing.assert_close(head.bias.detach(), expected)
    fit_zzz_head(head, feats, labels, temperature=False)
    assert torch.all(head.bias == 0)


def test_float32_features_and_floors():
    feats, labels, _ = class_gaussians(4, 16, 2, 6, noise=1e-7, seed=9)   # generative sigma^2 below the floor
    head = ZZZHead(4, 16, 2)
    info = fit_zzz_head(head, feats.float(), labels, temperature=False)
    assert info['sigma2'] == pytest.approx(head.sigma2_min, rel=1e-4)
    assert torch.isfinite(head.sigma2_raw) and head.sigma2_raw.item() < -10


@pytest.mark.parametrize('call,match', [
    (lambda h, x, y: fit_zzz_head(h, x, y + 10), r'labels must lie in \[0, 4\).*remap'),
    (lambda h, x, y: fit_zzz_head(h, x[:, :5], y), r'shape \(N, 8\).*pass the pooled embeddings'),
    (lambda h, x, y: fit_zzz_head(h, x[:1], y[:1]), r'at least 2 feature rows'),
    (lambda h, x, y: fit_zzz_head(h, x, y.double()), r'integer class indices.*labels.long\(\)'),
    (lambda h, x, y: fit_zzz_head(h, x, y[:-1]), r'labels of shape'),
    (lambda h, x, y: fit_zzz_head(h, x * math.nan, y), r'NaN or inf'),
    (lambda h, x, y: fit_zzz_head(h, x[:8], y[:8]), r'carve a holdout.*holdout=\(feats, labels\)'),
    (lambda h, x, y: fit_zzz_head(h, x, y, holdout=x), r'holdout must be a pair'),
    (lambda h, x, y: fit_zzz_head(h, x, y, holdout=(x[:, :3], y)), r'\(holdout\).*shape \(N, 8\)'),
    (lambda h, x, y: fit_zzz_head(h, x, y, holdout_fraction=1.0), r'holdout_fraction must be in \(0, 1\)'),
    (lambda h, x, y: fit_zzz_head(h, x, y, chunk_classes=0), r'must be >= 1'),
    (lambda h, x, y: fit_zzz_head(h, x, y, calibrate='bias'), r"calibrate must be 'logits' or 'covariance'"),
    (lambda h, x, y: h.init_from_features(x, y + 10), r'labels must lie'),
])
def test_bad_input_raises_value_error(call, match):
    feats, labels, _ = class_gaussians(4, 8, 1, 3, seed=10)
    with pytest.raises(ValueError, match=match):
        call(make_head(4, 8, 2), feats, labels)


def test_eval_mode_head_sees_the_fit():
    feats, labels, _ = class_gaussians(4, 10, 2, 12, noise=0.05, seed=16)
    head = ZZZHead(4, 10, 2).eval()
    with torch.no_grad():
        before = head(feats.float())
    head.init_from_features(feats.float(), labels)
    with torch.no_grad():
        after = head(feats.float())
        head.train()
        reference = head(feats.float())
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-3)


def test_init_from_features_is_fit_zzz_head():
    feats, labels, _ = class_gaussians(3, 8, 1, 10, seed=11)
    a, b = make_head(3, 8, 2), make_head(3, 8, 2)
    assert a.init_from_features(feats, labels, seed=4) == fit_zzz_head(b, feats, labels, seed=4)
    for name, param in a.named_parameters():
        torch.testing.assert_close(param, getattr(b, name), rtol=0, atol=0)


# --- linear probe -----------------------------------------------------------------------------------------------

def naive_probe_objective(linear, feats, labels, weight_decay):
    """mean CE + weight_decay / 2 s^2 ||W||^2 on the raw features, s = RMS per coordinate of the centred ones."""
    s2 = ((feats - feats.mean(0)) ** 2).sum() / feats.numel()
    return F.cross_entropy(linear(feats), labels) + 0.5 * weight_decay * s2 * (linear.weight ** 2).sum()


def test_linear_probe_reaches_its_optimum():
    feats, labels, _ = class_gaussians(5, 10, 2, 30, noise=0.05, spread=0.1, seed=12, scale=False)
    feats = 40.0 * feats + 7.0                                      # raw scale and offset, as a backbone's
    torch.manual_seed(0)
    linear = nn.Linear(10, 5).double()
    before = naive_probe_objective(linear, feats, labels, 1e-2).item()
    info = fit_linear_head(linear, feats, labels, weight_decay=1e-2)
    after = naive_probe_objective(linear, feats, labels, 1e-2)
    assert info['loss_before'] == pytest.approx(before, rel=1e-9)
    assert info['loss_after'] == pytest.approx(after.item(), rel=1e-9)
    assert after.item() < before
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(after, [linear.weight, linear.bias])])
    start = nn.Linear(10, 5).double()                               # gradient scale at a zero start
    nn.init.zeros_(start.weight), nn.init.zeros_(start.bias)
    grad0 = torch.cat([g.flatten() for g in torch.autograd.grad(
        naive_probe_objective(start, feats, labels, 1e-2), [start.weight, start.bias])])
    assert grad.norm() < 1e-4 * grad0.norm()
    # a long L-BFGS run on the naive raw objective finds nothing lower
    opt = torch.optim.LBFGS(start.parameters(), max_iter=3000, tolerance_grad=0, tolerance_change=0,
                            history_size=50, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = naive_probe_objective(start, feats, labels, 1e-2)
        loss.backward()
        return loss

    opt.step(closure)
    reference = naive_probe_objective(start, feats, labels, 1e-2).item()
    assert after.item() <= reference + 1e-9
    with torch.no_grad():
        assert (linear(feats).argmax(1) == labels).double().mean().item() > 0.95


def test_linear_probe_separable_and_scale_free():
    feats, labels, _ = class_gaussians(4, 12, 2, 25, noise=0.002, spread=0.01, seed=13, scale=False)
    small, large = nn.Linear(12, 4).double(), nn.Linear(12, 4).double()
    fit_linear_head(small, feats, labels)
    fit_linear_head(large, 1000.0 * feats, labels)
    with torch.no_grad():
        assert (small(feats).argmax(1) == labels).all()
        torch.testing.assert_close(large(1000.0 * feats), small(feats), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('call,match', [
    (lambda x, y: fit_linear_head(nn.Linear(8, 4), x, y + 4), r'labels must lie'),
    (lambda x, y: fit_linear_head(nn.Linear(9, 4), x, y), r'shape \(N, 9\)'),
    (lambda x, y: fit_linear_head(nn.Linear(8, 4, bias=False), x, y), r'no bias'),
    (lambda x, y: fit_linear_head(nn.Linear(8, 4), x, y, weight_decay=0), r'weight_decay must be > 0'),
    (lambda x, y: fit_linear_head(ZZZHead(4, 8), x, y), r'expected an nn.Linear'),
])
def test_linear_probe_bad_input(call, match):
    feats, labels, _ = class_gaussians(4, 8, 1, 3, seed=14)
    with pytest.raises(ValueError, match=match):
        call(feats.float(), labels)
