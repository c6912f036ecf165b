"""Fine-grained data sets read from their official files, as downloaded (no conversion step).

Every reader returns an ImageListDataset: dataset[i] -> (PIL image in input_img_mode, int label in [0, C)),
with `samples` [(path, label)], `targets` [label], `classes` [name] (label order) and a `transform` that
timm's create_loader sets. Splits: 'train', and 'val' / 'validation' / 'test' -> the official test split
(timm's default names are 'train' / 'validation'). Where an official validation split exists (FGVC-Aircraft,
Flowers-102) 'train' is the official train + val ("trainval"), the standard protocol, and 'train_only' /
'val_only' select the two parts.

Data set (--data-dir) and the official files read:
    CUB200        CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/
    NABirds       nabirds/: the same four files as CUB, images/
    FGVCAircraft  fgvc-aircraft-2013b/ (or its data/): data/images_<level>_<part>.txt, data/variants.txt,
                  families.txt, manufacturers.txt, data/images/ (<level>: variant, family, manufacturer;
                  <part>: trainval, test, train, val)
    StanfordCars  the folder with devkit/ (cars_meta.mat, cars_train_annos.mat), cars_train/, cars_test/,
                  cars_test_annos_withlabels.mat (in the folder or devkit/)
    StanfordDogs  the folder with Images/, train_list.mat, test_list.mat
    Flowers102    the folder with jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat

The `.mat` files need scipy (`pip install carrot-zzz[mat]`).
"""
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.utils.data

__all__ = ['ImageListDataset', 'CUB200', 'NABirds', 'FGVCAircraft', 'StanfordCars', 'StanfordDogs', 'Flowers102',
           'split_kind', 'TRAIN_SPLITS', 'EVAL_SPLITS']

TRAIN_SPLITS = ('train', 'training')
EVAL_SPLITS = ('val', 'valid', 'validation', 'eval', 'evaluation', 'test')


def split_kind(split: str, name: str = 'dataset', extra: Sequence[str] = ()) -> str:
    """'train' for timm's train names, 'test' for its eval names ('val', 'validation', 'test', ...), or one of extra."""
    s = (split or '').split('[')[0].lower()
    if s in TRAIN_SPLITS:
        return 'train'
    if s in EVAL_SPLITS:
        return 'test'
    if s in extra:
        return s
    known = ', '.join(('train', 'validation', 'test') + tuple(extra))
    raise ValueError(f"{name}: unknown split '{split}'; use one of {known}")


class ImageListDataset(torch.utils.data.Dataset):
    """(image path, label) list -> dataset[i] = (PIL image converted to input_img_mode, int label).

    samples: [(path, label)] with labels in [0, len(classes)); classes: class names in label order.
    input_img_mode: PIL mode of the returned images ('RGB', 'L', ...; None keeps the file's).
    transform / target_transform: applied to image / label (timm's create_loader sets `transform`).
    `files_on_disk`: the sample paths are files (False where a subclass keeps the images in memory).
    """

    files_on_disk = True

    def __init__(self, samples: List[Tuple[str, int]], classes: Sequence[str], input_img_mode: Optional[str] = 'RGB',
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None):
        self.samples = list(samples)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [int(t) for _, t in self.samples]
        self.input_img_mode = input_img_mode
        self.transform = transform
        self.target_transform = target_transform

    @property
    def class_names(self) -> List[str]:
        return self.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int):
        """The PIL image of sample `index` (fully loaded, file closed)."""
        from PIL import Image
        with Image.open(self.samples[index][0]) as img:
            img.load()
            return img.copy()

    def __getitem__(self, index: int):
        img = self.load_image(index)
        if self.input_img_mode and img.mode != self.input_img_mode:
            img = img.convert(self.input_img_mode)
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        """Sample paths (timm's ImageDataset API), or their base names."""
        paths = [p for p, _ in self.samples]
        if basename:
            return [os.path.basename(p) for p in paths]
        return [os.path.abspath(p) for p in paths] if absolute else paths

    def __repr__(self) -> str:
        return f'{type(self).__name__}({len(self)} samples, {len(self.classes)} classes)'


