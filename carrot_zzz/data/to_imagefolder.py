"""Convert a data set read by carrot_zzz.data into an ImageFolder tree, for tools that only read folders.

    python -m carrot_zzz.data.to_imagefolder --dataset cub200 --data-dir /data/CUB_200_2011 --out /data/cub_folder

writes
    OUT/train/<class>/<image>      symlinks to the original files (PNG files for in-memory sets: fashion_mnist)
    OUT/val/<class>/<image>        the official test split (timm's 'validation' finds 'val/')
    OUT/class_map.txt              the class folder names, one per line, line k = label k (timm's --class-map)

Class folders are the class names with '/' and control characters replaced by '_', prefixed with the zero-padded
label ('007.Dress') unless the names already sort (timm's natural sort) in label order, so timm's ImageFolder
gives every image the same label as the reader, with or without --class-map.
"""
import argparse
import os
import sys
from typing import List, Optional

from timm.utils import natural_key

from . import DATASETS, create_dataset
from .fgvc import safe_name

__all__ = ['class_folders', 'to_imagefolder', 'main']

SPLITS = (('train', 'train'), ('validation', 'val'))


def class_folders(classes: List[str]) -> List[str]:
    """Folder names (label order) that are unique, path-safe and sort in label order under natural_key."""
    names = [safe_name(c) for c in classes]
    if len(set(names)) == len(names) and sorted(names, key=natural_key) == names:
        return names
    width = len(str(len(names) - 1))
    return [f'{k:0{width}d}.{n}' for k, n in enumerate(names)]


def to_imagefolder(dataset: str, data_dir: Optional[str], out: str) -> dict:
    """Write the tree for dataset (a DATASETS name) at data_dir into out; returns {split folder: image count}."""
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f'{out} exists and is not empty; remove it or pass another --out')
    counts = {}
    folders = None
    for split, folder in SPLITS:
        ds = create_dataset(dataset, root=data_dir, split=split, input_img_mode=None)
        if folders is None:
            folders = class_folders(ds.classes)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, 'class_map.txt'), 'w', encoding='utf-8') as f:
                f.write(''.join(name + '\n' for name in folders))
        for d in folders:
            os.makedirs(os.path.join(out, folder, d), exist_ok=True)
        for i, (path, label) in enumerate(ds.samples):
            base = os.path.basename(path)
            src_is_file = os.path.isfile(path)
            if not src_is_file:
                base = os.path.splitext(base)[0] + '.png'
            dst = os.path.join(out, folder, folders[label], base)
            if os.path.lexists(dst):  # same base name twice in one class: keep both
                dst = os.path.join(out, folder, folders[label], f'{i:06d}_{base}')
            if src_is_file:
                os.symlink(os.path.abspath(path), dst)
            else:
                ds.load_image(i).save(dst)
        counts[folder] = len(ds)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(
        prog='python -m carrot_zzz.data.to_imagefolder',
        description='Convert a fine-grained data set (official layout) to an ImageFolder tree of symlinks: '
                    'OUT/train/, OUT/val/ (official test split), OUT/class_map.txt.')
    p.add_argument('--dataset', required=True, choices=sorted(DATASETS), metavar='NAME',
                   help='one of: ' + ', '.join(sorted(DATASETS)))
    p.add_argument('--data-dir', default=None, metavar='DIR', help='root of the data set, as downloaded')
    p.add_argument('--out', required=True, metavar='DIR', help='output folder (must not exist or be empty)')
    a = p.parse_args(argv)
    try:
        counts = to_imagefolder(a.dataset, a.data_dir, a.out)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        sys.exit(f'to_imagefolder: error: {e}')
    summary = ', '.join(f'{k}/ {v} images' for k, v in counts.items())
    print(f'{a.out}: {summary}, class map {a.out}/class_map.txt')
    return counts


if __name__ == '__main__':
    main()
