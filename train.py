#!/usr/bin/env python3
"""timm's training CLI, plus the ZZZ head and the CARROT regulariser.

Speaks the command line of timm's reference train.py (same flags, meanings and defaults, `-c/--config` YAML,
output layout `output/train/<experiment>/`, log lines) and builds on timm's library: datasets, loaders,
transforms, mixup, optimizer / scheduler factories, EMA, `timm.task`, CheckpointSaver, NativeScaler,
update_summary. With none of the new flags it trains the plain timm model as timm's script does.

New flags (see `carrot-zzz parameters` in --help):
    --head {linear,zzz}      `--model X --head zzz` equals `--model X_zzz` (carrot_zzz's model wrapper)
    --zzz-rank, --zzz-v-min, --zzz-sigma2-min    ZZZ head options
    --carrot [--carrot-weight W] [--carrot-rank-norm dim|attainable] [--carrot-scope global|local]
             loss = task_loss + W * R(embedding, dominant class), inside autocast, before the division by
             --grad-accum-steps and the loss scaler (carrot_zzz.train_task.CarrotClassificationTask)
    --head-lr LR             head learning rate; the backbone keeps --lr (and --layer-decay)
    --head-weight-decay WD   head weight decay; the backbone keeps --weight-decay
    --sampler {random,pk} --samples-per-class K      class-balanced P x K batches (carrot_zzz.sampler)

From timm 1.0.31's train.py: --resume auto, --stop-epoch, --save-epochs, --sched wsd / rsqrt with --lr-decay-fn and
--lr-stable-timescale, --loss (timm.loss.create_classification_loss); --task multilabel stops with one line.
Flags that are parsed but not supported yet (UNSUPPORTED_FLAGS) stop the run with one line when set.
"""
import argparse
import copy
import importlib
import json
import logging
import os
import pickle
import random
import time
from collections import OrderedDict
from contextlib import suppress
from datetime import datetime
from functools import partial

import numpy as np
import timm
import torch
import torch.nn as nn
import yaml

from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.data.loader import PrefetchLoader
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.loss import (BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy,
                       create_classification_loss)
from timm.loss._loss_factory import LOSS_TYPES
from timm.models import create_model, load_checkpoint, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler

import carrot_zzz  # noqa: F401  registers the `<arch>_zzz` models
from carrot_zzz.data import create_dataset  # timm's create_dataset + the FGVC layouts and Fashion-MNIST
from carrot_zzz.model import ZZZModel
from carrot_zzz.recipe import read_recipe
from carrot_zzz.registry import base_name, is_zzz_name, zzz_name
from carrot_zzz.sampler import PKBatchSampler, dataset_targets
from carrot_zzz.carrot import NAN_WHEN_UNUSED
from carrot_zzz.cli import add_dataset_reader_flags, add_task_flags, first_line, single_label_error
from carrot_zzz.train_task import CARROT_SCOPES, CarrotClassificationTask
from carrot_zzz.weights import load_checkpoint_file, save_weights

try:
    import wandb
    has_wandb = True
except ImportError:
    has_wandb = False

_logger = logging.getLogger('train')


# ---------------------------------------------------------------------------------------------------------------
# command line: timm's flags (names, defaults, meanings) + carrot-zzz's
# ---------------------------------------------------------------------------------------------------------------

