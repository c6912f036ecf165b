"""validate.py end to end on the shipped Fashion-MNIST subset (1000 test images, 32 px, CPU), with checkpoints whose
answers are known: a head bias of 1e4 on one class makes every prediction that class (top-1 10%, that class 100%,
max softmax prob 1 everywhere, so the MSP cannot separate anything: AUROC 50%, FPR@95TPR 100%)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import validate  # (imports carrot_zzz: the _zzz models are registered)


COMMON = ['--dataset', 'fashion_mnist', '--device', 'cpu', '--img-size', '32', '-b', '500', '-j', '0']


def _biased(model, bias_name, cls):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[bias_name][cls] = 1e4
    return sd


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    out = {}
    plain = timm.create_model('test_resnet', num_classes=10)
    out['plain_safetensors'] = str(d / 'plain.safetensors')
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in _biased(plain, 'fc.bias', 7).items()}, out['plain_safetensors'])
    out['plain_pth'] = str(d / 'plain.pth.tar')
    torch.save({'epoch': 3, 'state_dict': _biased(plain, 'fc.bias', 7)}, out['plain_pth'])
    zzz = timm.create_model('test_resnet_zzz', num_classes=10, zzz_rank=4)
    out['zzz_pth'] = str(d / 'zzz.pth.tar')          # timm's layout: state_dict + state_dict_ema (differ)
    torch.save({'epoch': 3, 'state_dict': _biased(zzz, 'head.bias', 5),
                'state_dict_ema': _biased(zzz, 'head.bias', 3)}, out['zzz_pth'])
    ood = d / 'ood' / 'noise'
    ood.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(ood / f'{k}.png')
    out['ood'] = str(d / 'ood')
    out['dir'] = d
    return out


def _per_class(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_plain_safetensors_known_answer(ckpts):
    d = ckpts['dir']
    r = validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', ckpts['plain_safetensors'],
                                '--results-file', str(d / 'plain.csv'), '--per-class-csv', str(d / 'pc.csv'),
                                '--ood-data-dir', ckpts['ood']])
    assert r['model'] == 'test_resnet' and r['top1'] == 10.0 and r['top1_err'] == 90.0
    assert r['mean_class_acc'] == 10.0 and r['img_size'] == 32 and r['param_count'] > 0
    assert r['ece'] == pytest.approx(90.0)                        # accuracy 0.1 at confidence 1.0
    assert r['nll'] > 100                                         # 1e4 logit gap on 90% of the samples
    assert r['ood_auroc_msp'] == 50.0 and r['ood_fpr95_msp'] == 100.0
    assert 'ood_auroc_ll' not in r                                # no ZZZ head: no log-likelihood score
    rows = _per_class(d / 'pc.csv')
    assert [row['class_name'] for row in rows][:2] == ['T-shirt/top', 'Trouser']
    assert [float(row['accuracy']) for row in rows] == [100.0 if c == 7 else 0.0 for c in range(10)]
    assert {row['support'] for row in rows} == {'100'}
    with open(d / 'plain.csv') as f:
        written = list(csv.DictReader(f))
    assert len(written) == 1 and written[0]['top1'] == '10.0' and list(written[0])[:5] == [
        'model', 'top1', 'top1_err', 'top5', 'top5_err']


def test_zzz_checkpoint_ema_and_not(ckpts):
    d = ckpts['dir']
    base = COMMON + ['--model', 'test_resnet_zzz', '--checkpoint', ckpts['zzz_pth'], '--per-class-csv']
    r = validate.main(base + [str(d / 'ema.csv'), '--use-ema', '--ood-data-dir', ckpts['ood'],
                              '--results-file', str(d / 'zzz.json'), '--results-format', 'json'])
    assert r['top1'] == 10.0
    assert [float(x['accuracy']) for x in _per_class(d / 'ema.csv')].index(100.0) == 3    # the EMA weights
    assert r['ood_auroc_msp'] == 50.0 and 0.0 <= r['ood_auroc_ll'] <= 100.0 and 0.0 <= r['ood_fpr95_ll'] <= 100.0
    with open(d / 'zzz.json') as f:
        assert json.load(f) == json.loads(json.dumps(r))
    # no --use-ema: state_dict; plain architecture name + a _zzz checkpoint -> <arch>_zzz, rank read from it
    r = validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', ckpts['zzz_pth'],
                                '--per-class-csv', str(d / 'raw.csv')])
    assert r['model'] == 'test_resnet_zzz'
    assert [float(x['accuracy']) for x in _per_class(d / 'raw.csv')].index(100.0) == 5


def test_mismatch_and_missing_checkpoint_fail_clearly(ckpts, tmp_path):
    with pytest.raises(SystemExit, match='--num-classes 11: the checkpoint .* has 10 .classes.'):
        validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', ckpts['plain_pth'], '--num-classes', '11'])
    with pytest.raises(SystemExit, match='--checkpoint .*none.pth.tar: no such file'):
        validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', str(tmp_path / 'none.pth.tar')])
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(open(ckpts['zzz_pth'], 'rb').read()[:3000])
    with pytest.raises(SystemExit, match='--checkpoint .*truncated.pth.tar: cannot read it'):
        validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', str(truncated)])
    for flags, message in ((['--results-file', str(tmp_path / 'no' / 'r.csv')], '--results-file .*folder does not'),
                           (['--per-class-csv', str(tmp_path / 'no' / 'p.csv')], '--per-class-csv .*folder does not'),
                           (['--valid-labels', str(tmp_path / 'none.txt')], '--valid-labels .*no such file'),
                           (['--model-kwargs', 'wingspan=3'], '--model test_resnet: cannot create it .*--model-kwargs'),
                           (['--task', 'multilabel'], '--task multilabel: multi-label training and validation are not supported')):
        with pytest.raises(SystemExit, match=message):
            validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', ckpts['plain_pth'], *flags])
    with pytest.raises(SystemExit, match='--torchscript: is not supported for carrot_zzz models'):
        validate.main(COMMON + ['--model', 'test_resnet_zzz.r160_in1k', '--checkpoint', ckpts['zzz_pth'],
                                '--torchscript'])


def test_checkpoint_folder_skips_a_bad_file(ckpts, tmp_path):
    """--checkpoint DIR validates every checkpoint in it; a truncated one is reported and skipped."""
    folder = tmp_path / 'run'
    folder.mkdir()
    good = open(ckpts['plain_pth'], 'rb').read()
    (folder / 'checkpoint-1.pth.tar').write_bytes(good)
    (folder / 'checkpoint-2.pth.tar').write_bytes(good[:3000])
    eleven = timm.create_model('test_resnet', num_classes=11)        # another class count: read per checkpoint
    torch.save({'epoch': 1, 'state_dict': _biased(eleven, 'fc.bias', 2)}, folder / 'checkpoint-3.pth.tar')
    results = validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', str(folder)])
    assert sorted(os.path.basename(r['checkpoint']) for r in results) == ['checkpoint-1.pth.tar', 'checkpoint-3.pth.tar']
    assert [r['top1'] for r in results] == [10.0, 10.0]
    # nothing validated: an error, not an empty success
    for name in ('checkpoint-1.pth.tar', 'checkpoint-3.pth.tar'):
        os.remove(folder / name)
    with pytest.raises(SystemExit, match='no model or checkpoint could be validated'):
        validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', str(folder)])
    # a setting wrong for the whole run stops before the first checkpoint
    with pytest.raises(SystemExit, match='--results-file .*folder does not exist'):
        validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', str(folder),
                                '--results-file', str(tmp_path / 'no' / 'r.json'), '--results-format', 'json'])


def test_cli_prints_timm_output(ckpts):
    """The script as users run it: timm's log lines on stderr, '--result' + JSON on stdout."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'validate.py'), *COMMON, '--model', 'test_resnet',
                        '--checkpoint', ckpts['plain_pth'], '--log-freq', '1'],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'Test: [   0/2]' in p.stderr and ' * Acc@1 10.000 (90.000) Acc@5' in p.stderr
    assert 'Model test_resnet created, param count:' in p.stderr and ' * Mean class acc 10.000' in p.stderr
    head, _, body = p.stdout.partition('--result\n')
    r = json.loads(body)
    assert r['top1'] == 10.0 and list(r)[:10] == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count',
                                                 'img_size', 'crop_pct', 'interpolation', 'mean_class_acc']


