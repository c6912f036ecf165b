"""The base-model contracts timm's own code and tests read on a model, kept true for `<arch>_zzz`.

timm's tests/test_models.py (and timm's feature extractors, save_for_hf, load_pretrained) read attributes of
a model besides its forward: output_fmt (layout of forward_features), feature_info, num_prefix_tokens,
feature_dim, _traits / _model_args (what save_for_hf records) ... Each check here compares the `_zzz` wrapper
with the base model built with the same weights, or with what timm's own helpers compute from the base.
"""
import json

import pytest
import torch
from torch import nn

import timm
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureHookNet, get_model_args, get_model_input_config, load_pretrained, save_for_hf

import carrot_zzz  # noqa: F401  (registers the _zzz names)

# tiny members of families whose forward_features is NHWC (swin, mambaout, sequencer) or NCHW (resnet)
SWIN = ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=4, depths=(1, 1, 1, 1), embed_dim=24,
                                             num_heads=(1, 1, 1, 1)))
SEQUENCER = ('sequencer2d_s', dict(img_size=64, layers=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16),
                                   hidden_sizes=(4, 4, 4, 4)))
SPATIAL = [('test_resnet', {}), SWIN, ('test_mambaout', {}), SEQUENCER]
ALL = SPATIAL + [('test_vit', dict(img_size=32))]
# base-model attributes read as they are (timm's tests, feature extractors, _input helpers)
PLAIN_ATTRIBUTES = ('output_fmt', 'num_prefix_tokens', 'feature_dim', 'dynamic_img_size', 'patch_embed')


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny CPU models on a shared machine: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(arch: str, kwargs: dict, **head):
    """The `_zzz` model and its base (num_classes=0) holding the same backbone weights, both in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(arch + '_zzz', num_classes=head.pop('num_classes', 3), **head, **kwargs).eval()
    base = timm.create_model(arch, num_classes=0, **kwargs).eval()
    base.load_state_dict(model.backbone.state_dict())
    return model, base


def _ids(archs):
    return [a[0] for a in archs]


@pytest.mark.parametrize('arch,kwargs', ALL, ids=_ids(ALL))
def test_base_attributes_read_through_the_wrapper(arch, kwargs):
    model, base = _pair(arch, kwargs)
    for name in PLAIN_ATTRIBUTES:
        assert hasattr(model, name) == hasattr(base, name), name
        if hasattr(base, name):
            assert getattr(model, name) is getattr(model.backbone, name), name
            if name != 'patch_embed':
                assert getattr(model, name) == getattr(base, name), name
    assert getattr(model, 'output_fmt', 'NCHW') == getattr(base, 'output_fmt', 'NCHW')
    assert hasattr(model, 'set_input_size') == hasattr(base, 'set_input_size')
    # feature_info: the base's levels, module names that name the wrapper's modules
    assert len(model.feature_info) == len(base.feature_info)
    for ours, theirs in zip(model.feature_info, base.feature_info):
        assert ours['module'] == 'backbone.' + theirs['module']
        assert {k: v for k, v in ours.items() if k != 'module'} == {k: v for k, v in theirs.items() if k != 'module'}
        assert model.get_submodule(ours['module']) is model.backbone.get_submodule(theirs['module'])
    # _traits: the base's, first conv named in the wrapper
    traits = get_model_input_config(model)
    assert traits['first_conv'] == 'backbone.' + get_model_input_config(base)['first_conv']
    assert isinstance(model.get_submodule(traits['first_conv']), nn.Conv2d)
    assert {k: v for k, v in traits.items() if k != 'first_conv'} == \
        {k: v for k, v in get_model_input_config(base).items() if k != 'first_conv'}


@pytest.mark.parametrize('arch,kwargs', SPATIAL, ids=_ids(SPATIAL))
def test_forward_features_layout_is_what_output_fmt_says(arch, kwargs):
    """timm reads the channel and spatial axes of forward_features from getattr(model, 'output_fmt', 'NCHW');
    they must agree with the NCHW intermediates and with feature_info."""
    model, base = _pair(arch, kwargs)
    fmt = getattr(model, 'output_fmt', 'NCHW')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        _, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        torch.testing.assert_close(features, base.forward_features(x), rtol=0, atol=0)
    last = intermediates[-1]
    assert features.shape[get_channel_dim(fmt)] == model.num_features == last.shape[1]
    assert tuple(features.shape[a] for a in get_spatial_dim(fmt)) == tuple(last.shape[-2:])
    assert [f['num_chs'] for f in model.feature_info] == [t.shape[1] for t in intermediates]


@pytest.mark.parametrize('arch,kwargs', [('test_resnet', {}), SWIN], ids=['test_resnet', SWIN[0]])
def test_timm_hook_feature_extractor_on_the_wrapper(arch, kwargs):
    """timm's FeatureHookNet finds the levels feature_info names among the wrapper's modules."""
    model, base = _pair(arch, kwargs)
    x = torch.randn(1, 3, 64, 64)
    fmt = getattr(base, 'output_fmt', 'NCHW')
    with torch.no_grad():
        ours = FeatureHookNet(model, out_indices=(1, 2), output_fmt=fmt)(x)
        theirs = FeatureHookNet(base, out_indices=(1, 2), output_fmt=fmt)(x)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resizes_and_head_options_of_the_base_are_what_export_records():
    """set_input_size and reset_classifier(global_pool=...) change the base's traits / model args; timm's
    get_model_args (read by save_for_hf) sees them on the wrapper."""
    model, base = _pair('test_vit', dict(img_size=32))
    for m in (model, base):
        m.set_input_size(img_size=48)
        m.reset_classifier(m.num_classes, global_pool='avg')
    assert not model.head.training  # a new head keeps the model's mode, as timm's reset_classifier does
    assert model._traits['img_size'] == base._traits['img_size'] == (48, 48)
    ours, theirs = get_model_args(model), get_model_args(base)
    assert ours['img_size'] == theirs['img_size'] == (48, 48)
    assert ours['fc_norm'] is theirs['fc_norm'] is False
    assert ours['global_pool'] == theirs['global_pool'] == 'avg'
    assert (ours['num_classes'], ours['head_type'], theirs['num_classes']) == (3, 'zzz', 0)


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


HUB = [
    (SWIN[0], SWIN[1], dict(zzz_rank=3), dict(img_size=96)),
    ('test_vit', dict(img_size=32), dict(zzz_rank=2), dict(img_size=48, global_pool='avg')),
    ('test_resnet', {}, dict(head_type='linear'), {}),
]


@pytest.mark.parametrize('arch,kwargs,head,change', HUB, ids=_ids(HUB))
def test_save_for_hf_then_local_dir(tmp_path, arch, kwargs, head, change):
    """timm's save_for_hf + create_model('local-dir:...', pretrained=True): the same model, logits equal to
    the bit; with another num_classes the backbone is kept and the head is the one a fresh model gets."""
    model = _perturbed(timm.create_model(arch + '_zzz', num_classes=5, **head, **kwargs))
    if 'img_size' in change:
        model.set_input_size(img_size=change['img_size'])
    if 'global_pool' in change:
        model.reset_classifier(5, global_pool=change['global_pool'])
    size = change.get('img_size', kwargs.get('img_size', 64))
    save_for_hf(model, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == arch + '_zzz' and config['num_classes'] == 5

    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(again.head) is type(model.head)
    assert list(again.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)

    torch.manual_seed(7)
    other = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, num_classes=9)
    torch.manual_seed(7)
    fresh = timm.create_model(config['architecture'], **dict(config['model_args'], num_classes=9))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(other.backbone.state_dict()[k], v), k
    assert other.num_classes == 9 and list(other.head.state_dict()) == list(fresh.head.state_dict())
    for k, v in fresh.head.state_dict().items():
        assert torch.equal(other.head.state_dict()[k], v), k


def test_classifier_name_contract_of_timms_load_pretrained(tmp_path):
    """The ZZZ head keeps its parameter names (head.mu, head.A, ...): timm's load_pretrained, which drops a
    classifier of another class count by the names '<classifier>.weight' / '.bias', drops only head.bias and then
    fails on the shapes; a linear head is dropped and re-initialised as timm does for the base."""
    for head_type in ('zzz', 'linear'):
        model = _perturbed(timm.create_model('test_resnet_zzz', num_classes=5, head_type=head_type))
        path = tmp_path / f'{head_type}.pth'
        torch.save(model.state_dict(), path)
        state = model.state_dict()
        assert model.pretrained_cfg['classifier'] == 'head'
        assert ('head.weight' in state) == (head_type == 'linear') and ('head.mu' in state) == (head_type == 'zzz')
        for num_classes in (5, 9):
            target = timm.create_model('test_resnet_zzz', num_classes=num_classes, head_type=head_type)
            cfg = dict(target.pretrained_cfg, file=str(path), num_classes=5)
            if head_type == 'zzz' and num_classes != 5:
                with pytest.raises(RuntimeError, match='size mismatch for head.mu'):
                    load_pretrained(target, pretrained_cfg=cfg, num_classes=num_classes)
                continue
            before = {k: v.clone() for k, v in target.head.state_dict().items()}
            load_pretrained(target, pretrained_cfg=cfg, num_classes=num_classes)
            for k, v in model.backbone.state_dict().items():
                assert torch.equal(target.backbone.state_dict()[k], v), k
            expected_head = model.head.state_dict() if num_classes == 5 else before
            for k, v in expected_head.items():
                assert torch.equal(target.head.state_dict()[k], v), k
