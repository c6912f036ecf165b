"""The process a run lives in: device backends, distributed init (torchrun, for train.py and validate.py),
precision, seeds, one error line per run; the model placed on its device in its dtype and memory layout; the loss
scaler; the output folder's name."""
import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from datetime import datetime
from typing import Iterator, List, Optional

import torch
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import safe_model_name
from timm.utils import NativeScaler, init_distributed_device, random_seed, set_jit_fuser
import torch.distributed as dist
from torch import nn

from .errors import SettingError
from .precision import Precision, fast_cuda_math, require_device, resolve_precision

__all__ = ['start_process', 'join_processes', 'leave_processes', 'one_error_line', 'place_model', 'loss_scaler',
           'experiment_name', 'lost_process_message']

LOST_PEER_SIGNS = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe', 'NCCL communicator was '
                   'aborted', 'ProcessGroupNCCL', 'Socket Timeout')   # a collective whose peer process is gone
_ALIVE_KEY = 'carrot_zzz/alive_after_loss/'
_ERROR_KEY = 'carrot_zzz/error_line'          # one_error_line: rank 0's one-line error

_logger = logging.getLogger(__name__)


def start_process(cfg: argparse.Namespace) -> Precision:
    """train.py's process: import device_modules, then join_processes (cfg gets distributed, world_size, rank,
    device); returns the run's Precision."""
    for module in cfg.device_modules or ():
        importlib.import_module(module)
    cfg.grad_accum_steps = max(1, cfg.grad_accum_steps)
    precision = join_processes(cfg, 'Training')
    if precision.model_dtype == torch.float16:
        _logger.warning('float16 parameters train poorly; bfloat16 or amp are the safer choices')
    return precision


def join_processes(cfg: argparse.Namespace, activity: str) -> Precision:
    """What train.py's and validate.py's processes set up first: TF32 / cudnn autotuning on CUDA, the prefetcher
    setting, the device check, the precision, torchrun's process group when launched by it (cfg gets distributed,
    world_size, rank, local_rank, device: cuda:<local rank> there), the seed (plus the rank), the TorchScript fuser
    and fast norm. activity names the run in the log line ('Training', 'Validating'); returns the Precision."""
    fast_cuda_math()
    cfg.prefetcher = not cfg.no_prefetcher
    require_device(cfg.device)
    precision = resolve_precision(cfg.device, cfg.amp, cfg.amp_dtype, cfg.model_dtype)
    device = init_distributed_device(cfg)
    precision = Precision(device, precision.model_dtype, precision.amp_dtype)
    if cfg.distributed:
        _logger.info(f'{activity} in distributed mode: process {cfg.rank} of {cfg.world_size}, device {cfg.device}.')
    else:
        _logger.info(f'{activity} with a single process on 1 device ({cfg.device}).')
    _logger.info(f'Precision: {precision.describe()}.')
    random_seed(cfg.seed, cfg.rank)
    if cfg.fuser:
        set_jit_fuser(cfg.fuser)
    if cfg.fast_norm:
        set_fast_norm()
    return precision


def leave_processes(cfg: argparse.Namespace) -> None:
    """Leave torchrun's process group (nothing in a single process)."""
    if getattr(cfg, 'distributed', False):
        dist.destroy_process_group()


@contextlib.contextmanager
def one_error_line(cfg: Optional[argparse.Namespace], wait_s: float = 5.0) -> Iterator[None]:
    """Inside, under torchrun: a script's one-line error (a SystemExit with a message) is printed once. Every
    process meets the same wrong setting; rank 0 prints its line and leaves it in the rendezvous store, another
    rank that stops with the same line leaves silently; one whose line differs, or that finds none within wait_s
    (an error of its own), prints it. An error met before the process group exists (the settings checks) is
    printed by the first process of each machine (LOCAL_RANK 0); cfg is None while the settings are parsed. Exit
    status 1 either way; a single process is left as it is."""
    try:
        yield
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        if not getattr(cfg, 'distributed', False):     # before the process group: a machine's first process says it
            if os.environ.get('LOCAL_RANK', '0') != '0':
                raise SystemExit(1) from None
            raise
        try:
            store = dist.distributed_c10d._get_default_store()
            if cfg.rank == 0:
                print(e.code, file=sys.stderr, flush=True)
                store.set(_ERROR_KEY, e.code)
                raise SystemExit(1) from None
            if not _missing_keys(store, [_ERROR_KEY], wait_s) and store.get(_ERROR_KEY).decode() == e.code:
                raise SystemExit(1) from None
        except (RuntimeError, ValueError):     # the store's own errors (DistStoreError, timeouts): print it here
            pass
        raise


