#!/usr/bin/env python3
"""Validation with timm's reference validate.py command line and output, for `_zzz` and plain timm models.

    python validate.py --data-dir /data/CUB_200_2011 --dataset cub200 --model resnet50_zzz \
        --checkpoint output/train/.../model_best.pth.tar --use-ema --img-size 448 --results-file cub.csv

Everything timm's validate.py prints and writes (top-1 / top-5 in %, their errors, param count in millions,
image size, crop pct, interpolation; `--result` JSON on stdout; `--results-file` as csv or json), plus, computed
over the whole split (carrot_zzz.metrics has the formulas):

    mean_class_acc  mean over classes of the per-class top-1 accuracy (%)
    nll             mean negative log-likelihood of the labels under softmax(logits), nats
    ece             expected calibration error of the max softmax probability, 15 equal-width bins (%)
    ood_*           with --ood-data-dir DIR: AUROC and FPR at 95% TPR (%) of separating the split (positive)
                    from the images under DIR, scored by the maximum softmax probability (`_msp`) and, for
                    ZZZ heads, by the maximum class log-likelihood, the logit without its bias (`_ll`)

--per-class-csv FILE writes class_index, class_name, accuracy (%), correct, support for every class.
--checkpoint takes timm's .pth.tar / .pth (state_dict, or state_dict_ema with --use-ema) and .safetensors, from
this project's train.py or any timm training; --num-classes, the head type and the ZZZ rank are read from it when
not given, and a plain architecture name with a `_zzz` checkpoint becomes `<arch>_zzz`.
-c/--config RECIPE (beyond timm's flags) takes a train.py YAML recipe's model and data settings as defaults:

    python validate.py -c hparams/demo.yaml --checkpoint output/train/demo/model_best.safetensors
"""
import argparse
import copy
import csv
import glob
import json
import logging
import os
import time
from collections import OrderedDict
from contextlib import suppress
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm import utils
from timm.data import RealLabelsImagenet, create_loader, resolve_data_config
from timm.layers import apply_test_time_pool, set_fast_norm
from timm.models import create_model, get_pretrained_cfg, is_model, list_models, load_state_dict
from timm.utils import (AverageMeter, ParseKwargs, check_batch_size_retry, decay_batch_step, natural_key,
                        reparameterize_model, set_jit_fuser, setup_default_logging)

import carrot_zzz  # noqa: F401  registers the `<arch>_zzz` models
from carrot_zzz.recipe import read_recipe
from carrot_zzz.registry import is_zzz_name, zzz_name
from carrot_zzz.cli import add_dataset_reader_flags, add_task_flags, first_line, single_label_error
from carrot_zzz.zzz_head import ZZZHead
from carrot_zzz.data import create_dataset
from carrot_zzz.metrics import auroc, ece, fpr_at_tpr, per_class_accuracy
from carrot_zzz.weights import fit_state_dict


try:
    from functorch.compile import memory_efficient_fusion
    has_functorch = True
except ImportError:
    has_functorch = False

try:
    from sklearn.metrics import f1_score, precision_score, recall_score
    has_sklearn = True
except ImportError:
    has_sklearn = False

_logger = logging.getLogger('validate')


