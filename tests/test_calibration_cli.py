"""Calibrated and open-set out of the box, through the scripts: train.py folds a temperature into
model_best.safetensors and stores the class names, validate.py fits one on another split, matches class folders
by name and reports every OOD score; the ZZZ penalties are logged. Tiny image folder, timm's test_vit, CPU."""
import csv
import json
import os
import shutil

import pytest
import timm
import torch
from safetensors import safe_open

import train
import validate
from carrot_zzz.embeddings import load_embeddings
from carrot_zzz.weights import read_weights

NUM_CLASSES = 4
BASE = ['--model', 'test_vit', '--input-size', '3', '32', '32', '--num-classes', str(NUM_CLASSES),
        '--batch-size', '16', '--workers', '0', '--device', 'cpu', '--opt', 'adamw', '--lr', '2e-4',
        '--warmup-epochs', '0', '--no-aug', '--log-interval', '2', '--seed', '3']
VALIDATE = ['--model', 'test_vit', '--input-size', '3', '32', '32', '--workers', '0', '--device', 'cpu']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp('data'), num_classes=NUM_CLASSES, train_per_class=24)


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory, one_thread):
    """One epoch of a linear and of a ZZZ head, evaluated on a held-out quarter of each class (calibrated)."""
    out = tmp_path_factory.mktemp('runs')
    folders = {}
    for name, extra in (('linear', ['--lr', '3e-5']), ('zzz', ['--head', 'zzz', '--zzz-rank', '2', '--zzz-v-shrink', '0.1',
                                                 '--zzz-decouple', '0.1'])):
        folders[name] = train.main([data_dir, *BASE, '--epochs', '1', '--holdout-fraction', '0.25', '--output',
                                    str(out), '--experiment', name, *extra])
    return folders


def _metadata(path):
    with safe_open(path, framework='pt') as f:
        return f.metadata()


def _model(name, path):
    model = timm.create_model('test_vit_zzz' if name == 'zzz' else 'test_vit', num_classes=NUM_CLASSES,
                              **({'zzz_rank': 2} if name == 'zzz' else {}))
    model.load_state_dict(read_weights(path)[0])
    return model.eval()


@pytest.mark.parametrize('name', ['linear', 'zzz'])
def test_model_best_holds_the_folded_temperature_and_the_class_names(runs, name):
    folder = runs[name]
    meta = _metadata(os.path.join(folder, 'model_best.safetensors'))
    names = [f'class_{c}' for c in range(NUM_CLASSES)]
    assert json.loads(meta['class_names']) == names
    assert torch.load(os.path.join(folder, 'model_best.pth.tar'), weights_only=True)['class_names'] == names
    info = json.loads(meta['calibration'])
    temperature = float(meta['temperature'])
    assert info['identifiable'] and not info['floored'] and info['temperature'] == temperature
    assert info['nll_after'] < info['nll_before'] and info['samples'] == NUM_CLASSES * 6
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        trained = _model(name, os.path.join(folder, 'model_best.pth.tar'))(x)
        folded = _model(name, os.path.join(folder, 'model_best.safetensors'))(x)
    torch.testing.assert_close(folded, trained / temperature, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['linear', 'zzz'])
def test_validate_fits_the_same_temperature_on_the_same_holdout(runs, data_dir, tmp_path, name):
    """--fit-temperature holdout with train.py's fraction and seed carves the same samples: the same T; the
    calibrated file it writes equals train.py's model_best.safetensors."""
    folder = runs[name]
    saved = tmp_path / 'calibrated.safetensors'
    r = validate.main([data_dir, *VALIDATE, '--checkpoint', os.path.join(folder, 'model_best.pth.tar'),
                       '--fit-temperature', 'holdout', '--holdout-fraction', '0.25', '--seed', '3',
                       '--save-calibrated', str(saved)])
    expected = float(_metadata(os.path.join(folder, 'model_best.safetensors'))['temperature'])
    assert r['temperature'] == pytest.approx(expected, rel=1e-5)
    stored = _metadata(os.path.join(folder, 'model_best.safetensors'))
    assert r['ood_score'] == stored['ood_score'] == ('maha' if name == 'zzz' else 'maxlogit')
    assert r['ood_threshold'] == pytest.approx(float(stored['ood_threshold']), rel=1e-4, abs=1e-5)
    assert float(stored['ood_tpr']) == 0.95
    assert r['nll_calibrated'] < r['nll'] and {'ece_calibrated', 'temperature'} <= r.keys()
    ours, theirs = read_weights(saved)[0], read_weights(os.path.join(folder, 'model_best.safetensors'))[0]
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert json.loads(_metadata(saved)['class_names'])[0] == 'class_0'