def place_model(model: nn.Module, cfg: argparse.Namespace, precision: Precision) -> nn.Module:
    """Split / synchronised batch norm, device and dtype, channels-last, TorchScript: what the settings ask."""
    if cfg.split_bn:
        model = convert_splitbn_model(model, max(cfg.aug_splits, 2))
    model.to(device=precision.device, dtype=precision.model_dtype)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.distributed and cfg.sync_bn:
        if cfg.split_bn:
            raise SettingError('sync_bn', True, 'cannot be combined with split_bn; remove one')
        cfg.dist_bn = ''
        model = convert_sync_batchnorm(model)
        _logger.info('Batch norm synchronised over processes (zero-initialised BN layers may misbehave with it).')
    if cfg.torchscript:
        if cfg.sync_bn:
            raise SettingError('torchscript', True, 'cannot be combined with sync_bn')
        model = torch.jit.script(model)
    return model


def loss_scaler(precision: Precision):
    """timm's NativeScaler when float16 autocast on CUDA needs one, else None."""
    return NativeScaler(device=precision.device.type) if precision.needs_loss_scaling else None


def experiment_name(cfg: argparse.Namespace, image_size: int) -> str:
    """cfg.experiment, else timm's '<date-time>-<model>-<image size>'."""
    if cfg.experiment:
        return cfg.experiment
    return f'{datetime.now().strftime("%Y%m%d-%H%M%S")}-{safe_model_name(cfg.model)}-{image_size}'


def _missing_keys(store, keys: List[str], wait_s: float) -> List[str]:
    """The keys not (yet) set in the store after waiting up to wait_s for them."""
    deadline = time.time() + wait_s
    while True:
        missing = [key for key in keys if not store.check([key])]
        if not missing or time.time() > deadline:
            return missing
        time.sleep(0.1)


def _lost_ranks(cfg: argparse.Namespace, wait_s: float) -> Optional[List[int]]:
    """The ranks that do not answer after a collective failed: each survivor marks itself in the rendezvous store
    (hosted by torchrun's agent, which outlives the workers) and waits up to wait_s for the others; None when the
    store cannot be reached (it lived in the lost process)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f'{_ALIVE_KEY}{cfg.rank}', '1')
        missing = _missing_keys(store, [f'{_ALIVE_KEY}{r}' for r in range(cfg.world_size)], wait_s)
        return [int(key[len(_ALIVE_KEY):]) for key in missing]
    except Exception:      # the store's own errors (RuntimeError, DistStoreError, timeouts): no answer to give
        return None


def lost_process_message(cfg: argparse.Namespace, error: BaseException, wait_s: float = 3.0) -> Optional[str]:
    """The one line for a collective that failed because a process of the run died (None for any other error):
    which rank was lost, when the store can tell, and how to continue."""
    if not getattr(cfg, 'distributed', False) or not isinstance(error, RuntimeError):
        return None
    if not (isinstance(error, getattr(dist, 'DistBackendError', ())) or any(s in str(error) for s in LOST_PEER_SIGNS)):
        return None
    lost = _lost_ranks(cfg, wait_s)
    who = (f'rank {", ".join(map(str, lost))} of {cfg.world_size} was lost' if lost else
           f'a process of the {cfg.world_size} was lost')
    return (f'{who} (process {cfg.rank} saw its connection close); this process stops too. The checkpoints written '
            f'so far are kept: start the run again with `resume` auto (and the same `experiment`)')
