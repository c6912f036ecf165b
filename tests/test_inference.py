"""inference.py end to end on a tiny image folder (timm's test_vit, CPU): its table equals validate.py's saved
logits, labels are the checkpoint's class names, the stored threshold answers "unknown", every results format
round-trips, and bad input is one line or one row."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import train
import validate
from carrot_zzz.embeddings import load_embeddings
from carrot_zzz.results_table import read_table, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 4
BASE = ['--model', 'test_vit', '--input-size', '3', '32', '32', '--num-classes', str(NUM_CLASSES),
        '--batch-size', '16', '--workers', '0', '--device', 'cpu', '--opt', 'adamw', '--lr', '3e-4',
        '--warmup-epochs', '0', '--no-aug', '--log-interval', '5', '--seed', '1']
COMMON = ['--model', 'test_vit', '--input-size', '3', '32', '32', '--workers', '0', '--device', 'cpu']
NAMES = [f'class_{c}' for c in range(NUM_CLASSES)]


@pytest.fixture(scope='module')
def folders(tmp_path_factory, image_folder):
    """Four colour classes the model trains on, and 'unseen': images of none of them (uniform noise)."""
    root = tmp_path_factory.mktemp('data')
    image_folder(root / 'seen', num_classes=NUM_CLASSES, train_per_class=24, val_per_class=20)
    unseen = root / 'unseen' / 'validation' / 'noise'
    unseen.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(unseen / f'{i}.png')
    return {'seen': str(root / 'seen'), 'unseen': str(root / 'unseen')}


@pytest.fixture(scope='module')
def runs(folders, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp('runs')
    return {name: train.main([folders['seen'], *BASE, '--epochs', '2', '--holdout-fraction', '0.25', '--output',
                              str(out), '--experiment', name, *extra])
            for name, extra in (('zzz', ['--head', 'zzz', '--zzz-rank', '2']), ('linear', []))}


def _infer(data_dir, checkpoint, tmp_path, *flags):
    return inference.main([data_dir, *COMMON, '--checkpoint', checkpoint, '--results-dir', str(tmp_path),
                           '--no-console-results', *flags])


@pytest.mark.parametrize('name', ['zzz', 'linear'])
def test_table_equals_validate_and_names_the_classes(runs, folders, tmp_path, name):
    ckpt = os.path.join(runs[name], 'model_best.safetensors')
    emb = tmp_path / 'emb.safetensors'
    validate.main([folders['seen'], *COMMON, '--checkpoint', ckpt, '--save-embeddings', str(emb)])
    saved = load_embeddings(emb)
    for kind, expected in (('logit', saved['logits']), ('prob', torch.softmax(saved['logits'], 1))):
        rows = _infer(folders['seen'], ckpt, tmp_path, '--topk', str(NUM_CLASSES), '--include-index',
                      '--output-type', kind, '--label-type', 'name')
        assert len(rows) == expected.shape[0]
        table = torch.zeros_like(expected)
        for i, row in enumerate(rows):
            table[i, row['index']] = torch.tensor(row[kind])
            assert row['label'] == [NAMES[c] for c in row['index']]
            assert row['index'][0] == int(expected[i].argmax())
        torch.testing.assert_close(table, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['zzz', 'linear'])
def test_unknown_keeps_the_share_it_was_fitted_for_and_flags_an_unseen_class(runs, folders, tmp_path, name):
    """validate.py --fit-temperature validation fixes the threshold on the validation split: inference on that
    split keeps at least 95% of it (exactly the quantile), and the images of the class never trained on are
    called unknown more often."""
    saved = tmp_path / 'calibrated.safetensors'
    validate.main([folders['seen'], *COMMON, '--checkpoint', os.path.join(runs[name], 'model_best.pth.tar'),
                   '--split', 'train', '--fit-temperature', 'validation', '--save-calibrated', str(saved)])
    seen = _infer(folders['seen'], str(saved), tmp_path, '--reject-unknown')
    unseen = _infer(folders['unseen'], str(saved), tmp_path, '--reject-unknown')
    kept = sum(not row['unknown'] for row in seen) / len(seen)
    assert 0.95 <= kept < 0.95 + 1 / len(seen) + 1e-9
    flagged = sum(row['unknown'] for row in unseen) / len(unseen)
    assert flagged > 1 - kept
    score = 'ood_maha' if name == 'zzz' else 'ood_maxlogit'
    assert all((row[score] < row['ood_threshold']) == row['unknown'] for row in seen + unseen)
    assert all((row['label'] == 'unknown') == row['unknown'] for row in seen + unseen)
    forced = _infer(folders['seen'], str(saved), tmp_path, '--reject-unknown', '--ood-threshold', '1e9')
    assert all(row['unknown'] and row['ood_threshold'] == 1e9 for row in forced)


def test_a_training_checkpoint_predicts_the_same(runs, folders, tmp_path):
    """model_best.pth.tar (uncalibrated, as trained) gives the same top-k classes as its calibrated safetensors: a
    temperature never changes a prediction; its probabilities differ by the temperature."""
    for name in ('zzz', 'linear'):
        pth = _infer(folders['seen'], os.path.join(runs[name], 'model_best.pth.tar'), tmp_path, '--topk', '2')
        safe = _infer(folders['seen'], os.path.join(runs[name], 'model_best.safetensors'), tmp_path, '--topk', '2')
        assert [r['label'] for r in pth] == [r['label'] for r in safe] and pth[0]['label'][0] in NAMES


def test_reject_unknown_needs_a_threshold(runs, folders, tmp_path):
    with pytest.raises(SystemExit, match='--reject-unknown: the checkpoint stores no out-of-distribution '
                                         'threshold; pass --ood-threshold X'):
        _infer(folders['seen'], os.path.join(runs['zzz'], 'model_best.pth.tar'), tmp_path, '--reject-unknown')


ROWS = [{'filename': 'a.png', 'index': [2, 0], 'label': ['cat', 'dog'], 'prob': [0.75, 0.125], 'unknown': False},
        {'filename': 'b.png', 'error': 'truncated image'}]


@pytest.mark.parametrize('fmt', ['csv', 'json', 'json-records', 'json-split'])
def test_every_format_round_trips(tmp_path, fmt):
    path = write_table(ROWS, str(tmp_path / 'out'), fmt)
    back = read_table(path, fmt)
    full = [{key: row.get(key) for key in ('filename', 'index', 'label', 'prob', 'unknown', 'error')} for row in ROWS]
    assert [{key: row.get(key) for key in full[0]} for row in back] == full


def test_parquet_round_trips_or_says_what_it_needs(runs, folders, tmp_path, monkeypatch):
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match='--results-format parquet: the parquet format needs pandas and '
                                             'pyarrow .*: pip install pandas pyarrow'):
            _infer(folders['seen'], os.path.join(runs['zzz'], 'model_best.safetensors'), tmp_path,
                   '--results-format', 'parquet')
        return
    path = write_table(ROWS[:1], str(tmp_path / 'out'), 'parquet')
    assert read_table(path, 'parquet')[0]['label'] == ['cat', 'dog']


def test_unreadable_images_get_an_error_row_and_exit_status_1(runs, folders, tmp_path):
    broken = tmp_path / 'broken' / 'validation'
    shutil.copytree(os.path.join(folders['seen'], 'validation'), broken)
    (broken / 'class_0' / 'zz_broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'inference.py'), str(tmp_path / 'broken'), *COMMON,
                        '--checkpoint', os.path.join(runs['zzz'], 'model_best.safetensors'), '--results-dir',
                        str(tmp_path / 'out'), '--fullname'], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1, p.stderr[-1500:]
    rows = read_table(str(tmp_path / 'out' / 'test_vit_zzz-32.csv'), 'csv')
    bad = [row for row in rows if row.get('error')]
    assert len(rows) == NUM_CLASSES * 20 + 1 and len(bad) == 1 and bad[0]['filename'].endswith('zz_broken.png')
    assert all(row['label'] in NAMES for row in rows if not row.get('error'))
    assert '1 of 81 images could not be read' in p.stderr and 'Traceback' not in p.stderr
    (tmp_path / 'empty' / 'validation').mkdir(parents=True)
    with pytest.raises(SystemExit, match='inference.py: error: '):
        _infer(str(tmp_path / 'empty'), os.path.join(runs['zzz'], 'model_best.safetensors'), tmp_path)


def test_onnx_gives_the_same_table(folders, tmp_path, one_thread):
    """--onnx: an export made with README's recipe (dynamo=False) run on onnxruntime gives the eager table, the
    'unknown' answers included (maha read back from the logits)."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    import timm
    from carrot_zzz import fold_heads, load_weights
    folder = train.main([folders['seen'], *BASE, '--model', 'test_resnet', '--head', 'zzz', '--zzz-rank', '2',
                         '--epochs', '1', '--holdout-fraction', '0.25', '--output', str(tmp_path), '--experiment', 'r'])
    ckpt = os.path.join(folder, 'model_best.safetensors')
    model = timm.create_model('test_resnet_zzz', num_classes=NUM_CLASSES, zzz_rank=2)
    load_weights(model, ckpt)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    path = str(tmp_path / 'model.onnx')
    torch.onnx.export(fold_heads(model), (x,), path, dynamo=False, opset_version=17, input_names=['x'],
                      output_names=['logits'], dynamic_axes={'x': {0: 'batch'}, 'logits': {0: 'batch'}})
    common = ['--model', 'test_resnet', '--topk', '2', '--include-index', '--reject-unknown']
    eager = _infer(folders['seen'], ckpt, tmp_path, *common)
    exported = _infer(folders['seen'], ckpt, tmp_path, *common, '--onnx', path)
    assert [r['index'] for r in exported] == [r['index'] for r in eager]
    assert [r['unknown'] for r in exported] == [r['unknown'] for r in eager]
    for ours, theirs in zip(exported, eager):
        assert ours['prob'] == pytest.approx(theirs['prob'], abs=1e-5)
        assert ours['ood_maha'] == pytest.approx(theirs['ood_maha'], rel=1e-4, abs=1e-4)
    bad = tmp_path / 'bad.onnx'
    bad.write_bytes(b'not a model')
    with pytest.raises(SystemExit, match=r'--onnx .*: cannot load it'):
        _infer(folders['seen'], ckpt, tmp_path, '--model', 'test_resnet', '--onnx', str(bad))


def test_a_results_file_that_cannot_be_written_comes_after_the_printed_results(runs, folders, tmp_path, monkeypatch,
                                                                               capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(inference, 'write_table', disk_full)
    with pytest.raises(SystemExit, match=r'--results-format csv: cannot write .*\.csv \(No space left on device\); '
                                         r'the predictions were printed above'):
        inference.main([folders['seen'], *COMMON, '--checkpoint', os.path.join(runs['zzz'], 'model_best.safetensors'),
                        '--results-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert '--result' in printed and '"label": "class_' in printed
