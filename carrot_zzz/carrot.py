"""CARROT: a variance barrier and an effective-rank barrier on the classes of a batch of embeddings.

For z (B, D) with labels y, S_bar = mean_i ||z_i - mean(z)||^2, and every class c with n_c >= 2 samples:

    X_c     = z[y == c] - mean(z[y == c])                     (n_c, D)
    S_c     = mean_i ||X_c,i||^2                              trace of Cov_c
    r_c     = S_c / S_bar
    p       = eig(X_c X_c^T) / trace(X_c X_c^T)               = normalised eigenvalues of Cov_c
    erank_c = exp(-sum p log p)
    R_var   = mean_c -log r_c
    R_rank  = mean_c -log(erank_c / N_c)      N_c = D ('dim', the design) or min(n_c - 1, D) ('attainable')
    R       = R_var + R_rank                  (a zero attached to the graph when no class has 2 samples)

Vectorised: labels are sorted to number the classes, class means come from index_add, centred rows go into
a padded (G, K, D) buffer whose Gram matrices (G, K, K) share their non-zero eigenvalues with the covariances
(their traces are n_c S_c), and one batched symmetric eigensolver serves every class (LAPACK on the CPU,
sync-free Jacobi sweeps on accelerators: see jacobi.py). S_bar is the within-class plus the between-class
scatter, B S_bar = sum_c n_c S_c + sum_c n_c ||mean_c - mean(z)||^2: no other pass over z. The sizes G (classes
in the batch) and K (largest class) need one host sync, or none when the caller passes them as static bounds
(a P x K sampler knows both).

Statistics run in float32 (float64 for float64 input) with autocast disabled. Floors keep the value and the
gradients finite where the literal form gives 0/0 or -log 0: S_c and S_bar are floored at eps, and p at eps
inside the log (an exactly-zero eigenvalue then adds exactly 0 to the entropy).
"""
from typing import Dict, Optional, Tuple

import math

import torch
import torch.nn.functional as F
from torch import nn

from .jacobi import symmetric_eigvals

RANK_NORMS = ('dim', 'attainable')
STAT_NAMES = ('R', 'R_var', 'R_rank', 'classes_used', 'min_r', 'min_erank_frac')
NAN_WHEN_UNUSED = ('min_r', 'min_erank_frac')   # the stats that are NaN when no class has 2 samples


class _SymmetricGram(torch.autograd.Function):
    """X (G, K, D) -> X X^T (G, K, K); the backward is one batched product, dX = (dG + dG^T) X."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x @ x.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, = ctx.saved_tensors
        return (grad + grad.transpose(1, 2)) @ x


def labels_from_target(target: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class indices (B,) from class indices (B,) or soft / one-hot targets (B, C) (argmax: dominant class)."""
    if target.ndim == 2 and target.shape[0] == batch_size:
        return target.argmax(dim=1)
    if target.ndim == 1 and target.shape[0] == batch_size and not target.is_floating_point():
        return target
    raise ValueError(
        f'carrot: target must be class indices of shape ({batch_size},) or soft targets of shape '
        f'({batch_size}, C), got {tuple(target.shape)} {target.dtype}')


