"""save_weights / load_weights: exact round trips (own API, timm's load_checkpoint, save_for_hf + local-dir)
and loud failures for checkpoints that do not fit."""
import json

import pytest
import torch
from torch import nn

import timm
from timm.models import load_checkpoint, save_for_hf

from carrot_zzz import ZZZModel, load_weights, save_weights
from carrot_zzz.weights import checkpoint_keys, read_weights

X = torch.randn(2, 3, 64, 64)


pytestmark = pytest.mark.usefixtures('one_thread')


def _trained(name='resnet10t_zzz', size=64, **kwargs) -> nn.Module:
    """A model whose every tensor (BN statistics included) differs from a fresh one."""
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.train()
    model(torch.randn(2, 3, size, size))  # running stats and num_batches_tracked move
    return model.eval()


def _assert_same(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _assert_differs(a: nn.Module, b: nn.Module):
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize('kwargs', [dict(num_classes=5, zzz_rank=3), dict(num_classes=4, head_type='linear'),
                                    dict(num_classes=6, zzz_rank=0), dict(num_classes=0)])
def test_round_trip_exact(tmp_path, kwargs):
    model = _trained(**kwargs)
    path = save_weights(model, tmp_path / 'm.safetensors')
    fresh = timm.create_model('resnet10t_zzz', **kwargs).eval()
    _assert_differs(model, fresh)
    assert load_weights(fresh, path) is fresh
    _assert_same(model, fresh)
    torch.testing.assert_close(fresh(X), model(X), rtol=0, atol=0)
    # timm's own loaders read the same file
    other = timm.create_model('resnet10t_zzz', **kwargs).eval()
    load_checkpoint(other, str(path))
    _assert_same(model, other)
    other = timm.create_model('resnet10t_zzz', checkpoint_path=str(path), **kwargs).eval()
    _assert_same(model, other)
    _, meta = read_weights(path)
    assert meta['architecture'] == 'resnet10t_zzz' and meta['num_classes'] == str(kwargs['num_classes'])


def test_wrapped_models_save_clean_keys(tmp_path):
    model = _trained(num_classes=3)
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    save_weights(compiled, tmp_path / 'c.safetensors')
    keys = checkpoint_keys(tmp_path / 'c.safetensors')
    assert keys and all(k.startswith(('backbone.', 'head.')) for k in keys)
    fresh = timm.create_model('resnet10t_zzz', num_classes=3)
    load_weights(nn.DataParallel(fresh), tmp_path / 'c.safetensors')
    _assert_same(model, fresh)


def test_save_for_hf_and_local_dir_round_trip(tmp_path):
    model = _trained('vit_tiny_patch16_224_zzz.augreg_in21k_ft_in1k', num_classes=5, zzz_rank=3, img_size=32, depth=2,
                     size=32)
    for safe in (True, False):
        folder = tmp_path / f'hf_{safe}'
        save_for_hf(model, folder, safe_serialization=safe)
        config = json.loads((folder / 'config.json').read_text())
        assert config['architecture'] == 'vit_tiny_patch16_224_zzz'
        assert config['model_args']['zzz_rank'] == 3 and config['model_args']['num_classes'] == 5
        again = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        assert isinstance(again, ZZZModel) and again.head.rank == 3
        _assert_same(model, again)
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        assert tuple(again.pretrained_cfg['mean']) == model.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)
    # the saved model as a starting point for another label set: backbone kept, head new (timm's rule)
    other = timm.create_model(f'local-dir:{tmp_path / "hf_True"}', pretrained=True, num_classes=9)
    assert other.head.num_classes == 9
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(other.backbone.state_dict()[k], v), k
    # but the same class count with another head does not fit
    with pytest.raises(ValueError, match='ZZZ rank: the checkpoint has rank 3, the model 2'):
        timm.create_model(f'local-dir:{tmp_path / "hf_True"}', pretrained=True, zzz_rank=2)


def test_whole_model_file_through_pretrained_cfg_overlay(tmp_path):
    model = _trained(num_classes=5, head_type='linear')
    path = save_weights(model, tmp_path / 'w.safetensors')
    meta = read_weights(path)[1]
    assert meta['head_type'] == 'linear' and meta['num_classes'] == '5' and 'zzz_rank' not in meta
    again = timm.create_model('resnet10t_zzz', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=5, head_type='linear').eval()
    _assert_same(model, again)


