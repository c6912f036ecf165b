"""The pieces of a calibrated, open-set head, each against an independent naive form written from the formulas:
temperature fit and fold (carrot_zzz.temperature), ZZZHead.mahalanobis, the two ZZZ penalties, the OOD scores
(carrot_zzz.ood), and class-name matching (carrot_zzz.data.classes)."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carrot_zzz import FoldedZZZHead, ZZZHead
from carrot_zzz.data.classes import label_map, parse_class_names
from carrot_zzz.data.holdout import Part
from carrot_zzz.ood import OODScorer
from carrot_zzz.temperature import fit_temperature, fold_temperature


def _head(num_classes=6, dim=12, rank=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = ZZZHead(num_classes, dim, rank).to(dtype)
    with torch.no_grad():
        head.mu.normal_()
        head.sigma2_raw.fill_(-1.5)
        head.bias.normal_()
        if rank:
            head.A.normal_()
            head.v_raw.normal_()
    return head


def _naive_gaussians(head):
    """(m (C, d), Sigma (C, d, d), log|Sigma| (C,)) from the design's literal definitions: U = QR(A).Q."""
    d = head.feat_dim
    m = F.normalize(head.mu, dim=1)
    sigma2 = F.softplus(head.sigma2_raw) + head.sigma2_min
    eye = torch.eye(d, dtype=m.dtype)
    if head.rank:
        U = torch.linalg.qr(head.A).Q
        v = F.softplus(head.v_raw) + head.v_min
        sigma = U @ torch.diag_embed(v) @ U.transpose(1, 2) + sigma2 * eye
    else:
        sigma = (sigma2 * eye).expand(head.num_classes, d, d)
    return m, sigma, torch.logdet(sigma)


def _naive_logits(head, x):
    m, sigma, logdet = _naive_gaussians(head)
    delta = F.normalize(x, dim=1)[:, None, :] - m[None]                    # (B, C, d): the literal form
    q = torch.einsum('bcd,cde,bce->bc', delta, torch.linalg.inv(sigma), delta)
    return -0.5 * (q + logdet) + head.bias, q


# --- temperature --------------------------------------------------------------------------------------------------

def _grid_temperature(logits, targets):
    """The NLL minimiser by brute force over a fine log grid (independent of the Newton solver)."""
    grid = torch.logspace(-2, 2, 20001, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits.double() / t, targets) for t in grid[::50]])
    best = grid[::50][nll.argmin()]
    fine = best * torch.logspace(-0.02, 0.02, 2001, dtype=torch.float64)
    return fine[torch.stack([F.cross_entropy(logits.double() / t, targets) for t in fine]).argmin()].item()


def test_fit_temperature_finds_the_nll_minimum_and_recovers_a_known_temperature():
    torch.manual_seed(0)
    scores = torch.randn(4000, 10, dtype=torch.float64) * 3
    targets = torch.multinomial(torch.softmax(scores / 2.5, 1), 1).squeeze(1)    # labels drawn at T = 2.5
    found = fit_temperature(scores, targets)
    assert found['identifiable']
    assert found['temperature'] == pytest.approx(_grid_temperature(scores, targets), rel=2e-4)
    assert found['temperature'] == pytest.approx(2.5, rel=0.1)
    assert found['nll_after'] < found['nll_before']
    assert found['nll_after'] == pytest.approx(F.cross_entropy(scores / found['temperature'], targets).item(), abs=1e-9)


def test_an_error_free_split_has_no_temperature():
    logits = torch.eye(4).repeat(5, 1) * 3
    found = fit_temperature(logits, torch.arange(4).repeat(5))
    assert found == dict(temperature=1.0, nll_before=found['nll_before'], nll_after=found['nll_before'],
                         identifiable=False)


@pytest.mark.parametrize('kind', ['linear', 'zzz', 'zzz_rank0'])
def test_fold_divides_the_logits_keeps_top1_and_lowers_nll(kind):
    torch.manual_seed(1)
    head = nn.Linear(12, 6).double() if kind == 'linear' else _head(rank=0 if kind == 'zzz_rank0' else 3)
    x = torch.randn(300, 12, dtype=torch.float64)
    with torch.no_grad():
        before = head(x)
    targets = torch.where(torch.rand(300) < 0.7, before.argmax(1), torch.randint(0, 6, (300,)))
    found = fit_temperature(before, targets)
    assert fold_temperature(head, found['temperature']) is False
    with torch.no_grad():
        after = head(x)
    torch.testing.assert_close(after, before / found['temperature'], rtol=1e-9, atol=1e-9)
    assert torch.equal(after.argmax(1), before.argmax(1))
    assert F.cross_entropy(after, targets).item() < F.cross_entropy(before, targets).item()


def test_fold_reports_a_variance_at_its_floor():
    head = _head()
    with torch.no_grad():
        head.sigma2_raw.fill_(-9.0)          # sigma^2 close to its floor: a small T pushes it below
    assert head.divide_logits(0.01) is True
    with pytest.raises(ValueError, match='positive'):
        fold_temperature(head, 0.0)
    with pytest.raises(ValueError, match='nn.Linear or a ZZZHead'):
        fold_temperature(nn.Conv2d(3, 3, 1), 2.0)


# --- Mahalanobis distances and the OOD scores ---------------------------------------------------------------------