def build_parsers():
    """(config_parser, parser): the first reads only -c/--config, whose YAML sets the second's defaults."""
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')

    parser = argparse.ArgumentParser(description='PyTorch ImageNet Training (timm) with the ZZZ head and CARROT')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file specifying default arguments')
    # Dataset parameters
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='path to dataset (positional is *deprecated*, use --data-dir)')
    g = parser.add_argument_group('Dataset parameters')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    g.add_argument('--dataset', metavar='NAME', default='',
                   help='dataset type + name ("<type>/<name>") (default: ImageFolder or ImageTar if empty)')
    g.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    g.add_argument('--val-split', metavar='NAME', default='validation',
                   help='dataset validation split (default: validation)')
    g.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='Manually specify num samples in train split, for IterableDatasets.')
    g.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                   help='Manually specify num samples in validation split, for IterableDatasets.')
    add_dataset_reader_flags(g)
    # Model parameters
    g = parser.add_argument_group('Model parameters')
    g.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                   help='Name of model to train (default: "resnet50")')
    g.add_argument('--pretrained', action='store_true', default=False,
                   help='Start with pretrained version of specified network (if avail)')
    g.add_argument('--pretrained-path', default=None, type=str,
                   help='Load this checkpoint as if they were the pretrained weights (with adaptation).')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='Load this checkpoint into model after initialization (default: none)')
    g.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='Resume full model and optimizer state from checkpoint (default: none); "auto" (timm '
                        '1.0.31): the experiment\'s own last.pth.tar when it exists, else a fresh start')
    g.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='prevent resume of optimizer state when resuming model')
    g.add_argument('--num-classes', type=int, default=None, metavar='N',
                   help='number of label classes (Model default if None)')
    g.add_argument('--gp', default=None, type=str, metavar='POOL',
                   help='Global pool type, one of (fast, avg, max, avgmax, avgmaxc). Model default if None.')
    g.add_argument('--img-size', type=int, default=None, metavar='N',
                   help='Image size (default: None => model default)')
    g.add_argument('--in-chans', type=int, default=None, metavar='N', help='Image input channels (default: None => 3)')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='Input all image dimensions (d h w, e.g. --input-size 3 224 224), uses model default if empty')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N',
                   help='Input image center crop percent (for validation only)')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                   help='Override mean pixel value of dataset')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='Override std deviation of dataset')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME',
                   help='Image resize interpolation type (overrides model)')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                   help='Input batch size for training (default: 128)')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                   help='Validation batch size override (default: None)')
    g.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
    g.add_argument('--fuser', default='', type=str, help="Select jit fuser. One of ('', 'te', 'old', 'nvfuser')")
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='The number of steps to accumulate gradients (default: 1)')
    g.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help='Enable gradient checkpointing through model blocks/stages')
    g.add_argument('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    g.add_argument('--head-init-scale', default=None, type=float, help='Head initialization scale')
    g.add_argument('--head-init-bias', default=None, type=float, help='Head initialization bias value')
    g.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None).')
    sg = g.add_mutually_exclusive_group()
    sg.add_argument('--torchscript', dest='torchscript', action='store_true', help='torch.jit.script the full model')
    sg.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                    help='Enable compilation w/ specified backend (default: inductor).')
    # Device parameters
    g = parser.add_argument_group('Device parameters')
    g.add_argument('--device', default='cuda', type=str, help='Device (accelerator) to use.')
    g.add_argument('--amp', action='store_true', default=False, help='use AMP for mixed precision training')
    g.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16)')
    g.add_argument('--model-dtype', default=None, type=str, help='Model dtype override (non-AMP) (default: float32)')
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='Force broadcast buffers for native DDP to off.')
    g.add_argument('--synchronize-step', action='store_true', default=False,
                   help='torch.cuda.synchronize() end of each step')
    g.add_argument('--local_rank', '--local-rank', default=0, type=int)
    g.add_argument('--device-modules', default=None, type=str, nargs='+',
                   help='Python imports for device backend modules.')
    # Optimizer parameters
    g = parser.add_argument_group('Optimizer parameters')
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='Optimizer (default: "sgd")')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                   help='Optimizer Epsilon (default: None, use opt default)')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                   help='Optimizer Betas (default: None, use opt default)')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M', help='Optimizer momentum (default: 0.9)')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                   help='Clip gradient norm (default: None, no clipping)')
    g.add_argument('--clip-mode', type=str, default='norm',
                   help='Gradient clipping mode. One of ("norm", "value", "agc")')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay (default: None)')
    g.add_argument('--layer-decay-min-scale', type=float, default=0,
                   help='layer-wise lr decay minimum scale clamp (default: 0)')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='layer-wise lr decay no optimization scale (default: None)')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    # Learning rate schedule parameters
    g = parser.add_argument_group('Learning rate schedule parameters')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: "cosine"')
    g.add_argument('--sched-on-updates', action='store_true', default=False,
                   help='Apply LR scheduler step on update instead of epoch end.')
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate, overrides lr-base if set (default: None)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                   help='base learning rate: lr = lr_base * global_batch_size / base_size')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                   help='base learning rate batch size (divisor, default: 256).')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                   help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='learning rate noise on/off epoch percentages')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                   help='learning rate noise limit percent (default: 0.67)')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                   help='learning rate noise std-dev (default: 1.0)')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                   help='learning rate cycle len multiplier (default: 1.0)')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                   help='amount to decay each learning rate cycle (default: 0.5)')
    g.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                   help='learning rate cycle limit, cycles enabled if > 1')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly (default: 1.0)')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate (default: 1e-5)')
    g.add_argument('--min-lr', type=float, default=0, metavar='LR',
                   help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    g.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    g.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                   help='epoch repeat multiplier (number of times to repeat dataset epoch per train epoch).')
    g.add_argument('--start-epoch', default=None, type=int, metavar='N',
                   help='manual epoch number (useful on restarts)')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='list of decay epoch indices for multistep lr. must be increasing')
    g.add_argument('--decay-epochs', type=float, default=None, metavar='N',
                   help='epoch interval to decay LR (step), decay phase length (wsd / rsqrt, a value in (0, 1) is a '
                        'fraction of the schedule); default: 90 for step, 0.2 for wsd / rsqrt, as timm 1.0.31')
    g.add_argument('--lr-decay-fn', type=str, default=None, metavar='FN',
                   help='decay phase function of wsd / rsqrt (timm 1.0.31; default: 1-sqrt for wsd, linear for rsqrt)')
    g.add_argument('--lr-stable-timescale', type=float, default=None, metavar='N',
                   help='rsqrt timescale in epochs (timm 1.0.31; default: warmup epochs)')
    g.add_argument('--stop-epoch', type=int, default=None, metavar='N',
                   help='stop once N epochs are complete, without changing the schedule (timm 1.0.31)')
    g.add_argument('--save-epochs', type=int, nargs='+', default=None, metavar='N',
                   help='keep milestone-N.pth.tar, the state after N completed epochs (timm 1.0.31)')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                   help='epochs to warmup LR, if scheduler supports')
    g.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='Exclude warmup period from decay schedule.')
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                   help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                   help='patience epochs for Plateau LR scheduler (default: 10)')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate (default: 0.1)')
    # Augmentation and regularization parameters
    g = parser.add_argument_group('Augmentation and regularization parameters')
    g.add_argument('--no-aug', action='store_true', default=False,
                   help='Disable all training augmentation, override other train aug args')
    g.add_argument('--train-crop-mode', type=str, default=None, help='Crop-mode in train')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='Random resize scale (default: 0.08 1.0)')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='Random resize aspect ratio (default: 0.75 1.33)')
    g.add_argument('--hflip', type=float, default=0.5, help='Horizontal flip training aug probability')
    g.add_argument('--vflip', type=float, default=0., help='Vertical flip training aug probability')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='Color jitter factor (default: 0.4)')
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                   help='Probability of applying any color jitter.')
    g.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT',
                   help='Probability of applying random grayscale conversion.')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT',
                   help='Probability of applying gaussian blur.')
    g.add_argument('--aa', type=str, default=None, metavar='NAME',
                   help='Use AutoAugment policy. "v0" or "original". (default: None)')
    g.add_argument('--aug-repeats', type=float, default=0,
                   help='Number of augmentation repetitions (distributed training only) (default: 0)')
    g.add_argument('--aug-splits', type=int, default=0,
                   help='Number of augmentation splits (default: 0, valid: 0 or >=2)')
    g.add_argument('--jsd-loss', action='store_true', default=False,
                   help='Enable Jensen-Shannon Divergence + CE loss. Use with `--aug-splits`.')
    g.add_argument('--bce-loss', action='store_true', default=False, help='Enable BCE loss w/ Mixup/CutMix use.')
    g.add_argument('--loss', type=str, default=None, choices=LOSS_TYPES,
                   help='training loss by timm.loss.create_classification_loss (timm 1.0.31); default: chosen by '
                        '--jsd-loss / --bce-loss / mixup / --smoothing as in timm')
    add_task_flags(g)
    g.add_argument('--bce-sum', action='store_true', default=False, help='Sum over classes when using BCE loss.')
    g.add_argument('--bce-target-thresh', type=float, default=None,
                   help='Threshold for binarizing softened BCE targets (default: None, disabled).')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='Positive weighting for BCE loss.')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT', help='Random erase prob (default: 0.)')
    g.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    g.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    g.add_argument('--resplit', action='store_true', default=False,
                   help='Do not random erase first (clean) augmentation split')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                   help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    g.add_argument('--mixup-prob', type=float, default=1.0,
                   help='Probability of performing mixup or cutmix when either/both is enabled')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5,
                   help='Probability of switching to cutmix when both mixup and cutmix enabled')
    g.add_argument('--mixup-mode', type=str, default='batch',
                   help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    g.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                   help='Turn off mixup after this epoch, disabled if 0 (default: 0)')
    g.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')
    g.add_argument('--train-interpolation', type=str, default='random',
                   help='Training interpolation (random, bilinear, bicubic default: "random")')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='Dropout rate (default: 0.)')
    g.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                   help='Drop connect rate, DEPRECATED, use drop-path (default: None)')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='Drop path rate (default: None)')
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='Drop block rate (default: None)')
    # Batch norm parameters
    g = parser.add_argument_group('Batch norm parameters', 'Only works with gen_efficientnet based models currently.')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
    g.add_argument('--sync-bn', action='store_true', help='Enable synchronized BatchNorm.')
    g.add_argument('--dist-bn', type=str, default='reduce',
                   help='Distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", or "")')
    g.add_argument('--split-bn', action='store_true', help='Enable separate BN layers per augmentation split.')
    # Model EMA
    g = parser.add_argument_group('Model exponential moving average parameters')
    g.add_argument('--model-ema', action='store_true', default=False,
                   help='Enable tracking moving average of model weights.')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                   help='Force ema to be tracked on CPU, rank=0 node only. Disables EMA validation.')
    g.add_argument('--model-ema-decay', type=float, default=0.9998,
                   help='Decay factor for model weights moving average (default: 0.9998)')
    g.add_argument('--model-ema-warmup', action='store_true', help='Enable warmup for model EMA decay.')
    # Misc
    g = parser.add_argument_group('Miscellaneous parameters')
    g.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    g.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    g.add_argument('--log-interval', type=int, default=50, metavar='N',
                   help='how many batches to wait before logging training status')
    g.add_argument('--val-interval', type=int, default=1, metavar='N',
                   help='how many epochs between validation and checkpointing')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                   help='how many batches to wait before writing recovery checkpoint')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                   help='number of checkpoints to keep (default: 10)')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                   help='how many training processes to use (default: 4)')
    g.add_argument('--save-images', action='store_true', default=False,
                   help='save images of input batches every log interval for debugging')
    g.add_argument('--pin-mem', action='store_true', default=False,
                   help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    g.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    g.add_argument('--output', default='', type=str, metavar='PATH',
                   help='path to output folder (default: none, current dir)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME',
                   help='name of train experiment, name of sub-folder for output')
    g.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                   help='Best metric (default: "top1"')
    g.add_argument('--tta', type=int, default=0, metavar='N',
                   help='Test/inference time augmentation (oversampling) factor. 0=None (default: 0)')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                   help='use the multi-epochs-loader to save time at the beginning of every epoch')
    g.add_argument('--log-wandb', action='store_true', default=False,
                   help='log training and validation metrics to wandb')
    g.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    g.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    g.add_argument('--wandb-resume-id', default='', type=str, metavar='ID',
                   help='If resuming a run, the id of the run in wandb')
    # Scheduled / variable input sizes (parsed, not supported yet)
    g.add_argument('--train-img-sizes', type=int, nargs='+', default=None,
                   help='Per-batch square image sizes for scheduled resolution training')
    g.add_argument('--train-batch-sizes', type=int, nargs='+', default=None,
                   help='Batch size for each --train-img-sizes choice')
    g.add_argument('--train-size-probs', type=float, nargs='+', default=None,
                   help='Base sampling weights for --train-img-sizes (default: uniform)')
    g.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                   help='Resolution choice schedule')
    g.add_argument('--train-size-schedule-spread', type=float, default=0.65,
                   help='Progressive schedule spread in resolution-choice index units (default: 0.65)')
    g.add_argument('--train-size-random-mix', type=float, default=0.1,
                   help='Fraction of uniform random active choices mixed into a progressive schedule (default: 0.1)')
    g.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                   help='Fixed loader batches (before gradient accumulation) per epoch')
    g.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'),
                   help='Scale gradients relative to the policy-average scheduled batch size')
    # NaFlex (parsed, not supported yet)
    g.add_argument('--naflex-loader', action='store_true', default=False, help='Use NaFlex loader')
    g.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                   help='Sequence lengths to use for NaFlex loader')
    g.add_argument('--naflex-max-seq-len', type=int, default=576,
                   help='Fixed maximum sequence length for NaFlex loader (validation)')
    g.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None,
                   help='List of patch sizes for variable patch size training')
    g.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None,
                   help='Probabilities for each patch size')
    g.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
                   help='Scale loss (gradient) by batch_size')
    g.add_argument('--naflex-patchify-channels-first', action='store_true', default=False,
                   help='Emit NaFlex patches in C-P-P (channels-first) flat layout')
    # Knowledge distillation (parsed, not supported yet)
    parser.add_argument('--kd-model-name', default=None, type=str, help='Name of teacher model for distillation')
    parser.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'],
                        help='Type of distillation')
    parser.add_argument('--kd-loss-type', default='kl', type=str, help='Loss function for logit distillation')
    parser.add_argument('--distill-loss-weight', default=None, type=float, help='Weight for distillation loss.')
    parser.add_argument('--task-loss-weight', default=None, type=float, help='Weight for task loss.')
    parser.add_argument('--kd-temperature', default=4.0, type=float, help='Temperature for distillation')
    parser.add_argument('--kd-student-feature-dim', default=None, type=int, help='Student feature dimension')
    parser.add_argument('--kd-teacher-feature-dim', default=None, type=int, help='Teacher feature dimension')
    parser.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
                        help='Token distillation type')

    # carrot-zzz
    g = parser.add_argument_group('carrot-zzz parameters')
    g.add_argument('--head', default=None, choices=('linear', 'zzz'),
                   help='Classifier head: "--model X --head zzz" trains X_zzz (default: the model\'s own head)')
    g.add_argument('--zzz-rank', type=int, default=None, metavar='R',
                   help='ZZZ head: rank of each class covariance subspace (default: the model\'s, 8)')
    g.add_argument('--zzz-v-min', type=float, default=None, help='ZZZ head: floor of the subspace variances')
    g.add_argument('--zzz-sigma2-min', type=float, default=None, help='ZZZ head: floor of the isotropic variance')
    g.add_argument('--carrot', action='store_true', default=False,
                   help='Add the CARROT regulariser on the pooled embeddings to the training loss')
    g.add_argument('--carrot-weight', type=float, default=1.0, help='loss = task_loss + W * R (default: 1.0)')
    g.add_argument('--carrot-rank-norm', default='dim', choices=('dim', 'attainable'),
                   help='erank normaliser: embedding dim (default) or min(n_c - 1, dim)')
    g.add_argument('--carrot-scope', default='global', choices=CARROT_SCOPES,
                   help='global: R on the batch gathered over DDP ranks (default); local: each rank\'s batch')
    g.add_argument('--head-lr', type=float, default=None, metavar='LR',
                   help='Learning rate of the classifier head (default: --lr); the schedule scales it with --lr')
    g.add_argument('--head-weight-decay', type=float, default=None, metavar='WD',
                   help='Weight decay of the classifier head\'s weights (default: --weight-decay); biases and '
                        'other no-weight-decay parameters keep 0')
    g.add_argument('--sampler', default='random', choices=('random', 'pk'),
                   help='random (timm\'s) or pk: batch_size / K classes x K samples per batch')
    g.add_argument('--samples-per-class', type=int, default=4, metavar='K', help='K of --sampler pk (default: 4)')
    return config_parser, parser


