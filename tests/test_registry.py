"""`<arch>_zzz` registration, timm's model API on the wrapper, and pretrained loading from local files.

Every check compares against what timm itself does for the base architecture.
"""
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import timm
from timm.data import resolve_data_config
from timm.models import build_model_with_cfg, get_pretrained_cfg, group_parameters, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.optim import param_groups_layer_decay

import carrot_zzz
from carrot_zzz import ZZZHead, ZZZModel, register_zzz
from carrot_zzz.registry import ZZZ_SUFFIX, base_name, zzz_name

# (arch, backbone kwargs, input size): one or more per family, small inputs / depths where the arch allows
ARCHS = [
    ('resnet10t', {}, 64),
    ('resnext26ts', {}, 64),
    ('convnext_atto', {}, 64),
    ('vit_tiny_patch16_224', dict(img_size=64), 64),
    ('deit_tiny_distilled_patch16_224', dict(img_size=64), 64),
    ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=4, depths=(1, 1, 1, 1)), 64),
    ('efficientnet_b0', {}, 64),
    ('mobilenetv3_small_050', {}, 64),
    ('regnetx_002', {}, 64),
    ('levit_128s', dict(img_size=64), 64),
    ('crossvit_tiny_240', dict(img_size=120), 120),
    ('efficientformer_l1', dict(depths=(1, 1, 1, 1)), 224),
    ('maxvit_rmlp_pico_rw_256', dict(img_size=64), 64),
    ('coatnet_nano_rw_224', dict(img_size=64), 64),
    ('eva02_tiny_patch14_224', dict(img_size=56), 56),
    ('beit_base_patch16_224', dict(img_size=32, depth=2), 32),
    ('mixer_s16_224', dict(img_size=64), 64),
    ('densenet121', {}, 64),
    ('mobilevit_xxs', {}, 64),
    ('ghostnet_050', {}, 64),
    ('xcit_nano_12_p16_224', dict(img_size=64), 64),
    ('pvt_v2_b0', {}, 64),
    ('poolformer_s12', {}, 64),
    ('edgenext_xx_small', {}, 64),
    ('fastvit_t8', {}, 64),
    ('mambaout_femto', {}, 64),
    ('cait_xxs24_224', dict(img_size=64, depth=2), 64),
    ('repvit_m1', {}, 64),
    ('hgnetv2_b0', {}, 64),
    ('efficientvit_m0', dict(img_size=64), 64),
    ('dla46_c', {}, 64),
    ('pit_ti_224', dict(img_size=64), 64),
    ('hrnet_w18_small', {}, 64),
    ('gcvit_xxtiny', dict(img_size=64), 64),
    ('twins_svt_small', dict(depths=(1, 1, 1, 1)), 64),
    ('vit_small_patch16_224', dict(img_size=32, depth=2, global_pool='avg'), 32),
]


pytestmark = pytest.mark.usefixtures('one_thread')


def _data_cfg(model: nn.Module) -> dict:
    cfg = resolve_data_config(model=model)
    return {k: cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}


# --- registry -------------------------------------------------------------------------------------

def test_every_architecture_is_registered():
    bases = [m for m in timm.list_models() if not m.endswith(ZZZ_SUFFIX)]
    zzz = timm.list_models('*' + ZZZ_SUFFIX)
    assert len(bases) >= 1371
    assert set(zzz) >= {b + ZZZ_SUFFIX for b in bases}
    assert all(timm.is_model(b + ZZZ_SUFFIX) for b in bases)
    assert timm.models.is_model_in_modules('resnet50_zzz', 'registry')
    assert 'resnet50_zzz' in timm.list_models(module='registry')
    assert not timm.list_models('*_zzz_zzz')


