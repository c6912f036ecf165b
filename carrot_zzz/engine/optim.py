"""Optimizer, learning-rate schedule and gradient clipping of a training run, on timm.optim / timm.scheduler.

The head may train at its own learning rate and weight decay: its parameters get groups of their own whose
`lr_scale` is head_lr / lr (timm's schedulers multiply every group's scheduled rate by its lr_scale), so the head
follows the schedule at a fixed ratio and layer decay keeps applying to the backbone.
"""
import argparse
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import unwrap_model
from torch import nn

from ..model import ZZZModel
from .errors import SettingError, first_line

__all__ = ['scaled_learning_rate', 'resolve_learning_rate', 'split_head_groups', 'build_optimizer', 'build_scheduler', 'clip_parameters']

_logger = logging.getLogger(__name__)


def scaled_learning_rate(lr_base: float, global_batch: int, lr_base_size: int, scale_rule: str, opt: str
                         ) -> Tuple[float, str]:
    """(lr, rule): lr_base x (global_batch / lr_base_size), or its square root for rule 'sqrt'. An empty rule
    picks 'sqrt' for adaptive optimizers (names holding 'ada' or 'lamb'), 'linear' for the others."""
    rule = scale_rule or ('sqrt' if any(name in opt.lower() for name in ('ada', 'lamb')) else 'linear')
    ratio = global_batch / lr_base_size
    return lr_base * (ratio ** 0.5 if rule == 'sqrt' else ratio), rule


def resolve_learning_rate(cfg: argparse.Namespace) -> float:
    """cfg.lr, or when unset lr_base scaled to the global batch (batch x processes x accumulation steps)."""
    if cfg.lr:
        return cfg.lr
    global_batch = cfg.batch_size * cfg.world_size * cfg.grad_accum_steps
    cfg.lr, cfg.lr_base_scale = scaled_learning_rate(cfg.lr_base, global_batch, cfg.lr_base_size, cfg.lr_base_scale,
                                                     cfg.opt)
    _logger.info(f'Learning rate {cfg.lr:g}: lr_base {cfg.lr_base} scaled to the global batch of {global_batch} '
                 f'({cfg.lr_base_scale}).')
    return cfg.lr


def split_head_groups(model: nn.Module, groups: List[Dict[str, Any]], head_scale: float,
                      head_weight_decay: Optional[float]) -> List[Dict[str, Any]]:
    """timm's parameter groups with the classifier's parameters moved into groups of their own.

    Head groups get lr_scale x head_scale and is_head=True; the head groups that timm decays take head_weight_decay
    when it is given, its no-decay groups (biases, ...) keep 0.
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    out = []
    for group in groups:
        body = [p for p in group['params'] if id(p) not in head]
        mine = [p for p in group['params'] if id(p) in head]
        if body:
            out.append({**group, 'params': body})
        if mine:
            decay = group.get('weight_decay', 0.0)
            if head_weight_decay is not None and decay > 0.0:
                decay = head_weight_decay
            out.append({**group, 'params': mine, 'weight_decay': decay,
                        'lr_scale': group.get('lr_scale', 1.0) * head_scale, 'is_head': True})
    return out


def _head_aware_groups(model: nn.Module, cfg: argparse.Namespace) -> List[Dict[str, Any]]:
    skip = getattr(model, 'no_weight_decay', lambda: set())()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                          no_weight_decay_list=skip, min_scale=cfg.layer_decay_min_scale,
                                          no_opt_scale=cfg.layer_decay_no_opt_scale)
    else:
        groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=skip)
    head_scale = cfg.head_lr / cfg.lr if cfg.head_lr is not None else 1.0
    return split_head_groups(model, groups, head_scale, cfg.head_weight_decay)


def build_optimizer(model: nn.Module, cfg: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer for cfg.opt over the model's parameter groups (head split off when head_lr / head_weight_decay
    is set); SettingError for an unknown optimizer or an opt_kwargs key it does not take."""
    own_head = cfg.head_lr is not None or cfg.head_weight_decay is not None
    group_fn = (lambda m: _head_aware_groups(m, cfg)) if own_head else None
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=cfg), **cfg.opt_kwargs, param_group_fn=group_fn)
    except (ValueError, TypeError) as e:
        raise SettingError('opt', cfg.opt, f'cannot create this optimizer ({first_line(e, 200)}); see '
                                           f'timm.optim.list_optimizers() and check opt_kwargs') from e
    summary = ', '.join(f'{k}: {v}' for k, v in {**optimizer.defaults, 'weight_decay': cfg.weight_decay}.items())
    _logger.info(f'Optimizer {type(optimizer).__name__} ({cfg.opt}): {summary}')
    if cfg.head_lr is not None:
        _logger.info(f'Head learning rate {cfg.head_lr} ({cfg.head_lr / cfg.lr:g} x lr {cfg.lr}).')
    if cfg.head_weight_decay is not None:
        _logger.info(f'Head weight decay {cfg.head_weight_decay} (backbone {cfg.weight_decay}).')
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: argparse.Namespace, updates_per_epoch: int,
                    decreasing_metric: bool):
    """(timm scheduler or None, number of epochs it spans); without a scheduler the head's lr_scale is applied once."""
    try:
        scheduler, epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(cfg, decreasing_metric=decreasing_metric),
            updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise SettingError('sched', cfg.sched, f'cannot create this schedule ({first_line(e, 200)}); check sched '
                                               f'and its options') from e
    if scheduler is None:
        for group in optimizer.param_groups:
            if group.get('is_head'):
                group['lr'] *= group['lr_scale']
    else:
        per = 'epoch' if scheduler.t_in_epochs else 'update'
        warmup = 'before' if cfg.warmup_prefix else 'inside'
        _logger.info(f'Schedule over {epochs} epochs (warmup {warmup} them, cooldown after), stepped per {per}.')
    return scheduler, epochs


def clip_parameters(task, clip_mode: str) -> List[nn.Parameter]:
    """Parameters gradient clipping sees. Adaptive clipping ('agc') leaves the classifier out: timm's task drops
    the last two parameters (a linear head's weight and bias); a ZZZ head has five, all left out here."""
    module = task.get_trainable_module()
    model = unwrap_model(module)
    if 'agc' in clip_mode and isinstance(model, ZZZModel):
        head = {id(p) for p in model.get_classifier().parameters()}
        return [p for p in module.parameters() if id(p) not in head]
    return list(task.get_clip_parameters(exclude_head='agc' in clip_mode))