# flags that are parsed (timm's CLI) but not supported by this script yet: set to a non-default value, they
# stop the run with one line instead of being ignored
UNSUPPORTED_FLAGS = (
    'train_img_sizes', 'train_batch_sizes', 'train_size_probs', 'train_size_schedule', 'train_size_schedule_spread',
    'train_size_random_mix', 'train_batches_per_epoch', 'variable_batch_loss_scale',
    'naflex_loader', 'naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
    'naflex_loss_scale', 'naflex_patchify_channels_first',
    'kd_model_name', 'kd_distill_type', 'kd_loss_type', 'distill_loss_weight', 'task_loss_weight', 'kd_temperature',
    'kd_student_feature_dim', 'kd_teacher_feature_dim', 'kd_token_distill_type',
)


# what reading a truncated, corrupt or mismatched checkpoint raises (torch.load, load_state_dict, timm's readers)
CHECKPOINT_ERRORS = (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError)


def fail(msg: str):
    """Stop before training with one line that names the fix."""
    raise SystemExit(f'train.py: error: {msg}')


def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def parse_args(argv=None):
    """timm's two-stage parse: -c/--config YAML sets the defaults, the command line overrides them.

    Returns (args, args_text), args_text the YAML written to args.yaml. Unknown YAML keys stop the run, except
    keys with an empty value (None, False, '', []), which timm's args.yaml of a newer timm may carry: a
    warning names them.
    """
    config_parser, parser = build_parsers()
    args_config, remaining = config_parser.parse_known_args(argv)
    ignored = []
    if args_config.config:
        try:
            cfg = read_recipe(args_config.config)
        except ValueError as e:
            fail(str(e))
        known = {a.dest for a in parser._actions}
        for k in sorted(set(cfg) - known):
            if cfg[k] in (None, False, '', [], {}):
                ignored.append(k)
                cfg.pop(k)
            else:
                fail(f'config {args_config.config}: unknown key {k!r} (no flag {_flag(k)}); remove it or fix its name')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    if ignored:
        _logger.warning(f'Ignoring unknown config keys with empty values: {", ".join(ignored)}')
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    check_args(args, parser)
    return args, args_text


