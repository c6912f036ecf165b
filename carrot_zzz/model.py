"""ZZZModel: a timm backbone created with num_classes=0 plus a ZZZ (or linear) head on its pooled embedding.

    emb    = backbone.forward_head(backbone.forward_features(x), pre_logits=True)    (B, D)
    logits = head(emb)                                                                 (B, C)

D = model.head_hidden_size (the size of the embedding that feeds the head, equal to num_features for most
architectures). State dict layout: `backbone.*` (the base model's own names) and `head.*` (ZZZHead: mu, A,
v_raw, sigma2_raw, bias; linear: weight, bias). `create_zzz_model` is what every `<arch>_zzz` entrypoint
calls; the base weights load through timm's own pretrained machinery (the base entrypoint, its
pretrained_cfg and checkpoint filter), so every weight source timm supports for the base works here.
"""
import importlib
import inspect
import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn

import timm
from timm.models import load_pretrained, resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import _model_pretrained_cfgs, _model_to_module

from .weights import BACKBONE_PREFIX, _clean_key, checkpoint_keys, fit_state_dict, is_whole_model_keys
from .zzz_head import ZZZHead

__all__ = ['ZZZModel', 'HEAD_TYPES', 'ZZZ_SUFFIX', 'create_zzz_model']

ZZZ_SUFFIX = '_zzz'   # <arch>_zzz: the timm architecture with a ZZZ (or linear) head
HEAD_TYPES = ('zzz', 'linear')
# create_model kwargs consumed by the wrapper, never passed to the base
_HEAD_KWARGS = ('head_type', 'zzz_rank', 'zzz_v_min', 'zzz_sigma2_min')
_WHOLE_MODEL_SOURCES = ('local-dir', 'hf-hub')


class _FromBackbone:
    """A ZZZModel class attribute read live from `self.backbone` under the same name.

    When the base has no such attribute the read raises AttributeError, so `hasattr(model, name)` and
    `getattr(model, name, default)` answer for the wrapper exactly as they answer for the base.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Optional[nn.Module], owner: Optional[type] = None) -> Any:
        if model is None:
            return self
        return getattr(model.backbone, self.name)


def _prefix(names: Any, prefix: str = BACKBONE_PREFIX) -> Any:
    """Prefix a module name, or each of a tuple / list of them; None stays None."""
    if names is None:
        return None
    if isinstance(names, str):
        return prefix + names
    return tuple(prefix + n for n in names)


def _unprefix(names: Any, prefix: str = BACKBONE_PREFIX) -> Any:
    """Inverse of _prefix for names that carry the prefix; other names are returned unchanged."""
    if names is None:
        return None
    if isinstance(names, str):
        return names[len(prefix):] if names.startswith(prefix) else names
    return tuple(_unprefix(n, prefix) for n in names)


def _pool_type(model: nn.Module) -> Optional[str]:
    """The backbone's current global pooling type as a string ('avg', 'token', ...), None when it has none."""
    head = getattr(model, 'head', None)
    for obj in (getattr(head, 'global_pool', None), getattr(head, 'pool_type', None), getattr(model, 'global_pool', None)):
        obj = getattr(obj, 'pool_type', obj)
        if isinstance(obj, str):
            return obj
    return None


def embedding_dim(backbone: nn.Module) -> int:
    """D: size of `backbone.forward_head(x, pre_logits=True)`, timm's head_hidden_size (else num_features)."""
    dim = getattr(backbone, 'head_hidden_size', None) or getattr(backbone, 'num_features', None)
    if not isinstance(dim, int) or dim < 1:
        raise TypeError(
            f'{type(backbone).__name__} has no integer num_features / head_hidden_size, so the size of its '
            f'pooled embedding is unknown and no head can be built on it')
    return dim


def _check_forward_head(backbone: nn.Module) -> None:
    """Raise TypeError when the backbone's forward_head takes no pre_logits or is a NotImplementedError stub.

    Some timm encoders (e.g. qwen3_vit_*_enc, gemma4_vit_*_enc, mobilenetv5_*_enc) build with num_classes=0 but
    have no pooled embedding. Probing forward_head with an empty CPU tensor is free: a real head fails on the
    shape (any other error) or returns, a stub raises NotImplementedError before touching it.
    """
    try:
        params = inspect.signature(backbone.forward_head).parameters
    except (TypeError, ValueError):
        params = {}
    if params and 'pre_logits' not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise TypeError(
            f'{type(backbone).__name__}.forward_head takes no pre_logits argument: the model has no pooled '
            f'pre-logits embedding to put a classifier head on')
    try:
        with torch.no_grad():
            backbone.forward_head(torch.zeros(0), pre_logits=True)
    except NotImplementedError as e:
        raise TypeError(
            f'{type(backbone).__name__}.forward_head is not implemented ({e}): the model has no pooled '
            f'embedding to put a classifier head on') from e
    except Exception:
        pass


