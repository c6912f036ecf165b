"""What validate.py does for one model: the model a checkpoint holds, the split's loader, the scores, the results.

    precision = start_validation(cfg)                                         once per run; joins torchrun's processes
    state_dict = read_checkpoint(cfg.checkpoint, cfg.use_ema)                 (None without a checkpoint)
    model = create_validation_model(cfg, state_dict)                          weights loaded, strictly
    loader = validation_loader(cfg, dataset, data_config, crop_pct, precision, model)
    results = report(cfg, scores, ood_scores, ...)                            timm's fields + carrot-zzz's

The class count, head type and ZZZ rank come from the checkpoint (carrot_zzz.weights.describe_checkpoint) where the
command line does not give them; values given on both must agree.

Under torchrun each process scores its shard of every split (timm's ordered distributed sampler) and
engine.evaluate.predict gathers the shards in dataset order, so every process holds the scores of the whole split;
rank 0 alone logs and writes the results (`is_primary`).
"""
import argparse
import csv
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
from timm.data import resolve_data_config
from timm.layers import apply_test_time_pool
from timm.utils import reparameterize_model
from torch import nn
from torch.utils.data import IterableDataset

from ..data.classes import dataset_class_names, label_map, names_or_indices, parse_class_names
from ..data.holdout import Part, stratified_holdout
from ..embeddings import save_embeddings
from ..reliability import plot_reliability, reliability_bins
from ..retrieval import retrieval_metrics
from ..metrics import ood_metrics, per_class_accuracy, split_metrics
from ..ood import OOD_SCORES
from ..sampler import dataset_targets
from ..registry import is_zzz_name, zzz_name
from ..weights import CLASS_NAMES_KEY, describe_checkpoint, fit_state_dict, read_weights
from .data import evaluation_loader, read_split
from .errors import SettingError
from .models import build_timm_model, check_scriptable, merge_model_kwargs
from .precision import Precision
from .process import join_processes

__all__ = ['start_validation', 'is_primary', 'read_checkpoint', 'model_spec', 'create_validation_model',
           'open_eval_split', 'validation_loader', 'prepare_model', 'class_names', 'checkpoint_class_names',
           'match_classes', 'holdout_part', 'report', 'retrieval_fields', 'write_extras', 'per_class_rows', 'write_rows',
           'write_results']

_logger = logging.getLogger(__name__)


def start_validation(cfg: argparse.Namespace) -> Precision:
    """validate.py's process, once per run: engine.process.join_processes (under torchrun: torchrun's process group,
    one device per process; cfg gets distributed, world_size, rank, device). SettingError for what cannot run under
    torchrun; there, the processes other than rank 0 log warnings and errors only. Returns the Precision."""
    precision = join_processes(cfg, 'Validating')
    if cfg.distributed:
        _check_torchrun_settings(cfg)
        if cfg.rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
    return precision


def _check_torchrun_settings(cfg: argparse.Namespace) -> None:
    """SettingError for the settings that need validate.py to be one process."""
    if cfg.num_gpu > 1:
        raise SettingError('num_gpu', cfg.num_gpu, f'spreads each batch over GPUs inside one process (DataParallel), '
                                                   f'while torchrun runs {cfg.world_size} processes with one device '
                                                   f'each: use one of them (drop num_gpu, or run validate.py without '
                                                   f'torchrun)')
    if cfg.retry:
        raise SettingError('retry', True, 'would shrink the batch of one process alone and leave the others waiting '
                                          'under torchrun: drop it and pass a smaller batch_size')
    if cfg.naflex_loader:
        raise SettingError('naflex_loader', True, 'does not split a split over torchrun\'s processes in order: run '
                                                  'validate.py with it as one process')


def is_primary(cfg: argparse.Namespace) -> bool:
    """Whether this process prints and writes the results: the only one, or rank 0 under torchrun."""
    return getattr(cfg, 'rank', 0) == 0