@pytest.mark.parametrize('kind', ['pth', 'safetensors'])
def test_model_kwargs_that_agree_with_the_checkpoint(ckpts, tmp_path, kind, caplog):
    """`--model-kwargs zzz_rank=4` with a rank-4 checkpoint is accepted (it used to stop with 'got multiple values
    for keyword argument'); a rank the checkpoint contradicts stops with one line naming both values."""
    path = ckpts['zzz_pth']
    if kind == 'safetensors':
        from carrot_zzz import save_weights
        model = timm.create_model('test_resnet_zzz', num_classes=10, zzz_rank=4)
        model.load_state_dict(torch.load(path, weights_only=True)['state_dict'])
        path = str(save_weights(model, tmp_path / 'zzz.safetensors'))
    caplog.set_level('INFO')
    r = validate.main(COMMON + ['--model', 'test_resnet_zzz', '--model-kwargs', 'zzz_rank=4', '--checkpoint', path])
    assert r['top1'] == 10.0 and r['model'] == 'test_resnet_zzz'
    assert not any('Loaded  from' in rec.message for rec in caplog.records)      # an empty name between the words
    with pytest.raises(SystemExit, match=r"--model-kwargs zzz_rank=8: the checkpoint .* says 4; drop 'zzz_rank' from --model-kwargs"):
        validate.main(COMMON + ['--model', 'test_resnet_zzz', '--model-kwargs', 'zzz_rank=8', '--checkpoint', path])
    with pytest.raises(SystemExit, match=r'--zzz-rank 8: the checkpoint .* has 4 \(as its ZZZ rank\)'):
        validate.main(COMMON + ['--model', 'test_resnet_zzz', '--zzz-rank', '8', '--checkpoint', path])


