"""Sync-free Jacobi eigenvalues against LAPACK."""
import functools
import itertools

import pytest
import torch

import carrot_zzz.carrot
from carrot_zzz.jacobi import _round_robin, jacobi_eigvals, symmetric_eigvals
from carrot_zzz import carrot_regularizer


@pytest.mark.parametrize('n', [2, 4, 6, 16])
def test_round_robin_covers_every_pair_once(n):
    pairs = [pq for p, q in _round_robin(n) for pq in zip(p, q)]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for p, q in _round_robin(n):
        assert len(set(p) | set(q)) == n                    # disjoint within a round


@pytest.mark.parametrize('n', [1, 2, 3, 4, 7, 16, 33])
def test_values_and_gradients_match_lapack(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(20, n, 40, dtype=torch.float64, generator=g)
    a = (x @ x.mT).requires_grad_(True)
    weights = torch.rand(20, n, dtype=torch.float64, generator=g)
    ours = jacobi_eigvals(a).sort(-1).values
    ref = torch.linalg.eigvalsh(a)                          # ascending
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())
    grad_ours, = torch.autograd.grad((ours * weights).sum(), a)
    grad_ref, = torch.autograd.grad((ref * weights).sum(), a)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-9, atol=1e-9)


def test_rank_deficient_and_zero_matrices():
    x = torch.randn(5, 6, 3, dtype=torch.float64)           # rank 3 of 6
    a = torch.cat([x @ x.mT, torch.zeros(1, 6, 6, dtype=torch.float64)])
    torch.testing.assert_close(jacobi_eigvals(a).sort(-1).values, torch.linalg.eigvalsh(a), rtol=0, atol=1e-12)


def test_bad_method():
    with pytest.raises(ValueError, match="method must be 'auto', 'lapack' or 'jacobi'"):
        symmetric_eigvals(torch.eye(2), method='qr')


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_carrot_with_jacobi_matches_lapack(monkeypatch, dtype, tol):
    labels = torch.arange(12).repeat_interleave(8)[torch.randperm(96, generator=torch.Generator().manual_seed(0))]
    z = torch.randn(96, 64, dtype=dtype)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ref, _ = carrot_regularizer(z1, labels)
    ref.backward()
    monkeypatch.setattr(carrot_zzz.carrot, 'symmetric_eigvals', functools.partial(symmetric_eigvals, method='jacobi'))
    ours, _ = carrot_regularizer(z2, labels, max_classes=12, max_per_class=8)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(z2.grad, z1.grad, rtol=tol * 10, atol=tol * 10 * z1.grad.abs().max().item())
