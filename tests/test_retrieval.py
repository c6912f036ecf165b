"""carrot_zzz.retrieval against a naive reference (full N x N similarities, Python loops), hand-computed cases,
exact ties and chunk-size invariance."""
import math
import os
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from carrot_zzz.retrieval import _nearest_others, _ordered_keys, retrieval_metrics  # noqa: E402


def naive_retrieval(embeddings, labels, recall_ks=(1, 2, 4, 8), knn_ks=(1, 20)):
    """The module docstring's definitions, one query at a time, from the full float64 similarity matrix."""
    x = embeddings.double()
    x = x / x.norm(dim=1, keepdim=True)
    sim = (x @ x.T).tolist()
    y = labels.tolist()
    n = len(y)
    per_metric = {f'recall@{k}': [] for k in recall_ks}
    per_metric['map@r'] = []
    per_metric.update({f'knn{k}_top1': [] for k in knn_ks})
    for i in range(n):
        ranked = sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i][j], j))   # ties: index order
        correct = [y[j] == y[i] for j in ranked]
        r = sum(correct)
        if r == 0:                                                   # no other sample of its class: left out
            continue
        for k in recall_ks:
            per_metric[f'recall@{k}'].append(any(correct[:k]))
        precision_sum = sum(sum(correct[:j + 1]) / (j + 1) for j in range(r) if correct[j])
        per_metric['map@r'].append(precision_sum / r)
        for k in knn_ks:
            nearest = [y[j] for j in ranked[:k]]
            votes = Counter(nearest)
            best = max(votes.values())
            prediction = next(c for c in nearest if votes[c] == best)   # tied classes: the nearest one wins
            per_metric[f'knn{k}_top1'].append(prediction == y[i])
    return {name: (sum(v) / len(v) if v else math.nan) for name, v in per_metric.items()}