class ZZZModel(nn.Module):
    """A timm backbone (num_classes=0) + a ZZZHead or nn.Linear head, with timm's model API.

    Args:
        backbone: a timm model created with num_classes=0 (forward_features / forward_head(pre_logits=True)).
        num_classes: C; 0 gives a headless model whose forward returns the embedding.
        head_type: 'zzz' (ZZZHead, float32 logits) or 'linear' (nn.Linear, the plain backbone + linear head).
        zzz_rank, zzz_v_min, zzz_sigma2_min: ZZZHead's rank, v_min and sigma2_min.

    Shapes: forward(x (B, in_chans, H, W)) -> logits (B, C), or embedding (B, D) when C == 0;
        forward(x, return_embedding=True) -> (logits (B, C), embedding (B, D)) from one backbone pass.
        D = head_hidden_size.

    Base-model attributes that timm's own code and tests read on a model are the base's, read live:
    output_fmt (layout of forward_features: 'NCHW', 'NHWC' for swin / mambaout / sequencer ...),
    num_prefix_tokens, feature_dim, dynamic_img_size, patch_embed, set_input_size, feature_info (module
    names prefixed 'backbone.'), _traits (first_conv prefixed) and the base's part of _model_args.
    """

    __jit_unused_properties__ = ['global_pool', 'feature_info', '_traits', '_model_args']  # metadata, not forward

    output_fmt = _FromBackbone()
    num_prefix_tokens = _FromBackbone()
    feature_dim = _FromBackbone()
    dynamic_img_size = _FromBackbone()
    patch_embed = _FromBackbone()
    set_input_size = _FromBackbone()

    def __init__(
            self,
            backbone: nn.Module,
            num_classes: int,
            head_type: str = 'zzz',
            zzz_rank: int = 8,
            zzz_v_min: float = 1e-4,
            zzz_sigma2_min: float = 1e-4,
    ):
        super().__init__()
        self._wrapper_model_args: Dict[str, Any] = {}
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        for method in ('forward_features', 'forward_head'):
            if not callable(getattr(backbone, method, None)):
                raise TypeError(
                    f'{type(backbone).__name__} has no {method}(): a _zzz model needs timm\'s '
                    f'forward_features / forward_head(pre_logits=True) split to put a head on the pooled embedding')
        _check_forward_head(backbone)
        self.backbone = backbone
        self.head_type = head_type
        self.zzz_rank = zzz_rank
        self.zzz_v_min = zzz_v_min
        self.zzz_sigma2_min = zzz_sigma2_min
        self.num_features: int = getattr(backbone, 'num_features', None) or embedding_dim(backbone)
        self.head_hidden_size: int = embedding_dim(backbone)
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        if hasattr(backbone, 'in_chans'):
            self.in_chans = backbone.in_chans
        self._adopt_backbone_metadata()

    # --- construction helpers -----------------------------------------------------------------------
    def _make_head(self, num_classes: int) -> nn.Module:
        """A fresh head for num_classes (nn.Identity for 0), on the backbone's device, in the model's mode."""
        if num_classes < 0:
            raise ValueError(f'num_classes must be >= 0, got {num_classes}')
        if num_classes == 0:
            return nn.Identity()
        if self.head_type == 'zzz':
            head: nn.Module = ZZZHead(
                num_classes, self.head_hidden_size, rank=self.zzz_rank,
                v_min=self.zzz_v_min, sigma2_min=self.zzz_sigma2_min)
        else:
            head = nn.Linear(self.head_hidden_size, num_classes)
        param = next(self.backbone.parameters(), None)
        if param is not None:
            head = head.to(param.device)
            if self.head_type == 'linear' and param.is_floating_point():
                head = head.to(param.dtype)
        return head.train(self.training)  # as timm's reset_classifier: a new head in eval mode in an eval model

    def _adopt_backbone_metadata(self) -> None:
        """pretrained_cfg of the base, renamed for the wrapper (architecture, classifier, first_conv)."""
        cfg = dict(getattr(self.backbone, 'pretrained_cfg', None) or {})
        cfg.pop('state_dict', None)  # an in-memory source is not kept alive by the model
        arch = cfg.get('architecture')
        if arch and not arch.endswith(ZZZ_SUFFIX):
            cfg['architecture'] = arch + ZZZ_SUFFIX
        cfg['classifier'] = 'head'
        cfg['first_conv'] = _prefix(cfg.get('first_conv'))
        self.pretrained_cfg: Dict[str, Any] = cfg
        self.default_cfg = self.pretrained_cfg
        self.pretrained_model_args = dict(getattr(self.backbone, 'pretrained_model_args', None) or {})

    # --- live views of the base's metadata -------------------------------------------------------------
    @property
    def feature_info(self) -> List[Dict[str, Any]]:
        """The base's feature_info (one dict per feature level: num_chs, reduction, module), module names
        prefixed 'backbone.' so they name the wrapper's modules; AttributeError when the base has none."""
        infos = self.backbone.feature_info
        infos = getattr(infos, 'info', infos)  # a FeatureInfo holds its dicts in .info
        return [dict(f, module=_prefix(f['module'])) if f.get('module') else dict(f) for f in infos]

    @property
    def _traits(self) -> Dict[str, Any]:
        """The base's current traits (img_size, fixed_input_size, first_conv), first_conv prefixed 'backbone.'.

        Live, so a resize of the base (set_input_size) is what timm's save_for_hf records for the wrapper.
        """
        traits = dict(getattr(self.backbone, '_traits', None) or {})
        if 'first_conv' in traits:
            traits['first_conv'] = _prefix(traits['first_conv'])
        return traits

    @_traits.setter
    def _traits(self, traits: Dict[str, Any]) -> None:
        traits = dict(traits)
        if 'first_conv' in traits:
            traits['first_conv'] = _unprefix(traits['first_conv'])
        self.backbone._traits = traits

    @property
    def _model_args(self) -> Dict[str, Any]:
        """Reconstruction kwargs: the wrapper's (head kwargs, num_classes, factory kwargs) updated with the
        base's current ones (its resizes and head options), the base's num_classes=0 left out."""
        base = getattr(self.backbone, '_model_args', None) or {}
        return dict(self._wrapper_model_args, **{k: v for k, v in base.items() if k != 'num_classes'})

    @_model_args.setter
    def _model_args(self, args: Dict[str, Any]) -> None:
        self._wrapper_model_args = dict(args)

    # --- timm model API -----------------------------------------------------------------------------
    @property
    def global_pool(self) -> Optional[str]:
        """The backbone's pooling type (what timm's save_for_hf records), None when it has none."""
        return _pool_type(self.backbone)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New head for num_classes (0: headless); global_pool, when given, is set on the backbone first."""
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)
            self.num_features = getattr(self.backbone, 'num_features', None) or embedding_dim(self.backbone)
            self.head_hidden_size = embedding_dim(self.backbone)
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        """Layer groups of the base (for layer decay), as a name -> ordinal fn; the head joins the last group.

        Parameter 'backbone.<n>' gets the ordinal the base's group_matcher gives '<n>'; everything the base
        leaves unmatched (final norm) and the head map to +inf, the last group, as the base's own head does.
        """
        if not callable(getattr(self.backbone, 'group_matcher', None)):  # one backbone group, then the head
            return lambda name: (0.0,) if name.startswith(BACKBONE_PREFIX) else (float('inf'),)
        base = self.backbone.group_matcher(coarse=coarse)
        if callable(base):
            base_fn = base
        else:
            compiled = []
            for ordinal, spec in enumerate(base.values()):
                if spec is None:
                    continue
                specs = spec if isinstance(spec, (tuple, list)) else [(spec, None)]
                compiled += [(re.compile(pattern), (ordinal,), suffix) for pattern, suffix in specs]

            def base_fn(name: str) -> Tuple[float, ...]:
                for regex, prefix, suffix in compiled:
                    match = regex.match(name)
                    if match:
                        parts = (*prefix, *(g for g in match.groups() if g is not None), *(suffix or ()))
                        return tuple(float(p) for p in parts)
                return (float('inf'),)

        def matcher(name: str) -> Tuple[float, ...]:
            if name.startswith(BACKBONE_PREFIX):
                ordinal = base_fn(name[len(BACKBONE_PREFIX):])
                return tuple(ordinal) if isinstance(ordinal, (tuple, list)) else (ordinal,)
            return (float('inf'),)

        return matcher

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        fn = getattr(self.backbone, 'no_weight_decay', None)
        return {BACKBONE_PREFIX + n for n in fn()} if callable(fn) else set()

    def forward_features(self, x: torch.Tensor) -> Any:
        """The backbone's unpooled features (B, ..., num_features), as the base's forward_features."""
        return self.backbone.forward_features(x)

    def forward_head(self, x: Any, pre_logits: bool = False) -> torch.Tensor:
        """Features -> embedding (B, D) when pre_logits, else head logits (B, C)."""
        emb = self.backbone.forward_head(x, pre_logits=True)
        return emb if pre_logits else self.head(emb)

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """The backbone's forward_intermediates (same arguments and outputs)."""
        return self.backbone.forward_intermediates(x, **kwargs)

    def forward(
            self, x: torch.Tensor, return_embedding: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """x (B, in_chans, H, W) -> logits (B, C); with return_embedding, (logits, embedding (B, D)), one pass."""
        emb = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        logits = self.head(emb)
        return (logits, emb) if return_embedding else logits


# --- factory: what every <arch>_zzz entrypoint calls ---------------------------------------------------

def _base_cfg(arch: str, cfg: PretrainedCfg) -> Dict[str, Any]:
    """The resolved `_zzz` pretrained cfg expressed for the base: its architecture name and module names.

    The classifier name comes from the base's registered cfg (the `_zzz` cfg of a saved model names the
    wrapper's 'head'), and a 'backbone.'-prefixed first_conv is stripped.
    """
    out = cfg.to_dict()
    out['architecture'] = arch
    out['first_conv'] = _unprefix(out.get('first_conv'))
    registered = _model_pretrained_cfgs.get(f'{arch}.{cfg.tag}') or _model_pretrained_cfgs.get(arch)
    if registered is not None:
        out['classifier'] = registered.classifier
    return out


def _has_whole_model_weights(cfg: PretrainedCfg) -> bool:
    """True when the weight source is a saved `_zzz` model (backbone.* + head.*), False for base weights.

    A `local-dir:` / `hf-hub:` model name always names a whole model (its config.json has the `_zzz`
    architecture); an in-memory state_dict or a native weight file is told apart by its key names.
    Mirrors the source priority of timm's loader: model-name source, then state_dict, then file.
    """
    if cfg.source in _WHOLE_MODEL_SOURCES:
        return True
    if cfg.state_dict is not None:
        return is_whole_model_keys(cfg.state_dict.keys())
    if cfg.file and not cfg.custom_load and not str(cfg.file).lower().endswith(('.npz', '.npy')):
        return is_whole_model_keys(checkpoint_keys(cfg.file))
    return False


def _fit_whole_model(state_dict: Dict[str, torch.Tensor], model: 'ZZZModel', arch: str, name: str):
    """A whole saved `_zzz` model's state_dict, made to fit `model` as timm does for the base architecture.

    The backbone part goes through the base architecture's own checkpoint filter (e.g. a ViT's position
    embedding resampled to another image size); the input convolutions whose channel count differs are left
    for timm's load_pretrained to adapt (in_chans); everything else must fit exactly (fit_state_dict).
    """
    state_dict = {_clean_key(k): v for k, v in state_dict.items()}
    module = _model_to_module.get(arch)
    base_filter = getattr(importlib.import_module(f'timm.models.{module}'), 'checkpoint_filter_fn', None) \
        if module else None
    if base_filter is not None:
        backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(BACKBONE_PREFIX)}
        state_dict.update({BACKBONE_PREFIX + k: v for k, v in base_filter(backbone, model.backbone).items()})
    expected = model.state_dict()
    first_convs = model.pretrained_cfg.get('first_conv') or ()
    adapted_later = {k: state_dict[k] for k in (f'{c}.weight' for c in (
        (first_convs,) if isinstance(first_convs, str) else first_convs))
        if k in state_dict and k in expected and state_dict[k].shape[1] != expected[k].shape[1]}
    state_dict.update({k: expected[k] for k in adapted_later})   # checked as fitting; timm adapts them next
    state_dict = fit_state_dict(state_dict, model, new_head_ok=True, what=name)
    state_dict.update(adapted_later)
    return state_dict


