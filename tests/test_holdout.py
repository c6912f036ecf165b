"""The held-out part of a training split (carrot_zzz.data.holdout) against a per-class loop written from its rule."""
import random

import pytest
import torch

from carrot_zzz.data.holdout import Part, stratified_holdout


def naive_counts(labels, fraction):
    """Held-out samples per class: floor(fraction * n_c), at most n_c - 1."""
    counts = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    return {c: min(int(fraction * n), n - 1) for c, n in counts.items()}


@pytest.mark.parametrize('fraction', [0.0, 0.1, 0.25, 0.5, 0.9])
def test_stratified_counts_disjoint_and_seeded(fraction):
    rng = random.Random(0)
    labels = [rng.randrange(7) for _ in range(300)] + [7, 8, 8]          # a singleton class and a pair
    kept, held = stratified_holdout(labels, fraction, seed=3)
    assert sorted(kept.tolist() + held.tolist()) == list(range(len(labels)))   # disjoint, together all
    got = {}
    for i in held.tolist():
        got[labels[i]] = got.get(labels[i], 0) + 1
    expected = {c: k for c, k in naive_counts(labels, fraction).items() if k}
    assert got == expected
    again = stratified_holdout(labels, fraction, seed=3)
    assert torch.equal(again[1], held)
    if held.numel() > 2:
        assert not torch.equal(stratified_holdout(labels, fraction, seed=4)[1], held)


def test_bad_fraction():
    with pytest.raises(ValueError, match='holdout_fraction must lie in'):
        stratified_holdout([0, 1], 1.0, 0)


def test_part_forwards_transform_and_lists_its_targets():
    class Base:
        transform = None
        classes = ['a', 'b']

        def __getitem__(self, i):
            return (i if self.transform is None else self.transform(i)), i % 2

    base = Base()
    part = Part(base, torch.tensor([3, 0]), [i % 2 for i in range(5)])
    part.transform = lambda i: 10 * i
    assert base.transform is part.transform and part[0] == (30, 1)
    assert part.targets == [1, 0] and part.classes == ['a', 'b'] and len(part) == 2