def test_retrieval_embeddings_out_and_reliability_plot(ckpts, tmp_path):
    """--save-embeddings writes what the model computes (the head applied to the saved embeddings gives the saved
    logits; log-likelihoods are the logits without the bias); --retrieval reports carrot_zzz.retrieval on those
    embeddings (in %); --reliability-plot draws a PNG."""
    from carrot_zzz.embeddings import load_embeddings
    from carrot_zzz.retrieval import retrieval_metrics
    out, png = tmp_path / 'emb.safetensors', tmp_path / 'rel.png'
    r = validate.main(COMMON + ['--model', 'test_resnet_zzz', '--checkpoint', ckpts['zzz_pth'], '--retrieval',
                                '--save-embeddings', str(out), '--reliability-plot', str(png)])
    saved = load_embeddings(out)
    emb, logits = saved['embeddings'], saved['logits']
    assert emb.shape[0] == logits.shape[0] == 1000 and logits.shape[1] == 10
    assert saved['class_names'][:2] == ['T-shirt/top', 'Trouser']
    model = timm.create_model('test_resnet_zzz', num_classes=10, zzz_rank=4)
    model.load_state_dict(torch.load(ckpts['zzz_pth'], weights_only=True)['state_dict'])
    head = model.get_classifier().eval()
    with torch.no_grad():
        torch.testing.assert_close(head(emb), logits, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(saved['log_likelihoods'], logits - head.bias.detach(), rtol=0, atol=1e-3)
    expected = retrieval_metrics(emb, saved['labels'])
    assert {k: r[k] for k in expected} == pytest.approx({k: 100 * v for k, v in expected.items()}, abs=1e-3)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    for flags, message in ((['--save-embeddings', str(tmp_path / 'e.pt')], 'name a .safetensors file'),
                           (['--reliability-plot', str(tmp_path / 'r.jpg')], 'name a .png file'),
                           (['--retrieval', '--test-pool'], '--test-pool pools at test time only')):
        with pytest.raises(SystemExit, match=message):
            validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', ckpts['plain_pth'], *flags])


def test_reliability_plot_without_matplotlib_is_one_line(ckpts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)          # as if matplotlib were not installed
    with pytest.raises(SystemExit, match=r'--reliability-plot: plotting needs matplotlib: pip install "carrot-zzz\[plot\]"'):
        validate.main(COMMON + ['--model', 'test_resnet', '--checkpoint', ckpts['plain_pth'],
                                '--reliability-plot', str(tmp_path / 'r.png')])