def build_parser():
    p = argparse.ArgumentParser(description='PyTorch ImageNet Validation (timm) + carrot-zzz metrics')
    p.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (*deprecated*, use --data-dir)')
    p.add_argument('-c', '--config', default='', metavar='FILE',
                   help='a train.py YAML recipe: its keys that are validate.py flags become the defaults')
    p.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    p.add_argument('--dataset', metavar='NAME', default='',
                   help='dataset type + name ("<type>/<name>"), or a carrot_zzz data set: cub200, nabirds, '
                        'fgvc_aircraft[_family|_manufacturer], stanford_cars, stanford_dogs, flowers102, '
                        'fashion_mnist (default: ImageFolder or ImageTar if empty)')
    p.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
    p.add_argument('--num-samples', default=None, type=int, metavar='N',
                   help='Manually specify num samples in dataset split, for IterableDatasets.')
    add_dataset_reader_flags(p)
    p.add_argument('--model', '-m', metavar='NAME', default='dpn92', help='model architecture (default: dpn92)')
    p.add_argument('--pretrained', dest='pretrained', action='store_true', help='use pre-trained model')
    p.add_argument('-j', '--workers', default=4, type=int, metavar='N',
                   help='number of data loading workers (default: 4)')
    p.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
    p.add_argument('--img-size', default=None, type=int, metavar='N',
                   help='Input image dimension, uses model default if empty')
    p.add_argument('--in-chans', type=int, default=None, metavar='N', help='Image input channels (default: None => 3)')
    p.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='Input all image dimensions (d h w, e.g. --input-size 3 224 224), uses model default if empty')
    p.add_argument('--use-train-size', action='store_true', default=False,
                   help='force use of train input size, even when test size is specified in pretrained cfg')
    p.add_argument('--crop-pct', default=None, type=float, metavar='N', help='Input image center crop pct')
    p.add_argument('--crop-mode', default=None, type=str, metavar='N',
                   help='Input image crop mode (squash, border, center). Model default if None.')
    p.add_argument('--crop-border-pixels', type=int, default=None, help='Crop pixels from image border.')
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                   help='Override mean pixel value of dataset')
    p.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                   help='Override std deviation of of dataset')
    p.add_argument('--interpolation', default='', type=str, metavar='NAME',
                   help='Image resize interpolation type (overrides model)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='Number classes in dataset (default: the checkpoint\'s, else the model\'s)')
    p.add_argument('--gp', default=None, type=str, metavar='POOL',
                   help='Global pool type, one of (fast, avg, max, avgmax, avgmaxc). Model default if None.')
    p.add_argument('--log-freq', default=10, type=int, metavar='N', help='batch logging frequency (default: 10)')
    p.add_argument('--checkpoint', default='', type=str, metavar='PATH',
                   help='path to a checkpoint (.pth.tar, .pth, .safetensors) or a folder of them (default: none)')
    p.add_argument('--num-gpu', type=int, default=1, help='Number of GPUS to use')
    p.add_argument('--test-pool', dest='test_pool', action='store_true', help='enable test time pool')
    p.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    p.add_argument('--pin-mem', action='store_true', default=False,
                   help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    p.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
    p.add_argument('--device', default='cuda', type=str, help='Device (accelerator) to use.')
    p.add_argument('--amp', action='store_true', default=False, help='use Native AMP for mixed precision inference')
    p.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16)')
    p.add_argument('--model-dtype', default=None, type=str, help='Model dtype override (non-AMP) (default: float32)')
    p.add_argument('--tf-preprocessing', action='store_true', default=False,
                   help='Use Tensorflow preprocessing pipeline (require CPU TF installed')
    p.add_argument('--use-ema', dest='use_ema', action='store_true', help='use ema version of weights if present')
    p.add_argument('--fuser', default='', type=str, help="Select jit fuser. One of ('', 'te', 'old', 'nvfuser')")
    p.add_argument('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm')
    p.add_argument('--reparam', default=False, action='store_true', help='Reparameterize model')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    p.add_argument('--torchcompile-mode', type=str, default=None, help="torch.compile mode (default: None).")
    sg = p.add_mutually_exclusive_group()
    sg.add_argument('--torchscript', default=False, action='store_true', help='torch.jit.script the full model')
    sg.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                    help="Enable compilation w/ specified backend (default: inductor).")
    sg.add_argument('--aot-autograd', default=False, action='store_true', help="Enable AOT Autograd support.")
    p.add_argument('--results-file', default='', type=str, metavar='FILENAME',
                   help='Output csv file for validation results (summary)')
    p.add_argument('--results-format', default='csv', type=str,
                   help='Format for results file one of (csv, json) (default: csv).')
    p.add_argument('--real-labels', default='', type=str, metavar='FILENAME',
                   help='Real labels JSON file for imagenet evaluation')
    p.add_argument('--valid-labels', default='', type=str, metavar='FILENAME',
                   help='Valid label indices txt file for validation of partial label space')
    p.add_argument('--retry', default=False, action='store_true',
                   help='Enable batch size decay & retry for single model validation')
    p.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    add_task_flags(p)
    p.add_argument('--metrics-avg', type=str, default=None, choices=['micro', 'macro', 'weighted'],
                   help='Enable precision, recall, F1-score calculation and specify the averaging method. '
                        'Requires scikit-learn. (default: None)')
    p.add_argument('--naflex-loader', action='store_true', default=False,
                   help='Use NaFlex loader (Requires NaFlex compatible model)')
    p.add_argument('--naflex-max-seq-len', type=int, default=576,
                   help='Fixed maximum sequence length for NaFlex loader (validation)')

    g = p.add_argument_group('carrot-zzz parameters')
    g.add_argument('--head', default=None, choices=('linear', 'zzz'),
                   help='"--model X --head zzz" validates X_zzz (default: the model\'s, or the checkpoint\'s)')
    g.add_argument('--zzz-rank', type=int, default=None, metavar='R',
                   help='ZZZ head rank (default: read from the checkpoint, else the model\'s)')
    g.add_argument('--ood-data-dir', default='', metavar='DIR',
                   help='out-of-distribution images (an image folder, or --ood-dataset): report AUROC and FPR@95TPR')
    g.add_argument('--ood-dataset', default='', metavar='NAME', help='dataset name of --ood-data-dir (default: folder)')
    g.add_argument('--ood-split', default=None, metavar='NAME', help='split of --ood-data-dir (default: --split)')
    g.add_argument('--per-class-csv', default='', metavar='FILENAME',
                   help='write each class\'s accuracy and support to this csv file')
    return p



