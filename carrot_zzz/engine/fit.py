"""The epochs of a training run: train, evaluate, write the summary row and the checkpoint, step the schedule;
then the best weights as safetensors. Plus resuming, which sets where the epochs start.

    start, saved = load_resume(task, optimizer, scaler, cfg, resume_path(cfg))    weights, optimizer, scaler
    results = fit(trainer, start, end)                 [{'epoch', 'train', 'validation'}] per evaluated epoch
    export_best_weights(folder, model, ema_model)      model_best(.ema).safetensors
"""
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import distribute_bn, unwrap_model
from torch import nn

from .evaluate import epoch_metrics, predict
from ..weights import CLASS_NAMES_KEY, load_checkpoint_file, save_weights
from .checkpoints import best_checkpoint, last_checkpoint, newest_recovery, set_rng_state, stored_epoch, writing
from .data import set_loader_epoch
from .errors import CheckpointWriteError, SettingError, first_line
from .experiment import DEFAULT_OUTPUT, SummaryLog
from .loop import Trainer
from .preemption import Preempted, ProcessLost, StopSignals, agreed_stop
from .process import lost_process_message
from .models import CHECKPOINT_ERRORS

__all__ = ['resume_path', 'load_resume', 'attach_ema', 'continue_run', 'fit', 'export_best_weights',
           'evaluate_epoch']

_logger = logging.getLogger(__name__)


def resume_path(cfg) -> str:
    """The checkpoint to resume from: cfg.resume, or for 'auto' the experiment's newest state ('' if none): its
    last.pth.tar, or a recovery checkpoint of the epoch after it (a run stopped inside an epoch)."""
    if cfg.resume != 'auto':
        return cfg.resume
    folder = os.path.join(cfg.output or DEFAULT_OUTPUT, cfg.experiment)
    last = last_checkpoint(folder)
    last_epoch = stored_epoch(last) if os.path.isfile(last) else None    # None: none, or unreadable (load_resume says)
    newest = newest_recovery(folder, -1 if last_epoch is None else last_epoch) or \
        (last if os.path.isfile(last) else '')
    _logger.info(f'resume auto: {"resuming from " + newest if newest else "no " + last + ", a fresh start"}')
    return newest


def load_resume(task, optimizer, scaler, cfg, path: str):
    """(epoch to start from, the checkpoint's metadata) after loading the run at `path` into task, optimizer and
    scaler (not those two with no_resume_opt). SettingError for a truncated checkpoint or one of another model."""
    keep_opt = not cfg.no_resume_opt
    try:
        epoch = resume_task_checkpoint(task, path, optimizer=optimizer if keep_opt else None,
                                       loss_scaler=scaler if keep_opt else None, log_info=cfg.rank == 0)
        saved = load_checkpoint_file(path, mmap=True)
    except CHECKPOINT_ERRORS as e:
        raise SettingError('resume', path, f'cannot resume from it ({first_line(e, 200)}); it is truncated or the '
                                           f'checkpoint of another model: pass an intact last.pth.tar of this run') from e
    if 'update' in saved:                    # a recovery checkpoint: its epoch continues, from the next update
        return saved['epoch'], saved
    return epoch or 0, saved


def attach_ema(task, cfg, path: str) -> None:
    """The EMA of the weights (after resuming: it starts from the resumed weights, then takes the saved EMA)."""
    if not cfg.model_ema:
        return
    task.setup_ema(decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup,
                   device='cpu' if cfg.model_ema_force_cpu else None)
    if path:
        load_task_ema_checkpoint(task, path)