# --- helpers ---------------------------------------------------------------------------------------------------

def _need(root: Optional[str], name: str, files: Sequence[str], hint: str) -> str:
    """root itself or the first of its sub-folders (sorted) holding all `files`; else a one-line
    FileNotFoundError naming the files missing from root and the fix."""
    if not root:
        raise FileNotFoundError(f'{name}: no data folder given; pass --data-dir {hint}')
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{name}: data folder {root} does not exist; pass --data-dir {hint}')
    candidates = [root] + sorted(os.path.join(root, d) for d in os.listdir(root)
                                 if os.path.isdir(os.path.join(root, d)))
    for folder in candidates:
        if all(os.path.exists(os.path.join(folder, f)) for f in files):
            return folder
    missing = [f for f in files if not os.path.exists(os.path.join(root, f))]
    raise FileNotFoundError(f'{name}: {", ".join(missing)} not found in {root}; pass --data-dir {hint}')


def _mismatch(name: str, root: str, files: Sequence[str], missing: KeyError) -> ValueError:
    """The one-line error for list files of a data set that do not agree with each other."""
    return ValueError(f'{name}: the list files in {root} ({", ".join(files)}) do not agree: {missing} is named in '
                      f'one and missing from another; extract the original archive again')


def _read_pairs(path: str) -> Dict[str, str]:
    """'<key> <value with spaces>' lines -> {key: value} (insertion order = file order)."""
    out = {}
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if line:
                key, _, value = line.partition(' ')
                out[key] = value.strip()
    return out


def _loadmat(path: str) -> dict:
    try:
        import scipy.io
    except ImportError:
        raise ImportError(f"reading {os.path.basename(path)} (MATLAB .mat) needs scipy: "
                          f"pip install 'carrot-zzz[mat]' (or pip install scipy)") from None
    return scipy.io.loadmat(path, squeeze_me=True)


# --- readers ---------------------------------------------------------------------------------------------------

class CUB200(ImageListDataset):
    """Caltech-UCSD Birds-200-2011: 200 classes, 5994 train / 5794 test (official split).

    root: the CUB_200_2011 folder of CUB_200_2011.tgz (or the folder holding it).
    Class names: classes.txt as written ('001.Black_footed_Albatross').
    Files: images.txt, image_class_labels.txt, train_test_split.txt (1 = train), classes.txt. Labels: the class
    ids that images use, sorted numerically, -> 0..C-1. Samples keep the order of images.txt.
    """
    name = 'cub200'
    root_hint = '/path/to/CUB_200_2011 (the folder with images.txt, from CUB_200_2011.tgz)'
    files = ('images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt')

    def __init__(self, root: str, split: str = 'train', input_img_mode: str = 'RGB', transform=None):
        root = _need(root, self.name, self.files, self.root_hint)
        want_train = split_kind(split, self.name) == 'train'
        images, labels, is_train, class_names = (_read_pairs(os.path.join(root, f)) for f in self.files)
        try:
            used = sorted({labels[i] for i in images}, key=int)
            index = {c: k for k, c in enumerate(used)}
            samples = [(os.path.join(root, 'images', path), index[labels[i]])
                       for i, path in images.items() if (is_train[i].strip() == '1') == want_train]
            names = [class_names[c] for c in used]
        except KeyError as e:
            raise _mismatch(self.name, root, self.files, e) from None
        super().__init__(samples, names, input_img_mode, transform)


class NABirds(CUB200):
    """NABirds v1: 555 leaf classes (of the ids in image_class_labels.txt), 23929 train / 24633 test.

    root: the nabirds folder of nabirds.tar.gz. The same four files as CUB200 (labels: the 555 of the
    hierarchy's ids that images use). Class names: classes.txt ('Bewick's Wren', ...).
    """
    name = 'nabirds'
    root_hint = '/path/to/nabirds (the folder with images.txt, from nabirds.tar.gz)'


