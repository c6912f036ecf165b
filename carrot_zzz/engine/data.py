"""The data of a training run: data sets, the training and evaluation loaders, mixup / cutmix, P x K batches.

    data = build_training_data(cfg, model, precision)
    data.train_loader, data.eval_loader, data.mixup_fn, data.soft_targets, data.data_config

With holdout_fraction > 0 the evaluation after each epoch (and so model_best) uses a class-stratified, seeded part
of the training split (carrot_zzz.data.holdout) seen through the evaluation transform, and the official evaluation
split is not read at all: it stays for validate.py. `fit_view` is the training part seen through the evaluation
transform (what a closed-form head fit reads), made on demand.

Built on timm.data (create_dataset through carrot_zzz.data, resolve_data_config, create_loader, Mixup /
FastCollateMixup, AugMixDataset); with sampler='pk' the training loader draws its batches from
carrot_zzz.sampler.PKBatchSampler and keeps everything else of timm's loader (workers, collate, prefetcher).
"""
import argparse
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.data.loader import PrefetchLoader
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..data import create_dataset
from ..data.classes import dataset_class_names, names_or_indices
from ..data.holdout import Part, stratified_holdout
from ..data.image_check import drop_samples, set_pixel_limit, unreadable_images
from ..sampler import PKBatchSampler, dataset_targets
from .errors import SettingError, first_line
from .precision import Precision

__all__ = ['TrainingData', 'build_training_data', 'open_split', 'check_label_range', 'set_loader_epoch',
           'inner_loader', 'training_part_for_eval', 'eval_loader', 'image_mode', 'check_images', 'check_class_maps']

_logger = logging.getLogger(__name__)

# create_loader argument <- training setting: the augmentation and sampling of the training loader
TRAIN_LOADER_SETTINGS = {
    'no_aug': 'no_aug', 're_prob': 'reprob', 're_mode': 'remode', 're_count': 'recount', 're_split': 'resplit',
    'train_crop_mode': 'train_crop_mode', 'scale': 'scale', 'ratio': 'ratio', 'hflip': 'hflip', 'vflip': 'vflip',
    'color_jitter': 'color_jitter', 'color_jitter_prob': 'color_jitter_prob', 'grayscale_prob': 'grayscale_prob',
    'gaussian_blur_prob': 'gaussian_blur_prob', 'auto_augment': 'aa', 'num_aug_repeats': 'aug_repeats',
    'worker_seeding': 'worker_seeding', 'use_multi_epochs_loader': 'use_multi_epochs_loader',
}
# Mixup / FastCollateMixup argument <- setting
MIXUP_SETTINGS = {
    'mixup_alpha': 'mixup', 'cutmix_alpha': 'cutmix', 'cutmix_minmax': 'cutmix_minmax', 'prob': 'mixup_prob',
    'switch_prob': 'mixup_switch_prob', 'mode': 'mixup_mode', 'label_smoothing': 'smoothing',
    'num_classes': 'num_classes',
}


@dataclass
class TrainingData:
    """What the training loop reads. mixup_fn is set only without the prefetcher (which mixes in its collate)."""
    train_loader: Any
    eval_loader: Optional[Any]
    data_config: Dict[str, Any]
    mixup_fn: Optional[Mixup]
    soft_targets: bool                 # mixup / cutmix hand the loss (B, C) targets
    aug_splits: int
    train_targets: Optional[List[int]]
    eval_dataset: Optional[Any]
    fit_view: Optional[Any] = None          # the training samples through the evaluation transform (head fit)
    holdout: bool = False                   # eval_dataset is a held-out part of the training split
    bad_train_images: List = field(default_factory=list)   # (path, reason) left out by skip_bad_images
    class_names: Optional[List[str]] = None  # the training split's class names in label order (None: it has none)


def image_mode(input_img_mode: Optional[str], data_config: Dict[str, Any]) -> str:
    """PIL mode the images are read in: the one asked for, else RGB for 3 input channels and L (grey) otherwise."""
    return input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')