def test_pretrained_tags_are_mirrored():
    base_tagged = [m for m in timm.list_models(pretrained=True) if ZZZ_SUFFIX not in m]
    zzz_tagged = timm.list_models('*' + ZZZ_SUFFIX, pretrained=True)
    assert sorted(zzz_tagged) == sorted(zzz_name(m) for m in base_tagged)
    assert len(zzz_tagged) > 1000
    for name in ('vit_base_patch16_224.augreg2_in21k_ft_in1k', 'resnet50.a1_in1k', 'resnet50', 'convnext_atto'):
        assert timm.is_model_pretrained(zzz_name(name)) == timm.is_model_pretrained(name)
    assert not timm.is_model_pretrained('resnet50_zzz.no_such_tag')
    # the default tag and the weight location are the base's; only architecture names the _zzz model
    for name in ('vit_base_patch16_224', 'vit_base_patch16_224.augreg2_in21k_ft_in1k', 'resnet18'):
        zc, bc = get_pretrained_cfg(zzz_name(name)), get_pretrained_cfg(name)
        assert zc.architecture == bc.architecture + ZZZ_SUFFIX
        assert (zc.tag, zc.hf_hub_id, zc.url, zc.mean, zc.input_size) == (bc.tag, bc.hf_hub_id, bc.url, bc.mean, bc.input_size)
    assert get_pretrained_cfg('vit_base_patch16_224_zzz.augreg2_in21k_ft_in1k').hf_hub_id == \
        'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'


def test_unknown_tag_error_names_the_zzz_name():
    with pytest.raises(RuntimeError) as base_err:
        timm.create_model('resnet18.no_such_tag')
    with pytest.raises(RuntimeError) as zzz_err:
        timm.create_model('resnet18_zzz.no_such_tag')
    assert str(zzz_err.value) == str(base_err.value).replace('resnet18', 'resnet18_zzz')
    assert 'resnet18_zzz' in str(zzz_err.value)
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('no_such_arch_zzz')


def test_registering_again_is_harmless():
    import importlib
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # timm warns when a name is overwritten
        assert register_zzz() == []
        importlib.reload(carrot_zzz.registry)
        import carrot_zzz as again  # noqa: F401
    assert len(timm.list_models('*_zzz')) == len([m for m in timm.list_models() if not m.endswith('_zzz')])


def test_names():
    assert zzz_name('resnet50.a1_in1k') == 'resnet50_zzz.a1_in1k'
    assert base_name('resnet50_zzz.a1_in1k') == 'resnet50.a1_in1k'
    with pytest.raises(ValueError):
        base_name('resnet50')


# an architecture registered after carrot_zzz was imported (as another package would)
def carrot_later_net(pretrained=False, **kwargs):
    return build_model_with_cfg(ResNet, 'carrot_later_net', pretrained, block=BasicBlock, layers=(1, 1, 1, 1), **kwargs)


class _NoHeadSplit(nn.Module):
    """A model without timm's forward_features / forward_head split: its head cannot be replaced."""

    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def carrot_nosplit_net(pretrained=False, **kwargs):
    return build_model_with_cfg(_NoHeadSplit, 'carrot_nosplit_net', pretrained, **kwargs)


class _EncoderOnly(_NoHeadSplit):
    """Like timm's *_enc encoders (qwen3_vit_*_enc, gemma4_vit_*_enc): forward_head is a stub."""
    num_features = 8

    def forward_features(self, x):
        return self.net(x)

    def forward_head(self, x, pre_logits: bool = False):
        raise NotImplementedError('this encoder does not support classification use cases')


def carrot_encoder_net(pretrained=False, **kwargs):
    return build_model_with_cfg(_EncoderOnly, 'carrot_encoder_net', pretrained, **kwargs)