def continue_run(trainer: Trainer, saved: Dict[str, Any], start_epoch: int, same_folder: bool) -> None:
    """Pick up where a resumed run stopped: the schedule at start_epoch (and update, for a recovery checkpoint),
    the checkpoint ranking (same folder), and, for a single process, the RNG streams as if the run had not
    stopped (a recovery checkpoint restores them inside its epoch: Trainer.continue_within)."""
    within = saved.get('update', -1) + 1
    if within:
        trainer.continue_within(saved)
    done = start_epoch * trainer.updates_per_epoch + within
    if trainer.scheduler is not None and trainer.cfg.sched_on_updates and done > 0:
        trainer.scheduler.step_update(done)
    elif trainer.scheduler is not None and start_epoch > 0:
        trainer.scheduler.step(start_epoch)
    if trainer.keeper is not None and same_folder and saved:
        trainer.keeper.restore(saved.get('saver'), saved.get('epoch', start_epoch - 1))
    if saved.get('rng_state') is not None and not trainer.cfg.distributed and not within:
        set_rng_state(saved['rng_state'])


def _finite_weights(module: nn.Module) -> bool:
    """All parameters finite (one host sync)."""
    flags = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def evaluate_epoch(trainer: Trainer, ema: bool = False) -> Dict[str, float]:
    """loss / top1 / top5 of the model (or its EMA) on the evaluation loader."""
    cfg, data = trainer.cfg, trainer.data
    scores = predict(trainer.task.get_eval_model(ema=ema), data.eval_loader, trainer.precision,
                     channels_last=cfg.channels_last, tta=cfg.tta, log_every=cfg.log_interval if cfg.rank == 0 else 0,
                     log_name='Test (EMA)' if ema else 'Test', dataset_length=len(data.eval_dataset))
    return epoch_metrics(scores, cfg.num_classes)


def _evaluate(trainer: Trainer) -> Optional[Dict[str, float]]:
    cfg = trainer.cfg
    if trainer.data.eval_loader is None:
        return None
    metrics = evaluate_epoch(trainer)
    ema = trainer.task.get_trainable_module(ema=True)
    if ema is not None and not cfg.model_ema_force_cpu:
        if cfg.distributed and cfg.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(ema, cfg.world_size, cfg.dist_bn == 'reduce')
        metrics = evaluate_epoch(trainer, ema=True)
    return metrics


class EpochMetric(NamedTuple):
    """The epoch's metric for the schedule (value) and for the checkpoint ranking (rank_by: None for a model that
    is not finite, which is never the best)."""
    value: float
    rank_by: Optional[float]


def _rank_metric(trainer: Trainer, train: Dict[str, float], evaluation: Optional[Dict[str, float]]) -> EpochMetric:
    """The epoch's metric (see EpochMetric): cfg.eval_metric of the evaluation, or the training loss without one."""
    name = trainer.cfg.eval_metric if evaluation is not None else 'loss'
    value = (evaluation if evaluation is not None else train)[name]
    loss = (evaluation if evaluation is not None else train)['loss']
    if not (math.isfinite(value) and math.isfinite(loss)) or not _finite_weights(trainer.task.get_trainable_module()):
        _logger.warning('the model is not finite after this epoch: its checkpoint is kept unranked, never the best')
        return EpochMetric(value, None)
    return EpochMetric(value, value)


def _save_epoch(trainer: Trainer, epoch: int, rank_by: Optional[float], milestone: bool,
                summary: Optional[SummaryLog]) -> None:
    """The epoch's checkpoint (and milestone); when the write fails, the epoch's summary.csv row goes too."""
    try:
        trainer.keeper.save(trainer.state(), epoch, rank_by)
        if milestone:
            trainer.keeper.milestone(epoch + 1)
    except CheckpointWriteError:
        if summary is not None:
            summary.keep_before(epoch)
        raise


def fit(trainer: Trainer, start_epoch: int, end_epoch: int, summary: Optional[SummaryLog] = None,
        wandb=None) -> List[Dict[str, Any]]:
    """Epochs [start_epoch, end_epoch) of the run; evaluation and checkpoints every val_interval epochs and at
    the end; KeyboardInterrupt ends the loop quietly (the results so far are returned)."""
    cfg = trainer.cfg
    milestones = set(cfg.save_epochs or ())
    results = []
    with StopSignals() as trainer.stop:
        try:
            _epochs(trainer, start_epoch, end_epoch, summary, wandb, milestones, results)
        except KeyboardInterrupt:
            _logger.info('Interrupted: stopping after the last complete epoch')
        except RuntimeError as e:           # under torchrun: a collective whose peer process died
            lost = lost_process_message(cfg, e)
            if lost is None:
                raise
            raise ProcessLost(lost) from e
    return results