def fail(msg):
    raise SystemExit(f'validate.py: error: {msg}')


# --- model and checkpoint ------------------------------------------------------------------------------------------

def checkpoint_head(state_dict, model_name):
    """Create-model kwargs read off the checkpoint's head tensors: num_classes, head_type, zzz_rank (where known)."""
    if 'head.mu' in state_dict:
        A = state_dict.get('head.A')
        return dict(num_classes=state_dict['head.mu'].shape[0], head_type='zzz',
                    zzz_rank=0 if A is None else A.shape[-1])
    if 'head.weight' in state_dict and any(k.startswith('backbone.') for k in state_dict):
        return dict(num_classes=state_dict['head.weight'].shape[0], head_type='linear')
    try:
        classifier = get_pretrained_cfg(model_name.split('.')[0]).classifier
    except Exception:
        return {}
    for name in ([classifier] if isinstance(classifier, str) else list(classifier or ())):
        w = state_dict.get(f'{name}.weight', state_dict.get(f'{name}.bias'))
        if w is not None:
            return dict(num_classes=w.shape[0])
    return {}


def resolve_model(args, state_dict):
    """(model name, create_model kwargs) from --model / --head / --zzz-rank / --num-classes and the checkpoint."""
    name = args.model
    info = checkpoint_head(state_dict, name) if state_dict is not None else {}
    is_whole = state_dict is not None and any(k.startswith('backbone.') for k in state_dict) and all(
        k.startswith(('backbone.', 'head.')) for k in state_dict)
    if not is_zzz_name(name) and (args.head or args.zzz_rank is not None or is_whole):
        name = zzz_name(name)
        if is_whole:
            _logger.info(f'{args.checkpoint} holds a carrot_zzz model (backbone.* / head.*): validating {name}')
    kwargs = {}
    if is_zzz_name(name):
        head_type = args.head or info.get('head_type')
        if head_type:
            kwargs['head_type'] = head_type
        rank = args.zzz_rank if args.zzz_rank is not None else info.get('zzz_rank')
        if rank is not None and head_type != 'linear':
            kwargs['zzz_rank'] = rank
    num_classes = args.num_classes if args.num_classes is not None else info.get('num_classes')
    return name, num_classes, kwargs


def load_weights_into(model, state_dict, path):
    """Strict load; a mismatch becomes one line naming it (class count, head type, rank, architecture)."""
    try:
        model.load_state_dict(fit_state_dict(state_dict, model, what=path), strict=True)
    except (ValueError, RuntimeError) as e:
        fail(f'{first_line(e, 600)}; pass the matching --model / --num-classes / --zzz-rank')