def test_register_architecture_added_later():
    register_model(carrot_later_net)
    register_model(carrot_nosplit_net)
    assert not timm.is_model('carrot_later_net_zzz')
    assert register_zzz(['carrot_later_net', 'carrot_nosplit_net']) == ['carrot_later_net_zzz', 'carrot_nosplit_net_zzz']
    assert register_zzz('carrot_later_net') == []
    model = timm.create_model('carrot_later_net_zzz', num_classes=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    # registered fine; the head cannot be replaced, so create_model (not import / registration) says why
    with pytest.raises(RuntimeError, match='carrot_nosplit_net_zzz.*cannot be replaced.*forward_features'):
        timm.create_model('carrot_nosplit_net_zzz', num_classes=4)
    register_model(carrot_encoder_net)
    register_zzz('carrot_encoder_net')
    with pytest.raises(RuntimeError, match='carrot_encoder_net_zzz.*cannot be replaced.*forward_head is not implemented'):
        timm.create_model('carrot_encoder_net_zzz', num_classes=4)
    with pytest.raises(ValueError, match='unknown timm architecture'):
        register_zzz('no_such_arch')


def test_registration_import_overhead_under_200ms():
    """What registry / model / weights add to `import timm; import carrot_zzz` (python -X importtime)."""
    out = subprocess.run(
        [sys.executable, '-X', 'importtime', '-c', 'import timm; import carrot_zzz'],
        capture_output=True, text=True, check=True).stderr
    cumulative_us = {}
    for line in out.splitlines():
        if line.startswith('import time:') and '|' in line:
            _, cum, name = line[len('import time:'):].split('|')
            if cum.strip().isdigit():
                cumulative_us[name.strip()] = int(cum)
    mods = ('carrot_zzz.registry', 'carrot_zzz.model', 'carrot_zzz.weights')
    assert all(m in cumulative_us for m in mods), out[-2000:]
    added_ms = sum(cumulative_us[m] for m in mods) / 1e3
    print(f'registration import overhead: {added_ms:.1f} ms')
    assert added_ms < 200


# --- the model: timm API across families ----------------------------------------------------------

@pytest.mark.parametrize('arch,kwargs,size', ARCHS, ids=[a[0] for a in ARCHS])
def test_arch(arch, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(arch + '_zzz', num_classes=5, zzz_rank=4, **kwargs)
    base = timm.create_model(arch, num_classes=0, **kwargs)
    assert isinstance(model, ZZZModel) and isinstance(model.head, ZZZHead)
    assert (model.num_classes, model.head.rank) == (5, 4)
    assert model.num_features == base.num_features
    assert model.head_hidden_size == model.head.feat_dim
    x = torch.randn(2, 3, size, size)

    # train step: logits, embedding and gradients through head and backbone
    model.train()
    logits, emb = model(x, return_embedding=True)
    assert logits.shape == (2, 5) and logits.dtype == torch.float32
    assert emb.shape == (2, model.head_hidden_size)
    (logits.logsumexp(1).mean() + emb.pow(2).mean()).backward()
    assert model.head.mu.grad is not None and model.head.mu.grad.abs().sum() > 0
    grads = [p.grad for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) > len(grads) // 2  # (zero-init residual gammas give zero grads)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)

    # eval: one pass gives what the separate timm methods give, and the base's headless output
    model.eval()
    base.load_state_dict(model.backbone.state_dict())
    base.eval()
    with torch.no_grad():
        logits, emb = model(x, return_embedding=True)
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), emb)
        torch.testing.assert_close(model.forward_head(feats), logits)
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(base.forward_head(base.forward_features(x), pre_logits=True), emb)
        torch.testing.assert_close(model.head(emb), logits)

        model.reset_classifier(3)
        assert isinstance(model.get_classifier(), ZZZHead) and model.get_classifier().num_classes == 3
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
        torch.testing.assert_close(model(x), emb)

    # pretrained_cfg: the base's, renamed for the wrapper
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg['architecture'] == arch + '_zzz' and cfg['classifier'] == 'head'
    assert {k: v for k, v in cfg.items() if k not in ('architecture', 'classifier', 'first_conv')} == \
        {k: v for k, v in base.pretrained_cfg.items() if k not in ('architecture', 'classifier', 'first_conv')}
    for conv in ([cfg['first_conv']] if isinstance(cfg['first_conv'], str) else cfg['first_conv'] or []):
        assert isinstance(model.get_submodule(conv), nn.Module)
    assert _data_cfg(model) == _data_cfg(base)


def test_resolve_data_config_is_the_bases():
    model = timm.create_model('vit_tiny_patch16_224_zzz.augreg_in21k_ft_in1k', num_classes=3, img_size=64)
    base = timm.create_model('vit_tiny_patch16_224.augreg_in21k_ft_in1k', num_classes=3, img_size=64)
    assert _data_cfg(model) == _data_cfg(base)
    assert _data_cfg(model)['mean'] == (0.5, 0.5, 0.5) and model.pretrained_cfg['tag'] == 'augreg_in21k_ft_in1k'
    model = timm.create_model('resnet10t_zzz', num_classes=3)
    assert _data_cfg(model) == _data_cfg(timm.create_model('resnet10t', num_classes=3))


def _lr_scales(model: nn.Module) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g['lr_scale'] for g in param_groups_layer_decay(model, layer_decay=0.7) for p in g['params']}


