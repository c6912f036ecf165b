"""Save / load a model's whole weights as safetensors, failing loudly on any checkpoint that does not fit.

    save_weights(model, 'run/model.safetensors')     state_dict + metadata (architecture, head), atomic write
    load_weights(model, 'run/model.safetensors')     exact round trip, or ValueError naming the mismatch

The file is a plain safetensors state dict (keys `backbone.*`, `head.*` for a `_zzz` model), so timm's
`load_checkpoint(model, path)` and `create_model(name, checkpoint_path=path)` read it as well.
DDP / torch.compile wrappers are unwrapped on both sides, so the keys never carry 'module.' / '_orig_mod.'.
"""
import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .files import replacing
from .version import __version__

__all__ = ['save_weights', 'load_weights', 'fit_state_dict', 'checkpoint_keys', 'is_whole_model_keys', 'head_info',
           'describe_checkpoint', 'BACKBONE_PREFIX', 'HEAD_PREFIX', 'CLASS_NAMES_KEY', 'TEMPERATURE_KEY']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DDP / torch.compile, in either order
BACKBONE_PREFIX, HEAD_PREFIX = 'backbone.', 'head.'   # a carrot_zzz model's state dict: backbone.* and head.*
CLASS_NAMES_KEY = 'class_names'   # metadata entry (JSON list) and .pth.tar entry (list): names in label order
TEMPERATURE_KEY = 'temperature'   # metadata entry: the logit temperature folded into the weights


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, '_orig_mod') and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _clean_key(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split('.', 1)[1]
    return key


def load_checkpoint_file(path: PathLike, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) on the CPU that also takes timm's training checkpoints (their `args` is an
    argparse.Namespace, which weights_only refuses unless allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location='cpu', weights_only=True, mmap=mmap)