def class_names_of(dataset, num_classes):
    """Class names in label order: dataset.classes, a timm reader's class_to_idx, else the indices."""
    names = getattr(dataset, 'classes', None)
    if names is None:
        c2i = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
        if c2i:
            names = [None] * (max(c2i.values()) + 1)
            for c, i in c2i.items():
                names[i] = c
    names = list(names or [])
    return [str(names[i]) if i < len(names) and names[i] is not None else str(i) for i in range(num_classes)]


# --- evaluation ----------------------------------------------------------------------------------------------------

def make_dataset(args, name, root, split, input_img_mode, class_map=''):
    try:
        return create_dataset(
            name, root=root, split=split, download=args.dataset_download, load_bytes=args.tf_preprocessing,
            class_map=class_map, num_samples=args.num_samples,
            input_key=args.input_key, input_img_mode=input_img_mode, target_key=args.target_key,
            trust_remote_code=args.dataset_trust_remote_code, seed=args.seed)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError, AssertionError) as e:
        msg = first_line(e)
        fail(f'cannot read split {split!r} of {name or "image folder"} at {root}: {msg}')


def make_loader(args, dataset, data_config, crop_pct, device, model_dtype, model):
    if args.naflex_loader:
        from timm.data import create_naflex_loader
        patch_size = getattr(getattr(model, 'embeds', None), 'patch_size', None)
        return create_naflex_loader(
            dataset, batch_size=args.batch_size, use_prefetcher=args.prefetcher,
            interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
            num_workers=args.workers, crop_pct=crop_pct, crop_mode=data_config['crop_mode'],
            crop_border_pixels=args.crop_border_pixels, pin_memory=args.pin_mem, device=device,
            img_dtype=model_dtype or torch.float32, patch_size=patch_size or (16, 16),
            max_seq_len=args.naflex_max_seq_len)
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, use_prefetcher=args.prefetcher,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=crop_pct, crop_mode=data_config['crop_mode'],
        crop_border_pixels=args.crop_border_pixels, pin_memory=args.pin_mem, device=device,
        img_dtype=model_dtype or torch.float32, tf_preprocessing=args.tf_preprocessing)


def run_split(args, model, loader, device, model_dtype, amp_autocast, valid_labels, zzz_bias, real_labels=None,
              log=True):
    """Per-sample (targets, preds, max softmax prob, NLL, top-5 hit, max log-likelihood or None) over the loader.

    zzz_bias: the ZZZ head's bias (C,) or None; max log-likelihood = max_c (logit_c - bias_c).
    Logs timm's per-batch line (loss, Acc@1, Acc@5) every --log-freq batches when log.
    """
    criterion = nn.CrossEntropyLoss().to(device)
    batch_time, losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
    out = {k: [] for k in ('target', 'pred', 'conf', 'nll', 'hit5', 'maxll')}
    end = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        if args.no_prefetcher:
            target = target.to(device=device)
            input = input.to(device=device, dtype=model_dtype)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
            if valid_labels is not None:
                output = output[:, valid_labels]
            loss = criterion(output, target)
        if real_labels is not None:
            real_labels.add_result(output)
        logits = output.detach().float()                                    # (B, C)
        log_p = F.log_softmax(logits, 1)
        conf, pred = log_p.max(1)
        k = min(5, logits.shape[1])
        hit5 = (logits.topk(k, 1).indices == target.view(-1, 1)).any(1)
        correct = pred == target
        batch = logits.shape[0]
        losses.update(loss.item(), batch)
        top1.update(100.0 * correct.float().mean().item(), batch)
        top5.update(100.0 * hit5.float().mean().item(), batch)
        out['target'].append(target.cpu())
        out['pred'].append(pred.cpu())
        out['conf'].append(conf.exp().cpu())
        out['nll'].append((-log_p.gather(1, target.view(-1, 1).long()).squeeze(1)).cpu() if (target >= 0).all()
                          else torch.full((batch,), float('nan')))
        out['hit5'].append(hit5.cpu())
        if zzz_bias is not None:
            bias = zzz_bias if valid_labels is None else zzz_bias[valid_labels]
            out['maxll'].append((logits - bias.float()).max(1).values.cpu())
        batch_time.update(time.time() - end)
        end = time.time()
        if log and batch_idx % args.log_freq == 0:
            _logger.info(
                'Test: [{0:>4d}/{1}]  '
                'Time: {batch_time.val:.3f}s ({batch_time.avg:.3f}s, {rate_avg:>7.2f}/s)  '
                'Loss: {loss.val:>7.4f} ({loss.avg:>6.4f})  '
                'Acc@1: {top1.val:>7.3f} ({top1.avg:>7.3f})  '
                'Acc@5: {top5.val:>7.3f} ({top5.avg:>7.3f})'.format(
                    batch_idx, len(loader), batch_time=batch_time, rate_avg=batch / batch_time.avg,
                    loss=losses, top1=top1, top5=top5))
    return {k: (torch.cat(v) if v else None) for k, v in out.items()}


