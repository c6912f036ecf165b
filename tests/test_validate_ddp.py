"""validate.py under torchrun (2 CPU processes, gloo) against one process, on splits whose sizes are odd (15
reported, 21 for the temperature, 7 out-of-distribution) so that the distributed sampler pads each: the same
results, the same embeddings and temperature, files written once."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train
import validate
from test_train_ddp import torchrun

NUMBERS = ('top1', 'top5', 'mean_class_acc', 'nll', 'ece', 'ood_auroc_msp', 'ood_fpr95_msp', 'ood_auroc_ll',
           'ood_fpr95_ll', 'temperature', 'nll_calibrated', 'ece_calibrated', 'ood_threshold', 'recall@1', 'map@r')
OUTPUTS = {'r.json': '--results-file', 'pc.csv': '--per-class-csv', 'e.safetensors': '--save-embeddings',
           'cal.safetensors': '--save-calibrated'}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, image_folder, one_thread):
    """(argv of validate.py but its output files, folder): a ZZZ model trained one epoch on 3 classes."""
    root = tmp_path_factory.mktemp('validate_ddp')
    data = image_folder(root / 'data', num_classes=3, train_per_class=7, val_per_class=5)
    ood = image_folder(root / 'ood', num_classes=1, train_per_class=0, val_per_class=7, seed=1)
    folder = train.main([data, '--model', 'test_vit', '--input-size', '3', '32', '32', '--num-classes', '3',
                         '--batch-size', '7', '--workers', '0', '--device', 'cpu', '--epochs', '1', '--no-aug',
                         '--warmup-epochs', '0', '--head', 'zzz', '--zzz-rank', '2', '--calibrate', 'off',
                         '--output', str(root), '--experiment', 'tiny', '--seed', '0'])
    argv = [data, '--model', 'test_vit', '--checkpoint', os.path.join(folder, 'model_best.safetensors'),
            '--input-size', '3', '32', '32', '--device', 'cpu', '-b', '4', '-j', '0', '--ood-data-dir', ood,
            '--fit-temperature', 'train', '--retrieval', '--results-format', 'json']
    return argv, root


def _outputs(folder):
    """The output flags, every file in folder."""
    os.makedirs(folder)
    return [arg for name, flag in OUTPUTS.items() for arg in (flag, os.path.join(folder, name))]


def test_torchrun_gives_the_results_and_files_of_one_process(trained):
    argv, root = trained
    single = validate.main(argv + _outputs(root / 'one'))
    proc = torchrun(root, 'validate', argv + _outputs(root / 'two'))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count('--result\n') == 1 and out.count(' * Acc@1') == 1 and 'distributed mode' in out   # rank 0 alone
    assert sorted(os.listdir(root / 'two')) == sorted(OUTPUTS)
    with open(root / 'two' / 'r.json') as f:
        shared = json.load(f)
    assert set(shared) == set(single)
    for key in NUMBERS:
        assert shared[key] == pytest.approx(single[key], rel=1e-4, abs=2e-4), key
    assert shared['ood_score'] == single['ood_score']
    for name in ('e.safetensors', 'cal.safetensors'):
        one, two = load_file(root / 'one' / name), load_file(root / 'two' / name)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f'{name}: {key}')
    assert len(load_file(root / 'two' / 'e.safetensors')['labels']) == 15      # the padding dropped
    assert (root / 'one' / 'pc.csv').read_text() == (root / 'two' / 'pc.csv').read_text()


def test_num_gpu_under_torchrun_is_one_line_once(trained, tmp_path):
    argv, _ = trained
    proc = torchrun(tmp_path, 'validate', argv + ['--num-gpu', '2'])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    line = 'validate.py: error: --num-gpu 2: spreads each batch over GPUs inside one process (DataParallel)'
    assert out.count(line) == 1 and 'Traceback' not in out.split(line)[0], out[-3000:]