@pytest.mark.parametrize('arch,kwargs', [
    ('vit_tiny_patch16_224', dict(img_size=32, depth=3)),
    ('resnet10t', {}),
    ('convnext_atto', {}),
])
def test_layer_decay_groups_match_the_base(arch, kwargs):
    model = timm.create_model(arch + '_zzz', num_classes=5, **kwargs)
    base = timm.create_model(arch, num_classes=5, **kwargs)
    ours, theirs = _lr_scales(model), _lr_scales(base)
    head_scale = theirs[next(n for n in theirs if n.startswith(base.pretrained_cfg['classifier']))]
    assert head_scale == 1.0
    for name, scale in ours.items():
        if name.startswith('head.'):
            assert scale == head_scale, name
        else:
            assert scale == theirs[name[len('backbone.'):]], name
    layers = group_parameters(model, model.group_matcher(), reverse=True)
    assert max(layers.values()) == layers['head.mu']
    assert len(set(layers.values())) == len(set(group_parameters(base, base.group_matcher(), reverse=True).values()))


def test_timm_api_odds_and_ends():
    model = timm.create_model('vit_tiny_patch16_224_zzz', num_classes=4, img_size=32, depth=2)
    assert {'backbone.pos_embed', 'backbone.cls_token'} <= model.no_weight_decay()
    assert {'backbone.' + n for n in model.backbone.no_weight_decay()} == model.no_weight_decay()
    model.set_grad_checkpointing(True)
    assert model.backbone.grad_checkpointing
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.global_pool == 'token'
    model.reset_classifier(6, global_pool='avg')
    assert model.global_pool == 'avg' and model.num_classes == 6
    final, inter = model.forward_intermediates(torch.randn(1, 3, 32, 32))
    assert len(inter) == 2
    # a backbone kwarg that changes the embedding size is seen by the head
    model = timm.create_model('resnet10t_zzz', num_classes=4, global_pool='catavgmax')
    assert model.head_hidden_size == 1024 == model.head.feat_dim
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(ValueError, match='head_type'):
        timm.create_model('resnet10t_zzz', head_type='gaussian')
    with pytest.raises(ValueError, match='rank'):
        timm.create_model('vit_tiny_patch16_224_zzz', img_size=32, depth=1, zzz_rank=500)
    # a backbone error names the _zzz model and the base call
    with pytest.raises(RuntimeError, match="resnet10t_zzz.*create_model\\('resnet10t', num_classes=0"):
        timm.create_model('resnet10t_zzz', no_such_kwarg=1)


def test_linear_head_and_headless():
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model('convnext_atto_zzz', num_classes=7, head_type='linear').eval()
    assert isinstance(model.head, nn.Linear) and model.head.in_features == model.head_hidden_size
    logits, emb = model(x, return_embedding=True)
    torch.testing.assert_close(logits, model.head(emb))
    model.reset_classifier(2)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 2
    headless = timm.create_model('convnext_atto_zzz', num_classes=0).eval()
    assert isinstance(headless.head, nn.Identity) and headless(x).shape == (2, headless.head_hidden_size)


def test_features_only_is_the_bases_feature_extractor():
    model = timm.create_model('resnet10t_zzz', features_only=True, out_indices=(1, 3), num_classes=5, zzz_rank=2)
    base = timm.create_model('resnet10t', features_only=True, out_indices=(1, 3))
    assert type(model) is type(base)
    model.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(model(x), base(x)):
        torch.testing.assert_close(a, b)


