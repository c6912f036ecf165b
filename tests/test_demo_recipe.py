"""README's main command, shortened: hparams/demo.yaml trains the ZZZ head + CARROT on the shipped Fashion-MNIST
subset and validate.py -c takes the same recipe. Three epochs instead of thirty (the README states the full run's
top-1); the test asserts the pipeline learns well above chance (10%)."""
import json
import os

import train
import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = os.path.join(ROOT, 'hparams', 'demo.yaml')


def test_demo_recipe_trains_and_validates(tmp_path):
    out = train.main(['-c', RECIPE, '--epochs', '3', '--output', str(tmp_path), '--workers', '0'])
    assert os.path.basename(out) == 'demo'
    results = tmp_path / 'results.json'
    validate.main(['-c', RECIPE, '--checkpoint', os.path.join(out, 'model_best.safetensors'), '--workers', '0',
                   '--results-file', str(results), '--results-format', 'json'])
    res = json.loads(results.read_text())
    res = res[0] if isinstance(res, list) else res
    assert res['model'] == 'test_resnet_zzz' and res['img_size'] == 28
    assert res['top1'] > 40.0, res            # chance: 10%
    assert 0.0 <= res['ece'] <= 100.0 and res['nll'] > 0.0
