"""A fast check of the image files of a data set before training: missing, empty, unreadable or truncated files.

    bad = unreadable_images(dataset)          [(path, reason)], [] when all are fine or the set has no files
    drop_samples(dataset, bad)                leave them out of the set (its labels stay aligned)

Per file: it exists and is not empty; PIL identifies it from its header; it is within PIL's pixel limit (a
decompression bomb otherwise; --max-image-pixels sets the limit); its mode holds 8 bits a channel (16- and 32-bit
integer and float images are named: PIL would clip them to 8 bits, a 16-bit grey PNG reading as solid white);
a JPEG ends with its end-of-image marker (FF D9) and a PNG with its IEND chunk, the usual signs of a file cut short
by an interrupted copy. Only the first
and the last bytes are read, in a thread pool (the check is I/O). Why before training: timm's image readers replace
an image that fails to decode by the next sample, possibly of another class, which breaks the class balance a
P x K batch promises and trains on a wrong label; a missing file of an FGVC list stops the epoch midway.
"""
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

__all__ = ['sample_paths', 'image_problem', 'unreadable_images', 'drop_samples', 'set_pixel_limit', 'WIDE_MODES']

JPEG_END = b'\xff\xd9'
PNG_END = b'IEND\xaeB`\x82'
TAIL_BYTES = 64                     # encoders may pad after the end marker: look in the last few bytes
# modes PIL turns into RGB / L by clipping to 0..255, not by scaling: a 16-bit grey PNG reads as solid white
WIDE_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'I;32', 'F')
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS   # PIL's own limit against decompression bombs (178956970)


def set_pixel_limit(max_pixels: Optional[int]) -> None:
    """PIL's pixel limit for this process (and the loader workers it starts): None keeps PIL's default, 0 lifts it."""
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels or None


def _sample_list(dataset):
    """The object holding the (path, label) list: timm's folder reader, or a carrot_zzz list data set."""
    for owner in (dataset, getattr(dataset, 'reader', None)):
        if not getattr(owner, 'files_on_disk', True):
            return None
        samples = getattr(owner, 'samples', None)
        if isinstance(samples, list) and samples and isinstance(samples[0], (tuple, list)) \
                and isinstance(samples[0][0], str):
            return owner
    return None


def sample_paths(dataset) -> Optional[List[str]]:
    """The file of every sample, in sample order; None for sets that are not files (idx arrays, hub, tar...)."""
    owner = _sample_list(dataset)
    return None if owner is None else [s[0] for s in owner.samples]


def image_problem(path: str) -> Optional[str]:
    """Why `path` is not a readable image ('missing', 'empty', 'not an image', over the pixel limit, a mode wider
    than 8 bits, 'truncated'), None when it is."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 'missing'
    if size == 0:
        return 'empty'
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)     # judged below, by the limit itself
            with Image.open(path) as img:
                kind, mode, pixels = img.format, img.mode, img.width * img.height
    except Image.DecompressionBombError as e:     # PIL refuses above twice its limit: the size is in its message
        found = re.search(r'\((\d+) pixels\)', str(e))
        pixels = int(found.group(1)) if found else None
    except (UnidentifiedImageError, OSError, ValueError):
        return 'not an image'
    if Image.MAX_IMAGE_PIXELS and (pixels is None or pixels > Image.MAX_IMAGE_PIXELS):
        return f'{pixels} pixels, over the pixel limit of {Image.MAX_IMAGE_PIXELS} (raise it with --max-image-pixels)'
    if mode in WIDE_MODES:
        return f'mode {mode} (16- or 32-bit or float): PIL converts it to 8 bits by clipping; convert it to 8-bit first'
    end = {'JPEG': JPEG_END, 'PNG': PNG_END}.get(kind)
    if end is not None:
        with open(path, 'rb') as f:
            f.seek(max(0, size - TAIL_BYTES))
            if end not in f.read():
                return 'truncated'
    return None


def unreadable_images(dataset, workers: int = 8) -> List[Tuple[str, str]]:
    """[(path, reason)] of the samples of `dataset` that image_problem rejects, in sample order."""
    paths = sample_paths(dataset)
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(image_problem, paths))
    return [(p, why) for p, why in zip(paths, problems) if why is not None]


def drop_samples(dataset, bad: Sequence[Tuple[str, str]]) -> int:
    """Remove the samples whose file is in `bad` from the data set's list (and its `targets` list, when it keeps
    one); returns how many were removed."""
    owner = _sample_list(dataset)
    gone = {path for path, _ in bad}
    keep = [i for i, s in enumerate(owner.samples) if s[0] not in gone]
    removed = len(owner.samples) - len(keep)
    owner.samples = [owner.samples[i] for i in keep]
    targets = getattr(owner, 'targets', None)
    if isinstance(targets, list) and len(targets) == len(keep) + removed:
        owner.targets = [targets[i] for i in keep]
    return removed
