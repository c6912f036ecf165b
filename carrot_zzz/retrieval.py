"""Retrieval and leave-one-out k-NN evaluation of pooled embeddings of one split, chunked over the queries.

Notation: N samples, embeddings (N, D), labels (N,). Every sample is a query against all the OTHER samples of the
split, ranked by the cosine similarity s_ij = u_i . u_j of the L2-normalised embeddings u (float32); neighbours of
equal similarity are ranked by index (smaller index first), so every result is deterministic; similarities
closer than float32 rounding (about 6e-8) may compare as equal. n_i = number of other samples with the label of i.

    recall@K      mean_i [at least one of the K nearest neighbours of i has the label of i]
    map@r         mean_i (1 / R_i) sum_{j=1..R_i} P_i(j) [j-th neighbour of i has the label of i],  R_i = n_i,
                  P_i(j) = fraction of the j nearest neighbours with the label of i
                  (MAP@R, Musgrave et al., 2020, "A Metric Learning Reality Check")
    knn{k}_top1   mean_i [majority label of the k nearest neighbours of i = label of i]; a tie between classes
                  goes to the tied class whose nearest member ranks first (i.e. the nearest neighbour among them)

The means run over the queries with n_i >= 1: a query whose class has no other sample in the split can never be
answered and is left out of every metric (the metric-learning convention), so knn1_top1 equals recall@1. All are
NaN when no query qualifies. K and k larger than N - 1 use all N - 1 other samples.

Memory is linear in N: the similarities are computed for chunk_size queries at a time, (chunk_size, N) blocks,
and only the max(K, k, max_i R_i) nearest of each are kept (at most N - 1), never an N x N matrix; the per-query
results, (metrics, N) float64, are summed once at the end, so the chunk size does not change any result.
On CUDA the similarities follow torch's float32 matmul setting (the default 'highest' is full float32; TF32,
if enabled with torch.set_float32_matmul_precision, rounds them more coarsely and so makes more ties).
"""
import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

__all__ = ['retrieval_metrics']


def _ordered_keys(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Distinct int64 sort keys of similarities values (Q, M) float32 at column indices columns (broadcastable):
    larger similarity -> larger key; equal similarities -> the smaller column index gets the larger key.

    key = monotone_int32(s) * 2^32 + (2^32 - 1 - column); monotone_int32 reverses the bit patterns of negative
    floats (and -0.0 counts as +0.0), so sorting the keys is sorting by (similarity desc, index asc), exactly.
    """
    bits = (values + 0.0).view(torch.int32)                                 # a copy; -0.0 + 0.0 = +0.0
    bits ^= (bits >> 31).bitwise_and_(0x7FFFFFFF)                           # negative floats: reverse their order
    return bits.to(torch.int64).bitwise_left_shift_(32) + ((2 ** 32 - 1) - columns)


def _nearest_others(unit: torch.Tensor, start: int, stop: int, k: int) -> torch.Tensor:
    """Indices (stop - start, k) of the k nearest other samples of queries start..stop-1: similarity descending,
    equal similarities by index ascending. unit: (N, D) float32 L2-normalised embeddings; k <= N - 1.

    topk on the (Q, N) similarities picks the k largest values, but which of several samples equal to the k-th
    value it keeps is unspecified: the rows where such ties were cut (exact duplicates; one host sync per chunk)
    are selected again through the exact keys. Then the k kept are sorted by their keys.
    """
    sim = unit[start:stop] @ unit.T                                         # (Q, N) cosine similarities
    rows = torch.arange(stop - start, device=unit.device)
    sim[rows, rows + start] = -math.inf                                     # not its own neighbour
    values, indices = sim.topk(k, dim=1, sorted=False)                      # (Q, k)
    kth = values.min(1, keepdim=True).values
    cut = (sim == kth).sum(1) > (values == kth).sum(1)                      # some equal to the k-th were left out
    if cut.any():
        cut_rows = cut.nonzero().squeeze(1)
        tied = sim[cut_rows]                                                # (Q_cut, N)
        indices[cut_rows] = _ordered_keys(tied, torch.arange(sim.shape[1], device=sim.device)).topk(
            k, dim=1, sorted=False).indices
        values[cut_rows] = tied.gather(1, indices[cut_rows])
    order = _ordered_keys(values, indices).argsort(dim=1, descending=True)
    return indices.gather(1, order)


def _knn_correct(neighbour_labels: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """(Q,) bool: majority label of neighbour_labels (Q, k), nearest first, equals query_labels (Q,).

    Each position j scores votes_j * k + (k - 1 - j), votes_j = how many of the k share its label: the winner
    is the first position of the most voted class, so ties between classes go to the nearest of their members.
    Votes come from (Q, k, k) comparisons: meant for the small k of k-NN evaluation.
    """
    k = neighbour_labels.shape[1]
    votes = (neighbour_labels[:, :, None] == neighbour_labels[:, None, :]).sum(2)      # (Q, k)
    score = votes * k + (k - 1 - torch.arange(k, device=votes.device))
    winner = neighbour_labels.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
    return winner == query_labels


def _average_precision_at_r(hit: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(Q,) float64 (1 / R) sum_{j <= R} P(j) hit_j from hit (Q, k) bool, nearest first, and R (Q,) <= k."""
    rank = torch.arange(1, hit.shape[1] + 1, device=hit.device)
    precision = hit.cumsum(1, dtype=torch.float64).div_(rank)              # P(j), (Q, k); exact counts
    precision.mul_(hit & (rank <= r[:, None]))                              # only correct neighbours j <= R
    return precision.sum(1) / r.clamp(min=1)


def _check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], chunk_size: int) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f'retrieval_metrics: embeddings must be (N, D), got shape {tuple(embeddings.shape)}')
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f'retrieval_metrics: labels must be (N,) = ({embeddings.shape[0]},) to match the '
                         f'embeddings, got shape {tuple(labels.shape)}')
    if embeddings.shape[0] < 2:
        raise ValueError('retrieval_metrics: needs at least 2 samples (every query is compared with the others)')
    if chunk_size < 1 or any(k < 1 for k in ks):
        raise ValueError(f'retrieval_metrics: chunk_size and every K / k must be >= 1, got chunk_size={chunk_size}, '
                         f'ks={list(ks)}')
    if embeddings.is_floating_point() and not torch.isfinite(embeddings).all():
        raise ValueError('retrieval_metrics: the embeddings contain NaN or inf; evaluate a model that produces '
                         'finite features')


