"""The output folder of a training run: made, owned by one run at a time, its args.yaml and summary.csv.

    folder = open_experiment(output, name, args_text, resuming, overwrite)   rank 0 only
    log = SummaryLog(os.path.join(folder, 'summary.csv')); log.append(epoch, train, eval, lr)

Ownership is an exclusive lock (fcntl.flock) on `<folder>/.lock`, held until the process exits: the kernel
drops it when the process dies, kill -9 included, so a stale lock never blocks a restart. The lock file names
the owner (host, pid). A second run into the same folder stops with one line; a new run (no resume) into a
folder that already holds a checkpoint stops too, unless told to overwrite.
"""
import csv
import fcntl
import io
import logging
import os
import socket
from typing import Dict, Optional

from ..files import atomic_write, remove_stale_temporaries
from .checkpoints import last_checkpoint
from .errors import SettingError

__all__ = ['open_experiment', 'ExperimentLock', 'SummaryLog', 'DEFAULT_OUTPUT']

DEFAULT_OUTPUT = './output/train'   # timm's default output folder

_logger = logging.getLogger(__name__)
LOCK_NAME = '.lock'


class ExperimentLock:
    """An exclusive, non-blocking lock on a folder for the life of this process (or until release())."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self._file = open(self.path, 'a+')
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or 'another process'
            self._file.close()
            raise SettingError('experiment', os.path.basename(folder), f'{folder} is in use by a running training '
                                                                       f'({owner}); wait for it or pass another '
                                                                       f'experiment=NAME') from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f'host {socket.gethostname()} pid {os.getpid()}\n')
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def open_experiment(output: str, name: str, args_text: str, resuming: bool, overwrite: bool):
    """(folder, lock): the run's output folder, made if needed, locked, with args.yaml written.

    A folder that already holds last.pth.tar is a finished or stopped run: without resuming it stays untouched
    unless overwrite (SettingError naming resume=auto and experiment=NAME otherwise)."""
    folder = os.path.join(output, name)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SettingError('output', output, f'cannot make the folder {folder} ({e.strerror}); pass a writable '
                                             f'output=PATH') from e
    try:
        lock = ExperimentLock(folder)
    except OSError as e:
        raise SettingError('output', output, f'cannot write in {folder} ({e.strerror}); pass a writable '
                                             f'output=PATH') from e
    if not resuming and not overwrite and os.path.exists(last_checkpoint(folder)):
        lock.release()
        raise SettingError('experiment', name, f'{folder} holds a run already; continue it with resume=auto, pass '
                                               f'a new experiment=NAME, or overwrite it with `overwrite`')
    removed = remove_stale_temporaries(folder)
    if removed:
        _logger.info(f'Removed {removed} temporary files a stopped run left in {folder}')
    atomic_write(os.path.join(folder, 'args.yaml'), lambda f: f.write(args_text.encode()))
    return folder, lock


class SummaryLog:
    """summary.csv: one row per evaluated epoch, timm's columns (epoch, train_*, eval_*, lr)."""

    def __init__(self, path: str):
        self.path = path

    def keep_before(self, epoch: int) -> None:
        """Drop the rows of `epoch` and later (a resumed run redoes them; a fresh run starts the file anew)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, newline='') as f:
            rows = list(csv.reader(f))
        header, body = (rows[0], rows[1:]) if rows else ([], [])
        kept = [r for r in body if r and r[0] != 'epoch' and int(float(r[0])) < epoch]
        if len(kept) == len(body) and epoch > 0:
            return
        text = _csv_text([header, *kept] if kept else [])
        atomic_write(self.path, lambda f: f.write(text.encode()))

    def append(self, epoch: int, train: Dict[str, float], evaluation: Optional[Dict[str, float]],
               lr: float) -> Dict[str, float]:
        """Add the epoch's row (a header first when the file is new or empty); returns the row."""
        row = {'epoch': epoch, **{f'train_{k}': v for k, v in train.items()},
               **{f'eval_{k}': v for k, v in (evaluation or {}).items()}, 'lr': lr}
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        return row


def _csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