def read_checkpoint(path: str, use_ema: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(weights, metadata) of a .pth.tar / .pth / .safetensors file (its EMA entry with use_ema; metadata as
    carrot_zzz.weights.read_weights gives it); SettingError otherwise."""
    if not os.path.isfile(path):
        raise SettingError('checkpoint', path, 'no such file; pass the path of a .pth.tar, .pth or .safetensors file')
    try:
        state_dict, meta = read_weights(path, use_ema=use_ema)
    except ValueError as e:
        raise SettingError('checkpoint', path, f'cannot read it ({str(e).split("(", 1)[-1].rstrip(")")}; it is '
                                               f'truncated or not a timm / carrot_zzz checkpoint') from e
    _logger.info(f'Loaded the weights of {path}' + (f' (entry {meta["entry"]})' if 'entry' in meta else ''))
    return state_dict, meta


def checkpoint_class_names(cfg: argparse.Namespace, meta: Dict[str, str], num_classes: int) -> Optional[List[str]]:
    """The class names the checkpoint stores (label order), None when it has none (a warning says what that
    means); SettingError when its entry is malformed."""
    try:
        names = parse_class_names(meta.get(CLASS_NAMES_KEY), num_classes)
    except ValueError as e:
        raise SettingError('checkpoint', cfg.checkpoint, f'{e}; it was not written by train.py / save_weights or '
                                                         f'was altered') from e
    if names is None and cfg.checkpoint:
        _logger.warning(f'{cfg.checkpoint} stores no class names (an older or a timm checkpoint): the evaluation '
                        f'classes are taken in the data set\'s own order, which must be the training order')
    return names


def match_classes(dataset, model_names: Optional[List[str]], split: str):
    """The split with its labels renumbered to the model's classes by name (carrot_zzz.data.classes.label_map): a
    missing class folder just has no samples; SettingError for a class the model does not know. Unchanged when
    the model has no names, the data set none, or both agree."""
    folder_names = dataset_class_names(dataset)
    if model_names is None or folder_names is None or folder_names == model_names:
        return dataset
    try:
        mapping = label_map(folder_names, model_names)
    except ValueError as e:
        raise SettingError('split', split, str(e)) from e
    targets = dataset_targets(dataset)
    if targets is None:
        raise SettingError('split', split, 'its classes differ from the checkpoint\'s and its labels cannot be read '
                                           'to renumber them; evaluate a data set with the training classes')
    absent = len(model_names) - len(set(mapping))
    _logger.info(f'Split {split}: its {len(folder_names)} classes matched to the checkpoint\'s by name'
                 + (f'; {absent} of the checkpoint\'s {len(model_names)} classes have no samples here' if absent else ''))
    return Part(dataset, torch.arange(len(targets)), targets, relabel=mapping)


def holdout_part(dataset, fraction: float, seed: int, split: str):
    """The held-out part train.py evaluates on with holdout_fraction=fraction and seed=seed (the same carving,
    carrot_zzz.data.holdout.stratified_holdout, over the same labels)."""
    targets = dataset_targets(dataset)
    if targets is None:
        raise SettingError('split', split, 'its labels cannot be read, so no held-out part can be carved from it')
    _, held = stratified_holdout(targets, fraction, seed)
    if held.numel() == 0:
        raise SettingError('holdout_fraction', fraction, 'holds out no sample (too few per class); raise it')
    return Part(dataset, held, targets)


_SPEC_WORDS = {'num_classes': 'classes', 'head_type': 'as its head', 'zzz_rank': 'as its ZZZ rank'}


def model_spec(cfg: argparse.Namespace, state_dict: Optional[Dict[str, torch.Tensor]]):
    """(model name, create_model kwargs): --model / --head / --zzz-rank / --num-classes, completed by what the
    checkpoint says; a plain name with a saved `_zzz` model becomes `<arch>_zzz`."""
    info = describe_checkpoint(state_dict, cfg.model) if state_dict is not None else {}
    name = cfg.model
    if not is_zzz_name(name) and (cfg.head or cfg.zzz_rank is not None or info.get('whole')):
        name = zzz_name(name)
        if info.get('whole'):
            _logger.info(f'{cfg.checkpoint} holds a carrot_zzz model (backbone.* / head.*): using {name}')
    from_flags = {'num_classes': cfg.num_classes}
    if is_zzz_name(name):
        from_flags.update(head_type=cfg.head, zzz_rank=cfg.zzz_rank)
    stated = {k: v for k, v in from_flags.items() if v is not None}
    read = {k: info[k] for k in from_flags if info.get(k) is not None and not (k == 'zzz_rank' and (
        stated.get('head_type', info.get('head_type')) == 'linear'))}
    for key in sorted(stated.keys() & read.keys()):
        if stated[key] != read[key]:
            raise SettingError(key, stated[key], f'the checkpoint {cfg.checkpoint} has {read[key]} '
                                                 f'({_SPEC_WORDS[key]}); drop {key} or pass the checkpoint it '
                                                 f'describes')
    chosen = merge_model_kwargs({**read, **stated}, cfg.model_kwargs, f'the checkpoint {cfg.checkpoint}' if read
                                else 'the command line')
    return name, chosen


def create_validation_model(cfg: argparse.Namespace, state_dict: Optional[Dict[str, torch.Tensor]]) -> nn.Module:
    """The model to validate, weights loaded strictly (a mismatch is one SettingError naming it); cfg.model and
    cfg.num_classes are set to what was built."""
    name, kwargs = model_spec(cfg, state_dict)
    if not timm.is_model(name.split('.')[0]):
        raise SettingError('model', name, 'timm has no such model; pass a timm architecture (timm.list_models()) '
                                          'or its _zzz variant')
    check_scriptable(cfg.torchscript, is_zzz_name(name))
    model = build_timm_model(cfg, name, cfg.pretrained and state_dict is None, **kwargs)
    if state_dict is not None:
        try:
            model.load_state_dict(fit_state_dict(state_dict, model, what=cfg.checkpoint), strict=True)
        except (ValueError, RuntimeError) as e:
            raise SettingError('checkpoint', cfg.checkpoint, f'{str(e).splitlines()[0][:600]}; pass the matching '
                                                             f'model, num_classes and zzz_rank') from e
    cfg.model, cfg.num_classes = name, model.num_classes
    return model


def prepare_model(cfg: argparse.Namespace, precision: Precision, model: nn.Module):
    """Re-parameterise, test-time pool, place, compile / script / fuse, DataParallel: (model, data config, crop)."""
    if cfg.reparam:
        model = reparameterize_model(model)
    data_config = resolve_data_config(vars(cfg), model=model, use_test_size=not cfg.use_train_size, verbose=True)
    pooled = False
    if cfg.test_pool:
        model, pooled = apply_test_time_pool(model, data_config)
    model = model.to(device=precision.device, dtype=precision.model_dtype)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.torchscript:
        model = torch.jit.script(model)
    elif cfg.torchcompile:
        torch._dynamo.reset()
        model = torch.compile(model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
    elif cfg.aot_autograd:
        from functorch.compile import memory_efficient_fusion
        model = memory_efficient_fusion(model)
    if cfg.num_gpu > 1:
        model = torch.nn.DataParallel(model, device_ids=list(range(cfg.num_gpu)))
    return model, data_config, 1.0 if pooled else data_config['crop_pct']


def open_eval_split(cfg: argparse.Namespace, name: str, root: str, split: str, img_mode: str, class_map: str = ''):
    """A split to validate or predict on (engine.data.read_split, named split)."""
    return read_split(cfg, name, root, split, 'split', img_mode, load_bytes=cfg.tf_preprocessing, class_map=class_map,
                      num_samples=cfg.num_samples, seed=cfg.seed)


def validation_loader(cfg: argparse.Namespace, dataset, data_config: Dict[str, Any], crop_pct: float,
                      precision: Precision, model: nn.Module):
    """The split's loader: engine.data.evaluation_loader with validate.py's / inference.py's settings (under torchrun,
    this process's shard of it), or timm's NaFlex loader (--naflex-loader). SettingError for a streaming split under
    torchrun (its shards would not come back in dataset order)."""
    distributed = getattr(cfg, 'distributed', False)
    if distributed and isinstance(dataset, IterableDataset):
        raise SettingError('dataset', cfg.dataset, 'is a streaming reader, whose shards torchrun\'s processes cannot '
                                                   'gather in dataset order: run validate.py on it as one process')
    if cfg.naflex_loader:
        from timm.data import create_naflex_loader
        patch = getattr(getattr(model, 'embeds', None), 'patch_size', None) or (16, 16)
        return create_naflex_loader(
            dataset, patch_size=patch, max_seq_len=cfg.naflex_max_seq_len, batch_size=cfg.batch_size,
            use_prefetcher=cfg.prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'], num_workers=cfg.workers, crop_pct=crop_pct, crop_mode=data_config['crop_mode'],
            crop_border_pixels=cfg.crop_border_pixels, pin_memory=cfg.pin_mem, device=precision.device,
            img_dtype=precision.input_dtype)
    return evaluation_loader(dataset, data_config, precision, batch_size=cfg.batch_size, workers=cfg.workers,
                             prefetcher=cfg.prefetcher, pin_memory=cfg.pin_mem, distributed=distributed,
                             crop_pct=crop_pct, crop_border_pixels=cfg.crop_border_pixels,
                             tf_preprocessing=cfg.tf_preprocessing)


def class_names(model_names: Optional[List[str]], dataset, num_classes: int) -> List[str]:
    """The names of the logit columns: the checkpoint's, else the data set's (label order), else the indices."""
    return names_or_indices(model_names or dataset_class_names(dataset), num_classes)


def _ood_fields(scores: Dict[str, torch.Tensor], ood: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """AUROC and FPR@95TPR (%) of the split (positive) against the OOD data, for every score both have."""
    out = OrderedDict()
    for name in OOD_SCORES:
        key = f'score_{name}'
        if key in scores and key in ood:
            found = ood_metrics(scores[key], ood[key])
            out[f'ood_auroc_{name}'] = round(100 * found['auroc'], 4)
            out[f'ood_fpr95_{name}'] = round(100 * found['fpr95'], 4)
    return out


def report(cfg: argparse.Namespace, scores: Dict[str, torch.Tensor], num_classes: int, param_count: int,
           data_config: Dict[str, Any], crop_pct: float, ood: Optional[Dict[str, torch.Tensor]] = None,
           real_top: Optional[Dict[int, float]] = None, extra: Optional[Dict[str, float]] = None) -> 'OrderedDict':
    """timm's result fields (model, top1 / top5 and their errors in %, param count in millions, image size, crop pct,
    interpolation) and carrot-zzz's (mean_class_acc, nll, ece; OOD fields). real_top: {1: %, 5: %} from real labels."""
    m = split_metrics(scores, num_classes)
    top1, top5 = (real_top[1], real_top[5]) if real_top else (100 * m['top1'], 100 * m['top5'])
    fields = OrderedDict(model=cfg.model, top1=round(top1, 4), top1_err=round(100 - top1, 4), top5=round(top5, 4),
                         top5_err=round(100 - top5, 4))
    fields.update(extra or {})
    fields.update(param_count=round(param_count / 1e6, 2), img_size=data_config['input_size'][-1], crop_pct=crop_pct,
                  interpolation=data_config['interpolation'], mean_class_acc=round(100 * m['mean_class_acc'], 4),
                  nll=round(m['nll'], 4), ece=round(100 * m['ece'], 4))
    if ood:
        fields.update(_ood_fields(scores, ood))
    return fields


