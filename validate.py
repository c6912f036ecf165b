#!/usr/bin/env python3
"""Validate timm models, `_zzz` ones included, from timm's validate.py command line, with FGVC metrics.

    python validate.py --data-dir /data/CUB_200_2011 --dataset cub200 --model resnet50_zzz \
        --checkpoint output/train/.../model_best.pth.tar --use-ema --img-size 448 --results-file cub.csv

It prints and writes what timm's validate.py does (top-1 / top-5 and their errors in %, parameter count in
millions, image size, crop pct, interpolation; the `--result` JSON on stdout; `--results-file` as csv or json) and,
over the whole split (formulas in carrot_zzz.metrics):

    mean_class_acc  mean over classes of the per-class top-1 accuracy (%)
    nll             mean negative log-likelihood of the labels under softmax(logits), nats
    ece             expected calibration error of the max softmax probability, 15 equal-width bins (%)
    ood_*           with --ood-data-dir: AUROC and FPR at 95% TPR (%) of telling the split (positive) from the
                    images there, by each score of carrot_zzz.ood: `_msp`, `_maxlogit`, `_energy` and, for ZZZ
                    heads, `_maha` (minus the smallest squared Mahalanobis distance) and `_ll`
    temperature, nll_calibrated, ece_calibrated
                    with --fit-temperature SPLIT: the logit temperature fitted on SPLIT (or on train.py's held-out
                    part, `holdout`) and the split's NLL / ECE with it (--save-calibrated writes those weights)

--per-class-csv writes each class's accuracy. Class folders are matched to the checkpoint's class names. --checkpoint takes .pth.tar / .pth (state_dict, or state_dict_ema
with --use-ema) and .safetensors, or a folder of them; the class count, head type and ZZZ rank come from it when
not given. -c/--config RECIPE (not in timm) takes a train.py recipe's model and data settings as defaults:

    python validate.py -c hparams/demo.yaml --checkpoint output/train/demo/model_best.safetensors

Under torchrun (one process per GPU, as train.py) each process scores its shard of each split, the scores are
gathered in dataset order (the results are those of one process), and rank 0 alone prints and writes them:

    torchrun --standalone --nproc_per_node 8 validate.py --data-dir /data/CUB_200_2011 --dataset cub200 ...

--num-gpu N is the one-process alternative (DataParallel over N GPUs); the two do not combine.
"""
import argparse
import copy
import glob
import json
import logging
import os
from collections import OrderedDict
from functools import partial
from typing import List, Optional

import torch
from safetensors import SafetensorError
from timm.data import RealLabelsImagenet
from timm.models import is_model, list_models
from timm.utils import check_batch_size_retry, decay_batch_step, natural_key, random_seed, setup_default_logging

from carrot_zzz.cli import (add, add_dataset_reader_flags, add_input_flags, add_model_build_flags, add_precision_flags,
                            add_task_flags, fail, parse_with_recipe, setting_errors, single_label_error)
from carrot_zzz.data.classes import dataset_class_names
from carrot_zzz.engine.data import image_mode
from carrot_zzz.engine.precision import Precision
from carrot_zzz.engine.process import leave_processes, one_error_line
from carrot_zzz.engine.calibration import HOLDOUT, calibrate_for_report
from carrot_zzz.engine.validation import (checkpoint_class_names, class_names, create_validation_model, holdout_part,
                                          is_primary, match_classes, open_eval_split, per_class_rows, prepare_model,
                                          read_checkpoint, report, retrieval_fields, start_validation,
                                          validation_loader, write_extras, write_results, write_rows)
from carrot_zzz.engine.errors import first_line
from carrot_zzz.engine.evaluate import logits_and_embedding, predict
from carrot_zzz.files import unwritable
from carrot_zzz.weights import save_weights
from carrot_zzz.reliability import require_plotting
from carrot_zzz.model import HEAD_TYPES
from carrot_zzz.ood import OODScorer
from carrot_zzz.folded_head import folded_heads
from carrot_zzz.zzz_head import ZZZHead