def retrieval_metrics(
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        knn_ks: Sequence[int] = (1, 20),
        chunk_size: int = 256,
) -> Dict[str, float]:
    """{'recall@K' for K in recall_ks, 'map@r', 'knn{k}_top1' for k in knn_ks}, fractions in [0, 1] (see the
    module docstring) of embeddings (N, D) with labels (N,), on the embeddings' device.

    chunk_size: queries per block. Peak memory beyond the input (measured on the CPU): 4 * N * D bytes for the
    normalised copy of the embeddings, plus about 13 * chunk_size * N bytes for a similarity block and its top-k
    (330 MB at chunk_size=256, N=100 000) while the classes are small next to N, up to about 60 * chunk_size * N
    bytes when one class holds a large part of the split (its R_i neighbours are kept and sorted for MAP@R):
    lower chunk_size for such splits.
    """
    _check_inputs(embeddings, labels, list(recall_ks) + list(knn_ks), chunk_size)
    n = embeddings.shape[0]
    unit = F.normalize(embeddings.detach().float(), dim=1)                  # (N, D) float32
    _, label_ids, class_sizes = torch.unique(labels.detach().to(unit.device), return_inverse=True,
                                             return_counts=True)
    others = class_sizes[label_ids] - 1                                     # n_i, (N,)
    k_max = min(n - 1, max([1, *recall_ks, *knn_ks, int(others.max())]))

    per_query = torch.empty(len(recall_ks) + 1 + len(knn_ks), n, dtype=torch.float64, device=unit.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        neighbour_labels = label_ids[_nearest_others(unit, start, stop, k_max)]   # (Q, k_max)
        query_labels = label_ids[start:stop]
        hit = neighbour_labels == query_labels[:, None]
        chunk = [hit[:, :min(k, k_max)].any(1) for k in recall_ks]
        chunk.append(_average_precision_at_r(hit, others[start:stop]))
        chunk += [_knn_correct(neighbour_labels[:, :min(k, k_max)], query_labels) for k in knn_ks]
        per_query[:, start:stop] = torch.stack([c.double() for c in chunk])
    counted = others > 0                                                    # queries that enter the means
    num_queries = int(counted.sum())
    # one sum over all queries at the end: the same floating-point result for every chunk size
    means = (per_query[:, counted].sum(1) / num_queries).tolist() if num_queries else [math.nan] * len(per_query)
    names = [f'recall@{k}' for k in recall_ks] + ['map@r'] + [f'knn{k}_top1' for k in knn_ks]
    return dict(zip(names, means))
