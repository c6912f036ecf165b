"""The error a setting raises when its value cannot work, named by setting so each caller can name it its way.

    raise SettingError('samples_per_class', 32, 'must be at most batch_size=16; lower it or raise batch_size')

Python callers read `samples_per_class=32: must be at most batch_size=16; ...`; train.py and validate.py print
`--samples-per-class 32: must be at most --batch-size 16; ...` (carrot_zzz.cli.flag_text does the translation).
`first_line(e)` is the one-line form of an exception these messages quote. Messages name other settings by their
argument names: as name=value, in backticks (`lr`), or alone when the name
holds an underscore (batch_size). A plain ValueError: the library (the P x K sampler) raises it, the engine too.
"""
from typing import Any

__all__ = ['SettingError', 'first_line']


class SettingError(ValueError):
    """A setting (an argument name of the run's configuration) whose value cannot work, and how to fix it."""

    def __init__(self, setting: str, value: Any, message: str):
        self.setting = setting
        self.value = value
        self.message = message
        super().__init__(f'{setting}={value!r}: {message}')


def first_line(e: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message' (at most `limit` characters of it)."""
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0][:limit]}' if text else type(e).__name__