class FGVCAircraft(ImageListDataset):
    """FGVC-Aircraft 2013b: 100 variants / 70 families / 41 manufacturers, 6667 trainval / 3333 test.

    root: fgvc-aircraft-2013b (or its data/ folder). level: 'variant', 'family' or 'manufacturer'.
    split: 'train' / 'trainval' -> trainval; 'val' / 'validation' / 'test' -> test;
           'train_only' / 'val_only' -> the official train / val halves of trainval.
    Class order: variants.txt / families.txt / manufacturers.txt. Images keep their bottom 20 px banner.
    """
    LEVELS = {'variant': 'variants', 'family': 'families', 'manufacturer': 'manufacturers'}

    def __init__(self, root: str, split: str = 'train', level: str = 'variant', input_img_mode: str = 'RGB',
                 transform=None):
        if level not in self.LEVELS:
            raise ValueError(f"fgvc_aircraft: level must be one of {tuple(self.LEVELS)}, got '{level}'")
        name = f'fgvc_aircraft ({level})'
        kind = split_kind(split, name, extra=('trainval', 'train_only', 'val_only'))
        part = {'train': 'trainval', 'trainval': 'trainval', 'test': 'test', 'train_only': 'train',
                'val_only': 'val'}[kind]
        hint = '/path/to/fgvc-aircraft-2013b (from fgvc-aircraft-2013b.tar.gz)'
        root = root if not root or not os.path.isdir(os.path.join(root, 'data')) else os.path.join(root, 'data')
        listing = f'images_{level}_{part}.txt'
        root = _need(root, name, (self.LEVELS[level] + '.txt', listing, 'images'), hint)
        with open(os.path.join(root, self.LEVELS[level] + '.txt'), encoding='utf-8') as f:
            classes = [line.strip() for line in f if line.strip()]
        index = {c: k for k, c in enumerate(classes)}
        try:
            samples = [(os.path.join(root, 'images', f'{i}.jpg'), index[c])
                       for i, c in _read_pairs(os.path.join(root, listing)).items()]
        except KeyError as e:
            raise _mismatch(name, root, (listing, self.LEVELS[level] + '.txt'), e) from None
        super().__init__(samples, classes, input_img_mode, transform)


class StanfordCars(ImageListDataset):
    """Stanford Cars: 196 classes, 8144 train / 8041 test, from the devkit's .mat files (needs scipy).

    root: the folder holding devkit/ (cars_meta.mat, cars_train_annos.mat), cars_train/, cars_test/ and
    cars_test_annos_withlabels.mat (here or in devkit/). Labels: the annotations' `class` (1-based) - 1.
    """

    def __init__(self, root: str, split: str = 'train', input_img_mode: str = 'RGB', transform=None):
        train = split_kind(split, 'stanford_cars') == 'train'
        hint = '/path/to/stanford_cars (the folder with devkit/, cars_train/, cars_test/)'
        root = _need(root, 'stanford_cars', ('devkit/cars_meta.mat', 'cars_train' if train else 'cars_test'), hint)
        if train:
            annos_path = os.path.join(root, 'devkit', 'cars_train_annos.mat')
        else:
            annos_path = next((p for p in (os.path.join(root, 'cars_test_annos_withlabels.mat'),
                                           os.path.join(root, 'devkit', 'cars_test_annos_withlabels.mat'))
                               if os.path.isfile(p)), None)
            if annos_path is None:
                raise FileNotFoundError(f'stanford_cars: cars_test_annos_withlabels.mat not found in {root} or its '
                                        f'devkit/; download it (the test labels) next to devkit/')
        if not os.path.isfile(annos_path):
            raise FileNotFoundError(f'stanford_cars: {annos_path} not found; pass --data-dir {hint}')
        meta = _loadmat(os.path.join(root, 'devkit', 'cars_meta.mat'))
        classes = [str(c).strip() for c in _atleast_1d(meta['class_names'])]
        annos = _atleast_1d(_loadmat(annos_path)['annotations'])
        folder = os.path.join(root, 'cars_train' if train else 'cars_test')
        samples = [(os.path.join(folder, str(a['fname'])), int(a['class']) - 1) for a in annos]
        super().__init__(samples, classes, input_img_mode, transform)


