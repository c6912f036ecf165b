"""Data sets for train.py / validate.py: timm's create_dataset plus fine-grained readers and Fashion-MNIST.

    create_dataset('cub200', root='/data/CUB_200_2011', split='train')     official files, official split
    create_dataset('fashion_mnist', root=None, split='validation')         the subset shipped with carrot_zzz
    create_dataset('', root='/data/imagenet', split='validation')          anything else: timm's create_dataset

Names (case-insensitive, '-' = '_'): see DATASETS. Splits: 'train', and 'val' / 'validation' / 'test' for the
official test split (see carrot_zzz.data.fgvc for FGVC-Aircraft's and Flowers-102's trainval protocol).
"""
from functools import partial
from typing import Callable, Dict, Optional

from .fashion_mnist import FashionMNIST
from .fgvc import (CUB200, EVAL_SPLITS, TRAIN_SPLITS, FGVCAircraft, Flowers102, ImageListDataset, NABirds,
                   StanfordCars, StanfordDogs, split_kind)

__all__ = ['create_dataset', 'DATASETS', 'ImageListDataset', 'CUB200', 'NABirds', 'FGVCAircraft',
           'StanfordCars', 'StanfordDogs', 'Flowers102', 'FashionMNIST', 'split_kind', 'TRAIN_SPLITS', 'EVAL_SPLITS']

# name -> constructor(root, split, input_img_mode=...)
DATASETS: Dict[str, Callable] = {
    'cub200': CUB200, 'cub': CUB200, 'cub_200_2011': CUB200,
    'nabirds': NABirds,
    'fgvc_aircraft': FGVCAircraft, 'aircraft': FGVCAircraft,
    'fgvc_aircraft_family': partial(FGVCAircraft, level='family'),
    'aircraft_family': partial(FGVCAircraft, level='family'),
    'fgvc_aircraft_manufacturer': partial(FGVCAircraft, level='manufacturer'),
    'aircraft_manufacturer': partial(FGVCAircraft, level='manufacturer'),
    'stanford_cars': StanfordCars, 'cars': StanfordCars,
    'stanford_dogs': StanfordDogs, 'dogs': StanfordDogs,
    'flowers102': Flowers102, 'oxford_flowers102': Flowers102,
    'fashion_mnist': FashionMNIST,
}


def _key(name: Optional[str]) -> str:
    return (name or '').strip().lower().replace('-', '_')


def create_dataset(name: str, root: Optional[str] = None, split: str = 'validation', class_map=None,
                   load_bytes: bool = False, input_img_mode: Optional[str] = 'RGB', **kwargs):
    """timm.data.create_dataset with the same signature, plus the data sets of DATASETS.

    For a DATASETS name: returns its ImageListDataset (dataset[i] -> (PIL image, int label), `.classes`,
    `.targets`, settable `.transform`); timm-only arguments (is_training, batch_size, seed, repeats, download,
    num_samples, input_key, target_key, trust_remote_code, search_split) are accepted and ignored.
    Raises FileNotFoundError / ValueError with a one-line message naming the fix.
    """
    ctor = DATASETS.get(_key(name))
    if ctor is None:
        from timm.data import create_dataset as timm_create_dataset
        return timm_create_dataset(name, root=root, split=split, class_map=class_map or {}, load_bytes=load_bytes,
                                   input_img_mode=input_img_mode, **kwargs)
    if class_map:
        raise ValueError(f"--class-map applies to image folders; '{name}' takes its classes from its official "
                         f"files: remove --class-map")
    if load_bytes:
        raise ValueError(f"'{name}' returns decoded images; remove --tf-preprocessing")
    return ctor(root or None, split, input_img_mode=input_img_mode)