def validate(args):
    args.pretrained = args.pretrained or not args.checkpoint
    args.prefetcher = not args.no_prefetcher
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    if args.metrics_avg and not has_sklearn:
        _logger.warning("scikit-learn not installed, disabling metrics calculation. "
                        "Please install with 'pip install scikit-learn'.")
        args.metrics_avg = None

    model_dtype = None
    if args.model_dtype:
        if args.model_dtype not in ('float32', 'float16', 'bfloat16'):
            fail(f'--model-dtype must be float32, float16 or bfloat16, got {args.model_dtype}')
        model_dtype = getattr(torch, args.model_dtype)
    amp_autocast = suppress
    if args.amp:
        if model_dtype not in (None, torch.float32):
            fail('float32 model dtype must be used with --amp')
        if args.amp_dtype not in ('float16', 'bfloat16'):
            fail(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype}')
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        _logger.info('Validating in mixed precision with native PyTorch AMP.')
    else:
        _logger.info(f'Validating in {model_dtype or torch.float32}. AMP not enabled.')

    utils.random_seed(args.seed)
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()

    # model (+ checkpoint: its head tells num_classes / head type / rank when the command line does not)
    state_dict = None
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            fail(f'checkpoint {args.checkpoint} does not exist; pass --checkpoint with the path of a .pth.tar, '
                 f'.pth or .safetensors file')
        try:
            state_dict = load_state_dict(args.checkpoint, use_ema=args.use_ema)
        except Exception as e:
            fail(f'cannot read checkpoint {args.checkpoint} ({first_line(e)}); '
                 f'it is truncated or not a timm / carrot_zzz checkpoint')
    model_name, num_classes, head_kwargs = resolve_model(args, state_dict)
    in_chans = 3
    if args.in_chans is not None:
        in_chans = args.in_chans
    elif args.input_size is not None:
        in_chans = args.input_size[0]
    if not is_model(model_name.split('.')[0]):
        fail(f"unknown model '{model_name}'; pass --model with a timm architecture (timm.list_models()) "
             f"or its _zzz variant")
    if args.torchscript and is_zzz_name(model_name):
        fail('--torchscript is not supported for carrot_zzz models; use --torchcompile')
    try:
        model = create_model(model_name, pretrained=args.pretrained and state_dict is None, num_classes=num_classes,
                             in_chans=in_chans, global_pool=args.gp, scriptable=args.torchscript,
                             **head_kwargs, **args.model_kwargs)
    except (OSError, RuntimeError) as e:
        if args.pretrained and state_dict is None:
            fail(f'cannot create {model_name} with pretrained weights ({first_line(e)}); '
                 f'pass --checkpoint PATH to validate trained weights')
        raise
    except (TypeError, ValueError) as e:   # a --model-kwargs key or value the architecture does not take
        fail(f'cannot create {model_name} ({first_line(e)}); '
             f'check --model-kwargs and the model options')
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if state_dict is not None:
        load_weights_into(model, state_dict, args.checkpoint)
        del state_dict
    if args.reparam:
        model = reparameterize_model(model)
    param_count = sum(m.numel() for m in model.parameters())
    _logger.info('Model %s created, param count: %d' % (model_name, param_count))

    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    zzz_bias = head.bias.detach().to(device) if isinstance(head, ZZZHead) else None

    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size, verbose=True)
    test_time_pool = False
    if args.test_pool:
        model, test_time_pool = apply_test_time_pool(model, data_config)
    model = model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchscript:
        model = torch.jit.script(model)
    elif args.torchcompile:
        torch._dynamo.reset()
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    elif args.aot_autograd:
        if not has_functorch:
            fail('--aot-autograd needs functorch')
        model = memory_efficient_fusion(model)
    if args.num_gpu > 1:
        model = torch.nn.DataParallel(model, device_ids=list(range(args.num_gpu)))

    # data
    root_dir = args.data or args.data_dir
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset = make_dataset(args, args.dataset, root_dir, args.split, input_img_mode, args.class_map)
    valid_labels = None
    if args.valid_labels:
        with open(args.valid_labels) as f:
            valid_labels = [int(line.rstrip()) for line in f]
    real_labels = None
    if args.real_labels:
        if not hasattr(dataset, 'filenames'):
            fail(f'--real-labels needs a data set that lists its file names (ImageNet validation as an image '
                 f'folder); {args.dataset or "this data set"} does not: remove --real-labels')
        real_labels = RealLabelsImagenet(dataset.filenames(basename=True), real_json=args.real_labels)
    crop_pct = 1.0 if test_time_pool else data_config['crop_pct']
    loader = make_loader(args, dataset, data_config, crop_pct, device, model_dtype, model)

    model.eval()
    with torch.inference_mode():
        if not args.naflex_loader:  # warmup, as timm's: steadier first-batch time
            x = torch.randn((args.batch_size,) + tuple(data_config['input_size'])).to(device=device, dtype=model_dtype)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                model(x)
        res = run_split(args, model, loader, device, model_dtype, amp_autocast, valid_labels, zzz_bias, real_labels)
        ood = None
        if args.ood_data_dir:
            ood_split = args.ood_split or args.split
            ood_set = make_dataset(args, args.ood_dataset, args.ood_data_dir, ood_split, input_img_mode)
            ood_loader = make_loader(args, ood_set, data_config, crop_pct, device, model_dtype, model)
            _logger.info(f'Scoring {len(ood_loader)} batches of out-of-distribution data from {args.ood_data_dir}')
            ood = run_split(args, model, ood_loader, device, model_dtype, amp_autocast, valid_labels, zzz_bias,
                            log=False)
    if res['target'] is None:
        fail(f'split {args.split!r} at {root_dir} holds no samples; check --data-dir / --dataset / --split')

    target, pred = res['target'], res['pred']
    num_out = len(valid_labels) if valid_labels is not None else int(args.num_classes)
    correct = pred == target
    top1a, top5a = 100.0 * correct.double().mean().item(), 100.0 * res['hit5'].double().mean().item()
    if real_labels is not None:
        top1a, top5a = real_labels.get_accuracy(k=1), real_labels.get_accuracy(k=5)
    metric_results = {}
    if args.metrics_avg:
        kw = dict(average=args.metrics_avg, zero_division=0)
        metric_results = {
            f'{args.metrics_avg}_precision': round(100 * precision_score(target.numpy(), pred.numpy(), **kw), 4),
            f'{args.metrics_avg}_recall': round(100 * recall_score(target.numpy(), pred.numpy(), **kw), 4),
            f'{args.metrics_avg}_f1_score': round(100 * f1_score(target.numpy(), pred.numpy(), **kw), 4),
        }
    in_range = (target >= 0) & (target < num_out)
    acc_c, support = per_class_accuracy(pred[in_range], target[in_range], num_out)
    extra = OrderedDict(
        mean_class_acc=round(100 * acc_c[support > 0].mean().item(), 4),
        nll=round(res['nll'].double().mean().item(), 4),
        ece=round(100 * ece(res['conf'], correct), 4),
    )
    if ood is not None:
        for tag, key in (('msp', 'conf'), ('ll', 'maxll')):
            if res[key] is not None and ood[key] is not None:
                extra[f'ood_auroc_{tag}'] = round(100 * auroc(res[key], ood[key]), 4)
                extra[f'ood_fpr95_{tag}'] = round(100 * fpr_at_tpr(res[key], ood[key], 0.95), 4)
    results = OrderedDict(
        model=model_name,
        top1=round(top1a, 4), top1_err=round(100 - top1a, 4),
        top5=round(top5a, 4), top5_err=round(100 - top5a, 4),
        **metric_results,
        param_count=round(param_count / 1e6, 2),
        img_size=data_config['input_size'][-1],
        crop_pct=crop_pct,
        interpolation=data_config['interpolation'],
        **extra,
    )
    log_string = ' * Acc@1 {:.3f} ({:.3f}) Acc@5 {:.3f} ({:.3f})'.format(
        results['top1'], results['top1_err'], results['top5'], results['top5_err'])
    if metric_results:
        log_string += ' | Precision({avg}) {prec:.3f} | Recall({avg}) {rec:.3f} | F1-score({avg}) {f1:.3f}'.format(
            avg=args.metrics_avg, prec=metric_results[f'{args.metrics_avg}_precision'],
            rec=metric_results[f'{args.metrics_avg}_recall'], f1=metric_results[f'{args.metrics_avg}_f1_score'])
    _logger.info(log_string)
    _logger.info(' * Mean class acc {mean_class_acc:.3f} NLL {nll:.4f} ECE {ece:.3f} ({n} samples)'.format(
        n=len(target), **extra))
    for tag, what in (('msp', 'max softmax prob'), ('ll', 'max class log-likelihood')):
        if f'ood_auroc_{tag}' in extra:
            _logger.info(f' * OOD ({what}) AUROC {extra[f"ood_auroc_{tag}"]:.3f} '
                         f'FPR@95TPR {extra[f"ood_fpr95_{tag}"]:.3f} ({len(ood["target"])} OOD samples)')
    if args.per_class_csv:
        names = class_names_of(dataset, num_out)
        write_csv(args.per_class_csv, [
            OrderedDict(class_index=c, class_name=names[c],
                        accuracy='' if support[c] == 0 else round(100 * acc_c[c].item(), 4),
                        correct=int(round(acc_c[c].item() * support[c].item())) if support[c] else 0,
                        support=int(support[c])) for c in range(num_out)])
        _logger.info(f'Per-class accuracy written to {args.per_class_csv}')
    return results


