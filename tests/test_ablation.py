"""experiments/ablation.py end to end: 2 variants x 1 seed x 1 epoch of timm's test_resnet on a tiny image folder,
through the real train.py / validate.py subprocesses; then a resumed sweep skips both runs. About 20-30 s on 2 cores.
"""
import csv
import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'experiments', 'ablation.py')
TRAIN_FLAGS = ['--model', 'test_resnet', '--input-size', '3', '32', '32', '--num-classes', '4', '--batch-size', '16',
               '--workers', '0', '--device', 'cpu', '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '0',
               '--no-aug', '--epochs', '1', '--log-interval', '1', '--checkpoint-hist', '1']


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ablation = _load('ablation', SCRIPT)


def make_data(root):
    """root/data/{train,validation}/class_<c>/*.png (4 colours + noise) and root/ood/noise/*.png (uniform noise)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(4, 3))
    for split, n in (('train', 12), ('validation', 4)):
        for c in range(4):
            d = os.path.join(root, 'data', split, f'class_{c}')
            os.makedirs(d)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f'{i}.png'))
    d = os.path.join(root, 'ood', 'noise')
    os.makedirs(d)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(d, f'{i}.png'))
    return os.path.join(root, 'data'), os.path.join(root, 'ood')


def sweep(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')   # 2 cores shared with other work: no OpenMP spinning
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    return p.returncode, p.stdout + p.stderr


def test_sweep_end_to_end_then_resume_skips(tmp_path):
    data, ood = make_data(str(tmp_path))
    out = str(tmp_path / 'out')
    argv = ['--data-dir', data, '--variants', 'linear', 'zzz+carrot', '--seeds', '0', '--out', out,
            '--ood-data-dir', ood, '--', *TRAIN_FLAGS]
    rc, log = sweep(*argv)
    assert rc == 0, log[-3000:]
    assert '[1/2] linear-s0: train' in log and '[2/2] zzz+carrot-s0: done in' in log
    for run in ('linear-s0', 'zzz+carrot-s0'):
        for name in ('summary.csv', 'args.yaml', 'last.pth.tar', 'train.log', 'validate.json', 'per_class.csv'):
            assert os.path.exists(os.path.join(out, run, name)), (run, name)
    with open(os.path.join(out, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['variant'], r['seed']) for r in rows] == [
        ('linear', '0'), ('zzz+carrot', '0'), ('linear', 'mean'), ('zzz+carrot', 'mean'),
        ('linear', 'std'), ('zzz+carrot', 'std')]
    for r in rows[:2]:
        assert 0.0 <= float(r['top1']) <= 100.0 and 0.0 <= float(r['ece']) <= 100.0
        assert float(r['nll']) > 0 and 0.0 <= float(r['ood_auroc_msp']) <= 100.0
        assert math.isfinite(float(r['train_img_s'])) and float(r['train_img_s']) > 0
        assert r['epochs'] == '1'
    assert rows[0]['ood_auroc_ll'] == '' and rows[1]['ood_auroc_ll'] != ''   # log-likelihood score: ZZZ head only
    assert rows[2]['top1'] == rows[0]['top1'] and rows[4]['top1'] == ''      # one seed: mean = the run, no std
    md = open(os.path.join(out, 'results.md')).read()
    assert '| variant | n | top-1 (%) | mean class acc (%) | NLL | ECE (%) | OOD AUROC msp (%)' in md
    assert '| linear | 1 | ' in md and '| zzz+carrot | 1 | ' in md
    if importlib.util.find_spec('matplotlib') is not None:
        for png in ('accuracy_ece.png', 'curves.png', 'carrot.png'):
            assert os.path.getsize(os.path.join(out, png)) > 1000, png
    with open(os.path.join(out, 'zzz+carrot-s0', 'summary.csv')) as f:
        assert set(ablation.CARROT_COLS) <= set(next(csv.DictReader(f)))   # the columns carrot.png plots

    # resumed: both runs are finished, nothing is trained or validated again
    stamps = {run: os.path.getmtime(os.path.join(out, run, 'validate.json')) for run in ('linear-s0', 'zzz+carrot-s0')}
    os.remove(os.path.join(out, 'results.md'))
    rc, log = sweep(*argv)
    assert rc == 0, log[-3000:]
    assert '[1/2] linear-s0: skip' in log and '[2/2] zzz+carrot-s0: skip' in log
    assert ': train' not in log and ': validate' not in log
    assert stamps == {run: os.path.getmtime(os.path.join(out, run, 'validate.json')) for run in stamps}
    assert os.path.exists(os.path.join(out, 'results.md'))
    rc, log = sweep('--report-only', '--out', out)
    assert rc == 0 and '| zzz+carrot | 1 |' in log


def test_calibrated_weights_data_start_and_paired_differences(tmp_path):
    """--weights calibrate validates model_best.pth.tar with a temperature fitted on the run's held-out part (ECE
    before and after), the data start's seconds are read from train.log, a weight-0 CARROT variant logs CARROT's
    statistics, and --pairs reports B - A per seed."""
    data, ood = make_data(str(tmp_path))
    out = str(tmp_path / 'out')
    rc, log = sweep('--data-dir', data, '--variants', 'zzz-data+carrot@0', 'zzz-data+carrot', '--seeds', '0', '--out',
                    out, '--ood-data-dir', ood, '--weights', 'calibrate', '--pairs', 'zzz-data+carrot@0:zzz-data+carrot',
                    '--', *TRAIN_FLAGS, '--sampler', 'pk', '--samples-per-class', '4', '--holdout-fraction', '0.25')
    assert rc == 0, log[-3000:]
    rows = list(csv.DictReader(open(os.path.join(out, 'results.csv'))))
    for r in rows[:2]:
        assert 0 <= float(r['ece_calibrated']) <= 100 and float(r['data_start_s']) >= 0
        assert 0 <= float(r['ood_auroc_maha']) <= 100 and float(r['min_erank_frac']) > 0
    md = open(os.path.join(out, 'results.md')).read()
    assert '| zzz-data+carrot@0 | zzz-data+carrot | 1 | ' in md
    diff = float(rows[1]['top1']) - float(rows[0]['top1'])
    assert f'{diff:+.2f} ± 0.00' in md


def test_variant_names_give_their_flags():
    flags = ablation.variant_flags
    assert flags('zzz-r4-data+carrot@0.3-att+pen', 8) == [
        '--head', 'zzz', '--zzz-rank', '4', '--head-init', 'data', '--carrot', '--carrot-weight', '0.3',
        '--carrot-rank-norm', 'attainable', '--zzz-v-shrink', '0.1', '--zzz-decouple', '0.1']
    assert flags('linear-data', 8) == ['--head-init', 'data'] and flags('linear+carrot@0', 8) == [
        '--carrot', '--carrot-weight', '0']
    for bad in ('linear+pen', 'linear-r4', 'zzz+carot'):
        with pytest.raises(SystemExit, match='unknown variant'):
            flags(bad, 8)


def test_flags_the_sweep_sets_are_rejected():
    rc, log = sweep('--data-dir', ROOT, '--', '--model', 'test_resnet', '--seed', '3')
    assert rc == 2 and '--seed after -- are set by ablation.py' in log
    with pytest.raises(SystemExit, match='unknown variant'):
        ablation.variant_flags('linear-r4', 8)
    assert ablation.variant_flags('zzz-r0+carrot', 8) == ['--head', 'zzz', '--zzz-rank', '0', '--carrot']
    assert ablation.variant_flags('linear+carrot', 8) == ['--carrot']


def test_recipe_keys_of_the_variant_are_dropped(tmp_path):
    """A recipe that sets head / zzz_rank / carrot still serves every variant: each gets its own copy without them."""
    import train
    recipe = os.path.join(ROOT, 'hparams', 'cub200_resnet50_448.yaml')
    for variant in ('linear', 'linear+carrot', 'zzz-r4'):
        path = ablation.variant_config(recipe, variant, str(tmp_path))
        args, _ = train.parse_args(['-c', path, '--data-dir', ROOT, *ablation.variant_flags(variant, 8)])
        assert (args.head, args.carrot, args.zzz_rank) == {
            'linear': (None, False, None), 'linear+carrot': (None, True, None), 'zzz-r4': ('zzz', False, 4)}[variant]
        assert args.sampler == 'pk' and args.img_size == 448                  # the rest of the recipe stays


def test_train_img_per_s_from_log(tmp_path):
    log = tmp_path / 'train.log'
    log.write_text(
        '# 2025-01-01 00:00:00 python train.py\n'
        '     1.000 | Model created\n'
        '     2.000 | Train: 0 [   0/3 ( 33%)]  Loss: 1.0\n'      # update 1 done: clock starts
        '     3.000 | Train: 0 [   1/3 ( 67%)]  Loss: 1.0\n'
        '     4.000 | Train: 0 [   2/3 (100%)]  Loss: 1.0\n'      # 2 updates x 16 images in 2 s
        '     5.000 | Train: 1 [   0/3 ( 33%)]  Loss: 1.0\n'      # epoch 1 stopped midway: not counted
        '# 2025-01-01 00:01:00 python train.py --resume last.pth.tar\n'
        '     3.000 | Train: 1 [   0/3 ( 33%)]  Loss: 1.0\n'
        '     9.000 | Train: 1 [   2/3 (100%)]  Loss: 1.0\n')     # 32 images in 6 s
    assert ablation.train_img_per_s(str(log), 16) == pytest.approx(64 / 8)
