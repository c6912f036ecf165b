"""Checks of a training run's settings that need nothing built: contradictions, out-of-range values, missing files.

`check_training_settings(cfg)` raises a SettingError naming the setting and the fix, before any model, data or
output folder exists; settings that timm accepts and ignores only warn.
"""
import argparse
import logging
import math
import os

from ..registry import is_zzz_name
from .errors import SettingError
from .experiment import DEFAULT_OUTPUT
from ..sampler import check_pk_batch
from .checkpoints import last_checkpoint
from .models import HEAD_SETTINGS, check_scriptable

__all__ = ['check_training_settings', 'check_experiment_folder', 'NON_NEGATIVE_SETTINGS']

_logger = logging.getLogger(__name__)

# numbers that must be finite and >= 0 when set: a NaN or negative rate, weight or decay trains nonsense quietly
NON_NEGATIVE_SETTINGS = ('lr', 'lr_base', 'head_lr', 'warmup_lr', 'min_lr', 'weight_decay', 'head_weight_decay',
                         'carrot_weight', 'momentum', 'clip_grad', 'smoothing', 'drop', 'drop_path', 'drop_block',
                         'mixup', 'cutmix', 'reprob', 'model_ema_decay', 'zzz_v_shrink', 'zzz_decouple')
REMOTE_READERS = ('hfds', 'hfids', 'tfds', 'wds')   # these readers make or fetch their own data folder
EVAL_METRICS = ('loss', 'top1', 'top5')
CLIP_MODES = ('norm', 'value', 'agc')


def _uses_zzz_head(cfg: argparse.Namespace) -> bool:
    return cfg.head == 'zzz' or (cfg.head is None and (is_zzz_name(cfg.model) or cfg.zzz_rank is not None))


def _check_numbers(cfg: argparse.Namespace) -> None:
    for name in NON_NEGATIVE_SETTINGS:
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SettingError(name, value, 'must be a finite number >= 0')
    if cfg.stop_epoch is not None and cfg.stop_epoch < 1:
        raise SettingError('stop_epoch', cfg.stop_epoch, 'pass the number of epochs after which to stop (>= 1)')
    if cfg.save_epochs and min(cfg.save_epochs) < 1:
        raise SettingError('save_epochs', cfg.save_epochs, 'pass numbers of completed epochs (>= 1)')
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise SettingError('holdout_fraction', cfg.holdout_fraction, 'pass a fraction in [0, 1) (0: no holdout)')
    if not 0.0 < cfg.ood_tpr <= 1.0:
        raise SettingError('ood_tpr', cfg.ood_tpr, 'pass the share of in-distribution images to keep, in (0, 1]')
    if cfg.zzz_rank is not None and cfg.zzz_rank < 0:
        raise SettingError('zzz_rank', cfg.zzz_rank, 'must be >= 0 (0 is the cosine head)')
    if cfg.eval_metric not in EVAL_METRICS:
        raise SettingError('eval_metric', cfg.eval_metric, f'evaluation reports {", ".join(EVAL_METRICS)}; pass one')
    if cfg.clip_mode not in CLIP_MODES:
        raise SettingError('clip_mode', cfg.clip_mode, f'pass one of {", ".join(CLIP_MODES)}')


def _check_files(cfg: argparse.Namespace) -> None:
    data_dir = cfg.data_dir or cfg.data
    folder = not cfg.dataset or cfg.dataset.startswith(('folder/', 'imagefolder/', 'tar/'))
    if folder and not data_dir:
        raise SettingError('data_dir', None, 'no data folder given; pass data_dir=DIR (an image folder with train/ '
                                             'and validation/ splits)')
    remote = (cfg.dataset or '').split('/')[0] in REMOTE_READERS
    if data_dir and not cfg.dataset_download and not remote and not os.path.exists(data_dir):
        raise SettingError('data_dir', data_dir, 'this folder does not exist; pass the path of your data set')
    for name in ('resume', 'initial_checkpoint', 'pretrained_path'):
        path = getattr(cfg, name)
        if path and not (name == 'resume' and path == 'auto') and not os.path.isfile(path):
            raise SettingError(name, path, 'no such file; pass the path of a checkpoint file')
    if cfg.resume == 'auto' and not cfg.experiment:
        raise SettingError('resume', 'auto', 'continues the experiment folder in place; pass experiment=NAME')
    if cfg.pretrained_path and not cfg.pretrained:
        _logger.warning('--pretrained-path is only read with --pretrained (as in timm); add --pretrained to use it')