def retrieval_fields(scores: Dict[str, torch.Tensor]) -> 'OrderedDict':
    """Recall@1/2/4/8, MAP@R and k-NN top-1 (k = 1, 20), in %, of the split's embeddings (carrot_zzz.retrieval)."""
    found = retrieval_metrics(scores['embedding'], scores['target'])
    return OrderedDict((key, round(100 * value, 4)) for key, value in found.items())


def write_extras(cfg: argparse.Namespace, scores: Dict[str, torch.Tensor], bias: Optional[torch.Tensor],
                 names: List[str], results: Dict[str, Any]) -> None:
    """--save-embeddings (embeddings, labels, logits, ZZZ log-likelihoods = logits - bias, class names, every
    out-of-distribution score) and --reliability-plot (the split's reliability diagram, its ECE in the title)."""
    if cfg.save_embeddings:
        logits = scores['logits']
        save_embeddings(cfg.save_embeddings, scores['embedding'], scores['target'], logits,
                        log_likelihoods=logits - bias[:logits.shape[1]].to(logits) if bias is not None else None,
                        class_names=names, scores={key[len('score_'):]: value for key, value in scores.items()
                                                   if key.startswith('score_')})
        _logger.info(f'Embeddings of {len(logits)} samples written to {cfg.save_embeddings}')
    if cfg.reliability_plot:
        bins = reliability_bins(scores['conf'], scores['hit1'])
        plot_reliability(bins, cfg.reliability_plot, title=f'{cfg.model}, split {cfg.split}')
        _logger.info(f'Reliability diagram (ECE {results["ece"]:.2f}%) drawn to {cfg.reliability_plot}')