def check_args(args, parser):
    """Reject unsupported flags, contradictory combinations and a missing data folder before anything is built."""
    data_dir = args.data_dir or args.data
    folder_dataset = not args.dataset or args.dataset.startswith(('folder/', 'imagefolder/', 'tar/'))
    if folder_dataset and not data_dir:
        fail('no data folder given; pass --data-dir DIR (an image folder with train/ and validation/ splits)')
    # hub / tfds / webdataset readers take a cache folder or URLs, made or fetched by the reader itself
    reader_fetches = (args.dataset or '').split('/')[0] in ('hfds', 'hfids', 'tfds', 'wds')
    if data_dir and not args.dataset_download and not reader_fetches and not os.path.exists(data_dir):
        fail(f'data folder {data_dir} does not exist; pass --data-dir with the path of your dataset')
    error = single_label_error(args)
    if error:
        fail(error)
    if args.loss and (args.jsd_loss or args.bce_loss) and args.loss != ('jsd' if args.jsd_loss else 'bce'):
        fail(f'--loss {args.loss} contradicts --{"jsd" if args.jsd_loss else "bce"}-loss; keep one of them')
    if args.resume == 'auto' and not args.experiment:
        fail('--resume auto continues the experiment folder in place; pass --experiment NAME')
    if args.stop_epoch is not None and args.stop_epoch < 1:
        fail(f'--stop-epoch {args.stop_epoch}: pass the number of epochs after which to stop (>= 1)')
    if args.save_epochs and min(args.save_epochs) < 1:
        fail(f'--save-epochs {args.save_epochs}: pass numbers of completed epochs (>= 1)')
    for dest in ('resume', 'initial_checkpoint', 'pretrained_path'):
        path = getattr(args, dest)
        if path and not (dest == 'resume' and path == 'auto') and not os.path.isfile(path):
            fail(f'{_flag(dest)} {path}: no such file; pass the path of a checkpoint file')
    for dest in UNSUPPORTED_FLAGS:
        if getattr(args, dest) != parser.get_default(dest):
            fail(f'{_flag(dest)} is not supported by this train.py yet; remove it (see README, unsupported flags)')
    if args.eval_metric not in ('loss', 'top1', 'top5'):
        fail(f'--eval-metric {args.eval_metric}: validation reports loss, top1 and top5; pass one of them')
    if args.clip_mode not in ('norm', 'value', 'agc'):
        fail(f'--clip-mode {args.clip_mode}: pass norm, value or agc')
    if args.drop_connect is not None:   # timm parses and ignores it
        _logger.warning('--drop-connect is deprecated in timm and has no effect; use --drop-path')
    if args.head == 'zzz' or (args.head is None and is_zzz_name(args.model)):
        for dest, why in (('head_init_scale', 'scales a linear head\'s weight and bias'),
                          ('head_init_bias', 'sets a linear head\'s bias')):
            if getattr(args, dest) is not None:
                fail(f'{_flag(dest)} {why} and does not apply to the ZZZ head; remove it or use --head linear')
        if args.tta:
            fail('--tta averages linear-head logits and is not supported with the ZZZ head; remove it or use --head linear')
    if args.head == 'linear':
        for dest in ('zzz_rank', 'zzz_v_min', 'zzz_sigma2_min'):
            if getattr(args, dest) is not None:
                fail(f'{_flag(dest)} configures the ZZZ head; add --head zzz or remove it')
    if args.zzz_rank is not None and args.zzz_rank < 0:
        fail(f'--zzz-rank must be >= 0, got {args.zzz_rank}')
    if args.sampler == 'pk':
        k = args.samples_per_class
        if k < 1 or k > args.batch_size:
            fail(f'--samples-per-class {k} must be between 1 and --batch-size {args.batch_size}; '
                 f'lower --samples-per-class or raise --batch-size')
        if args.batch_size % k:
            fail(f'--batch-size {args.batch_size} is not a multiple of --samples-per-class {k}; use a batch of P x K')
        if args.aug_repeats:
            fail('--aug-repeats picks its own samples and cannot be combined with --sampler pk; remove one')
        if args.use_multi_epochs_loader:
            fail('--use-multi-epochs-loader cannot be combined with --sampler pk; remove it')
    if args.carrot and args.aug_splits:
        fail('--aug-splits stacks several views per target, which --carrot does not support; remove --aug-splits')
    if args.torchscript and (args.carrot or args.head or is_zzz_name(args.model)):
        fail('--torchscript is not supported for carrot_zzz models; use --torchcompile')


# ---------------------------------------------------------------------------------------------------------------
# model, optimizer, checkpoints
# ---------------------------------------------------------------------------------------------------------------

def resolve_model_name(args):
    """(timm model name, extra create_model kwargs): `X --head zzz` / `X --carrot` -> `X_zzz` with head_type."""
    name = args.model
    kwargs = {}
    wants_wrapper = args.head is not None or args.carrot or args.zzz_rank is not None \
        or args.zzz_v_min is not None or args.zzz_sigma2_min is not None
    if wants_wrapper and not is_zzz_name(name):
        kwargs['head_type'] = args.head or ('zzz' if args.zzz_rank is not None else 'linear')
        name = zzz_name(name)  # 'vit_base_patch16_224.augreg_in21k' -> 'vit_base_patch16_224_zzz.augreg_in21k'
    elif args.head is not None:
        kwargs['head_type'] = args.head
    for dest in ('zzz_rank', 'zzz_v_min', 'zzz_sigma2_min'):
        if getattr(args, dest) is not None:
            kwargs[dest] = getattr(args, dest)
    return name, kwargs


def clip_parameters_of(task, clip_mode: str):
    """The parameters timm's gradient clipping sees; AGC leaves out the whole head of a `_zzz` model.

    timm's task drops the last two parameters under AGC (a linear head's weight and bias); a ZZZ head has five
    (mu, A, v_raw, sigma2_raw, bias), all left out here. Plain timm models get timm's own choice.
    """
    exclude_head = 'agc' in clip_mode
    module = task.get_trainable_module()
    if exclude_head and isinstance(utils.unwrap_model(module), ZZZModel):
        head_ids = {id(p) for p in utils.unwrap_model(module).get_classifier().parameters()}
        return [p for p in module.parameters() if id(p) not in head_ids]
    return task.get_clip_parameters(exclude_head=exclude_head)


def head_param_groups(model, args, head_scale):
    """timm's param groups (weight decay or layer decay) with the head's params split off, lr_scale x head_scale.

    timm's schedulers set each group's lr to the scheduled lr x lr_scale, so the head follows the schedule at
    head_lr / lr times the backbone's rate, and layer decay keeps applying to the backbone. The head's groups
    that timm decays take --head-weight-decay when it is given (its no-weight-decay groups stay at 0).
    """
    no_weight_decay = getattr(model, 'no_weight_decay', lambda: set())()
    if args.layer_decay is not None:
        groups = param_groups_layer_decay(
            model, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
            no_weight_decay_list=no_weight_decay, min_scale=args.layer_decay_min_scale,
            no_opt_scale=args.layer_decay_no_opt_scale)
    else:
        groups = param_groups_weight_decay(model, weight_decay=args.weight_decay, no_weight_decay_list=no_weight_decay)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    out = []
    for group in groups:
        body = [p for p in group['params'] if id(p) not in head_ids]
        head = [p for p in group['params'] if id(p) in head_ids]
        if body:
            out.append({**group, 'params': body})
        if head:
            head_group = {**group, 'params': head, 'lr_scale': head_scale, 'is_head': True}
            if args.head_weight_decay is not None and group.get('weight_decay', 0.0) > 0.0:
                head_group['weight_decay'] = args.head_weight_decay
            out.append(head_group)
    return out


