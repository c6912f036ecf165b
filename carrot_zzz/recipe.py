"""Recipes: the YAML files train.py and validate.py take with -c/--config (hparams/*.yaml, a run's args.yaml).

A recipe is a mapping of flag names to values; `read_recipe` returns it with the flags' argparse names
(`samples-per-class` and `samples_per_class` are both `samples_per_class`). Each script decides what to do
with keys it has no flag for (train.py stops, validate.py skips the training-only ones).
"""
import os
from typing import Any, Dict

import yaml

__all__ = ['read_recipe']


def read_recipe(path: str) -> Dict[str, Any]:
    """{flag dest: value} of the YAML file at path; ValueError with a one-line fix when it is missing or not a mapping."""
    if not os.path.isfile(path):
        raise ValueError(f'config file {path} not found; pass -c with the path of a YAML recipe')
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f'config file {path} is not a YAML mapping of flag names to values')
    return {str(k).replace('-', '_'): v for k, v in cfg.items()}
