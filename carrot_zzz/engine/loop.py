"""One training epoch of a run (`Trainer.train_epoch`) and what a checkpoint of it holds (`Trainer.state`).

A step: the task's forward in the autocast region (the CARROT term, when on, is inside its loss), the loss
divided by the size of its accumulation group, backward (through timm's loss scaler under float16 autocast on
CUDA), and on the group's last batch: clipping, the optimizer step, zero_grad, the EMA update and the per-update
schedule. Losses and CARROT statistics are summed on the device (RunningMeans) and read back only for a log line
(every log_interval updates) and at the end of the epoch; a loss that is not finite there stops the run with
TrainingDiverged before anything else is written.
"""
import argparse
import contextlib
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from timm.utils import AverageMeter, dispatch_clip_grad

from ..carrot import NAN_WHEN_UNUSED
from ..weights import CLASS_NAMES_KEY
from .checkpoints import CheckpointKeeper, plain, rng_state, set_rng_state
from .data import TrainingData
from .errors import TrainingDiverged
from .means import RunningMeans
from .optim import clip_parameters
from .precision import Precision
from .preemption import Preempted, StopSignals, agreed_stop

__all__ = ['Trainer', 'accumulation_group', 'updates_per_epoch', 'freeze_batch_norm_statistics']

_logger = logging.getLogger(__name__)
LOSS_TERMS = ('task_loss', 'R_var', 'R_rank', 'zzz_v_shrink', 'zzz_decouple')
PENALTIES = ('zzz_v_shrink', 'zzz_decouple')


def accumulation_group(index: int, batches: int, steps: int):
    """(size, last?) of the accumulation group batch `index` of `batches` falls in: groups of `steps` batches,
    the epoch's last group shorter when steps does not divide batches."""
    start = index - index % steps
    size = min(steps, batches - start)
    return size, index - start == size - 1


def updates_per_epoch(batches: int, steps: int) -> int:
    """Optimizer updates in an epoch of `batches` batches accumulated `steps` at a time (the last group may be short)."""
    return math.ceil(batches / steps)


def _carrot_text(means: Dict[str, float]) -> str:
    return (f'  Task: {means["task_loss"]:#.3g}  R: {means["R"]:#.3g} (var {means["R_var"]:#.3g}, rank '
            f'{means["R_rank"]:#.3g})  Classes: {means["classes_used"]:.1f} ({100 * means["used_frac"]:.0f}% of '
            f'samples)  Min r: {means["min_r"]:.3g}  Min erank: {means["min_erank_frac"]:.3g}')


def freeze_batch_norm_statistics(model: torch.nn.Module) -> int:
    """Put every batch-norm layer of `model` in eval mode (after model.train()): it normalises with its running
    statistics and no longer updates them, while its weight and bias still train. Returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)


def _penalty_text(means: Dict[str, float]) -> str:
    """'  V shrink: 1.23  Decouple: 0.0456' for the ZZZ head's penalties that are on."""
    words = {'zzz_v_shrink': 'V shrink', 'zzz_decouple': 'Decouple'}
    return ''.join(f'  {words[name]}: {means[name]:#.3g}' for name in PENALTIES if name in means)


class StepTiming(NamedTuple):
    """What a log line says about time: seconds per update (AverageMeter), seconds waiting for data
    (AverageMeter), samples of the update over all processes."""
    step: AverageMeter
    data: AverageMeter
    samples: int


