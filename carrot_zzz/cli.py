"""What train.py and validate.py share on the command line.

* `add`: one flag per call, in the scripts' flag tables; a switch when the default is False.
* the flags both scripts take: device and precision, input size and normalisation, the data set reader flags,
  timm 1.0.31's multi-label flags;
* `parse_with_recipe`: the command line over the defaults of a `-c/--config` YAML recipe;
* one-line errors: `fail`, and `setting_errors`, which turns the package's SettingError (named by argument) into
  a line that names the flag.
"""
import argparse
import contextlib
import logging
import re
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from .errors import SettingError
from .recipe import read_recipe

__all__ = ['add', 'add_precision_flags', 'add_input_flags', 'add_dataset_reader_flags', 'add_task_flags', 'single_label_error', 'fail',
           'flag_name', 'flag_text', 'setting_errors', 'parse_with_recipe']

_logger = logging.getLogger(__name__)


def add(group: argparse._ActionsContainer, names: str, default: Any, help: str, type: Any = None, **kw) -> None:
    """Add one flag. names: space-separated option strings ('-b --batch-size'); default False makes a switch."""
    if default is False and type is None and 'action' not in kw:
        kw['action'] = 'store_true'
    elif type is not None:
        kw['type'] = type
    group.add_argument(*names.split(), default=default, help=help, **kw)


def add_precision_flags(group: argparse._ActionsContainer) -> None:
    """Device and precision, as both of timm's scripts take them (carrot_zzz.engine.precision reads them)."""
    add(group, '--device', 'cuda', 'torch device to run on', str)
    add(group, '--amp', False, 'mixed precision: the forward pass under autocast')
    add(group, '--amp-dtype', 'float16', 'autocast dtype: float16 or bfloat16', str)
    add(group, '--model-dtype', None, 'parameter dtype without autocast: float32, float16, bfloat16', str)


def add_input_flags(group: argparse._ActionsContainer) -> None:
    """Input size and normalisation, as both of timm's scripts take them (timm's resolve_data_config reads them)."""
    add(group, '--img-size', None, 'square input size (default: the model\'s)', int)
    add(group, '--in-chans', None, 'input channels (default: 3)', int)
    add(group, '--input-size', None, 'channels height width of the input, e.g. 3 224 224', int, nargs=3)
    add(group, '--mean', None, 'per-channel normalisation mean', float, nargs='+')
    add(group, '--std', None, 'per-channel normalisation standard deviation', float, nargs='+')
    add(group, '--interpolation', '', 'resize interpolation (default: the model\'s)', str)


def add_model_build_flags(group: argparse._ActionsContainer) -> None:
    """How validate.py and inference.py size, build and compile the model: the evaluation crop, --model-kwargs,
    --torchcompile-mode and the exclusive --torchscript / --torchcompile / --aot-autograd."""
    from timm.utils import ParseKwargs
    add(group, '--use-train-size', False, 'the training input size even where the model has a test size')
    add(group, '--crop-pct', None, 'centre-crop fraction', float)
    add(group, '--crop-mode', None, 'crop: center, squash or border (default: the model\'s)', str)
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra create_model key=value')
    add(group, '--torchcompile-mode', None, 'mode for torch.compile', str)
    exclusive = group.add_mutually_exclusive_group()
    add(exclusive, '--torchscript', False, 'TorchScript the model (plain timm models only)')
    add(exclusive, '--torchcompile', None, 'torch.compile with this backend (bare flag: inductor)', str, nargs='?',
        const='inductor')
    add(exclusive, '--aot-autograd', False, 'functorch memory-efficient fusion')


