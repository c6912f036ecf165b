"""The model a training run builds: timm's `--model X`, turned into `X_zzz` by the head and CARROT settings.

    name, head_kwargs = model_name_and_head(cfg)     'resnet50' + head='zzz' -> 'resnet50_zzz', {'head_type': 'zzz'}
    model = create_training_model(cfg)                create_model(name, ...), --initial-checkpoint, head init

`cfg` is the run's configuration (train.py's parsed flags); errors are SettingErrors named by its fields.
"""
import argparse
import pickle
from typing import Any, Dict, Tuple

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from ..registry import base_name, is_zzz_name, zzz_name
from .errors import SettingError, first_line
from .precision import input_channels

__all__ = ['model_name_and_head', 'merge_model_kwargs', 'create_training_model', 'build_timm_model', 'check_scriptable',
           'HEAD_SETTINGS', 'CHECKPOINT_ERRORS']

HEAD_SETTINGS = ('zzz_rank', 'zzz_v_min', 'zzz_sigma2_min')   # the ZZZ head's create_model kwargs
# what a truncated, corrupt or mismatched checkpoint raises (torch.load, load_state_dict, timm's readers)
CHECKPOINT_ERRORS = (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError, SafetensorError)


def model_name_and_head(cfg: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    """(timm model name, head kwargs). Any head or CARROT setting needs the wrapper: `X` -> `X_zzz` (a pretrained
    tag stays last: 'vit_b.augreg' -> 'vit_b_zzz.augreg'), its head 'zzz' when a ZZZ option is set, else 'linear'."""
    zzz_options = {k: getattr(cfg, k) for k in HEAD_SETTINGS if getattr(cfg, k) is not None}
    kwargs = dict(zzz_options)
    if is_zzz_name(cfg.model):
        name = cfg.model
    elif cfg.head is not None or cfg.carrot or zzz_options:
        name = zzz_name(cfg.model)
        kwargs['head_type'] = cfg.head or ('zzz' if 'zzz_rank' in zzz_options else 'linear')
    else:
        return cfg.model, kwargs
    if cfg.head is not None:
        kwargs['head_type'] = cfg.head
    return name, kwargs


def check_scriptable(torchscript: bool, carrot_zzz_model: bool) -> None:
    """SettingError for torchscript with a carrot_zzz model (the ZZZ head and the wrapper are not scriptable)."""
    if torchscript and carrot_zzz_model:
        raise SettingError('torchscript', True, 'is not supported for carrot_zzz models; use `torchcompile`')


def merge_model_kwargs(chosen: Dict[str, Any], model_kwargs: Dict[str, Any], source: str) -> Dict[str, Any]:
    """create_model kwargs from `chosen` (by flags or a checkpoint, named by `source`) and --model-kwargs: a key in
    both must hold the same value (zzz_rank=4 twice is fine; 4 and 8 are a contradiction)."""
    for key in sorted(chosen.keys() & model_kwargs.keys()):
        if model_kwargs[key] != chosen[key]:
            raise SettingError('model_kwargs', f'{key}={model_kwargs[key]}',
                               f"{source} says {chosen[key]}; drop '{key}' from model_kwargs or make them agree")
    return {**chosen, **model_kwargs}


def _creation_error(name: str, error: Exception) -> SettingError:
    """The SettingError for create_model failing on `name`."""
    text = first_line(error)
    arch = base_name(name) if is_zzz_name(name) else name
    if 'Unknown model' in text and not timm.is_model(arch.split('.')[0]):
        return SettingError('model', name, f'timm has no model {arch!r}; pick one of timm.list_models()')
    if is_zzz_name(name) and 'rank' in text:
        return SettingError('zzz_rank', name, f'{text}; lower zzz_rank')
    return SettingError('model', name, f'cannot create it ({text}); check model_kwargs and the model options')


def build_timm_model(cfg: argparse.Namespace, name: str, pretrained: bool, **kwargs) -> nn.Module:
    """timm.create_model(name) with the run's input channels, global pooling and scriptability (train.py,
    validate.py, inference.py); SettingError naming model (or zzz_rank) when it fails. A failure to load the
    pretrained weights says how to do without them."""
    try:
        return timm.create_model(name, pretrained=pretrained, in_chans=input_channels(cfg.in_chans, cfg.input_size),
                                 global_pool=cfg.gp, scriptable=cfg.torchscript, **kwargs)
    except (TypeError, *CHECKPOINT_ERRORS) as e:
        error = _creation_error(name, e)
        if pretrained and isinstance(e, OSError) and error.setting == 'model':
            error = SettingError('model', name, f'cannot load its pretrained weights ({first_line(e, 200)}); '
                                                f'pass checkpoint=PATH (or pretrained_path=FILE) with local weights')
        raise error from e


def _apply_head_init(model: nn.Module, scale, bias) -> None:
    """timm's --head-init-scale / --head-init-bias on a linear classifier (weight and bias scaled, bias set);
    check_training_settings refuses them for a ZZZ head."""
    head = model.get_classifier()
    with torch.no_grad():
        if scale is not None:
            head.weight.mul_(scale)
            head.bias.mul_(scale)
        if bias is not None:
            head.bias.fill_(bias)


def create_training_model(cfg: argparse.Namespace) -> nn.Module:
    """The model to train, on the CPU in float32; cfg.model and cfg.num_classes are set to what was built."""
    name, head_kwargs = model_name_and_head(cfg)
    kwargs = merge_model_kwargs(head_kwargs, cfg.model_kwargs, 'the head flags')
    if cfg.pretrained_path:
        kwargs['pretrained_cfg_overlay'] = dict(file=cfg.pretrained_path, num_classes=-1)
    try:
        model = build_timm_model(cfg, name, cfg.pretrained, num_classes=cfg.num_classes, drop_rate=cfg.drop,
                                 drop_path_rate=cfg.drop_path, drop_block_rate=cfg.drop_block,
                                 bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps, **kwargs)
    except SettingError as e:
        cause = e.__cause__
        if cfg.pretrained and cfg.pretrained_path and isinstance(cause, CHECKPOINT_ERRORS) and \
                'Unknown model' not in str(cause):
            raise SettingError('pretrained_path', cfg.pretrained_path,
                               f'cannot load it as the weights of {name} ({first_line(cause, 200)}); pass an intact '
                               f'checkpoint of this architecture') from cause
        raise
    if cfg.initial_checkpoint:
        try:
            timm.models.load_checkpoint(model, cfg.initial_checkpoint)
        except CHECKPOINT_ERRORS as e:
            raise SettingError('initial_checkpoint', cfg.initial_checkpoint,
                               f'cannot load it into {name} ({first_line(e, 200)}); '
                               f'pass an intact checkpoint of this model') from e
    if cfg.head_init_scale is not None or cfg.head_init_bias is not None:
        _apply_head_init(model, cfg.head_init_scale, cfg.head_init_bias)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    cfg.model = name
    if cfg.num_classes is None:
        cfg.num_classes = model.num_classes
    return model
