"""The errors of a run: a setting that cannot work (SettingError, from carrot_zzz.errors), a training loss that is no
longer finite, a checkpoint that cannot be written.
"""
from ..errors import SettingError, first_line

__all__ = ['SettingError', 'TrainingDiverged', 'CheckpointWriteError', 'first_line']


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, lost permission); the previous files stay as they were."""


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number; the checkpoints written before it stay as they were."""
