"""Embeddings out: a split's pooled embeddings, labels and logits in one .safetensors file, for retrieval, k-NN or
plots in any tool that reads safetensors (torch, numpy, jax, ...).

    save_embeddings('val_embeddings.safetensors', embeddings, labels, logits, log_likelihoods=None, class_names=None,
                    scores=None)
    data = load_embeddings('val_embeddings.safetensors')

Tensors (N samples, D embedding size, C classes): 'embeddings' (N, D), 'labels' (N,) int64, 'logits' (N, C) and,
when given, 'log_likelihoods' (N, C) (the ZZZ head's class log-likelihoods, logits without the bias) and one
'score_<name>' (N,) per out-of-distribution score (carrot_zzz.ood: msp, maxlogit, energy, maha, ll); dtypes
are kept. The class names are a JSON list in the metadata entry 'class_names'. The file is written to a temporary
name, synced and renamed (carrot_zzz.files.replacing), so an interrupted save never leaves a truncated file.
"""
import json
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch

from .files import replacing

__all__ = ['save_embeddings', 'load_embeddings']

PathLike = Union[str, os.PathLike]
_REQUIRED = ('embeddings', 'labels', 'logits')


def _safetensors_path(path: PathLike, what: str) -> str:
    path = os.fspath(path)
    if not path.endswith('.safetensors'):
        raise ValueError(f"{what} uses safetensors: give a path ending in '.safetensors', got '{path}'")
    return path


def _check_shapes(embeddings: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                  log_likelihoods: Optional[torch.Tensor], class_names: Optional[Sequence[str]]) -> None:
    n = embeddings.shape[0] if embeddings.ndim == 2 else None
    if n is None or labels.shape != (n,) or logits.ndim != 2 or logits.shape[0] != n:
        raise ValueError(f'save_embeddings: expected embeddings (N, D), labels (N,), logits (N, C), got '
                         f'{tuple(embeddings.shape)}, {tuple(labels.shape)}, {tuple(logits.shape)}')
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f'save_embeddings: labels must be class indices (an integer tensor), got {labels.dtype}')
    if log_likelihoods is not None and log_likelihoods.shape != logits.shape:
        raise ValueError(f'save_embeddings: log_likelihoods must have the shape of the logits {tuple(logits.shape)}, '
                         f'got {tuple(log_likelihoods.shape)}')
    if class_names is not None and (len(class_names) != logits.shape[1]
                                    or not all(isinstance(c, str) for c in class_names)):
        raise ValueError(f'save_embeddings: class_names must be {logits.shape[1]} strings, one per logit column, '
                         f'got {len(class_names)} entries')


def save_embeddings(
        path: PathLike,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
        log_likelihoods: Optional[torch.Tensor] = None,
        class_names: Optional[Sequence[str]] = None,
        scores: Optional[Dict[str, torch.Tensor]] = None,
) -> str:
    """Write embeddings (N, D), labels (N,), logits (N, C), optionally log_likelihoods (N, C), class_names (C
    strings) and scores {name: (N,)} (stored as 'score_<name>') to the .safetensors file path, atomically; returns
    the path. Tensors may be on any device."""
    import safetensors.torch
    path = _safetensors_path(path, 'save_embeddings')
    _check_shapes(embeddings, labels, logits, log_likelihoods, class_names)
    scores = dict(scores or {})
    wrong = [name for name, value in scores.items() if tuple(value.shape) != (logits.shape[0],)]
    if wrong:
        raise ValueError(f'save_embeddings: scores must be ({logits.shape[0]},) per sample; {", ".join(wrong)} '
                         f'are not')
    given = dict(embeddings=embeddings, labels=labels.long(), logits=logits, log_likelihoods=log_likelihoods,
                 **{f'score_{name}': value for name, value in scores.items()})
    tensors, storages = {}, set()
    for name, tensor in given.items():
        if tensor is None:
            continue
        tensor = tensor.detach().to('cpu').contiguous()
        if tensor.untyped_storage().data_ptr() in storages:               # safetensors refuses shared memory
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    metadata = {'format': 'pt'}
    if class_names is not None:
        metadata['class_names'] = json.dumps(list(class_names))
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with replacing(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return path


def load_embeddings(path: PathLike) -> Dict[str, Any]:
    """{'embeddings', 'labels', 'logits', 'log_likelihoods' and 'score_<name>' (only when saved): CPU tensors;
    'class_names': list of str or None} of a save_embeddings file. FileNotFoundError when missing, ValueError when it is not one."""
    from safetensors import safe_open
    path = _safetensors_path(path, 'load_embeddings')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no embeddings file at {path}')
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            data: Dict[str, Any] = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors errors on a truncated or corrupt file
        raise ValueError(f'{path} is not a readable safetensors file, it is truncated or corrupt '
                         f'({type(e).__name__}); write it again with save_embeddings') from e
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise ValueError(f'{path} holds no {", ".join(missing)}: it was not written by save_embeddings')
    names = metadata.get('class_names')
    data['class_names'] = json.loads(names) if names is not None else None
    return data
