"""The checkpoint files of one experiment folder, in timm's layout, consistent after a kill at any moment.

    last.pth.tar            the state after the latest epoch
    checkpoint-<E>.pth.tar  the best `max_history` epochs by the metric (unranked epochs after them, newest first)
    model_best.pth.tar      the best epoch so far
    milestone-<N>.pth.tar   the state after N completed epochs, never evicted
    recovery-<E>-<U>.pth.tar  mid-epoch state every recovery_interval updates (the latest two kept)

Each file is written under a temporary name and renamed (carrot_zzz.files); the ranked files are hard
links to last.pth.tar. Every checkpoint carries the ranking as it stands with itself included (its `saver` entry,
in the fields timm's CheckpointSaver reads), so after a kill between writing last.pth.tar and linking the others,
`restore` re-derives model_best and the history from last.pth.tar and the files on disk. A metric that is not a
finite number (a diverged model: NaN loss, or NaN logits scoring chance) is kept unranked, never best.
"""
import logging
import math
import os
import random
import re
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..files import atomic_link, atomic_write
from ..weights import load_checkpoint_file
from .errors import CheckpointWriteError, first_line

__all__ = ['CheckpointKeeper', 'rng_state', 'set_rng_state', 'plain', 'writing', 'last_checkpoint', 'best_checkpoint',
           'newest_recovery', 'stored_epoch', 'CHECKPOINT_SUFFIX']

_logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = '.pth.tar'
LAST = 'last'                     # last.pth.tar: the state after the latest epoch
BEST = 'model_best'               # model_best.pth.tar: the best-ranked epoch's state
RECOVERY = 'recovery-{epoch}-{update}'                             # recovery-<epoch>-<update>.pth.tar
_RECOVERY_NAME = re.compile(r'recovery-(\d+)-(\d+)' + re.escape(CHECKPOINT_SUFFIX))
Entry = Tuple[int, Optional[float]]       # (epoch, metric or None)


def last_checkpoint(folder: str) -> str:
    """The path of an experiment folder's last.pth.tar."""
    return os.path.join(folder, LAST + CHECKPOINT_SUFFIX)


def best_checkpoint(folder: str) -> str:
    """The path of an experiment folder's model_best.pth.tar."""
    return os.path.join(folder, BEST + CHECKPOINT_SUFFIX)


def newest_recovery(folder: str, after_epoch: int) -> str:
    """The recovery-<E>-<U>.pth.tar of folder with the largest (E, U) among E > after_epoch, '' if none."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = _RECOVERY_NAME.fullmatch(name)
        if match and int(match.group(1)) > after_epoch:
            found.append((int(match.group(1)), int(match.group(2)), name))
    return os.path.join(folder, max(found)[2]) if found else ''


def plain(value: Any) -> Any:
    """A settings value as something torch.load(weights_only=True) reads back (no Namespace, no custom classes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def rng_state() -> Dict[str, Any]:
    """torch, numpy and Python RNG states, in types a weights_only load accepts."""
    kind, keys, *rest = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), *rest],
            'python': random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    kind, keys, *rest = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state['python'])