def _assert_close(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        if math.isnan(expected[name]):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def _random_split(seed, n=60, dim=8, num_classes=7, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    if duplicates:                                                   # exact ties: each vector 1 to 4 times
        base = torch.randn(n // 3, dim, generator=g)
        emb = base[torch.randint(0, len(base), (n,), generator=g)]
    else:
        emb = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[:3] = torch.tensor([100, 101, 102])                       # three singleton classes
    return emb, labels


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('duplicates', [False, True])
def test_matches_naive_reference(seed, duplicates):
    emb, labels = _random_split(seed, duplicates=duplicates)
    ks, knn_ks = (1, 2, 4, 8), (1, 3, 20)
    _assert_close(retrieval_metrics(emb, labels, ks, knn_ks, chunk_size=16), naive_retrieval(emb, labels, ks, knn_ks))


def test_few_large_classes_map_at_r_over_long_lists():
    # R up to ~45: MAP@R needs far more neighbours than K or k
    emb, labels = _random_split(3, n=120, dim=4, num_classes=2, duplicates=True)
    _assert_close(retrieval_metrics(emb, labels, chunk_size=32), naive_retrieval(emb, labels))


@pytest.mark.parametrize('duplicates', [False, True])
def test_chunk_size_does_not_change_results(duplicates):
    emb, labels = _random_split(4, n=50, duplicates=duplicates)
    results = [retrieval_metrics(emb, labels, chunk_size=c) for c in (1, 7, 50, 1000)]
    assert all(r == results[0] for r in results[1:])


def _circle(degrees):
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], 1)


def test_hand_computed_circle():
    # angles 0 A, 20 B, 30 A, 110 B, 210 C (singleton, left out as a query), 50 A; neighbour orders (by angle gap):
    #   q0: B A A B C   q1: A A A B C   q2: B A A B C   q3: A A B C A   q5: A B A B C
    emb = _circle([0, 20, 30, 110, 210, 50])
    labels = torch.tensor([0, 1, 0, 1, 2, 0])
    m = retrieval_metrics(emb, labels, recall_ks=(1, 2, 4, 8), knn_ks=(1, 3, 20))
    assert m['recall@1'] == pytest.approx(1 / 5)                     # only q5
    assert m['recall@2'] == pytest.approx(3 / 5)                     # q0, q2, q5
    assert m['recall@4'] == 1.0 and m['recall@8'] == 1.0
    # AP@R: q0 (R=2) 1/2 * 1/2, q1 (R=1) 0, q2 1/2 * 1/2, q3 0, q5 (R=2) 1/2 * 1
    assert m['map@r'] == pytest.approx((0.25 + 0 + 0.25 + 0 + 0.5) / 5)
    assert m['knn1_top1'] == m['recall@1']
    assert m['knn3_top1'] == pytest.approx(3 / 5)                    # majority A for all: right for q0, q2, q5
    # k = 20 uses all 5 others; q0 and q2 tie 2 A : 2 B, the nearest (B) wins; q5 ties too, nearest A wins
    assert m['knn20_top1'] == pytest.approx(1 / 5)


def test_equal_similarities_rank_by_index():
    # q0 = (1, 0) is equally similar (0) to samples 1 and 2 = (0, 1): sample 1 ranks first
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    first_is_wrong = retrieval_metrics(emb, torch.tensor([0, 1, 0]), recall_ks=(1, 2), knn_ks=(1,))
    # queries: q0 (nearest: 1, wrong), q2 (nearest: its duplicate 1, wrong); q1 is a singleton
    assert first_is_wrong['recall@1'] == 0.0 and first_is_wrong['recall@2'] == 1.0
    first_is_right = retrieval_metrics(emb, torch.tensor([0, 0, 1]), recall_ks=(1, 2), knn_ks=(1,))
    # queries: q0 (nearest: 1, right), q1 (nearest: its duplicate 2, wrong); q2 is a singleton
    assert first_is_right['recall@1'] == 0.5 and first_is_right['knn1_top1'] == 0.5


@pytest.mark.parametrize('k', [5, 3])   # 5: every tie is kept, only their order matters; 3: ties are cut
def test_identical_embeddings_give_index_order(k):
    unit = torch.nn.functional.normalize(torch.ones(6, 3))
    for chunk in (1, 4):
        order = torch.cat([_nearest_others(unit, s, min(s + chunk, 6), k) for s in range(0, 6, chunk)])
        assert order.tolist() == [[j for j in range(6) if j != i][:k] for i in range(6)]


def test_ordered_keys_sort_like_a_stable_descending_sort():
    values = [0.5, -0.0, 0.0, -1.0, 1.0, -math.inf, 0.5, 1e-30, -1e-30, -0.5, 0.0, -1.0]
    sim = torch.tensor([values])
    keys = _ordered_keys(sim, torch.arange(len(values)))
    assert keys.unique().numel() == len(values)                      # distinct: topk is deterministic
    expected = sorted(range(len(values)), key=lambda j: (-values[j], j))   # -0.0 == 0.0: index order
    assert keys[0].argsort(descending=True).tolist() == expected


def test_all_singletons_give_nan():
    m = retrieval_metrics(torch.randn(5, 4), torch.arange(5))
    assert all(math.isnan(v) for v in m.values())


def test_k_larger_than_split_uses_all_others():
    emb = _circle([0, 10, 90, 100])
    labels = torch.tensor([0, 1, 0, 1])                              # each nearest neighbour is wrong
    m = retrieval_metrics(emb, labels, recall_ks=(1, 100), knn_ks=(100,))
    assert m['recall@1'] == 0.0 and m['recall@100'] == 1.0
    # three others: 2 of the other class, 1 of the own class: the majority is always wrong
    assert m['knn100_top1'] == 0.0


def test_input_dtypes_and_arbitrary_label_values():
    emb, labels = _random_split(5, n=40)
    expected = naive_retrieval(emb, labels)
    _assert_close(retrieval_metrics(emb.double(), labels * 7 - 300), expected)


@pytest.mark.parametrize('embeddings, labels, match', [
    (torch.randn(4), torch.zeros(4), r'\(N, D\)'),
    (torch.randn(4, 3), torch.zeros(5), r'labels must be \(N,\)'),
    (torch.randn(1, 3), torch.zeros(1), 'at least 2'),
    (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), torch.zeros(2), 'NaN'),
])
def test_bad_input_is_a_clear_error(embeddings, labels, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(embeddings, labels)


def test_bad_chunk_size_is_a_clear_error():
    with pytest.raises(ValueError, match='chunk_size'):
        retrieval_metrics(torch.randn(4, 3), torch.zeros(4), chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    emb, labels = _random_split(6, n=300, dim=32, duplicates=True)
    _assert_close(retrieval_metrics(emb.cuda(), labels.cuda(), chunk_size=64), retrieval_metrics(emb, labels))