@dataclass
class Trainer:
    """Everything one epoch touches; `keeper` and `output_dir` only on the process that writes (rank 0)."""
    cfg: argparse.Namespace
    task: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    precision: Precision
    data: TrainingData
    keeper: Optional[CheckpointKeeper] = None
    output_dir: Optional[str] = None
    clip: List[torch.nn.Parameter] = field(default_factory=list)
    stop: Optional[StopSignals] = None           # SIGTERM / SIGINT: stop at the next update (engine.preemption)
    resume_at: Optional[Dict[str, Any]] = None   # a recovery checkpoint's place in its epoch (see continue_within)

    def __post_init__(self):
        self._after_skip = None
        if self.cfg.clip_grad is not None:
            self.clip = clip_parameters(self.task, self.cfg.clip_mode)
        self.world = self.cfg.world_size if self.cfg.distributed else 1
        self.second_order = getattr(self.optimizer, 'is_second_order', False)

    @property
    def updates_per_epoch(self) -> int:
        return updates_per_epoch(len(self.data.train_loader), self.cfg.grad_accum_steps)

    def state(self) -> Dict[str, Any]:
        """The checkpoint of the run as it stands (the keeper adds epoch, metric and its ranking), with the training
        split's class names in label order (`class_names`) when it has them."""
        state = {'arch': self.cfg.model, 'optimizer': self.optimizer.state_dict(), 'version': 2,
                 'rng_state': rng_state(), 'args': plain(vars(self.cfg))}
        if self.data.class_names is not None:
            state[CLASS_NAMES_KEY] = list(self.data.class_names)
        if self.scaler is not None:
            state[self.scaler.state_dict_key] = self.scaler.state_dict()
        state.update(self.task.get_checkpoint_state())
        state.update(self.task.get_checkpoint_state(ema=True))
        return state

    def _stop_mixup(self, epoch: int) -> None:
        if not (self.cfg.mixup_off_epoch and epoch >= self.cfg.mixup_off_epoch):
            return
        if self.cfg.prefetcher and getattr(self.data.train_loader, 'mixup_enabled', False):
            self.data.train_loader.mixup_enabled = False
        elif self.data.mixup_fn is not None:
            self.data.mixup_fn.mixup_enabled = False

    def _inputs(self, images: torch.Tensor, target: torch.Tensor):
        if not self.cfg.prefetcher:
            images = images.to(device=self.precision.device, dtype=self.precision.input_dtype)
            target = target.to(device=self.precision.device)
            if self.data.mixup_fn is not None:
                images, target = self.data.mixup_fn(images, target)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target

    def _backward(self, loss: torch.Tensor, update: bool) -> None:
        cfg = self.cfg
        if self.scaler is not None:
            self.scaler(loss, self.optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode, parameters=self.clip,
                        create_graph=self.second_order, need_update=update)
            return
        loss.backward(create_graph=self.second_order)
        if update:
            if cfg.clip_grad is not None:
                dispatch_clip_grad(self.clip, value=cfg.clip_grad, mode=cfg.clip_mode)
            self.optimizer.step()

    def _step(self, images: torch.Tensor, target: torch.Tensor, group: int, update: bool) -> Dict[str, Any]:
        """Forward and backward of one batch; the optimizer steps when `update` (the group's last batch)."""
        quiet = self.cfg.distributed and not update and hasattr(self.task.get_trainable_module(), 'no_sync')
        with self.task.no_sync() if quiet else contextlib.nullcontext():
            with self.precision.autocast():
                out = self.task(images, target)
            self._backward(out['loss'] / group if group > 1 else out['loss'], update)
        return out

    def _check_finite(self, means: Dict[str, float], epoch: int, where: str) -> None:
        if math.isfinite(means.get('loss', 0.0)):
            return
        terms = ', '.join(f'{k} {means[k]:.4g}' for k in LOSS_TERMS if k in means)
        raise TrainingDiverged(
            f'the training loss became {means["loss"]} in epoch {epoch} ({where}{"; " + terms if terms else ""}); '
            f'the checkpoints written before are kept. Lower `lr` / `head_lr` (or `carrot_weight`), or clip '
            f'gradients with `clip_grad`')

    def _log(self, epoch: int, update: int, step_values: Dict[str, torch.Tensor], window: RunningMeans,
             running: RunningMeans, timing: 'StepTiming', lr: float) -> None:
        """The log line of an update (rank 0): this step's loss, the epoch's so far, times, lr and the task's
        statistics of the window since the last line; a loss that is no longer finite stops the run here."""
        now = RunningMeans(NAN_WHEN_UNUSED)
        now.add(step_values)
        latest, recent, total = now.means(self.world), window.means(self.world), running.means(self.world)
        self._check_finite(recent, epoch, f'updates up to {update}')
        if self.cfg.rank != 0:
            return
        step_time, data_time, samples = timing.step, timing.data, timing.samples
        line = (f'Train: {epoch} [{update:>4d}/{self.updates_per_epoch} '
                f'({100. * (update + 1) / self.updates_per_epoch:>3.0f}%)]  '
                f'Loss: {latest["loss"]:#.3g} ({total["loss"]:#.3g})  '
                f'Time: {step_time.val:.3f}s, {samples / step_time.val:>7.2f}/s  '
                f'({step_time.avg:.3f}s, {samples / step_time.avg:>7.2f}/s)  LR: {lr:.3e}  '
                f'Data: {data_time.val:.3f} ({data_time.avg:.3f})')
        _logger.info(line + (_carrot_text(recent) if 'R' in recent else '') + _penalty_text(recent))

    def _save_images(self, images: torch.Tensor, index: int) -> None:
        import torchvision.utils
        torchvision.utils.save_image(images, os.path.join(self.output_dir, f'train-batch-{index}.jpg'), padding=0,
                                     normalize=True)

    def _write_recovery(self, epoch: int, update: int, running: RunningMeans,
                        epoch_rng: Dict[str, Any]) -> Optional[str]:
        """recovery-<epoch>-<update>.pth.tar (rank 0): the run's state with what resuming inside the epoch needs
        (the update, the epoch's RNG start, the running means); its path, None on the other ranks."""
        if self.keeper is None:
            return None
        return self.keeper.recovery({**self.state(), 'update': update, 'epoch_rng_state': epoch_rng,
                                     'running': running.state()}, epoch, update)

    def _recovery(self, epoch: int, update: int, running: RunningMeans, epoch_rng: Dict[str, Any]) -> None:
        """A mid-epoch checkpoint, written only while the loss is still finite (every rank checks: the means sync)."""
        self._check_finite(running.means(self.world), epoch, f'before the recovery checkpoint of update {update}')
        self._write_recovery(epoch, update, running, epoch_rng)

    def _preempt(self, epoch: int, update: int, running: RunningMeans, epoch_rng: Dict[str, Any]) -> None:
        """Write the recovery checkpoint of this update (rank 0) and raise Preempted naming it."""
        path = self._write_recovery(epoch, update, running, epoch_rng)
        where = f'the state of update {update} of epoch {epoch} is in {path}' if path else 'rank 0 saved the state'
        raise Preempted(f'stopped by {self.stop.name or "a signal to another process"} at epoch {epoch}, update '
                        f'{update}: {where}; continue with '
                        f'`resume` auto (and the same `experiment`)')

    def continue_within(self, saved: Dict[str, Any]) -> None:
        """Resume inside an epoch from a recovery checkpoint (its `update`): the epoch's batches up to that update
        are read again but not trained on, with the RNG streams of the epoch's start, then the stopped run's."""
        self.resume_at = {key: saved[key] for key in ('epoch', 'update', 'epoch_rng_state', 'rng_state', 'running')
                          if key in saved}

    def _skip_to(self, epoch: int, running: RunningMeans) -> int:
        """Batches to read without training in this epoch (0 unless resuming inside it); restores its RNG start."""
        resume, self.resume_at = self.resume_at, None
        if not resume or resume['epoch'] != epoch:
            return 0
        if not self.cfg.distributed:
            set_rng_state(resume['epoch_rng_state'])
        running.load(resume['running'], self.precision.device)
        self._after_skip = resume['rng_state'] if not self.cfg.distributed else None
        return (resume['update'] + 1) * self.cfg.grad_accum_steps

    def _after_update(self, updates_done: int) -> None:
        self.optimizer.zero_grad()
        self.task.update_ema(step=updates_done)
        if self.cfg.synchronize_step and self.precision.device.type == 'cuda':
            torch.cuda.synchronize()
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=updates_done, metric=None)

    def train_epoch(self, epoch: int) -> 'OrderedDict[str, float]':
        """Train one epoch; returns the epoch's means: loss (per sample) and the task's statistics (per batch)."""
        cfg, loader = self.cfg, self.data.train_loader
        self._stop_mixup(epoch)
        self.task.get_trainable_module().train()
        if cfg.bn_freeze_stats:
            freeze_batch_norm_statistics(self.task.get_trainable_module())
        running, window = RunningMeans(NAN_WHEN_UNUSED), RunningMeans(NAN_WHEN_UNUSED)
        step_time, data_time = AverageMeter(), AverageMeter()
        batches, steps = len(loader), cfg.grad_accum_steps
        skip = self._skip_to(epoch, running)
        epoch_rng = rng_state()                     # what a recovery checkpoint of this epoch starts it from
        updates_done = epoch * self.updates_per_epoch + skip // steps
        samples = 0
        self.optimizer.zero_grad()
        tick = last_update = time.time()
        for index, (images, target) in enumerate(loader):
            if index < skip:                        # resuming inside the epoch: read, do not train
                if index == skip - 1 and self._after_skip is not None:
                    set_rng_state(self._after_skip)
                continue
            group, update_now = accumulation_group(index, batches, steps)
            images, target = self._inputs(images, target)
            data_time.update(group * (time.time() - tick))
            out = self._step(images, target, group, update_now)
            values = {'loss': out['loss'].detach()}
            stats = {k: v for k, v in out.items() if k not in ('loss', 'output') and torch.is_tensor(v) and v.ndim == 0}
            running.add(values, images.shape[0])
            window.add(values, images.shape[0])
            running.add(stats)
            window.add(stats)
            samples += images.shape[0] * self.world
            if not update_now:
                tick = time.time()
                continue
            updates_done += 1
            update = index // steps
            self._after_update(updates_done)
            if cfg.recovery_interval and (update + 1) % cfg.recovery_interval == 0:
                self._recovery(epoch, update, running, epoch_rng)
            at_log = update % cfg.log_interval == 0 or index == batches - 1
            if (at_log or not cfg.distributed) and agreed_stop(self.stop, cfg.distributed, self.precision.device):
                self._preempt(epoch, update, running, epoch_rng)
            step_time.update(time.time() - last_update)
            last_update = time.time()
            if at_log:
                lrs = [g['lr'] for g in self.optimizer.param_groups]
                self._log(epoch, update, {**values, **stats}, window, running,
                          StepTiming(step_time, data_time, samples), sum(lrs) / len(lrs))
                window = RunningMeans(NAN_WHEN_UNUSED)
                if cfg.save_images and self.output_dir:
                    self._save_images(images, index)
            samples = 0
            tick = time.time()
        if hasattr(self.optimizer, 'sync_lookahead'):
            self.optimizer.sync_lookahead()
        means = running.means(self.world)
        self._check_finite(means, epoch, 'epoch mean')
        return means