def _plain(value):
    """args value -> something torch.load(weights_only=True) reads back (no Namespace, no custom classes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def rng_state():
    np_state = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        'python': random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state['python'])


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's CheckpointSaver; every file is written under a temporary name, synced and renamed over the target
    (a kill mid-save leaves the previous file intact), args are stored as a plain dict so checkpoints load
    with torch.load(weights_only=True), and the RNG states ride along for an exact resume."""

    def _save(self, save_path, epoch, metric=None):
        save_state = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,
            'rng_state': rng_state(),
        }
        if self.args is not None:
            save_state['args'] = _plain(vars(self.args))
        if self.amp_scaler is not None:
            save_state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        save_state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        save_state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if metric is not None:
            save_state['metric'] = float(metric)
        if hasattr(self, 'state_dict'):  # timm >= 1.0.30: checkpoint history for a resume into the same folder
            save_state['saver'] = _plain(self.state_dict(epoch, metric))
        tmp = save_path + '.partial'
        with open(tmp, 'wb') as f:
            torch.save(save_state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, save_path)

    def _replace(self, src, dst):
        os.replace(src, dst)  # atomic; timm unlinks dst first, leaving a moment without it

    def _duplicate(self, src, dst):
        tmp = dst + '.partial'
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            import shutil
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def export_safetensors(output_dir, model, ema_model=None):
    """model_best.safetensors (+ model_best_ema.safetensors) from model_best.pth.tar (last.pth.tar without one):
    the weights alone, for validate.py and timm.create_model(pretrained_cfg_overlay=dict(file=...)).

    Called after training: the best state is loaded into the (unwrapped) training model and its EMA and
    written with carrot_zzz.weights.save_weights (architecture / head metadata; temporary file + rename).
    """
    src = os.path.join(output_dir, 'model_best.pth.tar')
    if not os.path.exists(src):
        src = os.path.join(output_dir, 'last.pth.tar')
        if not os.path.exists(src):
            return []
    ckpt = load_checkpoint_file(src)
    written = []
    for key, module, name in (('state_dict', model, 'model_best.safetensors'),
                              ('state_dict_ema', ema_model, 'model_best_ema.safetensors')):
        if ckpt.get(key) is None or module is None:
            continue
        module = utils.unwrap_model(module)
        module.load_state_dict(ckpt[key])
        written.append(str(save_weights(module, os.path.join(output_dir, name))))
    return written


