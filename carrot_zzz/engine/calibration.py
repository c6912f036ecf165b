"""Temperature after training (train.py at the end of a run, validate.py --fit-temperature): one temperature T
fitted on an evaluation split's logits (carrot_zzz.temperature), folded into the head's own parameters, with the
ECE and NLL before and after.

    calibrate = export_calibration(cfg, data, precision)        train.py: folds T into each exported module
    fields = calibrate_for_report(raw, model, scores, ...)      validate.py --fit-temperature SPLIT
    scored = score_split(model, loader, precision)              logits, labels (and embeddings for a ZZZ head)
    info = calibrate_head(model, scored)                        T folded into model's head; NLL / ECE before, after
    after = calibrated_logits(model, scored, info)              the logits the folded head gives on that split

The fold is exact (logits / T) for a linear head, and for a ZZZ head unless a variance hits its floor; then the
logits after are recomputed from the embeddings through the folded head.
"""
import argparse
import copy
import json
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .evaluate import logits_and_embedding, predict
from ..metrics import classification_metrics, threshold_at_tpr
from ..ood import OODScorer, default_ood_score
from ..temperature import fit_temperature, fold_temperature
from ..weights import CLASS_NAMES_KEY, TEMPERATURE_KEY
from ..zzz_head import ZZZHead
from .data import TrainingData, eval_loader
from .errors import SettingError
from .precision import Precision

__all__ = ['CALIBRATE_CHOICES', 'HOLDOUT', 'foldable_head', 'score_split', 'calibrate_head', 'calibrated_logits',
           'describe_calibration', 'wants_calibration', 'export_calibration', 'calibrate_for_report']

CALIBRATE_CHOICES = ('on', 'off')
HOLDOUT = 'holdout'    # validate.py --fit-temperature holdout: the held-out part of the training split

_logger = logging.getLogger(__name__)
_HEAD_ROWS = 4096     # embeddings through the head at once


def foldable_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's classifier when a temperature can be folded into it (nn.Linear or ZZZHead), else None."""
    model = getattr(model, 'module', model)
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    return head if isinstance(head, (nn.Linear, ZZZHead)) else None


def score_split(model: nn.Module, loader, precision: Precision, channels_last: bool = False,
                scorer=None, log_every: int = 0, log_name: str = 'Calibration') -> Dict[str, torch.Tensor]:
    """carrot_zzz.engine.evaluate.predict with the logits kept, and the embeddings too for a ZZZ head (its fold may need
    them, and so does the 'maha' score)."""
    zzz = isinstance(foldable_head(model), ZZZHead)
    return predict(model, loader, precision, channels_last=channels_last, scorer=scorer, keep_logits=True,
                   forward=logits_and_embedding(model) if zzz else None, log_every=log_every, log_name=log_name)


def _head_logits(head: nn.Module, embedding: torch.Tensor) -> torch.Tensor:
    """head(embedding) (N, C) float32 on the CPU, in row blocks on the head's device."""
    device = next(head.parameters()).device
    with torch.no_grad():
        return torch.cat([head(block.to(device)).float().cpu() for block in embedding.split(_HEAD_ROWS)])


def calibrated_logits(model: nn.Module, scored: Dict[str, torch.Tensor], info: Dict[str, Any]) -> torch.Tensor:
    """The logits (N, C) the folded head gives for the scored split: logits / T when the fold was exact, else the
    embeddings through the folded head."""
    if info['floored'] and 'embedding' in scored:
        return _head_logits(foldable_head(model), scored['embedding'])
    return scored['logits'] / info['temperature']


def calibrate_head(model: nn.Module, scored: Dict[str, torch.Tensor], ood_tpr: float = 0.95) -> Dict[str, Any]:
    """Fit T on the scored split and fold it into the model's head (in place); returns temperature, samples,
    identifiable, nll / ece before and after on that split (ece as a fraction), floored, and the threshold of the
    "unknown" answer on the folded head's scores of that split (ood_score, ood_threshold, ood_tpr; see
    _ood_threshold). A split classified without
    a single error leaves T = 1 (identifiable False: no finite temperature minimises its NLL). ValueError when the
    head cannot fold."""
    head = foldable_head(model)
    if head is None:
        raise ValueError('its classifier is neither an nn.Linear nor a ZZZ head: no temperature can be folded in')
    logits, target = scored['logits'], scored['target']
    found = fit_temperature(logits, target)
    floored = fold_temperature(head, found['temperature']) if found['identifiable'] else False
    info = dict(temperature=found['temperature'], samples=int(target.numel()), identifiable=found['identifiable'],
                floored=floored)
    before = classification_metrics(logits, target)
    after_logits = calibrated_logits(model, scored, info)
    after = classification_metrics(after_logits, target)
    info.update(nll_before=before['nll'], nll_after=after['nll'], ece_before=before['ece'], ece_after=after['ece'])
    info.update(_ood_threshold(head, after_logits, scored.get('embedding'), ood_tpr))
    return info


def _ood_threshold(head: nn.Module, logits: torch.Tensor, embedding: Optional[torch.Tensor],
                   tpr: float) -> Dict[str, Any]:
    """ood_score (maha for a ZZZ head, maxlogit otherwise), ood_threshold (the value of that score, of the folded
    head, that keeps a tpr share of the split's images: carrot_zzz.metrics.threshold_at_tpr), ood_tpr."""
    name = default_ood_score(head)
    with torch.no_grad():
        scores = OODScorer(head)(logits, embedding)
    return dict(ood_score=name, ood_threshold=threshold_at_tpr(scores[name], tpr), ood_tpr=tpr)