def create_zzz_model(
        arch: str,
        pretrained: bool = False,
        pretrained_cfg: Optional[Union[str, Dict[str, Any], PretrainedCfg]] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[Any] = None,
        **kwargs: Any,
) -> nn.Module:
    """Build `<arch>_zzz`: timm.create_model(arch, num_classes=0, **backbone kwargs) wrapped in ZZZModel.

    pretrained=True loads, by the resolved pretrained cfg of `<arch>_zzz[.tag]` (+ overlay):
      * base weights (a registered tag, url / hf hub id, or a `file` / `state_dict` of the base model) into
        the backbone, through the base's own entrypoint (its pretrained_cfg, filter fn, in_chans adaption);
        the head starts fresh;
      * a whole saved `_zzz` model (`local-dir:` / `hf-hub:` names, or a file / state_dict with backbone.* and
        head.* keys) into the wrapper, through timm's load_pretrained; the backbone part gets what timm gives
        the base architecture (its checkpoint filter, e.g. position embeddings resampled to another img_size,
        and in_chans adaptation); the head is kept when it fits and re-initialised when num_classes differs
        from the checkpoint's; any other mismatch raises.
    features_only=True returns the base's feature extractor (base weights only).
    Wrapper kwargs: num_classes, head_type, zzz_rank, zzz_v_min, zzz_sigma2_min; all others go to the base.
    """
    name = arch + ZZZ_SUFFIX
    head_kwargs = {k: kwargs.pop(k) for k in _HEAD_KWARGS if k in kwargs}
    source_args = kwargs.pop('pretrained_model_args', None)
    if source_args:
        source_args = {k: v for k, v in source_args.items() if k not in _HEAD_KWARGS and k != 'num_classes'}
    # resolving under the _zzz name makes an unknown tag fail naming the name the user typed
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    whole = pretrained and _has_whole_model_weights(cfg)
    base_cfg = _base_cfg(arch, cfg)
    if kwargs.get('features_only'):
        kwargs.pop('num_classes', None)
        if whole:
            raise ValueError(
                f'{name}: features_only=True loads base-model weights only, but the weight source is a whole '
                f'{ZZZ_SUFFIX} model; create the {ZZZ_SUFFIX} model and use its .backbone instead')
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=base_cfg, cache_dir=cache_dir, **kwargs)

    num_classes = kwargs.pop('num_classes', None)
    if num_classes is None:
        num_classes = cfg.num_classes if cfg.num_classes is not None and cfg.num_classes >= 0 else 1000
    backbone = _build_backbone(arch, name, pretrained and not whole, base_cfg, cache_dir, source_args, kwargs)
    try:
        model = ZZZModel(backbone, num_classes, **head_kwargs)
    except TypeError as e:
        raise RuntimeError(f"{name}: the head of '{arch}' cannot be replaced: {e}") from e
    # recorded for save_for_hf / local-dir reconstruction; create_model merges its own kwargs over these
    model._model_args = dict(head_type=model.head_type) if model.head_type != 'zzz' else dict(
        head_type='zzz', zzz_rank=model.zzz_rank, zzz_v_min=model.zzz_v_min, zzz_sigma2_min=model.zzz_sigma2_min)
    if whole:
        _load_whole_model(model, arch, name, base_cfg, kwargs.get('in_chans', 3), cache_dir)
    getattr(backbone, 'pretrained_cfg', {}).pop('state_dict', None)  # do not keep an in-memory source alive
    return model