@pytest.mark.parametrize('arch,saved,loaded', [
    ('vit_tiny_patch16_224', dict(img_size=32, depth=1), dict(img_size=64, depth=1)),   # pos_embed resampled
    ('resnet10t', {}, dict(in_chans=1)),                                                # stem adapted to 1 channel
])
def test_whole_model_file_adapts_as_timm_does_for_the_base(tmp_path, arch, saved, loaded):
    """A saved `_zzz` model loaded at another image size or channel count: its backbone gets exactly what timm
    gives the base architecture from the same weights (the base's checkpoint filter, in_chans adaptation)."""
    torch.manual_seed(0)
    zzz = timm.create_model(f'{arch}_zzz', num_classes=4, zzz_rank=2, **saved)
    path = save_weights(zzz, tmp_path / 'zzz.safetensors')
    base_path = tmp_path / 'base.safetensors'
    save_weights(zzz.backbone, base_path)
    again = timm.create_model(f'{arch}_zzz', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=4, zzz_rank=2, **loaded)
    base = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(base_path)),
                             num_classes=0, **loaded)
    for k, v in base.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[k], v), k
    for k, v in zzz.head.state_dict().items():
        assert torch.equal(again.head.state_dict()[k], v), k


@pytest.mark.parametrize('whole', [False, True], ids=['base', 'whole'])
def test_timm_training_checkpoint_through_pretrained_cfg_overlay(tmp_path, whole):
    """A checkpoint as timm's CheckpointSaver writes it (args an argparse.Namespace) loads as pretrained weights,
    of the base model (into the backbone) or of a whole `_zzz` model."""
    import argparse
    source = _trained(num_classes=5, head_type='linear') if whole else timm.create_model('resnet10t')
    path = tmp_path / 'checkpoint-3.pth.tar'
    torch.save({'epoch': 3, 'arch': 'x', 'state_dict': source.state_dict(),
                'args': argparse.Namespace(model='resnet10t', lr=0.1)}, path)
    model = timm.create_model('resnet10t_zzz', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=5, head_type='linear').eval()
    target = model if whole else model.backbone
    for k, v in source.state_dict().items():
        if not (not whole and k.startswith('fc.')):
            assert torch.equal(target.state_dict()[k], v), k


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_classes=7), 'class count: the checkpoint has 5 classes, the model 7.*num_classes=5'),
    (dict(num_classes=5, zzz_rank=2), 'ZZZ rank: the checkpoint has rank 3, the model 2.*zzz_rank=3'),
    (dict(num_classes=5, head_type='linear'), "head type: the checkpoint has a 'zzz' head, the model a 'linear'"),
    (dict(name='resnet14t_zzz', num_classes=5, zzz_rank=3), "architecture: the checkpoint is 'resnet10t_zzz', the model 'resnet14t_zzz'"),
    (dict(name='convnext_atto_zzz', num_classes=5, zzz_rank=3), 'backbone / architecture: .* missing'),
])
def test_mismatch_fails_loudly(tmp_path, kwargs, match):
    path = save_weights(_trained(num_classes=5, zzz_rank=3), tmp_path / 'm.safetensors')
    target = timm.create_model(kwargs.pop('name', 'resnet10t_zzz'), **kwargs)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_weights(target, path)
    for k, v in target.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_truncated_and_missing_files(tmp_path):
    path = save_weights(_trained(num_classes=5), tmp_path / 'm.safetensors')
    data = path.read_bytes()
    cut = tmp_path / 'cut.safetensors'
    for n in (len(data) // 2, 7, len(data) - 1):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match='truncated or corrupt'):
            load_weights(timm.create_model('resnet10t_zzz', num_classes=5), cut)
    torch.save(timm.create_model('resnet10t_zzz', num_classes=5).state_dict(), tmp_path / 'm.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'm.pth').read_bytes()[:1000])
    with pytest.raises(ValueError, match='truncated or corrupt'):
        load_weights(timm.create_model('resnet10t_zzz', num_classes=5), tmp_path / 'cut.pth')
    with pytest.raises(FileNotFoundError):
        load_weights(timm.create_model('resnet10t_zzz', num_classes=5), tmp_path / 'nope.safetensors')
    with pytest.raises(ValueError, match='.safetensors'):
        save_weights(timm.create_model('resnet10t_zzz', num_classes=5), tmp_path / 'm.bin')