def _check_head(cfg: argparse.Namespace) -> None:
    if _uses_zzz_head(cfg):
        for name in ('head_init_scale', 'head_init_bias', 'tta'):
            if getattr(cfg, name) is not None and (name != 'tta' or cfg.tta):
                raise SettingError(name, getattr(cfg, name), 'assumes a linear head and does not apply to the ZZZ '
                                                             'head; remove it or use head=linear')
    for name in ('zzz_v_shrink', 'zzz_decouple'):
        if getattr(cfg, name) and not _uses_zzz_head(cfg):
            raise SettingError(name, getattr(cfg, name), 'penalises the ZZZ head; add head=zzz or remove it')
    if cfg.head == 'linear':
        for name in HEAD_SETTINGS:
            if getattr(cfg, name) is not None:
                raise SettingError(name, getattr(cfg, name), 'configures the ZZZ head; add head=zzz or remove it')
    check_scriptable(cfg.torchscript, bool(cfg.carrot or cfg.head or is_zzz_name(cfg.model)))


def _check_sampler(cfg: argparse.Namespace) -> None:
    if cfg.sampler != 'pk':
        return
    k = cfg.samples_per_class
    check_pk_batch(cfg.batch_size, k)
    if cfg.carrot and k < 2:
        raise SettingError('samples_per_class', k, 'CARROT needs classes with 2 or more samples in a batch; pass '
                                                   'samples_per_class=2 or more')
    if cfg.aug_repeats:
        raise SettingError('aug_repeats', cfg.aug_repeats, 'picks its own samples and cannot be combined with '
                                                           'sampler=pk; remove one')
    if cfg.use_multi_epochs_loader:
        raise SettingError('use_multi_epochs_loader', True, 'cannot be combined with sampler=pk; remove it')


def check_experiment_folder(cfg: argparse.Namespace) -> None:
    """SettingError before anything is built when a new run (no resume) would write into an experiment folder
    that holds a run already (open_experiment checks again when it takes the folder)."""
    folder = os.path.join(cfg.output or DEFAULT_OUTPUT, cfg.experiment) if cfg.experiment else None
    if folder and not cfg.resume and not cfg.overwrite and os.path.exists(last_checkpoint(folder)):
        raise SettingError('experiment', cfg.experiment, f'{folder} holds a run already; continue it with '
                                                         f'resume=auto, pass a new experiment=NAME, or overwrite it '
                                                         f'with `overwrite`')


def check_training_settings(cfg: argparse.Namespace) -> None:
    """SettingError for the first setting that cannot work; warnings for those timm ignores."""
    _check_numbers(cfg)
    _check_files(cfg)
    _check_head(cfg)
    _check_sampler(cfg)
    if cfg.loss and (cfg.jsd_loss or cfg.bce_loss) and cfg.loss != ('jsd' if cfg.jsd_loss else 'bce'):
        raise SettingError('loss', cfg.loss, f'contradicts {"jsd_loss" if cfg.jsd_loss else "bce_loss"}; keep one')
    if cfg.carrot and cfg.aug_splits:
        raise SettingError('aug_splits', cfg.aug_splits, 'stacks several views per target, which CARROT does not '
                                                         'support; remove aug_splits')
    if cfg.aug_splits == 1:
        raise SettingError('aug_splits', 1, 'pass 0 (off) or 2 and more')
    if cfg.split_bn and not (cfg.aug_splits > 1 or cfg.resplit):
        raise SettingError('split_bn', True, 'needs aug_splits=2 or more, or `resplit`')
    if cfg.drop_connect is not None:   # timm parses and ignores it
        _logger.warning('--drop-connect is deprecated in timm and has no effect; use --drop-path')
