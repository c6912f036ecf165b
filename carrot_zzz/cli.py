"""Command-line pieces train.py and validate.py share.

* the data set reader flags both of timm's scripts take (--dataset-download, --class-map, --input-img-mode,
  --input-key, --target-key, --dataset-trust-remote-code);
* timm 1.0.31's multi-label flags (--task, --target-format, --multilabel-threshold): parsed so that a newer timm
  command line or args.yaml runs, single-label only;
* the one-line form of an exception, for their one-line errors.
"""
import argparse
import logging
from typing import Optional

__all__ = ['add_dataset_reader_flags', 'add_task_flags', 'single_label_error', 'first_line']

_logger = logging.getLogger(__name__)


def add_dataset_reader_flags(group: argparse._ActionsContainer) -> None:
    """Add timm's data set reader flags, with timm's defaults and meanings."""
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='Allow download of dataset for torch/ and tfds/ datasets that support it.')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (default: "")')
    group.add_argument('--input-img-mode', default=None, type=str,
                       help='Dataset image conversion mode for input images.')
    group.add_argument('--input-key', default=None, type=str, help='Dataset key for input images.')
    group.add_argument('--target-key', default=None, type=str, help='Dataset key for target labels.')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help="Allow huggingface dataset import to execute code downloaded from the dataset's repo.")


def add_task_flags(group: argparse._ActionsContainer) -> None:
    """Add --task, --target-format and --multilabel-threshold to a parser or argument group."""
    group.add_argument('--task', type=str, default='classification', choices=('classification', 'multilabel'),
                       help='classification (single label); multilabel (timm 1.0.31) is not supported here')
    group.add_argument('--target-format', type=str, default=None,
                       help='multi-label target format (timm 1.0.31); class indices only here')
    group.add_argument('--multilabel-threshold', type=float, default=None,
                       help='multi-label F1 threshold (timm 1.0.31); no effect with single-label classification')


def single_label_error(args: argparse.Namespace) -> Optional[str]:
    """The one-line error for multi-label settings, or None; a set --multilabel-threshold only warns."""
    if args.multilabel_threshold is not None:
        _logger.warning('--multilabel-threshold applies to multi-label validation only and has no effect here')
    for flag, value, single in (('--task', args.task, ('classification',)),
                                ('--target-format', args.target_format, (None, 'indices'))):
        if value not in single:
            return (f'{flag} {value}: multi-label training and validation are not supported here (the ZZZ head '
                    f'and CARROT are single-label); remove it, or use timm\'s own scripts')
    return None


def first_line(e: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message' (at most `limit` characters of it)."""
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0][:limit]}' if text else type(e).__name__
