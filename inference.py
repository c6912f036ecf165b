#!/usr/bin/env python3
"""Predict the classes of a folder of images with a timm model, `_zzz` ones included, from timm's inference.py
command line; labels are the class names the checkpoint stores, and a ZZZ head can answer "unknown".

    python inference.py --data-dir photos/ --model resnet50_zzz --checkpoint output/train/EXP/model_best.safetensors \
        --topk 3 --results-format csv json --reject-unknown

One row per image (carrot_zzz.engine.inference): its file name, the top-k labels (--label-type name: the
checkpoint's class names, else the class indices), their probabilities (--output-type prob) or logits, optionally
the indices (--include-index). Written to --results-dir / --results-file (default <model>-<img size>) in each
--results-format (csv, json, json-records, json-split, parquet: parquet needs pandas and pyarrow; when several
JSON formats are asked for at once, all but the first get their format in the name: <file>-json-split.json), and printed
after '--result' as JSON keyed by file name. --reject-unknown labels an image 'unknown' when its
out-of-distribution score (maha for ZZZ heads, maxlogit for linear ones) is below the threshold stored by train.py
(or validate.py --fit-temperature --save-calibrated); --ood-threshold X sets it. An image that cannot be read gets
a row with an `error` column, the others are predicted, and the exit status is 1. -c RECIPE (not in timm) takes a
train.py recipe's model and data settings as defaults. The scores come from the evaluation loop validate.py uses.
--onnx FILE computes the logits with a model exported by README's recipe on onnxruntime (the `onnx` extra), with
the same output; a ZZZ head's maha score is then read back from the logits (carrot_zzz.ood).
"""
import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from timm.utils import set_jit_fuser, setup_default_logging

from carrot_zzz.cli import (add, add_dataset_reader_flags, add_input_flags, add_model_build_flags, add_precision_flags,
                            fail, parse_with_recipe, setting_errors)
from carrot_zzz.data.image_check import drop_samples, unreadable_images
from carrot_zzz.engine.data import image_mode
from carrot_zzz.engine.inference import (LABEL_TYPES, OUTPUT_TYPES, error_rows, label_names, onnx_forward,
                                         prediction_rows, sample_names, unknown_rule)
from carrot_zzz.engine.precision import fast_cuda_math, require_device, resolve_precision
from carrot_zzz.engine.validation import (checkpoint_class_names, create_validation_model, open_eval_split,
                                          prepare_model, read_checkpoint, validation_loader)
from carrot_zzz.engine.errors import first_line
from carrot_zzz.engine.evaluate import logits_and_embedding, predict
from carrot_zzz.files import unwritable
from carrot_zzz.folded_head import folded_heads
from carrot_zzz.model import HEAD_TYPES
from carrot_zzz.ood import OODScorer
from carrot_zzz.results_table import EXTENSIONS, RESULT_FORMATS, require_parquet, write_table

