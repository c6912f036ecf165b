"""The training task of a run: timm's classification task (loss on the logits), with the ZZZ head's penalties when
their weights are set, with CARROT the same plus w * R(embedding, class) (carrot_zzz.regularised_task); then
torch.compile and DDP, in timm.task's order."""
import argparse
import logging

from timm.loss import create_classification_loss
from timm.task import ClassificationTask
from torch import nn

from ..regularised_task import CarrotClassificationTask, PenalisedClassificationTask
from .errors import SettingError
from .precision import Precision

__all__ = ['training_loss', 'carrot_bounds', 'build_task', 'compile_and_distribute']

_logger = logging.getLogger(__name__)


def training_loss(cfg: argparse.Namespace, soft_targets: bool, aug_splits: int) -> nn.Module:
    """The criterion timm trains with: cfg.loss when given, else 'jsd' with jsd_loss, 'bce' with bce_loss, else
    'ce'; timm.loss.create_classification_loss then picks the variant (soft-target / label-smoothing CE, ...)."""
    kind = cfg.loss or ('jsd' if cfg.jsd_loss else 'bce' if cfg.bce_loss else 'ce')
    bce = kind == 'bce'
    try:
        return create_classification_loss(
            loss_type=kind, smoothing=cfg.smoothing, soft_targets=soft_targets, jsd_splits=aug_splits,
            bce_target_thresh=cfg.bce_target_thresh if bce else None, bce_sum=cfg.bce_sum and bce,
            pos_weight=cfg.bce_pos_weight if bce else None)
    except ValueError as e:
        setting = 'loss' if cfg.loss else ('jsd_loss' if cfg.jsd_loss else 'bce_loss')
        raise SettingError(setting, cfg.loss or True, str(e).splitlines()[0]) from e


def carrot_bounds(cfg: argparse.Namespace, world_size: int):
    """(max_classes, max_per_class) of the batch CARROT sees, known in advance under P x K batches (no host sync
    in the regulariser), else (None, None). Pair / element mixup may give a sample its mirror's class: 2 K."""
    if cfg.sampler != 'pk':
        return None, None
    mixes_pairs = (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None) and cfg.mixup_mode != 'batch'
    classes = cfg.batch_size // cfg.samples_per_class
    if cfg.carrot_scope == 'global':
        classes *= world_size
    return classes, cfg.samples_per_class * (2 if mixes_pairs else 1)


def build_task(cfg: argparse.Namespace, model: nn.Module, criterion: nn.Module, precision: Precision):
    """The task on the device (EMA, compilation and DDP come later: fit.attach_ema, compile_and_distribute)."""
    common = dict(device=precision.device, dtype=precision.model_dtype, verbose=cfg.rank == 0,
                  zzz_v_shrink=cfg.zzz_v_shrink, zzz_decouple=cfg.zzz_decouple)
    if cfg.carrot:
        max_classes, max_per_class = carrot_bounds(cfg, cfg.world_size)
        task = CarrotClassificationTask(
            model, criterion, carrot_weight=cfg.carrot_weight, rank_norm=cfg.carrot_rank_norm,
            scope=cfg.carrot_scope, max_classes=max_classes, max_per_class=max_per_class, **common)
    elif cfg.zzz_v_shrink or cfg.zzz_decouple:
        task = PenalisedClassificationTask(model, criterion, **common)
    else:
        task = ClassificationTask(model, criterion, device=precision.device, dtype=precision.model_dtype,
                                  verbose=cfg.rank == 0)
    return task


def compile_and_distribute(task, cfg: argparse.Namespace, precision: Precision) -> None:
    """torch.compile the task's modules (and the EMA's), then wrap for DDP: timm.task's order."""
    if cfg.torchcompile:
        _logger.info(f'Compiling task components with backend={cfg.torchcompile}, mode={cfg.torchcompile_mode}')
        task.compile(backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
    if cfg.distributed:
        ids = [precision.device] if precision.device.type == 'cuda' else None
        task.prepare_distributed(device_ids=ids, broadcast_buffers=not cfg.no_ddp_bb)