def set_loader_epoch(loader, epoch):
    base = loader.loader if isinstance(loader, PrefetchLoader) else loader
    for obj in (getattr(base, 'dataset', None), getattr(base, 'batch_sampler', None), getattr(base, 'sampler', None)):
        if hasattr(obj, 'set_epoch'):
            obj.set_epoch(epoch)
            if obj is not getattr(base, 'dataset', None):
                return


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    utils.setup_default_logging()
    args, args_text = parse_args(argv)

    if args.device_modules:
        for module in args.device_modules:
            importlib.import_module(module)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        fail(f'--device {args.device} (the default) but CUDA is not available here; pass --device cpu')
    device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(
            'Training in distributed mode with multiple processes, 1 device per process.'
            f'Process {args.rank}, total {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on 1 device ({args.device}).')
    assert args.rank >= 0

    model_dtype = None
    if args.model_dtype:
        if args.model_dtype not in ('float32', 'float16', 'bfloat16'):
            fail(f'--model-dtype must be float32, float16 or bfloat16, got {args.model_dtype}')
        model_dtype = getattr(torch, args.model_dtype)
        if model_dtype == torch.float16:
            _logger.warning('float16 is not recommended for training, for half precision bfloat16 is recommended.')
    amp_dtype = torch.float16
    if args.amp:
        if model_dtype not in (None, torch.float32):
            fail('--amp needs a float32 model: remove --model-dtype or --amp')
        if args.amp_dtype not in ('float16', 'bfloat16'):
            fail(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype}')
        if args.amp_dtype == 'bfloat16':
            amp_dtype = torch.bfloat16

    utils.random_seed(args.seed, args.rank)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()

    in_chans = 3
    if args.in_chans is not None:
        in_chans = args.in_chans
    elif args.input_size is not None:
        in_chans = args.input_size[0]

    factory_kwargs = {}
    if args.pretrained_path:
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    model_name, zzz_kwargs = resolve_model_name(args)
    args.model = model_name
    try:
        model = create_model(
            model_name,
            pretrained=args.pretrained,
            in_chans=in_chans,
            num_classes=args.num_classes,
            drop_rate=args.drop,
            drop_path_rate=args.drop_path,
            drop_block_rate=args.drop_block,
            global_pool=args.gp,
            bn_momentum=args.bn_momentum,
            bn_eps=args.bn_eps,
            scriptable=args.torchscript,
            **factory_kwargs,
            **zzz_kwargs,
            **args.model_kwargs,
        )
    except (RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as e:
        msg = first_line(e)
        base = base_name(model_name) if is_zzz_name(model_name) else model_name
        if 'Unknown model' in msg and not timm.is_model(base):
            msg = f'timm has no model {base!r}; pick one of timm.list_models()'
        elif 'Unknown model' in msg:
            msg += '; carrot_zzz registers `<arch>_zzz` for every timm arch (carrot_zzz.registry)'
        elif is_zzz_name(model_name) and 'rank' in msg:
            msg += ' (lower --zzz-rank)'
        fail(f'cannot create model {model_name}: {msg}')
    if args.initial_checkpoint:   # what timm's create_model(checkpoint_path=...) does, with a one-line error
        try:
            load_checkpoint(model, args.initial_checkpoint)
        except CHECKPOINT_ERRORS as e:
            fail(f'--initial-checkpoint {args.initial_checkpoint}: cannot load it into {model_name} '
                 f'({first_line(e)}); pass an intact checkpoint of this model')

    head = model.get_classifier()
    zzz_head = isinstance(head, carrot_zzz.ZZZHead)
    if zzz_head and (args.head_init_scale is not None or args.head_init_bias is not None or args.tta):
        fail('--head-init-scale / --head-init-bias / --tta assume a linear head; remove them or use --head linear')
    if args.head_init_scale is not None:
        with torch.no_grad():
            head.weight.mul_(args.head_init_scale)
            head.bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(head.bias, args.head_init_bias)

    if args.num_classes is None:
        assert hasattr(model, 'num_classes'), 'Model must have `num_classes` attr if not set on cmd line/config.'
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if utils.is_primary(args):
        _logger.info(
            f'Model {safe_model_name(args.model)} created, param count:{sum([m.numel() for m in model.parameters()])}')

    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))

    num_aug_splits = 0
    if args.aug_splits > 0:
        if args.aug_splits < 2:
            fail('--aug-splits 1 makes no sense; use 0 or >= 2')
        num_aug_splits = args.aug_splits
    if args.split_bn:
        if not (num_aug_splits > 1 or args.resplit):
            fail('--split-bn needs --aug-splits >= 2 or --resplit')
        model = convert_splitbn_model(model, max(num_aug_splits, 2))

    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''
        if args.split_bn:
            fail('--sync-bn and --split-bn cannot be combined; remove one')
        model = convert_sync_batchnorm(model)
        if utils.is_primary(args):
            _logger.info(
                'Converted model to use Synchronized BatchNorm. WARNING: You may have issues if using '
                'zero initialized BN layers (enabled by default for ResNets) while sync-bn enabled.')
    if args.torchscript:
        if args.sync_bn:
            fail('--torchscript cannot be combined with --sync-bn')
        model = torch.jit.script(model)

    amp_autocast = suppress
    loss_scaler = None
    if args.amp:
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type in ('cuda',) and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
        if utils.is_primary(args):
            _logger.info('Using native Torch AMP. Training in mixed precision.')
    elif utils.is_primary(args):
        _logger.info(f'AMP not enabled. Training in {model_dtype or torch.float32}.')

    # datasets
    if args.data and not args.data_dir:
        args.data_dir = args.data
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')

    def _dataset(split, is_training, **kw):
        try:
            ds = create_dataset(
                args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=args.class_map,
                download=args.dataset_download, batch_size=args.batch_size, input_img_mode=input_img_mode,
                input_key=args.input_key, target_key=args.target_key,
                trust_remote_code=args.dataset_trust_remote_code, **kw)
        except (RuntimeError, FileNotFoundError, ValueError, AssertionError) as e:
            fail(f'cannot read split {split!r} of {args.dataset or "image folder"} at {args.data_dir}: '
                 f'{first_line(e)}; check --data-dir / --dataset / '
                 f'--{"train" if is_training else "val"}-split')
        if not isinstance(ds, torch.utils.data.IterableDataset) and len(ds) == 0:
            fail(f'split {split!r} at {args.data_dir} holds no samples; check --data-dir and --'
                 f'{"train" if is_training else "val"}-split')
        return ds

    dataset_train = _dataset(args.train_split, True, seed=args.seed, repeats=args.epoch_repeats,
                             num_samples=args.train_num_samples)
    dataset_eval = None
    if args.val_split:
        dataset_eval = _dataset(args.val_split, False, num_samples=args.val_num_samples)
    train_targets = dataset_targets(dataset_train)
    for name, targets in (('training', train_targets),
                          ('validation', dataset_targets(dataset_eval) if dataset_eval is not None else None)):
        if targets:
            lo, hi = min(targets), max(targets)
            if lo < 0 or hi >= args.num_classes:
                fail(f'{name} labels span [{lo}, {hi}] but the model has {args.num_classes} classes; '
                     f'pass --num-classes {hi + 1} (labels must lie in [0, num_classes))')

    # loaders
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    mixup_args = {}
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
    collate_fn = None
    if mixup_active:
        if args.prefetcher:
            if num_aug_splits:
                fail('--aug-splits with mixup needs --no-prefetcher')
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    if num_aug_splits > 1:
        dataset_train = AugMixDataset(dataset_train, num_splits=num_aug_splits)
    common_loader_kwargs = dict(
        mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem,
        img_dtype=model_dtype or torch.float32, device=device, distributed=args.distributed,
        use_prefetcher=args.prefetcher)
    loader_train = create_loader(
        dataset_train,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats,
        num_aug_splits=num_aug_splits,
        interpolation=train_interpolation,
        num_workers=args.workers,
        worker_seeding=args.worker_seeding,
        collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        **common_loader_kwargs,
    )
    if args.sampler == 'pk':
        if train_targets is None:
            fail(f'--sampler pk needs the labels of the training set, which {type(dataset_train).__name__} does not '
                 f'expose (targets / reader.samples); use --sampler random')
        try:
            batch_sampler = PKBatchSampler(
                train_targets, args.batch_size, args.samples_per_class, num_replicas=args.world_size,
                rank=args.rank, seed=args.seed)
        except ValueError as e:
            fail(str(e))
        base = loader_train.loader if isinstance(loader_train, PrefetchLoader) else loader_train
        pk_loader = torch.utils.data.DataLoader(
            base.dataset, batch_sampler=batch_sampler, num_workers=base.num_workers, collate_fn=base.collate_fn,
            pin_memory=base.pin_memory, worker_init_fn=base.worker_init_fn,
            persistent_workers=base.persistent_workers)
        if isinstance(loader_train, PrefetchLoader):
            loader_train.loader = pk_loader
        else:
            loader_train = pk_loader
        if utils.is_primary(args):
            _logger.info(f'Using P x K sampler: {batch_sampler.classes_per_batch} classes x {args.samples_per_class} '
                         f'samples per batch and rank, {len(batch_sampler)} batches per epoch.')

    if not args.lr:
        global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any([o in on for o in ('ada', 'lamb')]) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
        if utils.is_primary(args):
            _logger.info(
                f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) '
                f'and effective global batch size ({global_batch_size:g}) with {args.lr_base_scale} scaling.')

    loader_eval = None
    if dataset_eval is not None:
        eval_workers = args.workers
        if args.distributed and ('tfds' in args.dataset or 'wds' in args.dataset):
            eval_workers = min(2, args.workers)
        loader_eval = create_loader(
            dataset_eval,
            input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size,
            is_training=False,
            interpolation=data_config['interpolation'],
            num_workers=eval_workers,
            crop_pct=data_config['crop_pct'],
            **common_loader_kwargs,
        )

    # loss, as timm's train.py picks it
    if args.loss:
        bce = args.loss == 'bce'
        try:
            train_loss_fn = create_classification_loss(
                loss_type=args.loss, smoothing=args.smoothing, soft_targets=mixup_active,
                bce_target_thresh=args.bce_target_thresh if bce else None, bce_sum=args.bce_sum and bce,
                pos_weight=args.bce_pos_weight if bce else None, jsd_splits=num_aug_splits)
        except ValueError as e:
            fail(f'--loss {args.loss}: {first_line(e)}')
    elif args.jsd_loss:
        if num_aug_splits <= 1:
            fail('--jsd-loss needs --aug-splits >= 2')
        train_loss_fn = JsdCrossEntropy(num_splits=num_aug_splits, smoothing=args.smoothing)
    elif mixup_active:
        if args.bce_loss:
            train_loss_fn = BinaryCrossEntropy(
                target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
        else:
            train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        if args.bce_loss:
            train_loss_fn = BinaryCrossEntropy(
                smoothing=args.smoothing, target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                pos_weight=args.bce_pos_weight)
        else:
            train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device=device)
    validate_loss_fn = nn.CrossEntropyLoss().to(device=device)

    if args.carrot:
        max_classes = max_per_class = None
        if args.sampler == 'pk':  # static bounds: no host sync inside the regulariser
            mixes_pairs = mixup_active and args.mixup_mode != 'batch'  # elem / pair: a sample may take its mirror's class
            max_per_class = args.samples_per_class * (2 if mixes_pairs else 1)
            max_classes = args.batch_size // args.samples_per_class
            if args.carrot_scope == 'global':
                max_classes *= args.world_size
        task = CarrotClassificationTask(
            model=model, criterion=train_loss_fn, carrot_weight=args.carrot_weight,
            rank_norm=args.carrot_rank_norm, scope=args.carrot_scope, max_classes=max_classes,
            max_per_class=max_per_class, device=device, dtype=model_dtype, verbose=utils.is_primary(args))
    else:
        task = ClassificationTask(
            model=model, criterion=train_loss_fn, device=device, dtype=model_dtype, verbose=utils.is_primary(args))

    model = task.get_trainable_module()
    eval_model = task.get_eval_model()

    try:
        if args.head_lr is not None or args.head_weight_decay is not None:
            head_scale = args.head_lr / args.lr if args.head_lr is not None else 1.0
            optimizer = create_optimizer_v2(
                model, **optimizer_kwargs(cfg=args), **args.opt_kwargs,
                param_group_fn=lambda m: head_param_groups(m, args, head_scale))
        else:
            optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except (ValueError, TypeError) as e:   # an unknown --opt, an --opt-kwargs key the optimizer does not take
        fail(f'cannot create optimizer --opt {args.opt} ({first_line(e)}); see timm.optim.list_optimizers() '
             f'and check --opt-kwargs')
    if utils.is_primary(args):
        defaults = copy.deepcopy(optimizer.defaults)
        defaults['weight_decay'] = args.weight_decay
        defaults = ', '.join([f'{k}: {v}' for k, v in defaults.items()])
        logging.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: {defaults}')
        if args.head_lr is not None:
            _logger.info(f'Head learning rate {args.head_lr} ({args.head_lr / args.lr:g} x lr {args.lr}).')
        if args.head_weight_decay is not None:
            _logger.info(f'Head weight decay {args.head_weight_decay} (backbone {args.weight_decay}).')

    resume_epoch = None
    resume_rng = None
    if args.resume == 'auto':   # the experiment's own last checkpoint, in place; none yet: a fresh start
        last = os.path.join(args.output or './output/train', args.experiment, 'last.pth.tar')
        args.resume = last if os.path.isfile(last) else ''
        if utils.is_primary(args):
            _logger.info(f'--resume auto: resuming from {last}' if args.resume else
                         f'--resume auto: no {last}, starting fresh')
    if args.resume:
        try:
            resume_epoch = resume_task_checkpoint(
                task, args.resume,
                optimizer=None if args.no_resume_opt else optimizer,
                loss_scaler=None if args.no_resume_opt else loss_scaler,
                log_info=utils.is_primary(args))
            resume_rng = load_checkpoint_file(args.resume).get('rng_state')
        except CHECKPOINT_ERRORS as e:
            fail(f'--resume {args.resume}: cannot resume from it ({first_line(e)}); it is truncated or the '
                 f'checkpoint of another model: pass an intact last.pth.tar of this run')

    if args.model_ema:
        task.setup_ema(
            decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
            device='cpu' if args.model_ema_force_cpu else None)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)

    if args.torchcompile:
        if utils.is_primary(args):
            _logger.info(f'Compiling task components with backend={args.torchcompile}, mode={args.torchcompile_mode}')
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        model = task.get_trainable_module()
        eval_model = task.get_eval_model()
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)

    if args.distributed:
        if utils.is_primary(args):
            _logger.info('Preparing task for distributed training')
        task.prepare_distributed(
            device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=not args.no_ddp_bb)
        model = task.get_trainable_module()

    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing_metric = eval_metric == 'loss'
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric),
            updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        fail(f'cannot create scheduler --sched {args.sched} ({first_line(e)}); check --sched and its options')
    if lr_scheduler is None:  # no scheduler applies lr_scale: apply the head's once
        for group in optimizer.param_groups:
            if group.get('is_head'):
                group['lr'] = group['lr'] * group['lr_scale']
    best_metric = None
    best_epoch = None
    saver = None
    output_dir = None
    if utils.is_primary(args):
        if args.experiment:
            exp_name = args.experiment
        else:
            exp_name = '-'.join([
                datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                str(data_config['input_size'][-1])])
        output_dir = utils.get_outdir(args.output if args.output else './output/train', exp_name)
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=decreasing_metric, max_history=args.checkpoint_hist, task=task)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        if args.log_wandb:
            if has_wandb:
                wandb.init(project=args.wandb_project, name=exp_name, config=args, tags=args.wandb_tags,
                           resume='must' if args.wandb_resume_id else None,
                           id=args.wandb_resume_id if args.wandb_resume_id else None)
            else:
                _logger.warning(
                    "You've requested to log metrics to wandb but package not found. "
                    "Metrics not being logged to wandb, try `pip install wandb`")

    start_epoch = 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    elif resume_epoch is not None:
        start_epoch = resume_epoch
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    if saver is not None and args.resume and start_epoch > 0 and \
            os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(output_dir):
        if hasattr(saver, 'load_state_dict_from_checkpoint'):  # timm >= 1.0.30
            saver.load_state_dict_from_checkpoint(args.resume)  # keep ranking the checkpoints of the resumed run
            best_metric, best_epoch = saver.best_metric, saver.best_epoch
        trim_summary = getattr(utils.summary, 'trim_summary', None)
        if trim_summary is not None:
            trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)

    if utils.is_primary(args) and lr_scheduler is not None:
        if args.warmup_prefix:
            sched_explain = '(warmup_epochs + epochs + cooldown_epochs). Warmup added to total when warmup_prefix=True'
        else:
            sched_explain = '(epochs + cooldown_epochs). Warmup within epochs when warmup_prefix=False'
        _logger.info(
            f'Scheduled epochs: {num_epochs} {sched_explain}. '
            f'LR stepped per {"epoch" if lr_scheduler.t_in_epochs else "update"}.')

    if resume_rng is not None and not args.distributed:
        set_rng_state(resume_rng)  # the RNG streams continue as if the run had not stopped

    results = []
    wrote_summary = False
    try:
        end_epoch = num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)
        milestones = set(args.save_epochs or ())
        for epoch in range(start_epoch, end_epoch):
            set_loader_epoch(loader_train, epoch)
            train_metrics = train_one_epoch(
                epoch, model, loader_train, optimizer, args, task=task, device=device, lr_scheduler=lr_scheduler,
                saver=saver, output_dir=output_dir, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                model_dtype=model_dtype, mixup_fn=mixup_fn)

            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                if utils.is_primary(args):
                    _logger.info('Distributing BatchNorm running means and vars')
                utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')

            epoch_p_1 = epoch + 1
            if epoch_p_1 % args.val_interval != 0 and epoch_p_1 not in (num_epochs, end_epoch):
                if utils.is_primary(args):
                    _logger.info('Skipping eval and checkpointing ')
                if saver is not None and epoch_p_1 in milestones:
                    saver.save_checkpoint(epoch)   # unranked: the milestone needs this epoch's state
                    saver.save_milestone(epoch_p_1)
                if lr_scheduler is not None:
                    lr_scheduler.step(epoch_p_1, metric=None)
                continue

            if loader_eval is not None:
                eval_metrics = validate(
                    eval_model, loader_eval, validate_loss_fn, args, device=device, amp_autocast=amp_autocast,
                    model_dtype=model_dtype)
                ema_model = task.get_trainable_module(ema=True)
                if ema_model is not None and not args.model_ema_force_cpu:
                    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                        utils.distribute_bn(ema_model, args.world_size, args.dist_bn == 'reduce')
                    eval_metrics = validate(
                        task.get_eval_model(ema=True), loader_eval, validate_loss_fn, args, device=device,
                        amp_autocast=amp_autocast, model_dtype=model_dtype, log_suffix=' (EMA)')
            else:
                eval_metrics = None

            if output_dir is not None:
                lrs = [param_group['lr'] for param_group in optimizer.param_groups]
                utils.update_summary(
                    epoch, train_metrics, eval_metrics, filename=os.path.join(output_dir, 'summary.csv'),
                    lr=sum(lrs) / len(lrs), write_header=None if wrote_summary or start_epoch else True,
                    log_wandb=args.log_wandb and has_wandb)
                wrote_summary = True

            latest_metric = eval_metrics[eval_metric] if eval_metrics is not None else train_metrics[eval_metric]
            if saver is not None:
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)
                if epoch_p_1 in milestones:
                    saver.save_milestone(epoch_p_1)
            if lr_scheduler is not None:
                lr_scheduler.step(epoch_p_1, latest_metric)

            latest_results = {'epoch': epoch, 'train': train_metrics}
            if eval_metrics is not None:
                latest_results['validation'] = eval_metrics
            results.append(latest_results)
    except KeyboardInterrupt:
        pass

    if args.distributed:
        torch.distributed.destroy_process_group()
    if best_metric is not None:
        _logger.info('*** Best metric: {0} (epoch {1})'.format(best_metric, best_epoch))
    if utils.is_primary(args):
        for path in export_safetensors(output_dir, task.get_trainable_module(), task.get_trainable_module(ema=True)):
            _logger.info(f'Wrote weights to {path}')
        display_results = sorted(
            results, key=lambda x: x.get('validation', x.get('train')).get(eval_metric, 0),
            reverse=decreasing_metric)
        print(f'--result\n{json.dumps(display_results[-10:], indent=4)}')
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# one epoch
# ---------------------------------------------------------------------------------------------------------------