_logger = logging.getLogger('validate')
SCRIPT = 'validate.py'
BULK_EXCLUDE = ['*_in21k', '*_in22k', '*in12k', '*_dino', '*fcmae', '*seer']   # `--model all`: ImageNet-1k heads


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument('data', nargs='?', metavar='DIR', help='data folder (old positional form of --data-dir)')
    add(p, '-c --config', '', 'a train.py YAML recipe: its keys that are flags here become the defaults',
        metavar='FILE')
    add(p, '--data-dir', None, 'root folder of the data set', metavar='DIR')
    add(p, '--dataset', '', 'reader and name, or cub200, nabirds, fgvc_aircraft[_family|_manufacturer], '
                            'stanford_cars, stanford_dogs, flowers102, fashion_mnist; empty: image folder')
    add(p, '--split', 'validation', 'split to validate on')
    add(p, '--num-samples', None, 'size of the split of a streaming (iterable) reader', int)
    add_dataset_reader_flags(p)
    add(p, '-m --model', 'dpn92', 'timm architecture (optionally .tag), its _zzz variant, a pattern, "all", or a '
                                  'file listing names')
    add(p, '--pretrained', False, 'the pretrained weights of --model (implied without --checkpoint)')
    add(p, '-j --workers', 4, 'data-loader worker processes', int)
    add(p, '-b --batch-size', 256, 'evaluation batch', int)
    add_input_flags(p)
    add(p, '--crop-border-pixels', None, 'pixels cut off every border first', int)
    add(p, '--num-classes', None, 'classes of the classifier (default: the checkpoint\'s, else the model\'s)', int)
    add(p, '--gp', None, 'global pooling of the backbone (default: the model\'s)', str)
    add(p, '--log-freq', 10, 'batches between progress lines', int)
    add(p, '--checkpoint', '', 'weights to validate: .pth.tar, .pth, .safetensors, or a folder of them', str)
    add(p, '--num-gpu', 1, 'GPUs for DataParallel in one process (under torchrun: leave at 1)', int)
    add(p, '--test-pool', False, 'test-time pooling at a larger input')
    add(p, '--no-prefetcher', False, 'plain loader: no asynchronous copy and normalisation on the device')
    add(p, '--pin-mem', False, 'page-locked loader memory for faster host-to-device copies')
    add(p, '--channels-last', False, 'channels-last memory layout for model and inputs')
    add_precision_flags(p)
    add(p, '--tf-preprocessing', False, 'TensorFlow\'s preprocessing (needs TensorFlow)')
    add(p, '--use-ema', False, 'the EMA weights of a training checkpoint, when it holds them')
    add(p, '--fuser', '', 'TorchScript fuser: te, old or nvfuser', str)
    add(p, '--fast-norm', False, 'timm\'s fast normalisation layers')
    add(p, '--reparam', False, 'fold re-parameterisable blocks before validating')
    add_model_build_flags(p)
    add(p, '--results-file', '', 'write the results here', str)
    add(p, '--results-format', 'csv', 'format of --results-file: csv or json', str)
    add(p, '--real-labels', '', 'ImageNet "real" labels JSON file', str)
    add(p, '--valid-labels', '', 'text file of the class indices to keep (a subset of the label space)', str)
    add(p, '--retry', False, 'on out-of-memory, retry with smaller batches')
    add(p, '--seed', 42, 'random seed', int)
    add_task_flags(p)
    add(p, '--metrics-avg', None, 'also precision / recall / F1 with this averaging (needs scikit-learn)', str,
        choices=['micro', 'macro', 'weighted'])
    add(p, '--naflex-loader', False, 'NaFlex variable-resolution loader (NaFlex models)')
    add(p, '--naflex-max-seq-len', 576, 'NaFlex sequence length', int)
    g = p.add_argument_group('carrot-zzz')
    add(g, '--head', None, '"--model X --head zzz" validates X_zzz (default: the model\'s or checkpoint\'s)',
        choices=HEAD_TYPES)
    add(g, '--zzz-rank', None, 'ZZZ head rank (default: the checkpoint\'s, else the model\'s)', int)
    add(g, '--ood-data-dir', '', 'out-of-distribution images: report AUROC and FPR@95TPR against them',
        metavar='DIR')
    add(g, '--ood-dataset', '', 'data set name of --ood-data-dir (default: image folder)', metavar='NAME')
    add(g, '--ood-split', None, 'split of --ood-data-dir (default: --split)', metavar='NAME')
    add(g, '--per-class-csv', '', 'write every class\'s accuracy and support here', metavar='FILENAME')
    add(g, '--fit-temperature', '', 'fit a logit temperature on this split (not --split), or "holdout": the part '
                                    'train.py held out of --train-split', metavar='SPLIT')
    add(g, '--ood-tpr', 0.95, 'with --fit-temperature: the share of that split the "unknown" threshold keeps',
        float)
    add(g, '--save-calibrated', '', 'write the weights with the fitted temperature folded in (.safetensors)',
        metavar='FILE')
    add(g, '--train-split', 'train', 'the split train.py trained on (--fit-temperature holdout carves from it)')
    add(g, '--holdout-fraction', 0.0, 'the fraction train.py held out of each class (--fit-temperature holdout)',
        float)
    add(g, '--retrieval', False, 'also Recall@1/2/4/8, MAP@R and k-NN top-1 (k 1, 20) of the pooled embeddings')
    add(g, '--save-embeddings', '', 'write embeddings, labels, logits (ZZZ: log-likelihoods) to this .safetensors',
        metavar='FILE')
    add(g, '--reliability-plot', '', 'draw the reliability diagram of the split into this .png (needs matplotlib)',
        metavar='FILE')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Validate timm models (with carrot-zzz metrics).')
    _flags(p)
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line over the defaults of a -c train.py recipe (its training-only keys are skipped)."""
    return parse_with_recipe(SCRIPT, build_parser(), argv, skip_unknown=True)[0]


def check_args(cfg: argparse.Namespace) -> None:
    """What holds for the whole run, checked once before any model (in a bulk run, before the first)."""
    error = single_label_error(cfg)
    if error:
        fail(SCRIPT, error)
    if not cfg.dataset and not (cfg.data or cfg.data_dir):
        fail(SCRIPT, 'no data folder given; pass --data-dir DIR (an image folder, or the root of --dataset NAME)')
    if cfg.save_embeddings and not cfg.save_embeddings.endswith('.safetensors'):
        fail(SCRIPT, f'--save-embeddings {cfg.save_embeddings}: name a .safetensors file')
    _check_temperature_flags(cfg)
    if cfg.reliability_plot and not cfg.reliability_plot.lower().endswith('.png'):
        fail(SCRIPT, f'--reliability-plot {cfg.reliability_plot}: name a .png file')
    if cfg.test_pool and (cfg.retrieval or cfg.save_embeddings):
        fail(SCRIPT, '--test-pool pools at test time only in the classifier: embeddings are not defined with it; '
                     'remove --test-pool or --retrieval / --save-embeddings')
    if cfg.reliability_plot:
        try:
            require_plotting()
        except ImportError as e:
            fail(SCRIPT, f'--reliability-plot: {e}')
    for flag, path in (('--results-file', cfg.results_file), ('--per-class-csv', cfg.per_class_csv),
                       ('--save-embeddings', cfg.save_embeddings), ('--reliability-plot', cfg.reliability_plot),
                       ('--save-calibrated', cfg.save_calibrated)):
        why = unwritable(path) if path else None
        if why:
            fail(SCRIPT, f'{flag} {path}: {why}')
    for flag, path in (('--valid-labels', cfg.valid_labels), ('--real-labels', cfg.real_labels)):
        if path and not os.path.isfile(path):
            fail(SCRIPT, f'{flag} {path}: no such file; pass the path of the labels file')


def _check_temperature_flags(cfg: argparse.Namespace) -> None:
    """--fit-temperature never on the split it reports; holdout needs --holdout-fraction and another split."""
    if cfg.save_calibrated and not cfg.fit_temperature:
        fail(SCRIPT, '--save-calibrated writes the weights with a fitted temperature; add --fit-temperature SPLIT')
    if cfg.save_calibrated and not cfg.save_calibrated.endswith('.safetensors'):
        fail(SCRIPT, f'--save-calibrated {cfg.save_calibrated}: name a .safetensors file')
    if not 0.0 < cfg.ood_tpr <= 1.0:
        fail(SCRIPT, f'--ood-tpr {cfg.ood_tpr}: pass the share of in-distribution images to keep, in (0, 1]')
    if not cfg.fit_temperature:
        return
    if cfg.fit_temperature == cfg.split:
        fail(SCRIPT, f'--fit-temperature {cfg.fit_temperature}: that is the split reported (--split); fit on another '
                     f'split (e.g. holdout with --holdout-fraction F --seed S, as in training)')
    if cfg.fit_temperature == HOLDOUT:
        if not 0.0 < cfg.holdout_fraction < 1.0:
            fail(SCRIPT, '--fit-temperature holdout: pass --holdout-fraction F (and --seed S) as given to train.py')
        if cfg.train_split == cfg.split:
            fail(SCRIPT, f'--fit-temperature holdout carves from --train-split {cfg.train_split}, the split reported; '
                         f'report another --split')


def _sklearn_metrics(cfg, scores) -> dict:
    """timm's optional precision / recall / F1 (%), with scikit-learn; {} without it (a warning says so)."""
    if not cfg.metrics_avg:
        return {}
    try:
        from sklearn.metrics import f1_score, precision_score, recall_score
    except ImportError:
        _logger.warning('--metrics-avg needs scikit-learn (pip install scikit-learn); skipping those metrics')
        return {}
    y, p, kw = scores['target'].numpy(), scores['pred'].numpy(), dict(average=cfg.metrics_avg, zero_division=0)
    return {f'{cfg.metrics_avg}_{name}': round(100 * fn(y, p, **kw), 4)
            for name, fn in (('precision', precision_score), ('recall', recall_score), ('f1_score', f1_score))}


