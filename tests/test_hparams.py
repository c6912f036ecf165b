"""Every hparams/*.yaml loads through train.py's parser (known flags only, accepted values, no rejection) and
names a model that train.py can build."""
import glob
import os

import pytest
import timm
import torch

import train
from carrot_zzz import ZZZHead
from carrot_zzz.engine.models import model_name_and_head
from carrot_zzz.registry import is_zzz_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'hparams', '**', '*.yaml'), recursive=True))


@pytest.mark.parametrize('path', CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_hparams_parse_and_build(path):
    args, text = train.parse_args(['-c', path, '--data-dir', ROOT])  # the data folder is the user's
    assert args.config == path and text
    name, kwargs = model_name_and_head(args)
    with torch.device('meta'):   # the architecture and its head, without memory or pretrained weights
        model = timm.create_model(name, num_classes=args.num_classes, **kwargs)
    assert is_zzz_name(name) == bool(args.carrot or args.head)
    if args.head == 'zzz':
        assert isinstance(model.get_classifier(), ZZZHead) and model.get_classifier().rank == args.zzz_rank


def test_there_are_recipes():
    assert len(CONFIGS) >= 6
