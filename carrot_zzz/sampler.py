"""Class-balanced P x K batch sampler, and the per-sample labels of a dataset.

Every global batch holds P_global = world_size * batch_size / K distinct classes with K samples each;
rank r takes classes [r P, (r + 1) P) of it, so each rank's batch is P classes x K samples and the ranks
see different classes of one global plan. The plan for an epoch depends only on (seed, epoch):

    chunks      every class c is shuffled and cut into ceil(n_c / K) chunks of K indices; a short last
                chunk is topped up from the rest of the class (with replacement when n_c < K)
    batches     num_batches = len(dataset) // (world_size * batch_size)  (about one pass over the data);
                each picks P_global distinct classes, weighted by their remaining chunks, and pops one
                chunk of each; once fewer than P_global classes have chunks left, the used-up classes
                are refilled with a fresh shuffle
"""
from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler

from .errors import SettingError


def check_pk_batch(batch_size: int, samples_per_class: int) -> None:
    """SettingError unless a batch of batch_size is P classes x K = samples_per_class samples."""
    if samples_per_class < 1 or samples_per_class > batch_size:
        raise SettingError('samples_per_class', samples_per_class, f'must lie in [1, batch_size={batch_size}]; '
                                                                   f'lower samples_per_class or raise batch_size')
    if batch_size % samples_per_class:
        raise SettingError('batch_size', batch_size, f'is not a multiple of samples_per_class={samples_per_class}; '
                                                     f'use a batch of P x K')


class PKBatchSampler(Sampler[List[int]]):
    """Batches of `batch_size // samples_per_class` classes x `samples_per_class` samples (see module doc).

    Args:
        labels: class index of every sample of the dataset, (N,).
        batch_size: samples per batch on this rank, a multiple of samples_per_class.
        samples_per_class: K.
        num_replicas: world size (DDP); every rank builds the same global plan.
        rank: this process's rank.
        seed: base seed; the plan of an epoch is a function of (seed, epoch) only.
        num_batches: batches per epoch, default len(labels) // (num_replicas * batch_size) (at least 1).
    """

    def __init__(
            self,
            labels: Sequence[int],
            batch_size: int,
            samples_per_class: int,
            num_replicas: int = 1,
            rank: int = 0,
            seed: int = 0,
            num_batches: Optional[int] = None,
    ):
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim != 1 or labels.numel() == 0:
            raise ValueError('PKBatchSampler: labels must be a non-empty 1-d sequence of class indices')
        check_pk_batch(batch_size, samples_per_class)
        if not 0 <= rank < num_replicas:
            raise ValueError(f'PKBatchSampler: rank {rank} outside [0, {num_replicas})')
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.classes_per_batch = batch_size // samples_per_class
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        classes = torch.unique(labels)
        self.class_indices = [torch.nonzero(labels == c).flatten() for c in classes.tolist()]
        global_classes = self.classes_per_batch * num_replicas
        if len(self.class_indices) < global_classes:
            raise SettingError('sampler', 'pk', f'needs {global_classes} distinct classes per global batch '
                                                f'(batch_size / K x world size) but the data set has '
                                                f'{len(self.class_indices)}; raise samples_per_class or lower '
                                                f'batch_size')
        if num_batches is not None and num_batches < 1:
            raise ValueError(f'PKBatchSampler: num_batches must be >= 1, got {num_batches}')
        self.num_batches = num_batches or max(1, labels.numel() // (num_replicas * batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _chunks(self, c: int, gen: torch.Generator) -> List[torch.Tensor]:
        """Shuffle class c and cut it into chunks of K indices, topping up the last one."""
        idx = self.class_indices[c]
        k = self.samples_per_class
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        if idx.numel() < k:  # with replacement: the class is smaller than K
            extra = idx[torch.randint(idx.numel(), (k - idx.numel(),), generator=gen)]
            return [torch.cat([idx, extra])]
        short = (-idx.numel()) % k
        if short:  # top up from the rest of the class, no repeats inside the chunk
            idx = torch.cat([idx, idx[:idx.numel() - (k - short)][:short]])
        return list(idx.view(-1, k))

    def global_plan(self) -> torch.Tensor:
        """The epoch's global plan: (num_batches, P_global, K) dataset indices, classes distinct per batch."""
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        num_classes = len(self.class_indices)
        p_global = self.classes_per_batch * self.num_replicas
        pools = [self._chunks(c, gen) for c in range(num_classes)]
        batches = []
        for _ in range(self.num_batches):
            weights = torch.tensor([float(len(p)) for p in pools])
            if int((weights > 0).sum()) < p_global:   # refill exhausted classes with a fresh shuffle
                for c in range(num_classes):
                    if not pools[c]:
                        pools[c] = self._chunks(c, gen)
                weights = torch.tensor([float(len(p)) for p in pools])
            picked = torch.multinomial(weights, p_global, replacement=False, generator=gen)
            batches.append(torch.stack([pools[c].pop() for c in picked.tolist()]))
        return torch.stack(batches)

    def __iter__(self) -> Iterator[List[int]]:
        plan = self.global_plan()
        p = self.classes_per_batch
        mine = plan[:, self.rank * p:(self.rank + 1) * p]            # (num_batches, P, K)
        for batch in mine:
            yield batch.flatten().tolist()


def dataset_targets(dataset) -> Optional[List[int]]:
    """Labels of a map-style dataset without loading its images, or None where they cannot be read cheaply.

    Tries `targets`, `reader.targets`, `reader.samples` / `parser.samples` ((path, target) pairs, timm's
    ImageFolder reader) and `samples`, unwrapping `.dataset` wrappers (timm's AugMixDataset, Subset).
    """
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        for owner in (dataset, getattr(dataset, 'reader', None), getattr(dataset, 'parser', None)):
            if owner is None:
                continue
            targets = getattr(owner, 'targets', None)
            if targets is not None and not callable(targets):
                return [int(t) for t in targets]
            samples = getattr(owner, 'samples', None)
            if isinstance(samples, (list, tuple)) and (not samples or isinstance(samples[0], (list, tuple))):
                return [int(s[1]) for s in samples]
        indices = getattr(dataset, 'indices', None)
        inner = getattr(dataset, 'dataset', None)
        if indices is not None and inner is not None:
            base = dataset_targets(inner)
            return None if base is None else [base[i] for i in indices]
        dataset = inner
    return None