def validate(cfg: argparse.Namespace, precision: Precision) -> OrderedDict:
    """Validate one model (one checkpoint); returns its results. Under torchrun every process scores its shard of
    each split and gets the whole split's scores back (engine.evaluate.predict), so all compute the same results;
    rank 0 alone logs them and writes the files (retrieval fields, the costly ones, are computed there only)."""
    cfg.pretrained = cfg.pretrained or not cfg.checkpoint
    random_seed(cfg.seed)                               # the same on every process: one model
    state_dict, meta = read_checkpoint(cfg.checkpoint, cfg.use_ema) if cfg.checkpoint else (None, {})
    raw = create_validation_model(cfg, state_dict)
    names = checkpoint_class_names(cfg, meta, raw.num_classes) if state_dict is not None else None
    head = raw.get_classifier() if hasattr(raw, 'get_classifier') else None
    bias = head.bias.detach().float().clone() if isinstance(head, ZZZHead) else None
    param_count = sum(p.numel() for p in raw.parameters())
    _logger.info(f'Model {cfg.model} created, param count: {param_count}')
    model, data_config, crop_pct = prepare_model(cfg, precision, raw)
    root = cfg.data or cfg.data_dir
    img_mode = image_mode(cfg.input_img_mode, data_config)
    dataset = match_classes(open_eval_split(cfg, cfg.dataset, root, cfg.split, img_mode, cfg.class_map), names,
                            cfg.split)
    subset = [int(line) for line in open(cfg.valid_labels)] if cfg.valid_labels else None
    real = _real_labels(cfg, dataset) if cfg.real_labels else None
    score = _scoring(cfg, model, head, subset)
    loader = partial(validation_loader, cfg, data_config=data_config, crop_pct=crop_pct, precision=precision,
                     model=raw)
    with folded_heads(raw):     # the ZZZ head as one matrix product (carrot_zzz.folded_head)
        scores = predict(model, loader(dataset), precision, log_every=cfg.log_freq,
                         keep_logits=bool(cfg.retrieval or cfg.save_embeddings or cfg.fit_temperature or real),
                         **score)
        if not scores:
            fail(SCRIPT, f'split {cfg.split!r} at {root} holds no samples; check --data-dir / --dataset / --split')
        ood = None
        if cfg.ood_data_dir:
            ood_set = open_eval_split(cfg, cfg.ood_dataset, cfg.ood_data_dir, cfg.ood_split or cfg.split, img_mode)
            ood = predict(model, loader(ood_set), precision, **{**score, 'keep_embeddings': False})
    classes = len(subset) if subset is not None else cfg.num_classes
    real_top = _real_top(real, scores['logits']) if real else None
    results = report(cfg, scores, classes, param_count, data_config, crop_pct, ood, real_top,
                     _sklearn_metrics(cfg, scores))
    if cfg.retrieval and is_primary(cfg):
        results.update(retrieval_fields(scores))
    columns = class_names(names, dataset, cfg.num_classes)
    columns = [columns[i] for i in subset] if subset is not None else columns
    if cfg.fit_temperature:
        fit_set = _temperature_split(cfg, root, img_mode, names)
        fields, metadata = calibrate_for_report(raw, model, scores, loader(fit_set), precision, cfg.fit_temperature,
                                                names or dataset_class_names(dataset), cfg.ood_tpr)
        results.update(fields)
        _late_write(cfg, '--save-calibrated', cfg.save_calibrated, lambda: save_weights(raw, cfg.save_calibrated,
                                                                                      metadata))
    _log_results(cfg, results, len(scores['target']), len(ood['target']) if ood else 0)
    _late_write(cfg, '--save-embeddings / --reliability-plot', cfg.save_embeddings or cfg.reliability_plot,
                lambda: write_extras(cfg, scores, bias, columns, results))
    _late_write(cfg, '--per-class-csv', cfg.per_class_csv,
                lambda: write_rows(cfg.per_class_csv, per_class_rows(scores, columns)))
    return results