def _build_backbone(arch: str, name: str, pretrained: bool, base_cfg: Dict[str, Any], cache_dir, source_args,
                    kwargs: Dict[str, Any]) -> nn.Module:
    """timm.create_model(arch, num_classes=0, ...) with the base's weights when pretrained; a RuntimeError naming
    `name` for any failure but a missing file or hub (OSError, raised as it is)."""
    try:
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=base_cfg, cache_dir=cache_dir,
                                 pretrained_model_args=source_args or None, num_classes=0, **kwargs)
    except OSError:  # a missing weight file or an unreachable hub: not the architecture's fault
        raise
    except Exception as e:
        raise RuntimeError(
            f"{name}: building the base timm.create_model('{arch}', num_classes=0, ...) failed: "
            f"{type(e).__name__}: {e}") from e


def _load_whole_model(model: nn.Module, arch: str, name: str, base_cfg: Dict[str, Any], in_chans: int,
                      cache_dir) -> None:
    """A whole saved `_zzz` model into the wrapper through timm's load_pretrained (see create_zzz_model)."""
    load_cfg = dict(model.pretrained_cfg, **{k: v for k, v in base_cfg.items() if k in ('state_dict',)})
    load_cfg['classifier'] = None  # the head is handled by fit_state_dict, not dropped by name
    load_pretrained(model, pretrained_cfg=load_cfg, num_classes=model.num_classes, in_chans=in_chans,
                    filter_fn=lambda sd, m: _fit_whole_model(sd, m, arch, name), strict=True, cache_dir=cache_dir)
