"""Eigenvalues of a batch of small symmetric matrices without a host sync, differentiable.

torch.linalg.eigvalsh checks LAPACK / cuSOLVER error codes on the host, one sync per call on CUDA. Here the
eigenvectors V come from a fixed number of cyclic Jacobi sweeps (vectorised: each step applies n/2
disjoint rotations, round-robin ordering, n - 1 steps a sweep), computed without autograd, and the
eigenvalues are the Rayleigh quotients

    lambda_k = v_k^T A v_k

whose gradient, with V held fixed, is v_k v_k^T: the exact eigenvalue derivative. The quotient is
stationary in v_k, so an error e in the eigenvectors changes lambda only by O(e^2).
"""
import math
from functools import lru_cache
from typing import Optional, Tuple

import torch


@lru_cache(maxsize=None)
def _round_robin(n: int) -> Tuple[Tuple[Tuple[int, ...], Tuple[int, ...]], ...]:
    """For even n, n - 1 rounds of n / 2 disjoint pairs (p, q), p < q, covering every pair once."""
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        pairs = [tuple(sorted((players[i], players[n - 1 - i]))) for i in range(n // 2)]
        rounds.append((tuple(p for p, _ in pairs), tuple(q for _, q in pairs)))
        players = [players[0], players[-1]] + players[1:-1]
    return tuple(rounds)


@lru_cache(maxsize=None)
def _rotation_indices(n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per round, flat indices into an (n, n) matrix: gather (3 n/2: pp, qq, pq) and scatter (4 n/2: pp, qq,
    pq, qp). Made once per size and device, so later calls copy nothing from the host."""
    gather, scatter = [], []
    for p, q in _round_robin(n):
        pp = [i * n + i for i in p]
        qq = [j * n + j for j in q]
        pq = [i * n + j for i, j in zip(p, q)]
        qp = [j * n + i for i, j in zip(p, q)]
        gather.append(pp + qq + pq)
        scatter.append(pp + qq + pq + qp)
    return torch.tensor(gather, device=device), torch.tensor(scatter, device=device)


def symmetric_eigvals(a: torch.Tensor, method: str = 'auto') -> torch.Tensor:
    """Eigenvalues (..., n), unordered, of symmetric matrices a (..., n, n). Gradients flow to a.

    method: 'lapack' (torch.linalg.eigvalsh), 'jacobi' (sync-free), or 'auto': LAPACK on the CPU, where a
    host sync costs nothing, Jacobi on accelerators.
    """
    if method == 'auto':
        method = 'lapack' if a.device.type == 'cpu' else 'jacobi'
    if method == 'lapack':
        return torch.linalg.eigvalsh(a)
    if method != 'jacobi':
        raise ValueError(f"symmetric_eigvals: method must be 'auto', 'lapack' or 'jacobi', got {method!r}")
    return jacobi_eigvals(a)


def jacobi_eigvals(a: torch.Tensor, sweeps: Optional[int] = None) -> torch.Tensor:
    """Eigenvalues (..., n) of symmetric a (..., n, n) by cyclic Jacobi; 3 + ceil(log2 n) sweeps by default
    (measured: float64 round-off for 2 <= n <= 33 with random Gram matrices)."""
    n = a.shape[-1]
    if n <= 1:
        return a.diagonal(dim1=-2, dim2=-1)
    if sweeps is None:
        sweeps = 3 + math.ceil(math.log2(n))
    size = n + n % 2                        # an odd n gets a zero row and column: a_pq = 0 there, no rotation
    half = size // 2
    gather, scatter = _rotation_indices(size, a.device)
    with torch.no_grad():
        work = a.detach().reshape(-1, n, n)
        if size != n:
            work = torch.nn.functional.pad(work, (0, 1, 0, 1))
        batch = work.shape[0]
        vecs = torch.eye(size, dtype=a.dtype, device=a.device).expand(batch, size, size)
        for _ in range(sweeps):
            for g_idx, s_idx in zip(gather, scatter):
                a_pp, a_qq, a_pq = work.reshape(batch, -1)[:, g_idx].split(half, dim=1)
                # the rotation angle that zeroes a_pq, taken in [-pi/4, pi/4]
                sign = torch.copysign(torch.ones_like(a_pq), a_qq - a_pp)
                theta = 0.5 * torch.atan2(2 * a_pq * sign, (a_qq - a_pp) * sign)
                c, s = torch.cos(theta), torch.sin(theta)
                # the pairs cover every index: the rotation has no identity part
                rot = work.new_zeros(batch, size * size).index_copy_(1, s_idx, torch.cat([c, c, s, -s], 1))
                rot = rot.view(batch, size, size)
                work = rot.transpose(1, 2) @ work @ rot
                vecs = vecs @ rot
        vecs = vecs[:, :n, :n].reshape(a.shape)         # the padded coordinate is never rotated
    return torch.einsum('...ik,...ij,...jk->...k', vecs, a, vecs)