_logger = logging.getLogger('inference')
SCRIPT = 'inference.py'


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument('data', nargs='?', metavar='DIR', help='image folder (old positional form of --data-dir)')
    add(p, '-c --config', '', 'a train.py YAML recipe: its keys that are flags here become the defaults',
        metavar='FILE')
    add(p, '--data-dir', None, 'folder of the images (or the root of --dataset NAME)', metavar='DIR')
    add(p, '--dataset', '', 'reader and name, or a carrot_zzz FGVC name; empty: image folder')
    add(p, '--split', 'validation', 'split to predict (a sub-folder of --data-dir when it exists)')
    add_dataset_reader_flags(p)
    add(p, '-m --model', 'resnet50', 'timm architecture (optionally .tag), or its _zzz variant')
    add(p, '-j --workers', 2, 'data-loader worker processes', int)
    add(p, '-b --batch-size', 256, 'batch of images', int)
    add_input_flags(p)
    add(p, '--num-classes', None, 'classes of the classifier (default: the checkpoint\'s, else the model\'s)', int)
    add(p, '--log-freq', 10, 'batches between progress lines', int)
    add(p, '--checkpoint', '', '.pth.tar, .pth or .safetensors weights to predict with', str)
    add(p, '--pretrained', False, 'the pretrained weights of --model (implied without --checkpoint)')
    add(p, '--num-gpu', 1, 'GPUs for DataParallel', int)
    add(p, '--test-pool', False, 'test-time pooling (models that support it)')
    add(p, '--channels-last', False, 'channels-last memory layout')
    add_precision_flags(p)
    add(p, '--fuser', '', 'TorchScript fuser: te, old or nvfuser', str)
    add_model_build_flags(p)
    _output_flags(p)
    g = p.add_argument_group('carrot-zzz')
    add(g, '--head', None, '"--model X --head zzz" predicts with X_zzz (default: the checkpoint\'s)',
        choices=HEAD_TYPES)
    add(g, '--zzz-rank', None, 'ZZZ head rank (default: the checkpoint\'s)', int)
    add(g, '--gp', None, 'global pooling of the backbone (default: the model\'s)', str)
    add(g, '--use-ema', False, 'the EMA weights of a .pth.tar checkpoint')
    add(g, '--reject-unknown', False, 'label "unknown" every image whose out-of-distribution score is below the '
                                      'checkpoint\'s threshold')
    add(g, '--ood-threshold', None, 'threshold of --reject-unknown (default: the checkpoint\'s)', float)
    add(g, '--onnx', '', 'compute the logits with this exported model on onnxruntime (README\'s recipe); '
                         '--model / --checkpoint still give the input settings, names and threshold', metavar='FILE')
    p.set_defaults(reparam=False, tf_preprocessing=False, num_samples=None, seed=42, prefetcher=True,
                   crop_border_pixels=None, pin_mem=False, naflex_loader=False)


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('results')
    add(g, '--results-dir', None, 'folder of the results files', str)
    add(g, '--results-file', None, 'results file name (default: <model>-<img size>), the extension added', str)
    add(g, '--results-format', ['csv'], f'one or more of {", ".join(RESULT_FORMATS)}', str, nargs='+',
        choices=RESULT_FORMATS)
    add(g, '--results-separate-col', False, 'one column per rank instead of list cells')
    add(g, '--topk', 1, 'classes per image', int)
    add(g, '--fullname', False, 'the whole path of each image instead of its base name')
    add(g, '--filename-col', 'filename', 'name of the file name column', str)
    add(g, '--index-col', 'index', 'name of the class index column(s)', str)
    add(g, '--label-col', 'label', 'name of the label column(s)', str)
    add(g, '--output-col', None, 'name of the probability / logit column(s) (default: prob or logit)', str)
    add(g, '--output-type', 'prob', 'probabilities (prob) or logits (logit)', str, choices=OUTPUT_TYPES)
    add(g, '--label-type', 'description', 'labels: none, or the class names (name, description, detailed: '
                                          'the checkpoint stores names only)', str, choices=LABEL_TYPES)
    add(g, '--include-index', False, 'also the class indices')
    add(g, '--exclude-output', False, 'leave out the probabilities / logits')
    add(g, '--no-console-results', False, 'do not print the results')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Predict with timm models (with carrot-zzz class names and "unknown").')
    _flags(p)
    return p


def check_args(cfg: argparse.Namespace) -> None:
    require_device(cfg.device)
    if not cfg.dataset and not (cfg.data or cfg.data_dir):
        fail(SCRIPT, 'no image folder given; pass --data-dir DIR')
    if cfg.topk < 1:
        fail(SCRIPT, f'--topk {cfg.topk}: pass 1 or more')
    if cfg.exclude_output and cfg.label_type == 'none' and not cfg.include_index:
        fail(SCRIPT, '--exclude-output with --label-type none leaves nothing to write; add --include-index')
    folder = cfg.results_dir or os.path.dirname(cfg.results_file or '') or '.'
    why = unwritable(folder, folder=True)
    if why:
        fail(SCRIPT, f'--results-dir {folder}: {why}')
    if 'parquet' in cfg.results_format:
        try:
            require_parquet()
        except ImportError as e:
            fail(SCRIPT, f'--results-format parquet: {e}')


def results_base(cfg: argparse.Namespace, img_size: int) -> str:
    """The results path without extension: --results-file (a known extension dropped) in --results-dir."""
    name = cfg.results_file or f'{cfg.model}-{img_size}'
    stem, ext = os.path.splitext(name)
    name = stem if ext in EXTENSIONS.values() else name
    if cfg.results_dir:
        os.makedirs(cfg.results_dir, exist_ok=True)
        name = os.path.join(cfg.results_dir, name)
    return name