@pytest.mark.parametrize('rank', [0, 1, 3])
def test_mahalanobis_equals_the_naive_float64_form(rank):
    head = _head(rank=rank)
    x = torch.randn(9, 12, dtype=torch.float64)
    logits, q = _naive_logits(head, x)
    torch.testing.assert_close(head.mahalanobis(x), q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(head(x), logits, rtol=1e-10, atol=1e-10)
    with torch.no_grad():                                    # the folded head gives them too
        torch.testing.assert_close(FoldedZZZHead(head, torch.float64).mahalanobis(x), q, rtol=1e-10, atol=1e-10)


def test_mahalanobis_shrinks_by_the_folded_temperature():
    head = _head()
    x = torch.randn(5, 12, dtype=torch.float64)
    q = head.mahalanobis(x).detach()
    head.divide_logits(1.7)
    torch.testing.assert_close(head.mahalanobis(x).detach(), q / 1.7, rtol=1e-10, atol=1e-10)


def test_ood_scores_against_their_definitions():
    head = _head().eval()
    x = torch.randn(20, 12, dtype=torch.float64)
    with torch.no_grad():
        logits = head(x)
        scores = OODScorer(head)(logits, x)
        _, q = _naive_logits(head, x)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(scores['msp'], p.max(1).values.float())
    torch.testing.assert_close(scores['maxlogit'], logits.max(1).values.float())
    torch.testing.assert_close(scores['energy'], torch.log(torch.exp(logits).sum(1)).float())
    torch.testing.assert_close(scores['ll'], (logits - head.bias).max(1).values.float())
    torch.testing.assert_close(scores['maha'], -q.min(1).values.float())
    subset = [4, 1]
    cut = OODScorer(head, subset)(logits[:, subset], x)
    torch.testing.assert_close(cut['maha'], -q[:, subset].min(1).values.float())
    assert set(OODScorer(nn.Linear(12, 6))(logits, x)) == {'msp', 'maxlogit', 'energy'}


# --- the design's two penalties -----------------------------------------------------------------------------------

def _naive_penalties(head):
    m = F.normalize(head.mu, dim=1)
    U = torch.linalg.qr(head.A).Q                                           # (C, d, r)
    v = F.softplus(head.v_raw) + head.v_min
    sigma2 = (F.softplus(head.sigma2_raw) + head.sigma2_min).detach()
    shrink = sum(torch.log((sigma2 + v[c]) / sigma2).square().sum() for c in range(head.num_classes))
    decouple = sum((U[c].T @ m[c]).square().sum() for c in range(head.num_classes))
    return shrink / head.num_classes, decouple / head.num_classes


def test_penalties_and_their_gradients_equal_the_naive_forms():
    head = _head()
    params = [head.mu, head.A, head.v_raw, head.sigma2_raw]
    for ours, naive in zip((head.v_shrink_penalty(), head.decoupling_penalty()), _naive_penalties(head)):
        torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-12)
        got = torch.autograd.grad(ours, params, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(naive, params, allow_unused=True, retain_graph=True)
        for g, w in zip(got, want):
            if w is None:
                assert g is None or torch.count_nonzero(g) == 0
            else:
                torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    assert head.decoupling_penalty().item() <= 1.0
    zero = _head(rank=0)
    assert zero.v_shrink_penalty().item() == 0.0 and zero.decoupling_penalty().item() == 0.0


def test_decoupling_is_zero_when_the_mean_is_orthogonal_to_the_subspace():
    head = _head(num_classes=2, dim=6, rank=2)
    with torch.no_grad():
        head.mu.copy_(torch.eye(6, dtype=torch.float64)[:2])
        head.A.copy_(torch.eye(6, dtype=torch.float64)[None, :, 2:4].expand(2, 6, 2))
    assert head.decoupling_penalty().item() == pytest.approx(0.0, abs=1e-14)
    with torch.no_grad():
        head.mu.copy_(torch.eye(6, dtype=torch.float64)[2:4])    # each mean inside its subspace
    assert head.decoupling_penalty().item() == pytest.approx(1.0, abs=1e-12)


# --- class names --------------------------------------------------------------------------------------------------

def test_label_map_and_stored_names():
    assert label_map(['b', 'd'], ['a', 'b', 'c', 'd']) == [1, 3]
    with pytest.raises(ValueError, match="not trained on: 'zebra'"):
        label_map(['a', 'zebra'], ['a', 'b'])
    assert parse_class_names(json.dumps(['a', 'b']), 2) == ['a', 'b'] and parse_class_names(None) is None
    for text, message in (('not json', 'not JSON'), (json.dumps({'a': 1}), 'list of distinct'),
                          (json.dumps(['a', 'a']), 'list of distinct'), (json.dumps(['a']), '1 names for 2')):
        with pytest.raises(ValueError, match=message):
            parse_class_names(text, 2)


def test_part_relabels_samples_and_targets():
    data = [(f'img{i}', i % 3) for i in range(6)]
    part = Part(data, torch.arange(6), [t for _, t in data], relabel=[5, 0, 2])
    assert part.targets == [5, 0, 2, 5, 0, 2] and part[1] == ('img1', 0) and part[3] == ('img3', 5)


def test_threshold_at_tpr_is_the_highest_that_keeps_the_share():
    from carrot_zzz.metrics import threshold_at_tpr
    torch.manual_seed(0)
    scores = torch.randn(1000)
    for tpr in (0.5, 0.95, 1.0):
        t = threshold_at_tpr(scores, tpr)
        assert int((scores >= t).sum()) >= tpr * 1000
        assert int((scores > t).sum()) < tpr * 1000          # any higher threshold keeps fewer