def _real_labels(cfg: argparse.Namespace, dataset):
    """timm's ImageNet "real" labels for the split's files; one line when the data set lists no files."""
    if not hasattr(dataset, 'filenames'):
        fail(SCRIPT, f'--real-labels needs a data set that lists its file names (ImageNet validation as an '
                     f'image folder); {cfg.dataset or "this data set"} does not: remove --real-labels')
    return RealLabelsImagenet(dataset.filenames(basename=True), real_json=cfg.real_labels)


def _real_top(real: RealLabelsImagenet, logits: torch.Tensor) -> dict:
    """{1: %, 5: %}: top-1 / top-5 against the "real" labels of the split's logits (N, C) in dataset order."""
    real.add_result(logits)
    return {k: real.get_accuracy(k=k) for k in (1, 5)}


def _late_write(cfg: argparse.Namespace, flag: str, path: str, write) -> None:
    """write() when path is set and this process writes (engine.validation.is_primary), logged; a failure (a disk
    that filled up, a folder gone read-only) is kept in cfg.write_failures for main, which prints the results first
    and then stops with one line."""
    if not path or not is_primary(cfg):
        return
    try:
        write()
        _logger.info(f'{flag} written: {path}')
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, 200)
        cfg.__dict__.setdefault('write_failures', []).append(f'{flag} {path}: cannot write it ({reason})')