def per_class_rows(scores: Dict[str, torch.Tensor], names: List[str]) -> List[Dict[str, Any]]:
    """class_index, class_name, accuracy (%, empty for an absent class), correct, support per class."""
    target, pred = scores['target'], scores['pred']
    keep = (target >= 0) & (target < len(names))
    acc, support = per_class_accuracy(pred[keep], target[keep], len(names))
    correct = (acc.nan_to_num(0.0) * support).round().long()                 # acc_c = correct_c / n_c
    return [OrderedDict(class_index=c, class_name=names[c],
                        accuracy='' if support[c] == 0 else round(100 * acc[c].item(), 4),
                        correct=int(correct[c]), support=int(support[c])) for c in range(len(names))]


def write_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    """Rows as csv, the header the union of their keys in first-seen order, missing cells empty."""
    fields = list(OrderedDict((k, None) for r in rows for k in r))
    with open(path, mode='w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval='')
        writer.writeheader()
        writer.writerows(rows)


def write_results(path: str, results, fmt: str = 'csv') -> None:
    """The results of one model (a dict) or of several (a list) as json, else csv (timm's fallback)."""
    if fmt == 'json':
        with open(path, mode='w') as f:
            json.dump(results, f, indent=4)
        return
    rows = results if isinstance(results, (list, tuple)) else [results]
    if rows:
        write_rows(path, rows)