def predict_images(cfg: argparse.Namespace):
    """(rows, input size): a row per image of the split, predicted or unreadable (see the module doc)."""
    cfg.pretrained = cfg.pretrained or not cfg.checkpoint
    fast_cuda_math()
    if cfg.fuser:
        set_jit_fuser(cfg.fuser)
    precision = resolve_precision(cfg.device, cfg.amp, cfg.amp_dtype, cfg.model_dtype)
    state_dict, meta = read_checkpoint(cfg.checkpoint, cfg.use_ema) if cfg.checkpoint else (None, {})
    raw = create_validation_model(cfg, state_dict)
    names = checkpoint_class_names(cfg, meta, raw.num_classes) if state_dict is not None else None
    head = raw.get_classifier() if hasattr(raw, 'get_classifier') else None
    rule = unknown_rule(cfg, meta, head)
    model, data_config, crop_pct = prepare_model(cfg, precision, raw)
    forward = onnx_forward(cfg.onnx, raw.num_classes) if cfg.onnx else (logits_and_embedding(model) if rule else None)
    dataset = open_eval_split(cfg, cfg.dataset, cfg.data or cfg.data_dir, cfg.split,
                              image_mode(cfg.input_img_mode, data_config), cfg.class_map)
    bad = unreadable_images(dataset)
    if bad:
        drop_samples(dataset, bad)
        _logger.warning(f'{len(bad)} images cannot be read; they get a row with an error')
    rows = []
    if len(dataset):
        with folded_heads(raw):     # the ZZZ head as one matrix product (carrot_zzz.folded_head)
            scores = predict(model, validation_loader(cfg, dataset, data_config, crop_pct, precision, raw),
                             precision, channels_last=cfg.channels_last, scorer=OODScorer(head), keep_logits=True,
                             keep_embeddings=False, forward=forward, log_every=cfg.log_freq, log_name='Predict')
        rows = prediction_rows(cfg, sample_names(dataset, cfg.fullname), scores,
                               label_names(names, raw.num_classes, cfg.label_type), rule)
    return rows + error_rows(cfg, bad), data_config['input_size'][-1]


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Predict and write the results; returns the rows (those of unreadable images have an 'error')."""
    setup_default_logging()
    cfg = parse_with_recipe(SCRIPT, build_parser(), argv, skip_unknown=True)[0]   # a recipe's other keys skipped
    with setting_errors(SCRIPT, build_parser()):
        check_args(cfg)
        rows, img_size = predict_images(cfg)
    names = [row[cfg.filename_col] for row in rows]
    if len(set(names)) < len(names):
        _logger.warning(f'{len(names) - len(set(names))} file names repeat (images in different folders): the json '
                        f'format and the console keep one row per name; pass --fullname')
    if not cfg.no_console_results:
        keyed = {row[cfg.filename_col]: {k: v for k, v in row.items() if k != cfg.filename_col} for row in rows}
        print(f'--result\n{json.dumps(keyed, indent=4)}')
    base = results_base(cfg, img_size)
    shared = [fmt for fmt in cfg.results_format if EXTENSIONS[fmt] == '.json']
    for fmt in dict.fromkeys(cfg.results_format):
        own = base + f'-{fmt}' if fmt in shared[1:] else base       # several .json formats at once
        try:
            _logger.info(f'Results written to {write_table(rows, own, fmt, cfg.filename_col)}')
        except OSError as e:
            reason = e.strerror or first_line(e, 200)
            fail(SCRIPT, f'--results-format {fmt}: cannot write {own}{EXTENSIONS[fmt]} ({reason}); the '
                         f'predictions were printed above' + (' (--no-console-results: they are lost)'
                                                             if cfg.no_console_results else ''))
    failed = sum('error' in row for row in rows)
    if failed:
        _logger.error(f'{failed} of {len(rows)} images could not be read (rows with an error); the others are '
                      f'predicted')
    return rows


if __name__ == '__main__':
    sys.exit(1 if any('error' in row for row in main()) else 0)
