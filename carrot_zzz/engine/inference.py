"""What inference.py does with the scores of the one evaluation loop: a table of top-k predictions per image, the
class names the checkpoint stores as labels, and an "unknown" answer from the stored out-of-distribution threshold.

    rule = unknown_rule(cfg, meta, head)                       (score name, threshold) or None
    forward = onnx_forward(path, num_classes)                  --onnx: the logits from onnxruntime
    rows = prediction_rows(cfg, filenames, scores, labels, rule)      one dict per image, timm's columns
    rows += error_rows(cfg, bad)                                      unreadable images: file name + error

Columns (names set by the flags, defaults in brackets): the file name [filename]; with --include-index the top-k
class indices [index]; unless --label-type none the top-k labels [label]; unless --exclude-output the top-k
probabilities or logits [prob / logit]. One value per cell for --topk 1, a list otherwise, or one column per rank
with --results-separate-col (index_0, label_0, prob_0, ...). With --reject-unknown: ood_<score> (the image's score),
ood_threshold, unknown (True when the score is below the threshold; the top-1 label then reads 'unknown').
"""
import argparse
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data.classes import names_or_indices
from ..ood import OODScorer, default_ood_score
from .errors import SettingError, first_line

__all__ = ['UNKNOWN', 'LABEL_TYPES', 'OUTPUT_TYPES', 'unknown_rule', 'onnx_forward', 'label_names', 'sample_names',
           'prediction_rows', 'error_rows']

UNKNOWN = 'unknown'
LABEL_TYPES = ('none', 'name', 'description', 'detailed')    # timm's; a checkpoint stores names only
OUTPUT_TYPES = ('prob', 'logit')


def unknown_rule(cfg: argparse.Namespace, meta: Dict[str, str], head: Optional[nn.Module]
                 ) -> Optional[Tuple[str, float]]:
    """(score name, threshold) of --reject-unknown: the checkpoint's stored ones, the threshold overridden by
    --ood-threshold; None without --reject-unknown. SettingError when there is no threshold or the head cannot
    give the stored score."""
    if not cfg.reject_unknown:
        return None
    name = meta.get('ood_score') or default_ood_score(head)
    threshold = cfg.ood_threshold if cfg.ood_threshold is not None else meta.get('ood_threshold')
    if threshold is None:
        raise SettingError('reject_unknown', True, 'the checkpoint stores no out-of-distribution threshold; pass '
                                                   'ood_threshold=X, or the model_best.safetensors of a train.py run '
                                                   'with an evaluation split, or the file of validate.py '
                                                   '--fit-temperature SPLIT --save-calibrated FILE')
    if name not in OODScorer(head).names:
        raise SettingError('reject_unknown', True, f'the stored score {name!r} needs a ZZZ head; this model\'s head '
                                                   f'is {type(head).__name__}')
    return name, float(threshold)


def onnx_forward(path: str, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> logits through an exported model (README's ONNX recipe) on onnxruntime. SettingError when
    onnxruntime is missing, the file cannot be loaded, or its output does not have num_classes columns."""
    try:
        import onnxruntime
    except ImportError as e:
        raise SettingError('onnx', path, 'needs onnxruntime: pip install ".[onnx]"') from e
    if not os.path.isfile(path):
        raise SettingError('onnx', path, 'no such file; pass the .onnx file of README\'s export recipe')
    try:
        session = onnxruntime.InferenceSession(path, providers=onnxruntime.get_available_providers())
    except Exception as e:    # onnxruntime's own error types for a corrupt or foreign file
        raise SettingError('onnx', path, f'cannot load it ({first_line(e)}); export it again with README\'s '
                                         f'recipe') from e
    name, width = session.get_inputs()[0].name, session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width != num_classes:
        raise SettingError('onnx', path, f'gives {width} logits, the checkpoint has {num_classes} classes; pass '
                                         f'the checkpoint it was exported from')

    def forward(images: torch.Tensor) -> torch.Tensor:
        logits = session.run(None, {name: images.float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)
    return forward


def label_names(names: Optional[Sequence[str]], num_classes: int, label_type: str) -> Optional[List[str]]:
    """The label of each class: the checkpoint's class names, else the indices; None for label_type 'none'."""
    return None if label_type == 'none' else names_or_indices(names, num_classes)


def sample_names(dataset, fullname: bool) -> List[str]:
    """The file name of each sample (the whole path with fullname), or its index where the data set has no files."""
    if hasattr(dataset, 'filenames'):
        return [str(name) for name in dataset.filenames(basename=not fullname)]
    return [str(i) for i in range(len(dataset))]


def _ranked(cfg: argparse.Namespace, column: str, values: List[Any]) -> Dict[str, Any]:
    """One top-k column: a value (k = 1), a list, or one column per rank (results_separate_col)."""
    if cfg.results_separate_col and len(values) > 1:
        return OrderedDict((f'{column}_{i}', v) for i, v in enumerate(values))
    return {column: values[0] if len(values) == 1 else values}


def prediction_rows(cfg: argparse.Namespace, filenames: Sequence[str], scores: Dict[str, torch.Tensor],
                    labels: Optional[List[str]], rule: Optional[Tuple[str, float]]) -> List[Dict[str, Any]]:
    """The rows of the predicted images (module doc), from predict's scores (logits kept; score_<name> for the
    rule)."""
    logits = scores['logits'].float()
    outputs = torch.softmax(logits, 1) if cfg.output_type == 'prob' else logits
    top, index = outputs.topk(min(cfg.topk, outputs.shape[1]), dim=1)
    output_col = cfg.output_col or cfg.output_type
    rows = []
    for i, name in enumerate(filenames):
        row = OrderedDict([(cfg.filename_col, name)])
        value = scores[f'score_{rule[0]}'][i].item() if rule is not None else None
        if cfg.include_index:
            row.update(_ranked(cfg, cfg.index_col, index[i].tolist()))
        if labels is not None:
            ranked = [labels[c] for c in index[i].tolist()]
            if rule is not None and value < rule[1]:
                ranked[0] = UNKNOWN
            row.update(_ranked(cfg, cfg.label_col, ranked))
        if not cfg.exclude_output:
            row.update(_ranked(cfg, output_col, top[i].tolist()))
        if rule is not None:
            row.update({f'ood_{rule[0]}': value, 'ood_threshold': rule[1], UNKNOWN: value < rule[1]})
        rows.append(row)
    return rows


def error_rows(cfg: argparse.Namespace, bad: Sequence[Tuple[str, str]]) -> List[Dict[str, Any]]:
    """A row per unreadable image: its file name and the reason, in an `error` column."""
    return [OrderedDict([(cfg.filename_col, path if cfg.fullname else os.path.basename(path)), ('error', why)])
            for path, why in bad]