def _scoring(cfg, model, head, subset) -> dict:
    """predict's arguments: every OOD score (carrot_zzz.ood), and the embeddings where a result needs them (retrieval,
    --save-embeddings; the ZZZ 'maha' score with --ood-data-dir; a ZZZ fold that may need them)."""
    zzz = isinstance(head, ZZZHead)
    keep = bool(cfg.retrieval or cfg.save_embeddings or (zzz and cfg.fit_temperature))
    embeds = keep or (zzz and bool(cfg.ood_data_dir))
    return dict(channels_last=cfg.channels_last, class_subset=subset, scorer=OODScorer(head, subset),
                forward=logits_and_embedding(model) if embeds else None, keep_embeddings=keep)


def _temperature_split(cfg, root: str, img_mode: str, names):
    """The split --fit-temperature names, its classes matched to the checkpoint's; for 'holdout', the held-out part
    of --train-split that train.py evaluated on with --holdout-fraction and --seed."""
    split = cfg.train_split if cfg.fit_temperature == HOLDOUT else cfg.fit_temperature
    dataset = match_classes(open_eval_split(cfg, cfg.dataset, root, split, img_mode, cfg.class_map), names, split)
    if cfg.fit_temperature == HOLDOUT:
        dataset = holdout_part(dataset, cfg.holdout_fraction, cfg.seed, split)
    return dataset


def _log_results(cfg, results, samples: int, ood_samples: int) -> None:
    _logger.info(f' * Acc@1 {results["top1"]:.3f} ({results["top1_err"]:.3f}) '
                 f'Acc@5 {results["top5"]:.3f} ({results["top5_err"]:.3f})')
    if cfg.metrics_avg and f'{cfg.metrics_avg}_f1_score' in results:
        avg = cfg.metrics_avg
        _logger.info(f' * Precision({avg}) {results[f"{avg}_precision"]:.3f} | Recall({avg}) '
                     f'{results[f"{avg}_recall"]:.3f} | F1-score({avg}) {results[f"{avg}_f1_score"]:.3f}')
    _logger.info(f' * Mean class acc {results["mean_class_acc"]:.3f} NLL {results["nll"]:.4f} '
                 f'ECE {results["ece"]:.3f} ({samples} samples)')
    if 'map@r' in results:
        recalls = ' '.join(f'R@{k.split("@")[1]} {v:.3f}' for k, v in results.items() if k.startswith('recall@'))
        _logger.info(f' * Retrieval {recalls} MAP@R {results["map@r"]:.3f} k-NN top-1 (k=1) '
                     f'{results["knn1_top1"]:.3f} (k=20) {results["knn20_top1"]:.3f}')
    for tag, what in (('msp', 'max softmax prob'), ('ll', 'max class log-likelihood')):
        if f'ood_auroc_{tag}' in results:
            _logger.info(f' * OOD ({what}) AUROC {results[f"ood_auroc_{tag}"]:.3f} '
                         f'FPR@95TPR {results[f"ood_fpr95_{tag}"]:.3f} ({ood_samples} OOD samples)')


