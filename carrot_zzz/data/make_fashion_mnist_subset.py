"""Write a class-balanced subset of Fashion-MNIST's original idx files (the shipped one is made this way):

    python -m carrot_zzz.data.make_fashion_mnist_subset SRC_DIR OUT_DIR --train-per-class 300 --test-per-class 100

keeps the first N images of each class in file order (deterministic) and writes the same idx.gz format;
`--classes 0 1 ...` keeps only those labels (a held-out class makes an out-of-distribution set). The reader is
carrot_zzz.data.fashion_mnist; this module is the command only, so the package never imports it.
"""
import argparse
import os
from typing import Optional, Sequence

import numpy as np

from .fashion_mnist import FILE_PREFIX, load_split, write_idx

__all__ = ['make_subset', 'main']


def make_subset(src: str, out: str, train_per_class: int, test_per_class: int,
                classes: Optional[Sequence[int]] = None) -> None:
    """Write the first N images of each class (file order) of both splits of src as idx.gz files into out.

    classes: keep only these labels (their original values: a held-out class stays out of training and can be
    written to a folder of its own, e.g. as an out-of-distribution set for validate.py --ood-data-dir).
    """
    os.makedirs(out, exist_ok=True)
    for split, per_class in (('train', train_per_class), ('test', test_per_class)):
        images, labels = load_split(src, split)
        order = np.argsort(labels, kind='stable')                     # grouped by class, file order within
        rank = np.empty_like(order)
        rank[order] = np.arange(len(labels)) - np.searchsorted(labels[order], labels[order])  # position in class
        chosen = (rank < per_class) & (np.isin(labels, classes) if classes is not None else True)
        keep = np.flatnonzero(chosen)                                 # file order (classes interleaved)
        prefix = FILE_PREFIX[split]
        write_idx(os.path.join(out, f'{prefix}-images-idx3-ubyte.gz'), images[keep])
        write_idx(os.path.join(out, f'{prefix}-labels-idx1-ubyte.gz'), labels[keep].astype(np.uint8))


def main(argv=None):
    p = argparse.ArgumentParser(description='Write a class-balanced Fashion-MNIST subset (first N per class).')
    p.add_argument('src', help='folder of the original Fashion-MNIST idx(.gz) files')
    p.add_argument('out', help='output folder')
    p.add_argument('--train-per-class', type=int, default=300)
    p.add_argument('--test-per-class', type=int, default=100)
    p.add_argument('--classes', type=int, nargs='+', default=None, metavar='LABEL',
                   help='keep only these labels, 0-9 (default: all ten)')
    a = p.parse_args(argv)
    make_subset(a.src, a.out, a.train_per_class, a.test_per_class, a.classes)


if __name__ == '__main__':
    main()
