"""Running means of 0-d device tensors, read back (one host sync) only when a log line or an epoch needs them."""
from collections import OrderedDict
from typing import Dict, Iterable

import torch

__all__ = ['RunningMeans']


class RunningMeans:
    """Weighted sums and counts per name, on the device. Values named in `skip_nan` (statistics that are NaN
    by definition in some batches, e.g. CARROT's minima when no class has 2 samples) leave out their NaN
    batches; any other NaN or inf shows in its mean, as a diverged loss should."""

    def __init__(self, skip_nan: Iterable[str] = ()):
        self.skip_nan = frozenset(skip_nan)
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, object] = {}

    def add(self, values: Dict[str, torch.Tensor], weight: float = 1.0) -> None:
        for name, value in values.items():
            value = value.detach().float()
            count = weight                                  # a Python number: no device work when always defined
            if name in self.skip_nan:
                defined = ~torch.isnan(value)
                value, count = torch.where(defined, value, 0.0), defined.float() * weight
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
            self.counts[name] = self.counts.get(name, 0.0) + count

    def state(self) -> Dict[str, Dict[str, object]]:
        """The sums and counts, on the CPU (a recovery checkpoint keeps them: the epoch's means continue)."""
        cpu = lambda v: v.detach().cpu() if torch.is_tensor(v) else v     # noqa: E731
        return {'sums': {n: cpu(v) for n, v in self.sums.items()}, 'counts': {n: cpu(v) for n, v in self.counts.items()}}

    def load(self, state: Dict[str, Dict[str, object]], device: torch.device) -> None:
        """Continue from a state() (tensors back on `device`)."""
        move = lambda v: v.to(device) if torch.is_tensor(v) else v        # noqa: E731
        self.sums = {n: move(v) for n, v in state['sums'].items()}
        self.counts = {n: move(v) for n, v in state['counts'].items()}

    def means(self, world_size: int = 1) -> 'OrderedDict[str, float]':
        """{name: mean} over everything added (summed over DDP ranks first); NaN for a name never defined."""
        if not self.sums:
            return OrderedDict()
        names = list(self.sums)
        device = next(iter(self.sums.values())).device
        table = torch.stack([torch.stack([self.sums[n], torch.as_tensor(self.counts[n], dtype=torch.float32,
                                                                         device=device)]) for n in names])  # (K, 2)
        if world_size > 1:
            torch.distributed.all_reduce(table)
        table = table.cpu()
        return OrderedDict((n, (s / c).item() if c > 0 else float('nan')) for n, (s, c) in zip(names, table))