def checkpoint_keys(path: PathLike) -> List[str]:
    """Tensor names of a weight file (.safetensors header only; .pth/.bin memory-mapped), wrapper prefixes removed."""
    path = str(path)
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            keys: Iterable[str] = list(f.keys())
    else:
        try:
            ckpt = load_checkpoint_file(path, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            ckpt = load_checkpoint_file(path)
        try:
            ckpt, _ = _state_dict_of(ckpt, use_ema=True)     # timm's lookup order, the EMA entry first
        except ValueError:
            pass
        keys = ckpt.keys() if isinstance(ckpt, dict) else []
    return [_clean_key(k) for k in keys]


def is_whole_model_keys(keys: Iterable[str]) -> bool:
    """True for the keys of a saved `_zzz` model: all under backbone. / head., at least one backbone. key."""
    keys = list(keys)
    return (any(k.startswith(BACKBONE_PREFIX) for k in keys)
            and all(k.startswith((BACKBONE_PREFIX, HEAD_PREFIX)) for k in keys))


def head_info(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Any]:
    """Head type, class count and ZZZ rank read off head.* tensor shapes (empty when there is no head)."""
    if 'head.mu' in shapes:
        return dict(head_type='zzz', num_classes=shapes['head.mu'][0],
                    zzz_rank=shapes['head.A'][-1] if 'head.A' in shapes else 0)
    if 'head.weight' in shapes:
        return dict(head_type='linear', num_classes=shapes['head.weight'][0])
    if not any(k.startswith(HEAD_PREFIX) for k in shapes):
        return dict(num_classes=0)
    return {}


def describe_checkpoint(state_dict: Dict[str, torch.Tensor], model_name: str) -> Dict[str, Any]:
    """What a checkpoint says about the model it holds: for a saved `_zzz` model (backbone.* / head.* keys) its head
    type, class count and ZZZ rank (head_info), plus whole=True; for a plain timm model the class count read off the
    classifier that timm's pretrained config names for `model_name` (empty when unknown)."""
    shapes = {_clean_key(k): tuple(v.shape) for k, v in state_dict.items()}
    if is_whole_model_keys(shapes):
        return {**head_info(shapes), 'whole': True}
    from timm.models import get_pretrained_cfg
    try:
        classifier = get_pretrained_cfg(model_name.split('.')[0]).classifier
    except Exception:     # no pretrained config for this name: nothing to read
        return {}
    for name in ([classifier] if isinstance(classifier, str) else list(classifier or ())):
        shape = shapes.get(f'{name}.weight', shapes.get(f'{name}.bias'))
        if shape is not None:
            return dict(num_classes=shape[0])
    return {}


_CLASSIFIER_NAMES = ('fc', 'head', 'head.fc', 'classifier', 'last_linear')    # timm's usual final layers


def _plain_weights_reason(ckpt: Dict[str, Tuple[int, ...]]) -> str:
    """Why a plain timm model's state dict does not load into a carrot_zzz model, and what does load it."""
    classes = next((ckpt[f'{name}.weight'][0] for name in _CLASSIFIER_NAMES
                    if len(ckpt.get(f'{name}.weight', ())) == 2), None)
    head = f'a classifier of {classes} classes' if classes else 'no classifier'
    return (f"it holds a plain timm model's weights ({head}), not a carrot_zzz model's (backbone.* / head.*): "
            f"validate it as that model (the name without _zzz), or start a _zzz model from it with "
            f"train.py --pretrained --pretrained-path FILE")


def _describe_mismatch(
        ckpt: Dict[str, Tuple[int, ...]],
        model: Dict[str, Tuple[int, ...]],
        ckpt_arch: Optional[str] = None,
        model_arch: Optional[str] = None,
) -> List[str]:
    """Human-readable reasons why checkpoint tensor shapes do not fit the model's; empty when they fit."""
    reasons = []
    missing = [k for k in model if k not in ckpt]
    unexpected = [k for k in ckpt if k not in model]
    wrong = [k for k in model if k in ckpt and tuple(ckpt[k]) != tuple(model[k])]
    if not (missing or unexpected or wrong):
        return reasons
    if is_whole_model_keys(model) and not is_whole_model_keys(ckpt):
        return [_plain_weights_reason(ckpt)]
    if ckpt_arch and model_arch and ckpt_arch != model_arch:
        reasons.append(f"architecture: the checkpoint is '{ckpt_arch}', the model '{model_arch}'")
    hc, hm = head_info(ckpt), head_info(model)
    if hc.get('num_classes') != hm.get('num_classes'):
        reasons.append(f"class count: the checkpoint has {hc.get('num_classes', '?')} classes, the model "
                       f"{hm.get('num_classes', '?')} (create the model with num_classes={hc.get('num_classes', '?')})")
    if hc.get('head_type') and hm.get('head_type') and hc['head_type'] != hm['head_type']:
        reasons.append(f"head type: the checkpoint has a '{hc['head_type']}' head, the model a '{hm['head_type']}' "
                       f"head (create the model with head_type='{hc['head_type']}')")
    elif hc.get('zzz_rank') is not None and hm.get('zzz_rank') is not None and hc['zzz_rank'] != hm['zzz_rank']:
        reasons.append(f"ZZZ rank: the checkpoint has rank {hc['zzz_rank']}, the model {hm['zzz_rank']} "
                       f"(create the model with zzz_rank={hc['zzz_rank']})")
    body = [k for k in missing + unexpected + wrong if not k.startswith(HEAD_PREFIX)]
    if body:
        examples = [f'{k} {tuple(ckpt[k])} vs {tuple(model[k])}' for k in wrong if not k.startswith(HEAD_PREFIX)][:2]
        examples += [f'{k} missing from the checkpoint' for k in missing if not k.startswith(HEAD_PREFIX)][:2]
        examples += [f'{k} not in the model' for k in unexpected if not k.startswith(HEAD_PREFIX)][:2]
        n_missing = sum(not k.startswith(HEAD_PREFIX) for k in missing)
        n_unexpected = sum(not k.startswith(HEAD_PREFIX) for k in unexpected)
        n_wrong = sum(not k.startswith(HEAD_PREFIX) for k in wrong)
        reasons.append(
            f'backbone / architecture: {n_missing} tensors missing, {n_unexpected} unexpected, {n_wrong} of '
            f'another shape (e.g. {"; ".join(examples)}); the checkpoint is of another architecture or size')
    if not reasons:  # head tensors differ in some other way (e.g. embedding size)
        k = (wrong + missing + unexpected)[0]
        reasons.append(f'head: {k} is {ckpt.get(k, "absent")} in the checkpoint, {model.get(k, "absent")} in the model')
    return reasons


def fit_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        new_head_ok: bool = False,
        what: str = 'checkpoint',
        checkpoint_arch: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """Check that state_dict fits model exactly (names and shapes); return the dict to load strictly.

    new_head_ok: when only the head differs and the checkpoint's class count differs from the model's
        (timm's rule for a new head), the model's freshly initialised head tensors replace the checkpoint's.
    Raises ValueError naming each mismatch (class count, head type, ZZZ rank, architecture) otherwise.
    """
    state_dict = {_clean_key(k): v for k, v in state_dict.items()}
    expected = unwrap_model(model).state_dict()
    ckpt_shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    model_shapes = {k: tuple(v.shape) for k, v in expected.items()}
    model_arch = (getattr(unwrap_model(model), 'pretrained_cfg', None) or {}).get('architecture')
    reasons = _describe_mismatch(ckpt_shapes, model_shapes, checkpoint_arch, model_arch)
    if not reasons:
        return state_dict
    body_fits = not any(
        not k.startswith(HEAD_PREFIX) and ckpt_shapes.get(k) != model_shapes.get(k)
        for k in set(ckpt_shapes) | set(model_shapes))
    ckpt_classes = head_info(ckpt_shapes).get('num_classes')
    if new_head_ok and body_fits and ckpt_classes != getattr(model, 'num_classes', None):
        _logger.info(f'{what}: checkpoint head has {ckpt_classes} classes, model {model.num_classes}: new head')
        out = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
        out.update({k: v for k, v in expected.items() if k.startswith(HEAD_PREFIX)})
        return out
    raise ValueError(f'{what} does not fit the model: ' + '; '.join(reasons))


def save_weights(model: nn.Module, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the model's state_dict (all parameters and persistent buffers) to a .safetensors file.

    Metadata records the architecture, head type, class count and rank (strings). Tensors that share
    storage are stored as copies, so every key is present for timm's load_checkpoint. The file is written
    to a temporary name, synced and renamed, so an interrupted save never leaves a truncated file at `path`.
    Returns the path.
    """
    import safetensors.torch
    path = Path(path)
    if path.suffix != '.safetensors':
        raise ValueError(f"save_weights writes safetensors: give a path ending in '.safetensors', got '{path}'")
    model = unwrap_model(model)
    tensors: Dict[str, torch.Tensor] = {}
    seen = set()
    for k, v in model.state_dict().items():
        v = v.detach().to('cpu').contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and ptr in seen:
            v = v.clone()
        seen.add(ptr)
        tensors[k] = v
    meta = {'format': 'pt', 'producer': f'carrot_zzz {__version__}'}
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('architecture'):
        meta['architecture'] = str(cfg['architecture'])
    for attr in ('num_classes', 'head_type', 'zzz_rank', 'head_hidden_size'):
        if hasattr(model, attr) and not (attr == 'zzz_rank' and getattr(model, 'head_type', 'zzz') != 'zzz'):
            meta[attr] = str(getattr(model, attr))
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(str(path)) as tmp:   # synced, 0644, renamed: a kill leaves the old file or the new one
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
    return path


def _state_dict_of(checkpoint: Any, use_ema: bool) -> Tuple[Dict[str, torch.Tensor], str]:
    """(weights, the entry they came from) of a torch checkpoint: its EMA entry when use_ema and present, else
    'state_dict' / 'model', else the checkpoint itself when it is a plain name -> tensor mapping."""
    if isinstance(checkpoint, dict):
        for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key], key
        if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            return checkpoint, 'weights'
    raise ValueError('it holds no state_dict / model entry nor a plain mapping of names to tensors')


def _stored_entries(checkpoint: Any) -> Dict[str, str]:
    """The metadata a training checkpoint carries beside its weights, as safetensors metadata strings:
    class_names (a JSON list) when it holds a list."""
    names = checkpoint.get(CLASS_NAMES_KEY) if isinstance(checkpoint, dict) else None
    return {CLASS_NAMES_KEY: json.dumps(names)} if isinstance(names, list) else {}


def read_weights(path: PathLike, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state_dict on CPU, metadata) of a .safetensors file, or of a torch checkpoint (.pth.tar / .pth / .bin:
    timm's training checkpoints included, read with weights_only; the EMA weights when use_ema and present); the
    metadata of a torch checkpoint is {'entry': the dict entry read} plus its class names (JSON, key
    'class_names') when it has them. Wrapper prefixes (module., _orig_mod.) go.

    Raises FileNotFoundError for a missing file and ValueError for an unreadable (truncated / corrupt) one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no weight file at {path}')
    try:
        if path.suffix == '.safetensors':
            from safetensors import safe_open
            with safe_open(str(path), framework='pt', device='cpu') as f:
                meta = dict(f.metadata() or {})
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        else:
            checkpoint = load_checkpoint_file(path)
            state_dict, entry = _state_dict_of(checkpoint, use_ema)
            meta = {'entry': entry, **_stored_entries(checkpoint)}
    except Exception as e:  # safetensors / torch.load errors on a truncated or corrupt file
        raise ValueError(
            f'{path} is not a readable weight file, it is truncated or corrupt ({type(e).__name__}: '
            f'{str(e).splitlines()[0] if str(e) else ""}); save it again with save_weights') from e
    return {_clean_key(k): v for k, v in state_dict.items()}, meta


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a save_weights file into model in place, exactly; returns model.

    Raises ValueError naming the mismatch when the file does not fit (class count, head type, ZZZ rank,
    architecture / backbone tensors) or cannot be read (truncated), FileNotFoundError when it is missing.
    Nothing is loaded unless everything fits.
    """
    state_dict, meta = read_weights(path)
    target = unwrap_model(model)
    state_dict = fit_state_dict(state_dict, target, what=str(path), checkpoint_arch=meta.get('architecture'))
    target.load_state_dict(state_dict, strict=True)
    return model
