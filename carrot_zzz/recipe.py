"""Recipes: the YAML files train.py and validate.py take with -c/--config (hparams/*.yaml, a run's args.yaml).

A recipe is a mapping of flag names to values; `read_recipe` returns it with the flags' argparse names
(`samples-per-class` and `samples_per_class` are both `samples_per_class`). Each script decides what to do
with keys it has no flag for (train.py stops, validate.py skips the training-only ones).
"""
import os
from typing import Any, Dict

import yaml

__all__ = ['read_recipe']


def _where(error: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error (1-based), '' when it has no position."""
    mark = getattr(error, 'problem_mark', None)
    return f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''


def _problem(error: yaml.YAMLError) -> str:
    return getattr(error, 'problem', None) or str(error).splitlines()[0]


def read_recipe(path: str) -> Dict[str, Any]:
    """{flag dest: value} of the YAML file at path; ValueError with a one-line fix when it is missing or not a mapping."""
    if not os.path.isfile(path):
        raise ValueError(f'config file {path} not found; pass -c with the path of a YAML recipe')
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f'config file {path} is not valid YAML{_where(e)}: {_problem(e)}; fix the recipe') from e
    if not isinstance(cfg, dict):
        raise ValueError(f'config file {path} is not a YAML mapping of flag names to values (it holds a '
                         f'{type(cfg).__name__}); write one "flag: value" per line')
    return {str(k).replace('-', '_'): v for k, v in cfg.items()}