class DeviceMeans:
    """Running sums of 0-d device tensors, read (one host sync) only when asked.

    A loss that turns NaN / inf shows in its mean, as in timm; only the CARROT minima, NaN by definition in a
    batch where no class has 2 samples (NAN_WHEN_UNUSED), are left out of their means when NaN.
    """

    def __init__(self):
        self.sums, self.counts = {}, {}

    def update(self, values, weight=1.0):
        for k, v in values.items():
            v = v.detach().float()
            if k in NAN_WHEN_UNUSED:
                defined = ~torch.isnan(v)
                v, count = torch.where(defined, v, 0.), defined.float() * weight
            else:
                count = weight   # a Python number: no device work for a value that is always defined
            self.sums[k] = self.sums.get(k, 0.) + v * weight
            self.counts[k] = self.counts.get(k, 0.) + count

    def means(self, world_size=1):
        if not self.sums:
            return OrderedDict()
        keys = list(self.sums)
        stacked = torch.stack([torch.stack([self.sums[k], torch.as_tensor(
            self.counts[k], dtype=torch.float32, device=self.sums[k].device)]) for k in keys])  # (K, 2)
        if world_size > 1:
            torch.distributed.all_reduce(stacked)
        stacked = stacked.cpu()
        return OrderedDict(
            (k, (s / c).item() if c > 0 else float('nan')) for k, (s, c) in zip(keys, stacked))