def read_split(cfg: argparse.Namespace, name: str, root: Optional[str], split: str, setting: str, img_mode: str,
               **options) -> Any:
    """One split of a data set through carrot_zzz.data.create_dataset with the run's reader settings (and PIL's
    pixel limit); SettingError naming `setting` when it cannot be read or, map-style, holds no samples. Shared by
    train.py's splits and validate.py / inference.py's."""
    set_pixel_limit(cfg.max_image_pixels)
    try:
        dataset = create_dataset(name, root=root, split=split, download=cfg.dataset_download,
                                 input_img_mode=img_mode, input_key=cfg.input_key, target_key=cfg.target_key,
                                 trust_remote_code=cfg.dataset_trust_remote_code, **options)
    except (RuntimeError, FileNotFoundError, ValueError, ImportError, AssertionError) as e:
        raise SettingError(setting, split, f'cannot read this split of {name or "the image folder"} at {root} '
                                           f'({first_line(e)}); check data_dir, dataset and {setting}') from e
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise SettingError(setting, split, f'holds no samples at {root}; check data_dir and {setting}')
    return dataset


def open_split(cfg: argparse.Namespace, split: str, training: bool, input_img_mode: str, **extra) -> Any:
    """One split of the training run's data set (read_split, named train_split or val_split)."""
    return read_split(cfg, cfg.dataset, cfg.data_dir, split, 'train_split' if training else 'val_split',
                      input_img_mode, is_training=training, class_map=cfg.class_map, batch_size=cfg.batch_size,
                      **extra)


def check_images(cfg: argparse.Namespace, dataset, split: str) -> List:
    """Stop on missing, empty, unreadable or truncated image files of a split (carrot_zzz.data.image_check), naming
    the first few; with skip_bad_images leave them out instead (a warning counts them). Returns the bad files."""
    began = time.time()
    bad = unreadable_images(dataset)
    _logger.info(f'Checked the image files of split {split!r} in {time.time() - began:.1f}s: {len(bad)} unreadable')
    if not bad:
        return bad
    shown = '; '.join(f'{path} ({why})' for path, why in bad[:3]) + (f'; {len(bad) - 3} more' if len(bad) > 3 else '')
    if not cfg.skip_bad_images:
        raise SettingError('data_dir', cfg.data_dir, f'{len(bad)} unreadable images in split {split!r}: {shown}; '
                                                     f'replace them, or leave them out with skip_bad_images')
    drop_samples(dataset, bad)
    _logger.warning(f'Left out {len(bad)} unreadable images of split {split!r} (skip_bad_images): {shown}')
    if len(dataset) == 0:
        raise SettingError('data_dir', cfg.data_dir, f'split {split!r} holds no readable image')
    return bad


def _training_split_for_eval(cfg: argparse.Namespace, img_mode: str, bad: List):
    """The training split again, through the evaluation transform, without the files check_images left out."""
    dataset = open_split(cfg, cfg.train_split, False, img_mode)
    if bad:
        drop_samples(dataset, bad)
    return dataset


def check_class_maps(train_set, eval_set, cfg: argparse.Namespace) -> None:
    """SettingError when the two splits of an image folder number their classes differently (a class folder that
    is empty or missing in one split shifts every later label)."""
    maps = [getattr(getattr(s, 'reader', None), 'class_to_idx', None) for s in (train_set, eval_set)]
    if not all(maps) or maps[0] == maps[1]:
        return
    train_map, eval_map = maps
    notes = [f'{c} has no images in {cfg.train_split!r}' for c in sorted(set(eval_map) - set(train_map))[:3]]
    notes += [f'{c} has no images in {cfg.val_split!r}' for c in sorted(set(train_map) - set(eval_map))[:3]]
    raise SettingError('data_dir', cfg.data_dir, f'the class folders of the {cfg.train_split!r} and {cfg.val_split!r} '
                                                 f'splits differ ({"; ".join(notes) or "other order"}), so their labels '
                                                 f'would not match; fill or remove the folders, or pass '
                                                 f'class_map=FILE naming every class')


def check_label_range(targets: Optional[List[int]], num_classes: int, what: str) -> None:
    """SettingError unless every label lies in [0, num_classes)."""
    if not targets:
        return
    low, high = min(targets), max(targets)
    if low < 0 or high >= num_classes:
        raise SettingError('num_classes', num_classes, f'the {what} labels span [{low}, {high}]; pass '
                                                       f'num_classes={high + 1} (labels must lie in [0, num_classes))')


def inner_loader(loader: Any) -> DataLoader:
    """The torch DataLoader under timm's PrefetchLoader (or the loader itself)."""
    return loader.loader if isinstance(loader, PrefetchLoader) else loader


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Tell the loader's data set, batch sampler and sampler which epoch they serve (their shuffles depend on it)."""
    base = inner_loader(loader)
    for owner in {id(o): o for o in (base.dataset, base.batch_sampler, base.sampler)}.values():
        if hasattr(owner, 'set_epoch'):
            owner.set_epoch(epoch)