def carrot_regularizer(
        z: torch.Tensor,
        target: torch.Tensor,
        rank_norm: str = 'dim',
        max_classes: Optional[int] = None,
        max_per_class: Optional[int] = None,
        eps: float = 1e-12,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """CARROT value R and its statistics for one batch.

    Args:
        z: embeddings (B, D), any float dtype.
        target: class indices (B,) or soft / one-hot targets (B, C) as mixup or label smoothing make them.
        rank_norm: 'dim' divides erank by D (the design's default); 'attainable' by min(n_c - 1, D), the
            largest erank a class of n_c samples can reach.
        max_classes: static bound on the number of distinct classes in the batch (P of a P x K sampler).
        max_per_class: static bound on the samples of any class (K of a P x K sampler). With it, the call
            makes no host sync; without it, one. Bounds that are too small fail with a RuntimeError
            (asynchronously on CUDA).
        eps: floor for S_c, S_bar and p.

    Returns:
        R: 0-d tensor in the compute dtype, attached to the graph of z.
        stats: detached 0-d tensors 'R', 'R_var', 'R_rank', 'classes_used', 'min_r' (min r_c) and
            'min_erank_frac' (min erank_c / D); the two minima are NaN when no class has 2 samples.
    """
    if z.ndim != 2:
        raise ValueError(f'carrot: z must be (B, D) embeddings, got shape {tuple(z.shape)}')
    if rank_norm not in RANK_NORMS:
        raise ValueError(f'carrot: rank_norm must be one of {RANK_NORMS}, got {rank_norm!r}')
    batch_size, dim = z.shape
    labels = labels_from_target(target, batch_size)
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        gid, slot, counts, num_groups, group_size = _group_by_class(labels, z, max_classes, max_per_class)
        sums, means, padded = _padded_classes(z, gid, slot, counts, num_groups, group_size)
        gram = _SymmetricGram.apply(padded)                                      # (G, K, K)
        ratio = _scatter_ratio(gram, sums, means, counts, batch_size, eps)       # r_c (G,)
        entropy = _log_erank(gram, eps)                                          # log erank_c (G,)
        if rank_norm == 'dim':
            log_norm = torch.full_like(entropy, math.log(dim))
        else:
            log_norm = torch.log((counts - 1).clamp(min=1, max=dim))
        used = counts >= 2
        num_used = used.sum()
        denom = num_used.clamp_min(1).to(dtype)
        zero = torch.zeros((), dtype=dtype, device=z.device)
        r_var = torch.where(used, -torch.log(ratio), zero).sum() / denom         # mean_c -log r_c
        r_rank = torch.where(used, log_norm - entropy, zero).sum() / denom       # mean_c -log(erank_c / N_c)
        reg = r_var + r_rank
    return reg, _statistics(reg, r_var, r_rank, used, num_used, ratio, entropy, dim)


def _group_by_class(labels: torch.Tensor, z: torch.Tensor, max_classes: Optional[int],
                    max_per_class: Optional[int]):
    """(gid (B,), slot (B,), counts (G,), G, K): each sample's class group (numbered in label order) and its row
    of a zero-padded (G K, D) buffer, the samples per group, the buffer's sizes. One host sync without
    max_per_class (the sizes), none with it (the bounds are checked asynchronously)."""
    batch_size = labels.shape[0]
    labels_sorted, order = torch.sort(labels, stable=True)
    is_start = torch.ones_like(labels_sorted, dtype=torch.bool)
    is_start[1:] = labels_sorted[1:] != labels_sorted[:-1]
    gid_sorted = torch.cumsum(is_start, 0) - 1
    # samples per group (B,), zero past the last group; index_add, as bincount would sync on CUDA
    counts = z.new_zeros(batch_size).index_add(0, gid_sorted, z.new_ones(batch_size))
    if batch_size == 0:
        num_groups, group_size = 0, 0
    elif max_per_class is None:   # the one host sync: the sizes of the padded buffer
        num_groups, group_size = torch.stack([gid_sorted[-1] + 1, counts.max().long()]).tolist()
    else:
        num_groups = batch_size if max_classes is None else max_classes
        group_size = max_per_class
        torch._assert_async(
            (counts.max() <= group_size) & (gid_sorted[-1] < num_groups),
            'carrot: the batch has more classes than max_classes or more samples of a class than '
            'max_per_class. Under a P x K sampler the loader handed over other samples than it was asked for: '
            'timm\'s image readers replace an image that fails to load by the next sample, possibly of another '
            'class. Check the image files (train.py does, up front), or pass no bounds')
    counts = F.pad(counts, (0, max(num_groups - batch_size, 0)))[:num_groups]  # (G,) samples per class
    start = torch.cumsum(counts, 0).long() - counts.long()
    pos_sorted = torch.arange(batch_size, device=z.device) - start.index_select(0, gid_sorted)
    gid = torch.empty_like(gid_sorted).index_copy_(0, order, gid_sorted)
    slot = torch.empty_like(gid_sorted).index_copy_(0, order, gid_sorted * group_size + pos_sorted)
    return gid, slot, counts, num_groups, group_size


def _padded_classes(z: torch.Tensor, gid: torch.Tensor, slot: torch.Tensor, counts: torch.Tensor, num_groups: int,
                    group_size: int):
    """(sums (G, D), means (G, D), padded (G, K, D)): each class centred and copied into a zero-padded buffer
    (index_select / index_add / index_copy: their backward passes are plain gathers and adds, not sorting
    scatters)."""
    sums = z.new_zeros(num_groups, z.shape[1]).index_add(0, gid, z)          # (G, D)
    means = sums / counts.clamp_min(1).unsqueeze(1)                          # (G, D)
    centred = z - means.index_select(0, gid)                                 # (B, D)
    padded = z.new_zeros(num_groups * group_size, z.shape[1]).index_copy_(0, slot, centred)
    return sums, means, padded.view(num_groups, group_size, z.shape[1])


def _scatter_ratio(gram: torch.Tensor, sums: torch.Tensor, means: torch.Tensor, counts: torch.Tensor,
                   batch_size: int, eps: float) -> torch.Tensor:
    """r_c = S_c / S_bar (G,): the trace of the Gram matrix is n_c S_c; S_bar = (within-class + between-class
    scatter) / B, from (G,) and (G, D) terms."""
    within = gram.diagonal(dim1=1, dim2=2).sum(1)                            # n_c S_c (G,)
    grand_mean = sums.sum(0) / max(batch_size, 1)                            # (D,)
    between = counts * (means - grand_mean).square().sum(1)                  # n_c ||m_c - mean(z)||^2 (G,)
    total_scatter = ((within.sum() + between.sum()) / max(batch_size, 1)).clamp_min(eps)  # S_bar
    class_scatter = (within / counts.clamp_min(1)).clamp_min(eps)            # S_c (G,)
    return class_scatter / total_scatter


def _log_erank(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """log erank_c (G,) = the entropy of the normalised eigenvalues of each class's Gram matrix (G, K, K)."""
    eigvals = symmetric_eigvals(gram).clamp_min(0)                             # (G, K)
    p = eigvals / eigvals.sum(1, keepdim=True).clamp_min(eps)
    return -(p * torch.log(p.clamp_min(eps))).sum(1)


def _statistics(reg, r_var, r_rank, used, num_used, ratio, entropy, dim: int) -> Dict[str, torch.Tensor]:
    """The detached 0-d statistics of carrot_regularizer (STAT_NAMES); the minima NaN when no class is used."""
    with torch.no_grad():
        nan = torch.full((), float('nan'), dtype=reg.dtype, device=reg.device)
        inf = torch.full((), float('inf'), dtype=reg.dtype, device=reg.device)
        min_r = torch.where(used, ratio, inf).amin() if used.numel() else inf
        min_erank = torch.where(used, entropy.exp() / dim, inf).amin() if used.numel() else inf
        return dict(zip(STAT_NAMES, (
            reg.detach(), r_var.detach(), r_rank.detach(), num_used,
            torch.where(num_used > 0, min_r, nan), torch.where(num_used > 0, min_erank, nan))))


class CarrotRegularizer(nn.Module):
    """nn.Module form of :func:`carrot_regularizer`: forward(z (B, D), target) -> (R, stats).

    cuda_graph: with static bounds (max_classes and max_per_class) and embeddings on CUDA that require
    grad, the forward and backward of the regulariser are captured once per input shape as CUDA graphs
    (torch.cuda.make_graphed_callables) and replayed: a few kernel launches a step instead of a few
    hundred. Elsewhere it runs eagerly. The returned stats are copies, safe to keep across steps.
    """

    def __init__(
            self,
            rank_norm: str = 'dim',
            max_classes: Optional[int] = None,
            max_per_class: Optional[int] = None,
            eps: float = 1e-12,
            cuda_graph: bool = False,
    ):
        super().__init__()
        if rank_norm not in RANK_NORMS:
            raise ValueError(f'CarrotRegularizer: rank_norm must be one of {RANK_NORMS}, got {rank_norm!r}')
        if cuda_graph and (max_classes is None or max_per_class is None):
            raise ValueError('CarrotRegularizer: cuda_graph=True needs static bounds max_classes and max_per_class')
        self.rank_norm = rank_norm
        self.max_classes = max_classes
        self.max_per_class = max_per_class
        self.eps = eps
        self.cuda_graph = cuda_graph
        self._graphed = {}

    def extra_repr(self) -> str:
        return (f'rank_norm={self.rank_norm!r}, max_classes={self.max_classes}, '
                f'max_per_class={self.max_per_class}, cuda_graph={self.cuda_graph}')

    def _eager(self, z: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return carrot_regularizer(
            z, target, rank_norm=self.rank_norm, max_classes=self.max_classes,
            max_per_class=self.max_per_class, eps=self.eps)

    def forward(self, z: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if not (self.cuda_graph and z.is_cuda and z.requires_grad and torch.is_grad_enabled()):
            return self._eager(z, target)
        labels = labels_from_target(target, z.shape[0])
        key = (tuple(z.shape), z.dtype, z.device)
        if key not in self._graphed:
            def flat(z_, labels_):
                reg, stats = self._eager(z_, labels_)
                return reg, torch.stack([v.to(reg.dtype) for v in stats.values()])
            sample = (z.detach().clone().requires_grad_(True), labels.clone())
            with torch.autocast(device_type='cuda', enabled=False):   # capture refuses autocast's cache
                self._graphed[key] = torch.cuda.make_graphed_callables(flat, sample)
        reg, packed = self._graphed[key](z, labels)
        values = packed.clone()
        stats = dict(zip(STAT_NAMES, values.unbind()))
        stats['classes_used'] = stats['classes_used'].long()
        return reg, stats
