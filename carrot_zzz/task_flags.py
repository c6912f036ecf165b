"""timm 1.0.31's multi-label flags (--task, --target-format, --multilabel-threshold), as train.py and validate.py
take them: parsed so that a newer timm command line or args.yaml runs, single-label only."""
import argparse
import logging
from typing import Optional

__all__ = ['add_task_flags', 'single_label_error']

_logger = logging.getLogger(__name__)


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