def validate_with_retries(cfg: argparse.Namespace, batch_size: int, precision: Precision) -> OrderedDict:
    """validate(), with the batch halved (timm's decay steps) after each out-of-memory error; results with an
    'error' field when no batch size fits."""
    error = 'Unknown'
    while batch_size:
        cfg.batch_size = batch_size * cfg.num_gpu
        try:
            if cfg.device.startswith('cuda') and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return validate(cfg, precision)
        except RuntimeError as e:
            error = str(e)
            _logger.error(f'"{error}" while validating {cfg.model}')
            if not check_batch_size_retry(error):
                break
        batch_size = decay_batch_step(batch_size)
        _logger.warning(f'Retrying with batch size {batch_size}.')
    _logger.error(f'{cfg.model} failed to validate ({error}).')
    return OrderedDict(model=cfg.model, error=error)


def bulk_targets(cfg: argparse.Namespace):
    """[(model, checkpoint)] of a bulk run (a checkpoint folder, a model pattern / 'all', a file of names); []
    for a single model."""
    if os.path.isdir(cfg.checkpoint):
        files = [f for pattern in ('*.pth.tar', '*.pth', '*.safetensors')
                 for f in glob.glob(os.path.join(cfg.checkpoint, pattern))]
        if not files:
            fail(SCRIPT, f'no .pth.tar / .pth / .safetensors files in {cfg.checkpoint}')
        return [(cfg.model, f) for f in sorted(files, key=natural_key)]
    if cfg.model == 'all':
        cfg.pretrained = True
        return [(name, '') for name in list_models(pretrained=True, exclude_filters=BULK_EXCLUDE)]
    if not is_model(cfg.model.split('.')[0]):
        names = list_models(cfg.model, pretrained=True)
        if names:
            return [(name, '') for name in names]
        if os.path.isfile(cfg.model):
            return [(line.strip(), None) for line in open(cfg.model) if line.strip()]
    return []


def validate_many(cfg: argparse.Namespace, targets, precision: Precision) -> List[OrderedDict]:
    """Every (model, checkpoint); one that cannot be validated is skipped with its one-line reason."""
    _logger.info(f'Validating {len(targets)} models / checkpoints: {", ".join(m for m, _ in targets)}')
    results = []
    try:
        for name, checkpoint in targets:
            run = copy.copy(cfg)              # validate() fills in per-model settings (class count, ...)
            run.model, run.checkpoint = name, checkpoint
            try:
                with setting_errors(SCRIPT, build_parser()):
                    result = validate_with_retries(run, cfg.batch_size, precision)
            except SystemExit as e:
                _logger.error(f'skipping {name} {checkpoint or ""}: {e}')
                continue
            if 'error' not in result:
                results.append({**result, **({'checkpoint': checkpoint} if checkpoint else {})})
    except KeyboardInterrupt:
        pass
    if not results:
        fail(SCRIPT, 'no model or checkpoint could be validated; see the errors above')
    return sorted(results, key=lambda r: r['top1'], reverse=True)


def main(argv: Optional[List[str]] = None):
    """Validate what the command line names; returns the results (None on the torchrun processes but rank 0)."""
    setup_default_logging()
    cfg = parse_args(argv)
    cfg.write_failures = []
    parser = build_parser()
    with one_error_line(cfg), setting_errors(SCRIPT, parser):
        precision = start_validation(cfg)
        check_args(cfg)
        targets = bulk_targets(cfg)
        if targets:
            results = validate_many(cfg, targets, precision)
        else:
            results = validate_with_retries(cfg, cfg.batch_size, precision) if cfg.retry else validate(cfg, precision)
    leave_processes(cfg)
    if not is_primary(cfg):
        return None
    print(f'--result\n{json.dumps(results, indent=4)}')   # for scripts that read timm's validate.py output
    _late_write(cfg, '--results-file', cfg.results_file,
                lambda: write_results(cfg.results_file, results, cfg.results_format))
    if cfg.write_failures:
        more = f' (and {len(cfg.write_failures) - 1} more)' if len(cfg.write_failures) > 1 else ''
        fail(SCRIPT, f'{cfg.write_failures[0]}{more}; the results above are complete')
    return results


if __name__ == '__main__':
    main()
