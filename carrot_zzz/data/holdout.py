"""A held-out part of a training split, for data sets without an official validation split (the FGVC sets).

    fit, held = stratified_holdout(targets, fraction=0.1, seed=42)     index tensors, disjoint, together all
    train_part, held_part = Part(train_set, fit), Part(eval_view_of_train_set, held)

Per class c with n_c samples, floor(fraction * n_c) are held out, at most n_c - 1 (every class keeps a training
sample; a class of one sample holds none out). Which ones depends only on (labels, seed): every DDP rank and every
resume carves the same split. The choice is a seeded random rank within each class (no loop over classes).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ['stratified_holdout', 'Part']


def stratified_holdout(targets: Sequence[int], fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept indices, held-out indices), both sorted, on the CPU, of a split whose labels are `targets` (N,): a
    sequence of ints or a tensor on any device."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'holdout_fraction must lie in [0, 1), got {fraction}')
    labels = torch.as_tensor(targets if torch.is_tensor(targets) else list(targets), dtype=torch.long).cpu()
    if labels.numel() == 0:
        raise ValueError('holdout: the split has no samples')
    noise = torch.rand(labels.numel(), generator=torch.Generator().manual_seed(seed))
    order = torch.argsort(noise)
    order = order[torch.argsort(labels[order], stable=True)]           # grouped by class, random within
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(labels.numel()) - starts[labels[order]]
    held_per_class = torch.minimum((fraction * counts).floor().long(), (counts - 1).clamp(min=0))
    held = rank_in_class < held_per_class[labels[order]]
    return order[~held].sort().values, order[held].sort().values


class Part(Dataset):
    """The samples `indices` of `dataset`, optionally with its labels renumbered (label t becomes relabel[t]).
    `transform` reads and sets the wrapped data set's own (timm's loaders set it), and `targets` lists the part's
    labels (the P x K sampler reads them)."""

    def __init__(self, dataset, indices: torch.Tensor, targets: Sequence[int],
                 relabel: Optional[Sequence[int]] = None):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.relabel = list(relabel) if relabel is not None else None
        self.targets = [self._label(int(targets[i])) for i in self.indices]

    def _label(self, target: int) -> int:
        return self.relabel[target] if self.relabel is not None and 0 <= target < len(self.relabel) else target

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        item = self.dataset[self.indices[index]]
        if self.relabel is None:
            return item
        sample, target = item
        return sample, self._label(int(target))

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    def __getattr__(self, name: str):
        if name == 'dataset':              # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)  # classes, reader, ... of the whole split