def _with_pk_batches(loader: Any, cfg: argparse.Namespace, targets: Optional[List[int]]) -> Any:
    """The training loader with its batches drawn by PKBatchSampler; workers, collate and prefetcher kept."""
    base = inner_loader(loader)
    if targets is None:
        raise SettingError('sampler', 'pk', f'needs the labels of the training set, which '
                                            f'{type(base.dataset).__name__} does not expose; use sampler=random')
    sampler = PKBatchSampler(targets, cfg.batch_size, cfg.samples_per_class, num_replicas=cfg.world_size,
                             rank=cfg.rank, seed=cfg.seed)
    pk = DataLoader(base.dataset, batch_sampler=sampler, num_workers=base.num_workers, collate_fn=base.collate_fn,
                    pin_memory=base.pin_memory, worker_init_fn=base.worker_init_fn,
                    persistent_workers=base.persistent_workers)
    _logger.info(f'P x K batches: {sampler.classes_per_batch} classes x {cfg.samples_per_class} samples per batch '
                 f'and rank, {len(sampler)} batches per epoch.')
    if isinstance(loader, PrefetchLoader):
        loader.loader = pk
        return loader
    return pk


def _loader_basics(cfg: argparse.Namespace, data_config: Dict[str, Any], precision: Precision) -> Dict[str, Any]:
    """create_loader arguments of the training loader beside its augmentation."""
    return dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                pin_memory=cfg.pin_mem, img_dtype=precision.input_dtype, device=precision.device,
                distributed=cfg.distributed, use_prefetcher=cfg.prefetcher)


def _train_loader(cfg, dataset, data_config, precision, collate_fn, aug_splits) -> Any:
    interpolation = data_config['interpolation'] if cfg.no_aug or not cfg.train_interpolation \
        else cfg.train_interpolation
    augmentation = {arg: getattr(cfg, setting) for arg, setting in TRAIN_LOADER_SETTINGS.items()}
    loader = create_loader(dataset, batch_size=cfg.batch_size, is_training=True, num_aug_splits=aug_splits,
                           interpolation=interpolation, num_workers=cfg.workers, collate_fn=collate_fn,
                           **augmentation, **_loader_basics(cfg, data_config, precision))
    if cfg.sampler == 'pk':
        loader = _with_pk_batches(loader, cfg, dataset_targets(dataset))
    return loader


def evaluation_loader(dataset, data_config: Dict[str, Any], precision: Precision, *, batch_size: int, workers: int,
                      prefetcher: bool, pin_memory: bool, distributed: bool = False, crop_pct: Optional[float] = None,
                      crop_border_pixels: Optional[int] = None, tf_preprocessing: bool = False) -> Any:
    """timm's evaluation loader over `dataset`: no augmentation, the data config's resize, crop (crop_pct overrides
    its fraction) and normalisation. The one loader of train.py's per-epoch evaluation, validate.py and inference.py."""
    return create_loader(dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
                         use_prefetcher=prefetcher, interpolation=data_config['interpolation'],
                         mean=data_config['mean'], std=data_config['std'], num_workers=workers,
                         crop_pct=crop_pct or data_config['crop_pct'], crop_mode=data_config['crop_mode'],
                         crop_border_pixels=crop_border_pixels, tf_preprocessing=tf_preprocessing,
                         pin_memory=pin_memory, device=precision.device, img_dtype=precision.input_dtype,
                         distributed=distributed)


def eval_loader(cfg, dataset, data_config, precision) -> Any:
    """The training run's evaluation loader (evaluation_loader with train.py's batch, workers and processes)."""
    workers = cfg.workers
    if cfg.distributed and any(kind in cfg.dataset for kind in ('tfds', 'wds')):
        workers = min(2, workers)          # streaming readers split their shards over fewer workers
    return evaluation_loader(dataset, data_config, precision, batch_size=cfg.validation_batch_size or cfg.batch_size,
                             workers=workers, prefetcher=cfg.prefetcher, pin_memory=cfg.pin_mem,
                             distributed=cfg.distributed)