def describe_calibration(info: Dict[str, Any], where: str) -> str:
    """'temperature 1.52 fitted on 300 samples of <where>: ECE 6.81% -> 2.10%, NLL 0.5120 -> 0.4330'."""
    if not info['identifiable']:
        return (f'no temperature fitted: all {info["samples"]} samples of {where} are classified correctly, so no '
                f'finite temperature minimises their NLL; T = 1 kept (evaluate on a larger or harder split)')
    floored = ' (a ZZZ variance at its floor: the fold is approximate)' if info['floored'] else ''
    return (f'temperature {info["temperature"]:.4g} fitted on {info["samples"]} samples of {where}: '
            f'ECE {100 * info["ece_before"]:.2f}% -> {100 * info["ece_after"]:.2f}%, '
            f'NLL {info["nll_before"]:.4f} -> {info["nll_after"]:.4f}{floored}')


def wants_calibration(cfg: argparse.Namespace, data: TrainingData) -> bool:
    """Whether train.py fits a temperature at the end: calibrate 'on', or unset, with an evaluation split.
    SettingError for calibrate 'on' without one."""
    if cfg.calibrate == 'on' and data.eval_dataset is None:
        raise SettingError('calibrate', 'on', 'needs an evaluation split to fit the temperature on; pass '
                                              'holdout_fraction=F (or a val_split), or calibrate=off')
    return cfg.calibrate != 'off' and data.eval_dataset is not None


def export_calibration(cfg: argparse.Namespace, data: TrainingData,
                       precision: Precision) -> Callable[[nn.Module, str], Dict[str, str]]:
    """calibrate(module, file name) -> metadata, for fit.export_best_weights: scores the run's evaluation split
    (the whole split, in one process: called on rank 0 after training), folds the fitted T into the module and
    logs it; returns {'temperature', 'calibration'} (the latter a JSON of split, samples, ECE / NLL before and
    after), or {} with a log line for a head that cannot fold or a module on another device (EMA kept on the CPU)."""
    single = copy.copy(cfg)
    single.distributed = False
    loader = eval_loader(single, data.eval_dataset, data.data_config, precision)
    where = 'the held-out part of the training split' if data.holdout else f'the {cfg.val_split} split'
    if not data.holdout:
        _logger.warning(f'The temperature is fitted on {where}: validate.py on that split reports an optimistic ECE. '
                        f'Hold out a part of the training split for it with holdout_fraction=F (or calibrate=off)')

    def calibrate(module: nn.Module, name: str) -> Dict[str, str]:
        if foldable_head(module) is None:
            _logger.info(f'{name}: not calibrated (its classifier is neither linear nor a ZZZ head)')
            return {}
        if next(module.parameters()).device != precision.device:
            _logger.info(f'{name}: not calibrated (its weights are on {next(module.parameters()).device})')
            return {}
        info = calibrate_head(module, score_split(module, loader, precision, channels_last=cfg.channels_last),
                              cfg.ood_tpr)
        _logger.info(f'{name}: {describe_calibration(info, where)}; "unknown" below {info["ood_score"]} '
                     f'{info["ood_threshold"]:.6g} (keeps {100 * info["ood_tpr"]:g}% of that split)')
        return _metadata(info, where)
    return calibrate


def _metadata(info: Dict[str, Any], where: str, names: Optional[List[str]] = None) -> Dict[str, str]:
    """Safetensors metadata of folded weights: temperature, calibration (JSON: split, samples, NLL / ECE before and
    after, ...), ood_score / ood_threshold / ood_tpr (the "unknown" threshold), class names when given."""
    meta = {TEMPERATURE_KEY: repr(info['temperature']), 'calibration': json.dumps({'split': where, **info}),
            'ood_score': info['ood_score'], 'ood_threshold': repr(info['ood_threshold']), 'ood_tpr': repr(info['ood_tpr'])}
    if names is not None:
        meta[CLASS_NAMES_KEY] = json.dumps(list(names))
    return meta


def calibrate_for_report(raw: nn.Module, model: nn.Module, scores: Dict[str, torch.Tensor], fit_loader,
                         precision: Precision, fit_split: str, names: Optional[List[str]] = None,
                         ood_tpr: float = 0.95) -> Tuple['OrderedDict[str, Any]', Dict[str, str]]:
    """validate.py --fit-temperature: T fitted on fit_loader's split and folded into raw's head. Returns (the result
    fields temperature, nll_calibrated, ece_calibrated (%) of the reported split (`scores`, scored before the fold,
    logits kept), ood_score / ood_threshold fitted on the fit split (see calibrate_head); the safetensors metadata
    of the folded weights: T, the threshold and the class names)."""
    info = calibrate_head(raw, score_split(model, fit_loader, precision, log_name='Temperature'), ood_tpr)
    where = 'the held-out part of the training split' if fit_split == HOLDOUT else f'split {fit_split}'
    _logger.info(describe_calibration(info, where))
    before = classification_metrics(scores['logits'], scores['target'])
    after = classification_metrics(calibrated_logits(raw, scores, info), scores['target'])
    _logger.info(f'Reported split with the temperature: ECE {100 * before["ece"]:.2f}% -> {100 * after["ece"]:.2f}%, '
                 f'NLL {before["nll"]:.4f} -> {after["nll"]:.4f}')
    fields = OrderedDict(temperature=round(info['temperature'], 6), nll_calibrated=round(after['nll'], 4),
                         ece_calibrated=round(100 * after['ece'], 4), ood_score=info['ood_score'],
                         ood_threshold=info['ood_threshold'])
    return fields, _metadata(info, where, names)