def _try_run(args, initial_batch_size):
    batch_size = initial_batch_size
    results = OrderedDict()
    error_str = 'Unknown'
    while batch_size:
        args.batch_size = batch_size * args.num_gpu  # multiply by num-gpu for DataParallel case
        try:
            if 'cuda' in args.device and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return validate(args)
        except RuntimeError as e:
            error_str = str(e)
            _logger.error(f'"{error_str}" while running validation.')
            if not check_batch_size_retry(error_str):
                break
        batch_size = decay_batch_step(batch_size)
        _logger.warning(f'Reducing batch size to {batch_size} for retry.')
    results['model'] = args.model
    results['error'] = error_str
    _logger.error(f'{args.model} failed to validate ({error_str}).')
    return results


_NON_IN1K_FILTERS = ['*_in21k', '*_in22k', '*in12k', '*_dino', '*fcmae', '*seer']


def parse_args(argv=None):
    """The command line over the defaults from -c/--config (not a timm validate.py flag): a train.py YAML recipe.

    The recipe's keys that are also validate.py flags (model, head, zzz_rank, dataset, data_dir, input size,
    mean, std, crop_pct, device, ...) become the defaults, so the settings a model was trained with are the
    ones it is validated with; training-only keys (optimizer, schedule, CARROT, ...) are skipped.
    """
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', metavar='FILE')
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()  # a fresh one: the recipe's defaults must not outlive this call
    if args_config.config:
        try:
            cfg = read_recipe(args_config.config)
        except ValueError as e:
            fail(str(e))
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in cfg.items() if k in known})
    args = parser.parse_args(remaining)
    args.config = args_config.config
    return args