def train_one_epoch(
        epoch, model, loader, optimizer, args, task, device=torch.device('cuda'), lr_scheduler=None, saver=None,
        output_dir=None, amp_autocast=suppress, loss_scaler=None, model_dtype=None, mixup_fn=None):
    """timm's train_one_epoch (task forward in autocast, / accum steps, scaler or backward, clip, step, EMA),
    with the loss and the CARROT statistics summed on the device and read only at --log-interval."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and loader.mixup_enabled:
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    second_order = hasattr(optimizer, 'is_second_order') and optimizer.is_second_order
    has_no_sync = args.distributed and hasattr(task.get_trainable_module(), 'no_sync')
    update_time_m = utils.AverageMeter()
    data_time_m = utils.AverageMeter()
    epoch_m = DeviceMeans()     # loss (sample weighted) and carrot stats over the epoch
    window_m = DeviceMeans()    # the same since the last log line
    stat_keys = None

    task.get_trainable_module().train()
    accum_steps = args.grad_accum_steps
    last_accum_steps = len(loader) % accum_steps
    updates_per_epoch = (len(loader) + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps

    data_start_time = update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if not args.prefetcher:
            input, target = input.to(device=device, dtype=model_dtype), target.to(device=device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time_m.update(accum_steps * (time.time() - data_start_time))

        def _forward():
            with amp_autocast():
                result = task(input, target)   # CARROT, when on, is already inside result['loss']
                _loss = result['loss']
            if accum_steps > 1:
                _loss = _loss / accum_steps
            return _loss, result

        def _backward(_loss):
            clip_parameters = None
            if args.clip_grad is not None:
                clip_parameters = clip_parameters_of(task, args.clip_mode)
            if loss_scaler is not None:
                loss_scaler(
                    _loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=clip_parameters, create_graph=second_order, need_update=need_update)
            else:
                _loss.backward(create_graph=second_order)
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()

        if has_no_sync and not need_update:
            with task.no_sync():
                loss, result = _forward()
                _backward(loss)
        else:
            loss, result = _forward()
            _backward(loss)

        batch_size = input.shape[0]
        global_batch_size = batch_size * (args.world_size if args.distributed else 1)
        step_loss = {'loss': loss.detach() * accum_steps}
        epoch_m.update(step_loss, batch_size)
        window_m.update(step_loss, batch_size)
        stats = {k: v for k, v in result.items() if k not in ('loss', 'output') and torch.is_tensor(v) and v.ndim == 0}
        if stats:
            stat_keys = list(stats)
            epoch_m.update(stats)
            window_m.update(stats)
        update_sample_count += global_batch_size

        if not need_update:
            data_start_time = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize()
        time_now = time.time()
        update_time_m.update(time.time() - update_start_time)
        update_start_time = time_now

        if update_idx % args.log_interval == 0 or last_batch:
            lrl = [param_group['lr'] for param_group in optimizer.param_groups]
            lr = sum(lrl) / len(lrl)
            now = DeviceMeans()
            now.update(step_loss)
            if stats:
                now.update(stats)
            world = args.world_size if args.distributed else 1
            now, window, running = now.means(world), window_m.means(world), epoch_m.means(world)
            window_m = DeviceMeans()
            if utils.is_primary(args):
                line = (
                    f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                    f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                    f'Loss: {now["loss"]:#.3g} ({running["loss"]:#.3g})  '
                    f'Time: {update_time_m.val:.3f}s, {update_sample_count / update_time_m.val:>7.2f}/s  '
                    f'({update_time_m.avg:.3f}s, {update_sample_count / update_time_m.avg:>7.2f}/s)  '
                    f'LR: {lr:.3e}  '
                    f'Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})')
                if stats:
                    line += (
                        f'  Task: {window["task_loss"]:#.3g}  R: {window["R"]:#.3g} '
                        f'(var {window["R_var"]:#.3g}, rank {window["R_rank"]:#.3g})  '
                        f'Classes: {window["classes_used"]:.1f} ({100 * window["used_frac"]:.0f}% of samples)  '
                        f'Min r: {window["min_r"]:.3g}  Min erank: {window["min_erank_frac"]:.3g}')
                _logger.info(line)
                if args.save_images and output_dir:
                    import torchvision.utils
                    torchvision.utils.save_image(
                        input, os.path.join(output_dir, 'train-batch-%d.jpg' % batch_idx), padding=0, normalize=True)

        if saver is not None and args.recovery_interval and ((update_idx + 1) % args.recovery_interval == 0):
            saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=None)
        update_sample_count = 0
        data_start_time = time.time()

    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    metrics = epoch_m.means(args.world_size if args.distributed else 1)
    return OrderedDict((k, metrics[k]) for k in ['loss'] + (stat_keys or []))


def validate(model, loader, loss_fn, args, device=torch.device('cuda'), amp_autocast=suppress, model_dtype=None,
             log_suffix=''):
    """timm's validate: loss, top1, top5 over the eval loader, reduced over ranks."""
    batch_time_m = utils.AverageMeter()
    losses_m = utils.AverageMeter()
    top1_m = utils.AverageMeter()
    top5_m = utils.AverageMeter()
    model.eval()
    end = time.time()
    last_idx = len(loader) - 1
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            last_batch = batch_idx == last_idx
            if not args.prefetcher:
                input = input.to(device=device, dtype=model_dtype)
                target = target.to(device=device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                reduce_factor = args.tta
                if reduce_factor > 1:
                    output = output.unfold(0, reduce_factor, reduce_factor).mean(dim=2)
                    target = target[0:target.size(0):reduce_factor]
                loss = loss_fn(output, target)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, output.shape[-1])))
            if args.distributed:
                reduced_loss = utils.reduce_tensor(loss.data, args.world_size)
                acc1 = utils.reduce_tensor(acc1, args.world_size)
                acc5 = utils.reduce_tensor(acc5, args.world_size)
            else:
                reduced_loss = loss.data
            if device.type == 'cuda':
                torch.cuda.synchronize()
            batch_size = output.shape[0]
            losses_m.update(reduced_loss.item(), batch_size)
            top1_m.update(acc1.item(), batch_size)
            top5_m.update(acc5.item(), batch_size)
            batch_time_m.update(time.time() - end)
            end = time.time()
            if utils.is_primary(args) and (last_batch or batch_idx % args.log_interval == 0):
                log_name = 'Test' + log_suffix
                _logger.info(
                    f'{log_name}: [{batch_idx:>4d}/{last_idx}]  '
                    f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
                    f'Loss: {losses_m.val:>7.3f} ({losses_m.avg:>6.3f})  '
                    f'Acc@1: {top1_m.val:>7.3f} ({top1_m.avg:>7.3f})  '
                    f'Acc@5: {top5_m.val:>7.3f} ({top5_m.avg:>7.3f})')
    return OrderedDict([('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])


if __name__ == '__main__':
    main()
