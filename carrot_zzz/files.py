"""Writing files so that a kill, a full disk or a second writer never leaves a half-written file under its name.

Every write goes to a temporary file in the same folder whose name no other writer uses (name, pid, random
suffix), is flushed to disk, then renamed over the target (os.replace is atomic on one file system); the
temporary file is removed on every exit path that Python sees. `remove_stale_temporaries` clears what a
killed process left behind.
"""
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, Optional

__all__ = ['replacing', 'atomic_write', 'atomic_link', 'remove_stale_temporaries', 'unwritable', 'TEMP_SUFFIX']

TEMP_SUFFIX = '.partial'


def _temporary_name(path: str) -> str:
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}')


@contextmanager
def replacing(path: str, mode: int = 0o644) -> Iterator[str]:
    """Yield a temporary path to write; after the block it is synced to disk, given `mode` and renamed over path.
    On any error or interrupt inside, it is removed and path keeps its previous content."""
    tmp = _temporary_name(path)
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write(path: str, write: Callable[[BinaryIO], None], mode: int = 0o644) -> None:
    """write(file) into a temporary file, then replace path with it (see `replacing`)."""
    with replacing(path, mode) as tmp:
        with open(tmp, 'wb') as f:
            write(f)


def atomic_link(src: str, dst: str) -> None:
    """dst becomes a hard link to src (a copy where links are not supported), replacing dst atomically."""
    tmp = _temporary_name(dst)
    try:
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str) -> int:
    """Remove the temporary files of `replacing` / `atomic_link` in folder (call with the folder's lock held)."""
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith('.') and name.endswith(TEMP_SUFFIX):
            os.unlink(os.path.join(folder, name))
            removed += 1
    return removed


def unwritable(path: str, folder: bool = False) -> Optional[str]:
    """Why `path` cannot be written, None when it can: a file whose folder is missing or not writable, or that is
    a folder itself; with folder=True a folder that is a file, not writable, or cannot be created (its first
    existing parent is a file or not writable). Checked before the work that ends in the write."""
    path = os.path.abspath(os.fspath(path))
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            return 'it is a file, not a folder'
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            return f'{path} is a file, not a folder'
        return None if os.access(path, os.W_OK | os.X_OK) else f'the folder {path} is not writable'
    if os.path.isdir(path):
        return 'it is a folder; name a file'
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return 'its folder does not exist; create it or pass another path'
    if not os.access(parent, os.W_OK | os.X_OK):
        return 'its folder is not writable; pass another path'
    return None
