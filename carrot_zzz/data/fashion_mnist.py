"""Fashion-MNIST from its original idx files (gzipped or not): the full set, or the subset shipped with carrot_zzz.

    FashionMNIST(root=None, split='train')      the class-balanced subset in carrot_zzz/data/fashion_mnist_subset/
    FashionMNIST(root='/usr/share/datasets/fashion-mnist', split='validation')   the full 60k / 10k files

Files read (the names of the original release, `.gz` optional):
    train-images-idx3-ubyte, train-labels-idx1-ubyte      (train split)
    t10k-images-idx3-ubyte,  t10k-labels-idx1-ubyte       (test split; 'val' / 'validation' / 'test')

idx format: big-endian int32 magic (0x00000803 images, 0x00000801 labels), the int32 sizes (N[, 28, 28]),
then uint8 data. Images are 28 x 28 grayscale ('L'), converted to input_img_mode ('RGB' for 3-channel models).

carrot_zzz.data.make_fashion_mnist_subset (a command) writes class-balanced subsets of the original files.
"""
import gzip
import os
import struct
from typing import Optional, Tuple

import numpy as np

from .fgvc import ImageListDataset, split_kind

__all__ = ['FashionMNIST', 'CLASSES', 'SHIPPED_DIR', 'FILE_PREFIX', 'read_idx', 'write_idx', 'load_split']

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fashion_mnist_subset')
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
FILE_PREFIX = {'train': 'train', 'test': 't10k'}


def _find(root: str, name: str) -> str:
    for candidate in (name + '.gz', name):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f'fashion_mnist: {name}[.gz] not found in {root}; point --data-dir at the folder with the original '
        f'Fashion-MNIST idx files (or leave it empty for the subset shipped with carrot_zzz)')


def read_idx(path: str) -> np.ndarray:
    """uint8 array of an idx file (gzipped when the name ends in .gz): (N,) labels or (N, H, W) images.

    Raises ValueError naming the file when it is truncated, not gzip data, or not a uint8 idx file.
    """
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack('>HBB', data[:4])
        shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    except (EOFError, struct.error, gzip.BadGzipFile) as e:
        raise ValueError(f'{path} is truncated or not an idx file ({type(e).__name__}: {e}); '
                         f'copy the original file again') from e
    if zero != 0 or dtype != 0x08:
        raise ValueError(f'{path} is not a uint8 idx file (magic {data[:4].hex()}); expected the original idx format')
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f'{path} holds {len(data) - offset} bytes of data for an array of shape {shape}: it is '
                         f'truncated; copy the original file again')
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file, gzipped (level 9, fixed mtime: reproducible bytes) if path ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack('>' + 'I' * array.ndim, *array.shape)
    if path.endswith('.gz'):
        with open(path, 'wb') as raw, gzip.GzipFile(fileobj=raw, mode='wb', compresslevel=9, mtime=0) as f:
            f.write(header + array.tobytes())
    else:
        with open(path, 'wb') as f:
            f.write(header + array.tobytes())


def load_split(root: Optional[str], split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of 'train' or the test split of the files in root."""
    root = root or SHIPPED_DIR
    if not os.path.isdir(root):
        raise FileNotFoundError(f'fashion_mnist: data folder {root} does not exist; pass --data-dir with the '
                                f'folder of the Fashion-MNIST idx files, or none for the shipped subset')
    prefix = FILE_PREFIX[split_kind(split, 'fashion_mnist')]
    images = read_idx(_find(root, f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(_find(root, f'{prefix}-labels-idx1-ubyte')).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f'fashion_mnist: {root} holds {images.shape} images for {labels.shape} labels')
    return images, labels


class FashionMNIST(ImageListDataset):
    """Fashion-MNIST as a timm-style dataset: dataset[i] -> (PIL image in input_img_mode, int label).

    root: folder with the original idx files; None / '' reads the shipped subset (data/fashion_mnist_subset/).
    split: 'train', or 'val' / 'validation' / 'test' (the official t10k test set).
    """

    files_on_disk = False          # the sample names label arrays read from the idx files

    def __init__(self, root: Optional[str] = None, split: str = 'train', input_img_mode: str = 'RGB', transform=None):
        images, labels = load_split(root, split)
        super().__init__(
            samples=[(f'{split_kind(split)}_{i:05d}.png', int(t)) for i, t in enumerate(labels)],
            classes=CLASSES, input_img_mode=input_img_mode, transform=transform)
        self.images = images

    def load_image(self, index: int):
        from PIL import Image
        return Image.fromarray(self.images[index])