def _mixup(cfg: argparse.Namespace, aug_splits: int):
    """(collate_fn for the prefetcher, mixup_fn for the plain loader, soft targets?); both None without mixing."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        return None, None, False
    kwargs = {arg: getattr(cfg, setting) for arg, setting in MIXUP_SETTINGS.items()}
    if not cfg.prefetcher:
        return None, Mixup(**kwargs), True
    if aug_splits:
        raise SettingError('aug_splits', aug_splits, 'with mixup or cutmix needs no_prefetcher')
    return FastCollateMixup(**kwargs), None, True


def _held_out(cfg: argparse.Namespace, train_set, img_mode: str, bad: List):
    """(training part, held-out part, training part through the evaluation transform) of the training split."""
    targets = dataset_targets(train_set)
    if targets is None:
        raise SettingError('holdout_fraction', cfg.holdout_fraction, f'needs the labels of the training set, which '
                                                                     f'{type(train_set).__name__} does not expose')
    kept, held = stratified_holdout(targets, cfg.holdout_fraction, cfg.seed)
    if held.numel() == 0:
        raise SettingError('holdout_fraction', cfg.holdout_fraction, 'holds out no sample (too few per class); raise '
                                                                     'it or pass 0')
    seen_as_eval = _training_split_for_eval(cfg, img_mode, bad)
    _logger.info(f'Evaluating on {held.numel()} of the {len(targets)} training samples, held out per class '
                 f'(holdout_fraction {cfg.holdout_fraction}); the {cfg.val_split or "evaluation"} split is not read')
    return Part(train_set, kept, targets), Part(seen_as_eval, held, targets), Part(seen_as_eval, kept, targets)


def training_part_for_eval(cfg: argparse.Namespace, data: TrainingData):
    """data.fit_view, made on first use: the training split without augmentation (held-out samples left out)."""
    if data.fit_view is None:
        data.fit_view = _training_split_for_eval(cfg, image_mode(cfg.input_img_mode, data.data_config),
                                                 data.bad_train_images)
    return data.fit_view


def build_training_data(cfg: argparse.Namespace, model: nn.Module, precision: Precision) -> TrainingData:
    """Data sets and loaders of a training run (see module doc); SettingError for unreadable data or labels."""
    data_config = resolve_data_config(vars(cfg), model=model, verbose=cfg.rank == 0)
    img_mode = image_mode(cfg.input_img_mode, data_config)
    train_set = open_split(cfg, cfg.train_split, True, img_mode, seed=cfg.seed, repeats=cfg.epoch_repeats,
                           num_samples=cfg.train_num_samples)
    bad = check_images(cfg, train_set, cfg.train_split)
    fit_view = None
    if cfg.holdout_fraction:
        train_set, eval_set, fit_view = _held_out(cfg, train_set, img_mode, bad)
    else:
        eval_set = open_split(cfg, cfg.val_split, False, img_mode, num_samples=cfg.val_num_samples) \
            if cfg.val_split else None
        if eval_set is not None:
            check_images(cfg, eval_set, cfg.val_split)
            check_class_maps(train_set, eval_set, cfg)
    train_targets = dataset_targets(train_set)
    check_label_range(train_targets, cfg.num_classes, 'training')
    names = dataset_class_names(train_set)
    if names and cfg.num_classes > len(names) and cfg.rank == 0:
        _logger.warning(f'num_classes {cfg.num_classes} but the training split has {len(names)} classes: outputs '
                        f'{len(names)}..{cfg.num_classes - 1} never see a sample; pass --num-classes {len(names)} '
                        f'unless they are meant for later')
    if eval_set is not None:
        check_label_range(dataset_targets(eval_set), cfg.num_classes, 'evaluation')
    collate_fn, mixup_fn, soft_targets = _mixup(cfg, cfg.aug_splits)
    if cfg.aug_splits > 1:
        train_set = AugMixDataset(train_set, num_splits=cfg.aug_splits)
    return TrainingData(
        train_loader=_train_loader(cfg, train_set, data_config, precision, collate_fn, cfg.aug_splits),
        eval_loader=eval_loader(cfg, eval_set, data_config, precision) if eval_set is not None else None,
        data_config=data_config, mixup_fn=mixup_fn, soft_targets=soft_targets, aug_splits=cfg.aug_splits,
        train_targets=train_targets, eval_dataset=eval_set, fit_view=fit_view, holdout=bool(cfg.holdout_fraction),
        bad_train_images=bad, class_names=names_or_indices(names, cfg.num_classes) if names else None)
