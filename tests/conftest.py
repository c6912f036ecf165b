"""Shared test pieces: the repository root on sys.path (train.py and validate.py are scripts, imported by the tests
as modules), one intra-op thread for tiny CPU models, and a tiny learnable image folder."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope='module')
def one_thread():
    """Tiny CPU models on a shared machine: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_image_folder(root, num_classes=4, train_per_class=16, val_per_class=8, size=32, seed=0):
    """root/{train,validation}/class_<c>/<i>.png: class c is a distinct colour plus noise (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(num_classes, 3))
    for split, n in (('train', train_per_class), ('validation', val_per_class)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f'{i}.png'))
    return str(root)


@pytest.fixture(scope='session')
def image_folder():
    """write_image_folder, for tests that need their own folders."""
    return write_image_folder