@contextmanager
def writing(what: str, folder: str) -> Iterator[None]:
    """Inside: an OSError or torch's RuntimeError of a failed write (a full disk shows as 'unexpected pos') becomes
    one CheckpointWriteError; the atomic writes have already removed their temporary file."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, 200)
        raise CheckpointWriteError(f'cannot write {what} in {folder} ({reason}); the files written before are kept '
                                   f'and no partial file is left: free space, or pass another output') from e


def _ranked(metric: Optional[float]) -> bool:
    return metric is not None and math.isfinite(metric)


class CheckpointKeeper:
    """Writes and ranks the checkpoint files of `folder` (see module doc). decreasing: a lower metric is better."""

    def __init__(self, folder: str, max_history: int = 10, decreasing: bool = False):
        if max_history < 1:
            raise ValueError(f'max_history must be >= 1, got {max_history}')
        self.folder = folder
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: List[Entry] = []          # kept epoch files, best first, unranked after, newest first
        self.best: Optional[Entry] = None
        self.recoveries: List[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name + CHECKPOINT_SUFFIX)

    def _epoch_file(self, epoch: int) -> str:
        return self.path(f'checkpoint-{epoch}')

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def _order(self, entries: List[Entry]) -> List[Entry]:
        """Ranked entries best first (ties: the earlier epoch first), then unranked ones newest first."""
        ranked = sorted((e for e in entries if _ranked(e[1])),
                        key=lambda e: (e[1] if self.decreasing else -e[1], e[0]))
        unranked = sorted((e for e in entries if not _ranked(e[1])), key=lambda e: -e[0])
        return ranked + unranked

    def _plan(self, epoch: int, metric: Optional[float]):
        """(history, best, kept?) once `epoch` with `metric` is added: it enters when there is room, when the
        worst kept entry is unranked, or when it beats the worst."""
        entry = (epoch, metric if _ranked(metric) else None)
        history = [e for e in self.history if e[0] != epoch]
        worst = history[-1] if history else None
        kept = len(history) < self.max_history or worst[1] is None or (
            entry[1] is not None and self._better(entry[1], worst[1]))
        if kept:
            history = self._order(history + [entry])
            if len(history) > self.max_history:      # evict the worst: unranked before ranked, the oldest first
                history = history[:self.max_history]
        best = self.best
        if entry[1] is not None and (best is None or self._better(entry[1], best[1])):
            best = entry
        return history, best, kept

    def bookkeeping(self, history: List[Entry], best: Optional[Entry], epoch: int, metric: Optional[float]
                    ) -> Dict[str, Any]:
        """The `saver` entry of a checkpoint, in timm CheckpointSaver's fields."""
        return {'checkpoint_files': [(os.path.basename(self._epoch_file(e)), m) for e, m in history],
                'best_epoch': None if best is None else best[0], 'best_metric': None if best is None else best[1],
                'pending': (epoch, metric)}

    def save(self, state: Dict[str, Any], epoch: int, metric: Optional[float] = None) -> Optional[Entry]:
        """Write `state` as last.pth.tar (+ checkpoint-<epoch>, model_best when it earns them); returns the best."""
        history, best, kept = self._plan(epoch, metric)
        state = {**state, 'epoch': epoch, 'saver': self.bookkeeping(history, best, epoch, metric)}
        if _ranked(metric):
            state['metric'] = float(metric)
        last = self.path(LAST)
        with writing(f'the checkpoint of epoch {epoch}', self.folder):
            atomic_write(last, lambda f: torch.save(state, f))
            if kept:
                atomic_link(last, self._epoch_file(epoch))
            for gone, _ in self.history:
                if gone not in {e for e, _ in history} and os.path.exists(self._epoch_file(gone)):
                    os.unlink(self._epoch_file(gone))
            if best is not None and best != self.best:
                atomic_link(last, self.path(BEST))
        self.history, self.best = history, best
        return best

    def milestone(self, completed_epochs: int) -> str:
        """milestone-<N>.pth.tar: a link to last.pth.tar, outside the ranking."""
        path = self.path(f'milestone-{completed_epochs}')
        with writing(os.path.basename(path), self.folder):
            atomic_link(self.path(LAST), path)
        return path

    def recovery(self, state: Dict[str, Any], epoch: int, update: int) -> str:
        """recovery-<epoch>-<update>.pth.tar, with the ranking so far (`saver`); the one before the previous is
        removed."""
        path = self.path(RECOVERY.format(epoch=epoch, update=update))
        saver = self.bookkeeping(self.history, self.best, epoch, None)        # the ranking so far, for a resume
        with writing(os.path.basename(path), self.folder):
            atomic_write(path, lambda f: torch.save({**state, 'epoch': epoch, 'saver': saver}, f))
        self.recoveries.append(path)
        while len(self.recoveries) > 2:
            old = self.recoveries.pop(0)
            if os.path.exists(old):
                os.unlink(old)
        return path

    def restore(self, saver: Optional[Dict[str, Any]], last_epoch: int) -> Optional[Entry]:
        """Take over the ranking of a resumed run from its last checkpoint's `saver` entry; entries whose files are
        gone are dropped, and model_best is re-linked when it does not hold the best epoch (a kill between the
        writes). Returns the best (epoch, metric)."""
        saver = saver or {}
        entries = [(int(name[len('checkpoint-'):-len(CHECKPOINT_SUFFIX)]), m)
                   for name, m in saver.get('checkpoint_files', ())]
        self.history = self._order([(e, m if _ranked(m) else None) for e, m in entries
                                    if os.path.exists(self._epoch_file(e))])
        best_epoch, best_metric = saver.get('best_epoch'), saver.get('best_metric')
        self.best = (best_epoch, best_metric) if best_epoch is not None and _ranked(best_metric) else None
        if self.best is not None:
            self._repair_best(last_epoch)
        return self.best

    def _repair_best(self, last_epoch: int) -> None:
        best_file = self.path(BEST)
        if os.path.exists(best_file) and stored_epoch(best_file) == self.best[0]:
            return
        source = self._epoch_file(self.best[0]) if self.best[0] != last_epoch else self.path(LAST)
        if os.path.exists(source) and stored_epoch(source) == self.best[0]:
            atomic_link(source, best_file)
            _logger.warning(f'{BEST}{CHECKPOINT_SUFFIX} did not hold the best epoch {self.best[0]}: '
                            f're-linked it from {os.path.basename(source)}')
        else:
            _logger.warning(f'the best epoch {self.best[0]} has no checkpoint file left; model_best keeps what it has')


def stored_epoch(path: str) -> Optional[int]:
    """The `epoch` entry of a checkpoint file (memory-mapped read), None when unreadable."""
    try:
        return load_checkpoint_file(path, mmap=True).get('epoch')
    except Exception:     # a truncated or foreign file: not the one we are looking for
        return None
