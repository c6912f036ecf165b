"""PKBatchSampler: P classes x K samples per batch, one pass per epoch, deterministic, DDP-aware."""
from collections import Counter

import pytest
import torch

from carrot_zzz.sampler import PKBatchSampler, dataset_targets


def labels_of(sizes):
    return [c for c, n in enumerate(sizes) for _ in range(n)]


SIZES = [30, 3, 12, 7, 1, 20, 9, 16, 5, 2, 11, 8]   # uneven classes, some smaller than K


def test_batches_are_p_classes_by_k():
    labels = labels_of(SIZES)
    sampler = PKBatchSampler(labels, batch_size=16, samples_per_class=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 16
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 16 and len(counts) == 4 and set(counts.values()) == {4}
        for c in counts:   # no repeats inside a class's chunk unless the class is smaller than K
            idx = [i for i in batch if labels[i] == c]
            assert len(set(idx)) == min(4, SIZES[c])


def test_about_one_pass_and_balanced_classes():
    labels = labels_of(SIZES)
    sampler = PKBatchSampler(labels, batch_size=8, samples_per_class=4, seed=1)
    seen = Counter(i for b in sampler for i in b)
    assert sum(seen.values()) == len(sampler) * 8 >= len(labels) - 8
    assert len(seen) > 0.8 * len(labels)                     # most samples visited once per epoch


def test_deterministic_for_seed_and_epoch():
    labels = labels_of(SIZES)
    a = PKBatchSampler(labels, batch_size=8, samples_per_class=2, seed=3)
    b = PKBatchSampler(labels, batch_size=8, samples_per_class=2, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)
    assert list(PKBatchSampler(labels, batch_size=8, samples_per_class=2, seed=4)) != list(b)


def test_ddp_ranks_split_one_global_plan():
    labels = labels_of(SIZES)
    ranks = [PKBatchSampler(labels, batch_size=8, samples_per_class=4, num_replicas=3, rank=r, seed=0)
             for r in range(3)]
    single = PKBatchSampler(labels, batch_size=24, samples_per_class=4, seed=0)
    assert len({len(s) for s in ranks}) == 1
    for step, parts in enumerate(zip(*ranks)):
        classes = [{labels[i] for i in p} for p in parts]
        assert all(len(c) == 2 for c in classes)
        assert not (classes[0] & classes[1]) and not (classes[0] & classes[2]) and not (classes[1] & classes[2])
    # the ranks' batches together are the global plan
    plan = single.global_plan()
    assert torch.equal(ranks[0].global_plan(), plan)
    first = [next(iter(r)) for r in ranks]
    assert first[0] + first[1] + first[2] == plan[0].flatten().tolist()


def test_bad_configurations():
    labels = labels_of(SIZES)
    with pytest.raises(ValueError, match='raise batch_size'):
        PKBatchSampler(labels, batch_size=4, samples_per_class=8)
    with pytest.raises(ValueError, match='multiple'):
        PKBatchSampler(labels, batch_size=10, samples_per_class=4)
    with pytest.raises(ValueError, match='distinct classes'):
        PKBatchSampler(labels, batch_size=64, samples_per_class=2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match='num_batches must be >= 1'):
            PKBatchSampler(labels, batch_size=8, samples_per_class=4, num_batches=bad)


def test_dataset_targets_reads_labels_without_images():
    class Reader:
        samples = [('a.png', 1), ('b.png', 0)]

    class Dataset:
        reader = Reader()

    assert dataset_targets(Dataset()) == [1, 0]
    assert dataset_targets(torch.utils.data.Subset(Dataset(), [1])) == [0]

    class Targets:
        targets = torch.tensor([2, 3])

    assert dataset_targets(Targets()) == [2, 3]
    assert dataset_targets(object()) is None