def test_validate_refuses_to_fit_on_the_split_it_reports(runs, data_dir):
    ckpt = os.path.join(runs['linear'], 'model_best.pth.tar')
    for flags, message in ((['--fit-temperature', 'validation'], 'that is the split reported'),
                           (['--fit-temperature', 'holdout'], 'pass --holdout-fraction F'),
                           (['--fit-temperature', 'holdout', '--holdout-fraction', '0.2', '--split', 'train'],
                            'carves from --train-split train, the split reported'),
                           (['--save-calibrated', 'x.safetensors'], 'add --fit-temperature SPLIT')):
        with pytest.raises(SystemExit, match=message):
            validate.main([data_dir, *VALIDATE, '--checkpoint', ckpt, *flags])


def test_calibrate_off_and_on_without_an_evaluation_split(data_dir, tmp_path, one_thread):
    folder = train.main([data_dir, *BASE, '--epochs', '1', '--calibrate', 'off', '--output', str(tmp_path),
                         '--experiment', 'off'])
    meta = _metadata(os.path.join(folder, 'model_best.safetensors'))
    assert 'temperature' not in meta and json.loads(meta['class_names'])[3] == 'class_3'
    trained = read_weights(os.path.join(folder, 'model_best.pth.tar'))[0]
    for key, value in read_weights(os.path.join(folder, 'model_best.safetensors'))[0].items():
        assert torch.equal(value, trained[key])
    with pytest.raises(SystemExit, match='--calibrate on: needs an evaluation split'):
        train.main([data_dir, *BASE, '--epochs', '1', '--calibrate', 'on', '--val-split', '', '--output',
                    str(tmp_path), '--experiment', 'on'])


def test_penalties_are_logged_and_need_a_zzz_head(runs, data_dir, tmp_path):
    with open(os.path.join(runs['zzz'], 'summary.csv')) as f:
        row = next(csv.DictReader(f))
    assert float(row['train_zzz_v_shrink']) > 0 and 0 <= float(row['train_zzz_decouple']) <= 1
    with pytest.raises(SystemExit, match='--zzz-decouple 0.1: penalises the ZZZ head; add --head zzz'):
        train.main([data_dir, *BASE, '--zzz-decouple', '0.1', '--output', str(tmp_path), '--experiment', 'p'])


@pytest.fixture
def shuffled_folders(data_dir, tmp_path):
    """Evaluation folders: one without class_1, one with class_2 renamed."""
    def make(change):
        root = tmp_path / change
        shutil.copytree(os.path.join(data_dir, 'validation'), root / 'validation')
        if change == 'missing':
            shutil.rmtree(root / 'validation' / 'class_1')
        else:
            os.rename(root / 'validation' / 'class_2', root / 'validation' / 'seagull')
        return str(root)
    return make


def test_class_folders_are_matched_by_name(runs, data_dir, shuffled_folders, tmp_path, caplog):
    """A missing class folder just has no samples (the others keep their results); a folder the checkpoint does
    not know stops with one line naming it; a checkpoint without names warns and keeps the folder order."""
    ckpt = os.path.join(runs['linear'], 'model_best.safetensors')
    full_csv, cut_csv = tmp_path / 'full.csv', tmp_path / 'cut.csv'
    validate.main([data_dir, *VALIDATE, '--checkpoint', ckpt, '--per-class-csv', str(full_csv)])
    validate.main([shuffled_folders('missing'), *VALIDATE, '--checkpoint', ckpt, '--per-class-csv', str(cut_csv)])
    full, cut = (list(csv.DictReader(open(p))) for p in (full_csv, cut_csv))
    assert [r['class_name'] for r in cut] == [f'class_{c}' for c in range(NUM_CLASSES)]
    assert cut[1]['support'] == '0' and cut[1]['accuracy'] == ''
    for c in (0, 2, 3):
        assert cut[c] == full[c]
    with pytest.raises(SystemExit, match="not trained on: 'seagull'"):
        validate.main([shuffled_folders('renamed'), *VALIDATE, '--checkpoint', ckpt])
    model = _model('linear', ckpt)
    bare = tmp_path / 'bare.pth'
    torch.save(model.state_dict(), bare)
    caplog.set_level('WARNING')
    validate.main([data_dir, *VALIDATE, '--checkpoint', str(bare)])
    assert any('stores no class names' in rec.message for rec in caplog.records)


def test_every_ood_score_is_reported_and_saved(runs, data_dir, tmp_path):
    ckpt = os.path.join(runs['zzz'], 'model_best.safetensors')
    emb = tmp_path / 'emb.safetensors'
    r = validate.main([data_dir, *VALIDATE, '--checkpoint', ckpt, '--ood-data-dir', data_dir, '--ood-split', 'train',
                       '--save-embeddings', str(emb)])
    for score in ('msp', 'maxlogit', 'energy', 'maha', 'll'):
        assert 0 <= r[f'ood_auroc_{score}'] <= 100 and 0 <= r[f'ood_fpr95_{score}'] <= 100
    saved = load_embeddings(emb)
    model = _model('zzz', ckpt)
    with torch.no_grad():
        distance = model.get_classifier().mahalanobis(saved['embeddings'])
    torch.testing.assert_close(saved['score_maha'], -distance.min(1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved['score_maxlogit'], saved['logits'].max(1).values)