def add_dataset_reader_flags(group: argparse._ActionsContainer) -> None:
    """The reader flags of timm's scripts, with timm's defaults and meanings, and PIL's pixel limit."""
    add(group, '--dataset-download', False, 'let torch/ and tfds/ data sets download themselves when missing')
    add(group, '--class-map', '', 'text file mapping folder names to class indices (image folders)', str,
        metavar='FILENAME')
    add(group, '--input-img-mode', None, 'PIL mode images are converted to (default: RGB, L for 1 channel)', str)
    add(group, '--input-key', None, 'field holding the image in hub / tfds / wds records', str)
    add(group, '--target-key', None, 'field holding the label in hub / tfds / wds records', str)
    add(group, '--dataset-trust-remote-code', False, 'allow a hub data set to run its own loading code')
    add(group, '--max-image-pixels', None, 'images up to this many pixels are read (not a timm flag; default: PIL\'s '
                                           'decompression-bomb limit, 178956970; 0: no limit)', int)


def add_task_flags(group: argparse._ActionsContainer) -> None:
    """timm 1.0.31's --task, --target-format and --multilabel-threshold: parsed so its command lines run."""
    add(group, '--task', 'classification', 'single-label classification; multilabel is refused here', str,
        choices=('classification', 'multilabel'))
    add(group, '--target-format', None, 'label format of multi-label data; class indices only here', str)
    add(group, '--multilabel-threshold', None, 'decision threshold of multi-label metrics; unused here', float)


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


def fail(script: str, message: str):
    """Stop the script with one line that names the fix (exit status 2, as argparse's own errors)."""
    raise SystemExit(f'{script}: error: {message}')


def flag_name(dest: str) -> str:
    """'samples_per_class' -> '--samples-per-class'."""
    return '--' + dest.replace('_', '-')


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ' '.join(str(v) for v in value)
    return str(value)


def flag_text(message: str, dests: Sequence[str]) -> str:
    """A library message with its argument names as flags: `name=value` -> `--name value` and a name in backticks
    -> `--name` for every dest, and a bare `name_with_underscore` -> `--name-with-underscore` (plain words like
    'model', and quoted names, stay words)."""
    known = '|'.join(sorted((re.escape(d) for d in dests), key=len, reverse=True))
    message = re.sub(rf'\b({known})=', lambda m: flag_name(m.group(1)) + ' ', message)
    message = re.sub(rf'`({known})`', lambda m: flag_name(m.group(1)), message)
    compound = '|'.join(sorted((re.escape(d) for d in dests if '_' in d), key=len, reverse=True))
    if compound:
        message = re.sub(rf'(?<![-\w\'"])({compound})\b', lambda m: flag_name(m.group(1)), message)
    return message


@contextlib.contextmanager
def setting_errors(script: str, parser: argparse.ArgumentParser) -> Iterator[None]:
    """Inside: a SettingError stops the script with one line that names the flag and the fix."""
    try:
        yield
    except SettingError as e:
        dests = [a.dest for a in parser._actions]
        shown = flag_name(e.setting) if e.value is None or e.value is True else \
            f'{flag_name(e.setting)} {_value_text(e.value)}'
        fail(script, f'{shown}: {flag_text(e.message, dests)}')


def parse_with_recipe(script: str, parser: argparse.ArgumentParser, argv: Optional[List[str]],
                      skip_unknown: bool) -> Tuple[argparse.Namespace, List[str]]:
    """(args, recipe keys left out): the command line over the defaults of `-c/--config FILE`, a YAML recipe.

    A recipe key that is no flag of the parser is skipped when skip_unknown (validate.py takes a training recipe),
    or when its value is empty (None, False, '', [], {}: what a newer timm's args.yaml may carry), and stops the
    script otherwise.
    """
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    config, remaining = config_parser.parse_known_args(argv)
    skipped = []
    if config.config:
        try:
            recipe = read_recipe(config.config)
        except ValueError as e:
            fail(script, str(e))
        known = {a.dest for a in parser._actions}
        for key in sorted(set(recipe) - known):
            if not skip_unknown and recipe[key] not in (None, False, '', [], {}):
                fail(script, f'config {config.config}: unknown key {key!r} (no flag {flag_name(key)}); remove it or '
                             f'fix its name')
            skipped.append(key)
            recipe.pop(key)
        parser.set_defaults(**recipe)
    args = parser.parse_args(remaining)
    args.config = config.config
    return args, skipped