def _epochs(trainer: Trainer, start_epoch: int, end_epoch: int, summary: Optional[SummaryLog], wandb,
            milestones, results: List[Dict[str, Any]]) -> None:
    """The epochs of fit; a stop request seen after an epoch's checkpoint ends the run there (Preempted)."""
    cfg = trainer.cfg
    for epoch in range(start_epoch, end_epoch):
        set_loader_epoch(trainer.data.train_loader, epoch)
        began = time.time()
        train = trainer.train_epoch(epoch)
        _logger.info(f'Epoch {epoch} trained in {time.time() - began:.1f}s')
        if cfg.distributed and cfg.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(trainer.task.get_trainable_module(), cfg.world_size, cfg.dist_bn == 'reduce')
        done = epoch + 1
        if done % cfg.val_interval and done != end_epoch:
            _logger.info(f'Epoch {epoch}: no evaluation or checkpoint (val_interval {cfg.val_interval})')
            if trainer.keeper is not None and done in milestones:
                trainer.keeper.save(trainer.state(), epoch)      # unranked: the milestone needs this state
                trainer.keeper.milestone(done)
            if trainer.scheduler is not None:
                trainer.scheduler.step(done, metric=None)
            continue
        evaluation = _evaluate(trainer)
        value, rank_by = _rank_metric(trainer, train, evaluation)
        if summary is not None:
            lrs = [g['lr'] for g in trainer.optimizer.param_groups]
            row = summary.append(epoch, train, evaluation, sum(lrs) / len(lrs))
            if wandb is not None:
                wandb.log(row)
        if trainer.keeper is not None:
            _save_epoch(trainer, epoch, rank_by, done in milestones, summary)
        if trainer.scheduler is not None:
            trainer.scheduler.step(done, value)
        results.append({'epoch': epoch, 'train': train, **({'validation': evaluation} if evaluation else {})})
        if done < end_epoch and agreed_stop(trainer.stop, cfg.distributed, trainer.precision.device):
            raise Preempted(f'stopped by {trainer.stop.name or "a signal to another process"} after epoch {epoch}: '
                            f'its checkpoint last.pth.tar is '
                            f'complete; continue with `resume` auto (and the same `experiment`)')


def export_best_weights(folder: str, model: nn.Module, ema_model: Optional[nn.Module] = None,
                        calibrate: Optional[Callable[[nn.Module, str], Dict[str, str]]] = None) -> List[str]:
    """model_best.safetensors (and model_best_ema.safetensors) from model_best.pth.tar, or last.pth.tar when no
    epoch was ranked: the weights alone, for validate.py and timm.create_model(pretrained_cfg_overlay=dict(file=)),
    with the checkpoint's class names in the metadata. calibrate(module, file name): folds a temperature into the
    loaded module in place and returns the metadata entries to add. Weights that are not finite are not exported
    (a warning says so)."""
    source = best_checkpoint(folder)
    if not os.path.exists(source):
        source = last_checkpoint(folder)
        if not os.path.exists(source):
            return []
    checkpoint = load_checkpoint_file(source)
    names = checkpoint.get(CLASS_NAMES_KEY)
    written = []
    for key, module, name in (('state_dict', model, 'model_best.safetensors'),
                              ('state_dict_ema', ema_model, 'model_best_ema.safetensors')):
        if checkpoint.get(key) is None or module is None:
            continue
        if not all(torch.isfinite(t).all() for t in checkpoint[key].values() if t.is_floating_point()):
            _logger.warning(f'{os.path.basename(source)} holds weights that are not finite: {name} not written')
            continue
        module = unwrap_model(module)
        module.load_state_dict(checkpoint[key])
        metadata = {CLASS_NAMES_KEY: json.dumps(names)} if isinstance(names, list) else {}
        if calibrate is not None:
            metadata.update(calibrate(module, name))
        with writing(name, folder):
            written.append(str(save_weights(module, os.path.join(folder, name), metadata)))
    return written