class StanfordDogs(ImageListDataset):
    """Stanford Dogs: 120 breeds, 12000 train / 8580 test, from train_list.mat / test_list.mat (needs scipy).

    root: the folder with Images/ (images.tar) and train_list.mat, test_list.mat (lists.tar).
    Class names: the breed part of the synset folder ('n02085620-Chihuahua' -> 'Chihuahua'); labels - 1.
    """

    def __init__(self, root: str, split: str = 'train', input_img_mode: str = 'RGB', transform=None):
        train = split_kind(split, 'stanford_dogs') == 'train'
        root = _need(root, 'stanford_dogs', ('train_list.mat', 'test_list.mat', 'Images'),
                     '/path/to/stanford_dogs (the folder with Images/, train_list.mat and test_list.mat)')
        lists = {k: _loadmat(os.path.join(root, f'{k}_list.mat')) for k in ('train', 'test')}
        folders = {}
        for m in lists.values():
            for f, y in zip(_atleast_1d(m['file_list']), _atleast_1d(m['labels'])):
                folders[int(y) - 1] = str(f).replace('\\', '/').split('/')[0]
        if sorted(folders) != list(range(len(folders))):
            raise ValueError(f'stanford_dogs: labels in {root}/*_list.mat are not 1..C')
        classes = [folders[k].split('-', 1)[-1] for k in range(len(folders))]
        m = lists['train' if train else 'test']
        samples = [(os.path.join(root, 'Images', str(f)), int(y) - 1)
                   for f, y in zip(_atleast_1d(m['file_list']), _atleast_1d(m['labels']))]
        super().__init__(samples, classes, input_img_mode, transform)


class Flowers102(ImageListDataset):
    """Oxford Flowers-102: 102 classes, 1020 train + 1020 val / 6149 test, from imagelabels.mat, setid.mat.

    root: the folder with jpg/ (102flowers.tgz), imagelabels.mat and setid.mat (needs scipy).
    split: 'train' / 'trainval' -> trnid + valid; 'val' / 'validation' / 'test' -> tstid;
           'train_only' / 'val_only' -> trnid / valid.
    The official files carry no class names: they come from torchvision's Flowers102.classes (label order).
    """

    def __init__(self, root: str, split: str = 'train', input_img_mode: str = 'RGB', transform=None):
        kind = split_kind(split, 'flowers102', extra=('trainval', 'train_only', 'val_only'))
        keys = {'train': ('trnid', 'valid'), 'trainval': ('trnid', 'valid'), 'test': ('tstid',),
                'train_only': ('trnid',), 'val_only': ('valid',)}[kind]
        root = _need(root, 'flowers102', ('imagelabels.mat', 'setid.mat', 'jpg'),
                     '/path/to/flowers102 (the folder with jpg/, imagelabels.mat and setid.mat)')
        labels = _atleast_1d(_loadmat(os.path.join(root, 'imagelabels.mat'))['labels']).astype(int) - 1
        setid = _loadmat(os.path.join(root, 'setid.mat'))
        ids = sorted(int(i) for k in keys for i in _atleast_1d(setid[k]))
        samples = [(os.path.join(root, 'jpg', f'image_{i:05d}.jpg'), int(labels[i - 1])) for i in ids]
        super().__init__(samples, flowers102_classes(), input_img_mode, transform)


def flowers102_classes() -> List[str]:
    try:
        from torchvision.datasets import Flowers102 as _TV
        names = list(getattr(_TV, 'classes', []))
    except ImportError:
        names = []
    return names if len(names) == 102 else [f'flower_{k:03d}' for k in range(1, 103)]


def _atleast_1d(x):
    import numpy as np
    return np.atleast_1d(x)


def safe_name(name: str) -> str:
    """A class name usable as one folder name: path separators and control characters -> '_'."""
    out = re.sub(r'[\\/\x00-\x1f]', '_', name).strip()
    return out if out not in ('', '.', '..') else '_' + out
