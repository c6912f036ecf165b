"""Every hparams/*.yaml loads through train.py's parser: known flags only, accepted values, no rejection."""
import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'hparams', '**', '*.yaml'), recursive=True))


@pytest.mark.parametrize('path', CONFIGS or [None], ids=[os.path.relpath(p, ROOT) for p in CONFIGS] or ['none'])
def test_hparams_parse(path):
    if path is None:
        args, _ = train.parse_args(['--data-dir', ROOT])       # no YAML files yet: timm's defaults parse
        assert args.model == 'resnet50'
        return
    args, text = train.parse_args(['-c', path, '--data-dir', ROOT])  # the data folder is the user's
    assert args.config == path and text