def check_args(args):
    """What holds for the whole run, checked once before any model (in a bulk run, before the first)."""
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        fail(f'--device {args.device} (the default) but CUDA is not available here; pass --device cpu')
    error = single_label_error(args)
    if error:
        fail(error)
    if not args.dataset and not (args.data or args.data_dir):
        fail('no data folder given; pass --data-dir DIR (an image folder, or the root of --dataset NAME)')
    for flag, path in (('--results-file', args.results_file), ('--per-class-csv', args.per_class_csv)):
        if path and os.path.dirname(path) and not os.path.isdir(os.path.dirname(path)):
            fail(f'{flag} {path}: its folder does not exist; create it or pass another path')
    for flag, path in (('--valid-labels', args.valid_labels), ('--real-labels', args.real_labels)):
        if path and not os.path.isfile(path):
            fail(f'{flag} {path}: no such file; pass the path of the labels file')


def main(argv=None):
    setup_default_logging()
    args = parse_args(argv)
    check_args(args)
    model_cfgs = []
    model_names = []
    if os.path.isdir(args.checkpoint):  # every checkpoint in a folder, same model
        checkpoints = []
        for pattern in ('*.pth.tar', '*.pth', '*.safetensors'):
            checkpoints += glob.glob(os.path.join(args.checkpoint, pattern))
        model_names = list_models(args.model)
        model_cfgs = [(args.model, c) for c in sorted(checkpoints, key=natural_key)]
        if not model_cfgs:
            fail(f'no .pth.tar / .pth / .safetensors files in {args.checkpoint}')
    else:
        if args.model == 'all':
            args.pretrained = True
            model_names = list_models(pretrained=True, exclude_filters=_NON_IN1K_FILTERS)
            model_cfgs = [(n, '') for n in model_names]
        elif not is_model(args.model.split('.')[0]):
            model_names = list_models(args.model, pretrained=True)
            model_cfgs = [(n, '') for n in model_names]
        if not model_cfgs and os.path.isfile(args.model):
            with open(args.model) as f:
                model_names = [line.rstrip() for line in f]
            model_cfgs = [(n, None) for n in model_names if n]

    if len(model_cfgs):
        _logger.info('Running bulk validation on these pretrained models: {}'.format(', '.join(model_names)))
        results = []
        try:
            initial_batch_size = args.batch_size
            for m, c in model_cfgs:
                run_args = copy.copy(args)   # validate() fills in settings (class count, ...) per model
                run_args.model = m
                run_args.checkpoint = c
                try:
                    r = _try_run(run_args, initial_batch_size)
                except SystemExit as e:  # fail(): this checkpoint or model cannot be validated; go on with the rest
                    _logger.error(f'skipping {m} {c or ""}: {e}')
                    continue
                if 'error' in r:
                    continue
                if run_args.checkpoint:
                    r['checkpoint'] = run_args.checkpoint
                results.append(r)
        except KeyboardInterrupt:
            pass
        if not results:
            fail('no model or checkpoint could be validated; see the errors above')
        results = sorted(results, key=lambda x: x['top1'], reverse=True)
    else:
        results = _try_run(args, args.batch_size) if args.retry else validate(args)

    if args.results_file:
        write_results(args.results_file, results, format=args.results_format)
    # results as JSON on stdout after a delimiter, as timm's validate.py prints them for runner scripts
    print(f'--result\n{json.dumps(results, indent=4)}')
    return results


def write_csv(path, rows):
    """rows (dicts) -> csv with the union of their keys as header (first-seen order); missing cells empty."""
    fields = list(OrderedDict((k, None) for r in rows for k in r))
    with open(path, mode='w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields, restval='')
        w.writeheader()
        w.writerows(rows)


def write_results(results_file, results, format='csv'):
    if format == 'json':
        with open(results_file, mode='w') as f:
            json.dump(results, f, indent=4)
        return
    rows = results if isinstance(results, (list, tuple)) else [results]
    if rows:
        write_csv(results_file, rows)


if __name__ == '__main__':
    main()