def test_compiled_and_ddp_style_wrapping_use_forward():
    """Wrappers that call forward(x, return_embedding=True) (DataParallel / DDP, torch.compile) get the
    logits and the pooled embedding of timm's forward_features + forward_head(pre_logits=True)."""
    model = timm.create_model('resnet10t_zzz', num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        for wrapped in (nn.DataParallel(model), torch.compile(model, backend='eager')):
            logits, emb = wrapped(x, return_embedding=True)
            torch.testing.assert_close(logits, model(x))
            torch.testing.assert_close(emb, embedding)
            assert emb.shape == (2, model.num_features)


# --- pretrained weights from local files ------------------------------------------------------------

PRETRAINED = [
    ('resnet10t.c3_in1k', {}, 64, '.safetensors'),
    ('vit_tiny_patch16_224.augreg_in21k_ft_in1k', dict(img_size=32, depth=2), 32, '.safetensors'),
    ('deit_tiny_distilled_patch16_224.fb_in1k', dict(img_size=32, depth=2), 32, '.pth'),
    ('convnext_atto.d2_in1k', {}, 64, '.safetensors'),
    ('efficientnet_b0.ra_in1k', {}, 64, '.pth'),
    ('levit_128s.fb_dist_in1k', dict(img_size=64), 64, '.safetensors'),
]


@pytest.mark.parametrize('name,kwargs,size,ext', PRETRAINED, ids=[p[0] for p in PRETRAINED])
def test_pretrained_from_local_file(tmp_path, name, kwargs, size, ext):
    """Base weights saved to a file load into the backbone exactly; the head is new."""
    import safetensors.torch
    torch.manual_seed(1)
    base = timm.create_model(name, **kwargs).eval()  # the 'pretrained' base, with its 1000-class head
    path = tmp_path / ('weights' + ext)
    saved = {k: v.clone() for k, v in base.state_dict().items()}
    if ext == '.safetensors':
        safetensors.torch.save_file(saved, str(path))
    else:
        torch.save(saved, path)

    model = timm.create_model(
        zzz_name(name), pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=11, **kwargs)
    model.eval()
    assert model.pretrained_cfg['tag'] == name.split('.')[1] and model.pretrained_cfg['file'] == str(path)
    backbone_sd = model.backbone.state_dict()
    assert set(backbone_sd) == set(timm.create_model(name, num_classes=0, **kwargs).state_dict())
    for k, v in backbone_sd.items():
        assert torch.equal(v, saved[k]), k
    assert model.head.num_classes == 11
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        _, emb = model(x, return_embedding=True)
        expected = base.forward_head(base.forward_features(x), pre_logits=True)
    torch.testing.assert_close(emb, expected)


def test_pretrained_adaptation_is_timms(tmp_path):
    """in_chans and img_size changes adapt the base checkpoint exactly as timm adapts it for the base."""
    import safetensors.torch
    path = str(tmp_path / 'vit.safetensors')
    safetensors.torch.save_file(timm.create_model('vit_tiny_patch16_224', depth=1).state_dict(), path)
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=path), depth=1, img_size=48, in_chans=1)
    model = timm.create_model('vit_tiny_patch16_224_zzz', num_classes=3, **kwargs)
    base = timm.create_model('vit_tiny_patch16_224', num_classes=0, **kwargs)
    for k, v in base.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert model.backbone.pos_embed.shape[1] == 1 + 3 * 3
    assert model(torch.randn(1, 1, 48, 48)).shape == (1, 3)


def test_named_tag_with_local_file(tmp_path):
    """The README's example (a tag of vit_base_patch16_224), offline: a local copy of the weights stands in for the hub."""
    import safetensors.torch
    small = dict(depth=1, img_size=32)
    base = timm.create_model('vit_base_patch16_224.augreg2_in21k_ft_in1k', **small).eval()
    path = str(tmp_path / 'vit_base.safetensors')
    safetensors.torch.save_file(base.state_dict(), path)
    model = timm.create_model('vit_base_patch16_224_zzz.augreg2_in21k_ft_in1k', pretrained=True, num_classes=200,
                              zzz_rank=8, pretrained_cfg_overlay=dict(file=path), **small).eval()
    assert model.pretrained_cfg['hf_hub_id'] == 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'
    assert model.head.num_classes == 200 and model.head.rank == 8
    assert _data_cfg(model) == _data_cfg(base)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, return_embedding=True)[1], base.forward_head(base.forward_features(x), pre_logits=True))


def test_pretrained_without_weights_fails_like_the_base():
    with pytest.raises(RuntimeError) as base_err:
        timm.create_model('test_resnet', pretrained=True, pretrained_cfg_overlay=dict(url='', hf_hub_id=None))
    with pytest.raises(RuntimeError) as zzz_err:
        timm.create_model('test_resnet_zzz', pretrained=True, pretrained_cfg_overlay=dict(url='', hf_hub_id=None))
    assert 'No pretrained weights' in str(base_err.value) and 'No pretrained weights' in str(zzz_err.value)
    with pytest.raises(FileNotFoundError):
        timm.create_model('resnet10t_zzz', pretrained=True, pretrained_cfg_overlay=dict(file='/no/such/file.pth'))
