"""`--head-init data`: the classifier starts from a closed-form fit on the backbone's features of the training split.

One pass over the training samples through the evaluation transform (no augmentation, no gradient) gives the pooled
embeddings; then a ZZZ head gets its per-class probabilistic PCA and one temperature (ZZZHead.init_from_features,
the temperature fitted on the held-out part when holdout_fraction is set; a fit whose held-out NLL is no better than
a uniform guess keeps the default start, with a warning), a linear head a multinomial logistic regression
(carrot_zzz.linear_probe.fit_linear_head), the same start for both so comparisons are fair. Without pretrained
weights a warning says the features are random. Done before the EMA copy, compilation and DDP wrapping: DDP's
construction broadcasts rank 0's weights, so every process starts from the same head. A resumed run keeps its trained head.
"""
import argparse
import logging
import math
import time
from typing import Dict

import torch
from torch import nn

from .evaluate import logits_and_embedding, predict
from ..linear_probe import fit_linear_head
from ..zzz_head import ZZZHead
from .data import TrainingData, eval_loader, training_part_for_eval
from .errors import SettingError
from .precision import Precision

__all__ = ['HEAD_INITS', 'init_head_from_data']

HEAD_INITS = ('default', 'data')


def _embed(model: nn.Module, dataset, cfg: argparse.Namespace, data: TrainingData, precision: Precision, name: str):
    """(embeddings (N, D) float32, labels (N,)) of `dataset` on the CPU, in dataset order (outside inference mode)."""
    loader = eval_loader(cfg, dataset, data.data_config, precision)
    scores = predict(model, loader, precision, channels_last=cfg.channels_last, forward=logits_and_embedding(model),
                     log_every=cfg.log_interval if cfg.rank == 0 else 0, log_name=name, dataset_length=len(dataset))
    return scores['embedding'].clone(), scores['target'].clone()     # normal tensors: the fit may use autograd


def _ran_away(info: Dict[str, float]) -> bool:
    """Whether a ZZZ fit's temperature failed: its held-out NLL is no better than a uniform guess over the classes."""
    nll = info.get('nll_after', math.nan)
    return info.get('classes_fitted', 0) > 1 and math.isfinite(nll) and nll >= math.log(info['classes_fitted']) - 1e-6


def init_head_from_data(model: nn.Module, cfg: argparse.Namespace, data: TrainingData, precision: Precision,
                        logger: logging.Logger) -> Dict[str, float]:
    """Fit the model's classifier to its features of the training split (see module doc); returns what was fitted,
    with the seconds the feature pass and the fit took."""
    head = model.get_classifier()
    if not isinstance(head, (ZZZHead, nn.Linear)):
        raise SettingError('head_init', 'data', f'fits a ZZZ or a linear head; {type(head).__name__} is neither: '
                                                f'use head_init=default')
    if not (cfg.pretrained or cfg.initial_checkpoint):
        logger.warning('head_init data on a backbone without pretrained weights (no pretrained, no '
                       'initial_checkpoint): its features are random, so the fit has little to find')
    start = time.time()
    feats, labels = _embed(model, training_part_for_eval(cfg, data), cfg, data, precision, 'Head init')
    held = _embed(model, data.eval_dataset, cfg, data, precision, 'Head init (held out)') if data.holdout else None
    passed = time.time() - start
    with torch.no_grad():
        if isinstance(head, ZZZHead):
            default = {k: v.clone() for k, v in head.state_dict().items()}
            info = head.init_from_features(feats.to(precision.device), labels.to(precision.device),
                                           holdout=tuple(t.to(precision.device) for t in held) if held else None)
            if _ran_away(info):
                head.load_state_dict(default)
                logger.warning(f'head_init data: the fitted temperature ran away (tau {info["tau"]:.3g}, held-out NLL '
                               f'{info["nll_after"]:.4g} not below ln {info["classes_fitted"]} = '
                               f'{math.log(info["classes_fitted"]):.4g}, a uniform guess): the features do not '
                               f'separate the classes; the head keeps its default start')
                info['kept_default'] = 1.0
        else:
            info = fit_linear_head(head, feats.to(precision.device), labels.to(precision.device))
    fitted = time.time() - start - passed
    shown = ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in info.items())
    logger.info(f'Head fitted to the data: {len(labels)} training samples{" + %d held out" % len(held[1]) if held else ""}'
                f'; feature pass {passed:.1f}s, fit {fitted:.1f}s; {shown}')
    return {**info, 'feature_seconds': passed, 'fit_seconds': fitted}
