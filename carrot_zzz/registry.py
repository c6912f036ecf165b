"""Registers `<arch>_zzz` in timm's model registry for every timm architecture: the base + a ZZZ head.

Importing `carrot_zzz` calls `register_zzz()` once, which registers one lazy entrypoint per architecture
that `timm.list_models()` returns (deprecated names excluded) through `timm.models.register_model`:

    timm.create_model('resnet50_zzz.a1_in1k', pretrained=True, num_classes=200, zzz_rank=8)

Each entrypoint only records its base architecture name: nothing is built or imported until it is called.
The base's pretrained tags are mirrored (`<arch>_zzz.<tag>` names the same weights as `<arch>.<tag>`)
by handing register_model this module's `default_cfgs`, the same mechanism timm's own model modules use,
so `timm.list_models('*_zzz', pretrained=True)`, `timm.is_model_pretrained` and tag errors behave as for
the base. Architectures that other packages register later are added with `register_zzz(name)`.
"""
from collections import deque
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from timm.models import register_model
from timm.models._pretrained import DefaultCfg
from timm.models._registry import _deprecated_models, _model_default_cfgs, _model_entrypoints, _model_pretrained_cfgs

from .model import ZZZ_SUFFIX, create_zzz_model

__all__ = ['ZZZ_SUFFIX', 'register_zzz', 'zzz_name', 'base_name', 'is_zzz_name']


# '<arch>_zzz' -> DefaultCfg: read by timm's register_model (as for timm's own modules) to register the tags
default_cfgs: Dict[str, DefaultCfg] = {}


def zzz_name(arch: str) -> str:
    """'resnet50' -> 'resnet50_zzz' (a pretrained tag is kept: 'resnet50.a1_in1k' -> 'resnet50_zzz.a1_in1k')."""
    arch, dot, tag = arch.partition('.')
    return arch + ZZZ_SUFFIX + dot + tag


def is_zzz_name(name: str) -> bool:
    """Whether a model name is a carrot_zzz one: 'resnet50_zzz' and 'resnet50_zzz.a1_in1k' are, 'resnet50' is not."""
    return name.partition('.')[0].endswith(ZZZ_SUFFIX)


def base_name(name: str) -> str:
    """'resnet50_zzz' -> 'resnet50' (tag kept); raises ValueError for a name without the suffix."""
    if not is_zzz_name(name):
        raise ValueError(f"'{name}' is not a {ZZZ_SUFFIX} model name; expected '<arch>{ZZZ_SUFFIX}[.tag]'")
    arch, dot, tag = name.partition('.')
    return arch[:-len(ZZZ_SUFFIX)] + dot + tag


def _mirrored_default_cfg(arch: str) -> Optional[DefaultCfg]:
    """The base's tags (same order, default first) with its registered (already resolved) pretrained cfgs.

    The resolved cfgs already carry 'timm/<arch>.<tag>' hub ids, so register_model does not rewrite them
    to a '<arch>_zzz' repo that does not exist; it only sets architecture='<arch>_zzz' and the tag.
    """
    base = _model_default_cfgs.get(arch)
    if base is None:
        return None
    cfgs = {tag: _model_pretrained_cfgs[f'{arch}.{tag}' if tag else arch] for tag in base.tags}
    return DefaultCfg(tags=deque(base.tags), cfgs=cfgs, is_pretrained=base.is_pretrained)


def _make_entrypoint(arch: str) -> Callable[..., Any]:
    """A timm entrypoint `<arch>_zzz(pretrained=False, **kwargs)` that builds ZZZModel around `arch`."""

    def entrypoint(pretrained: bool = False, **kwargs: Any):
        return create_zzz_model(arch, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = arch + ZZZ_SUFFIX
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'timm {arch} (num_classes=0) + ZZZ head; see carrot_zzz.model.create_zzz_model.'
    return entrypoint


def register_zzz(archs: Union[str, Iterable[str], None] = None) -> List[str]:
    """Register `<arch>_zzz` for each base architecture in `archs` (None: every registered timm architecture).

    Idempotent: names already registered by carrot_zzz are skipped, as are deprecated names, `_zzz` names
    themselves and names that another package registered under the `_zzz` name.
    Returns the newly registered `_zzz` names.
    Raises ValueError for an explicitly named architecture that timm does not know.
    """
    if archs is None:
        candidates = [a for a in _model_entrypoints if a not in _deprecated_models]
    else:
        candidates = [archs] if isinstance(archs, str) else list(archs)
        for arch in candidates:
            if arch.partition('.')[0] not in _model_entrypoints:
                raise ValueError(
                    f"register_zzz: unknown timm architecture '{arch}'; register it with "
                    f"timm.models.register_model before calling register_zzz")
    added = []
    for arch in candidates:
        arch = arch.partition('.')[0]
        name = arch + ZZZ_SUFFIX
        if arch.endswith(ZZZ_SUFFIX) or name in _model_entrypoints or arch in _deprecated_models:
            continue
        cfg = _mirrored_default_cfg(arch)
        if cfg is not None:
            default_cfgs[name] = cfg
        fn = _make_entrypoint(arch)
        globals()[name] = fn  # a module attribute, like timm's own entrypoints (register_model lists it in __all__)
        register_model(fn)
        added.append(name)
    return added


register_zzz()  # importing carrot_zzz registers every architecture timm knows at that point
