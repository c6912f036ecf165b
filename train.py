#!/usr/bin/env python3
"""Train a timm model, optionally with the ZZZ head and the CARROT regulariser, from timm's command line.

Every flag of timm's reference train.py is here with its name, default and meaning (`-c/--config` YAML recipes,
output layout `output/train/<experiment>/`: args.yaml, summary.csv, last / checkpoint-N / model_best .pth.tar);
with none of the carrot-zzz flags it trains the plain timm model. The flags this project adds:

    --head {zzz,linear}   `--model X --head zzz` trains `X_zzz` (carrot_zzz's wrapper); --zzz-rank / --zzz-v-min /
                          --zzz-sigma2-min configure the ZZZ head
    --carrot              loss = task loss + --carrot-weight x R(pooled embedding, class), inside autocast, before the
                          division by --grad-accum-steps and the loss scaler
    --head-lr, --head-weight-decay    the classifier's own learning rate and weight decay
    --sampler pk --samples-per-class K    class-balanced batches of batch_size / K classes x K samples
    --head-init data      the classifier starts from a closed-form fit to the backbone's features of the training
                          split (ZZZ: per-class probabilistic PCA + a temperature; linear: a logistic-regression probe)
    --holdout-fraction F  evaluate each epoch (and pick model_best) on a held-out part of the training split
    --calibrate {on,off}  at the end, one temperature fitted on the evaluation split and folded into
                          model_best.safetensors (default: on when there is an evaluation split)
    --zzz-v-shrink W, --zzz-decouple W    the ZZZ head's two penalties (ZZZHead.v_shrink_penalty /
                          decoupling_penalty) added to the loss with these weights (default 0: off)
    --overwrite           allow a new run into an experiment folder that holds one already

The work is done by carrot_zzz.engine (one module per phase, see its docstring); this script holds the flag table
and calls the phases in order. Flags of timm that this script parses but does not implement (UNSUPPORTED) stop
the run with one line when set.
"""
import argparse
import json
import logging
import os
from typing import List, Optional, Tuple

import yaml
from timm.loss import LOSS_TYPES
from timm.utils import ParseKwargs, setup_default_logging, unwrap_model

from carrot_zzz.carrot import RANK_NORMS
from carrot_zzz.cli import (add, add_dataset_reader_flags, add_input_flags, add_precision_flags, add_task_flags, fail,
                            flag_name, flag_text, parse_with_recipe, setting_errors, single_label_error)
from carrot_zzz.engine.calibration import CALIBRATE_CHOICES, export_calibration, wants_calibration
from carrot_zzz.engine.checkpoints import CheckpointKeeper
from carrot_zzz.engine.data import build_training_data
from carrot_zzz.engine.errors import CheckpointWriteError, TrainingDiverged
from carrot_zzz.engine.experiment import DEFAULT_OUTPUT, SummaryLog, open_experiment
from carrot_zzz.engine.fit import attach_ema, continue_run, export_best_weights, fit, load_resume, resume_path
from carrot_zzz.engine.head_init import HEAD_INITS, init_head_from_data
from carrot_zzz.engine.loop import Trainer, updates_per_epoch
from carrot_zzz.engine.preemption import Preempted, ProcessLost
from carrot_zzz.engine.models import create_training_model
from carrot_zzz.engine.optim import build_optimizer, build_scheduler, resolve_learning_rate
from carrot_zzz.engine.process import (experiment_name, leave_processes, loss_scaler, one_error_line, place_model,
                                      start_process)
from carrot_zzz.engine.settings import check_experiment_folder, check_training_settings
from carrot_zzz.engine.task import build_task, compile_and_distribute, training_loss
from carrot_zzz.model import HEAD_TYPES
from carrot_zzz.regularised_task import CARROT_SCOPES

_logger = logging.getLogger('train')
SCRIPT = 'train.py'

# timm flags parsed so that timm command lines and args.yaml files read, but not implemented here: set to anything
# but their default, they stop the run with one line
UNSUPPORTED = (
    'train_img_sizes', 'train_batch_sizes', 'train_size_probs', 'train_size_schedule', 'train_size_schedule_spread',
    'train_size_random_mix', 'train_batches_per_epoch', 'variable_batch_loss_scale',
    'naflex_loader', 'naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
    'naflex_loss_scale', 'naflex_patchify_channels_first',
    'kd_model_name', 'kd_distill_type', 'kd_loss_type', 'distill_loss_weight', 'task_loss_weight', 'kd_temperature',
    'kd_student_feature_dim', 'kd_teacher_feature_dim', 'kd_token_distill_type',
)


def _data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('data')
    g.add_argument('data', nargs='?', metavar='DIR', help='data folder (old positional form of --data-dir)')
    add(g, '--data-dir', None, 'root folder of the data set', metavar='DIR')
    add(g, '--dataset', '', 'reader and name, "<reader>/<name>", or a carrot_zzz FGVC name; empty: image folder')
    add(g, '--train-split', 'train', 'split the model trains on')
    add(g, '--val-split', 'validation', 'split evaluated after each epoch; empty: none')
    add(g, '--train-num-samples', None, 'size of the training split of a streaming (iterable) reader', int)
    add(g, '--val-num-samples', None, 'size of the evaluation split of a streaming (iterable) reader', int)
    add_dataset_reader_flags(g)


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('model')
    add(g, '--model', 'resnet50', 'timm architecture (optionally .tag), or its _zzz variant', str)
    add(g, '--pretrained', False, 'start from the pretrained weights of --model')
    add(g, '--pretrained-path', None, 'a local file read as the pretrained weights (with --pretrained)', str)
    add(g, '--initial-checkpoint', '', 'weights loaded into the new model before training', str)
    add(g, '--resume', '', 'checkpoint of a run to continue; "auto": this experiment\'s last.pth.tar if any', str)
    add(g, '--no-resume-opt', False, 'on --resume, restore the weights only (fresh optimizer and scaler)')
    add(g, '--num-classes', None, 'classes of the classifier (default: the model\'s)', int)
    add(g, '--gp', None, 'global pooling of the backbone (avg, max, avgmax, ...; default: the model\'s)', str)
    add_input_flags(g)
    add(g, '--crop-pct', None, 'centre-crop fraction of the evaluation transform', float)
    add(g, '-b --batch-size', 128, 'training batch per process', int)
    add(g, '-vb --validation-batch-size', None, 'evaluation batch (default: --batch-size)', int)
    add(g, '--channels-last', False, 'channels-last memory layout for model and inputs')
    add(g, '--fuser', '', 'TorchScript fuser: te, old or nvfuser', str)
    add(g, '--grad-accum-steps', 1, 'batches whose gradients add up to one optimizer step', int)
    add(g, '--grad-checkpointing', False, 'recompute activations in the backward pass to save memory')
    add(g, '--fast-norm', False, 'timm\'s fast normalisation layers')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model key=value')
    add(g, '--head-init-scale', None, 'multiply a new linear head\'s weight and bias by this', float)
    add(g, '--head-init-bias', None, 'set a new linear head\'s bias to this', float)
    add(g, '--torchcompile-mode', None, 'mode for torch.compile', str)
    exclusive = g.add_mutually_exclusive_group()
    add(exclusive, '--torchscript', False, 'TorchScript the model (plain timm models only)')
    add(exclusive, '--torchcompile', None, 'torch.compile the task with this backend (bare flag: inductor)', str,
        nargs='?', const='inductor')


def _device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('device')
    add_precision_flags(g)
    add(g, '--no-ddp-bb', False, 'DDP without broadcasting buffers')
    add(g, '--synchronize-step', False, 'wait for the device after each step (accurate step times)')
    add(g, '--local_rank --local-rank', 0, 'process index on this node (set by the launcher)', int)
    add(g, '--device-modules', None, 'modules to import for a device backend (e.g. carrot_zzz)', str, nargs='+')


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('optimizer')
    add(g, '--opt', 'sgd', 'optimizer name of timm.optim', str)
    add(g, '--opt-eps', None, 'optimizer epsilon (default: the optimizer\'s)', float)
    add(g, '--opt-betas', None, 'optimizer betas (default: the optimizer\'s)', float, nargs='+')
    add(g, '--momentum', 0.9, 'momentum of SGD-like optimizers', float)
    add(g, '--weight-decay', 2e-5, 'weight decay of the weights (biases and norms get none)', float)
    add(g, '--clip-grad', None, 'gradient clipping threshold (default: no clipping)', float)
    add(g, '--clip-mode', 'norm', 'what --clip-grad bounds: norm, value or agc', str)
    add(g, '--layer-decay', None, 'learning-rate factor per layer from the head down', float)
    add(g, '--layer-decay-min-scale', 0, 'lowest layer-decay factor', float)
    add(g, '--layer-decay-no-opt-scale', None, 'layers whose factor falls below this are frozen', float)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra optimizer key=value')


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('learning-rate schedule')
    add(g, '--sched', 'cosine', 'schedule name of timm.scheduler', str)
    add(g, '--sched-on-updates', False, 'step the schedule every update instead of every epoch')
    add(g, '--lr', None, 'peak learning rate (default: --lr-base scaled to the global batch)', float)
    add(g, '--lr-base', 0.1, 'learning rate of a global batch of --lr-base-size', float)
    add(g, '--lr-base-size', 256, 'global batch at which --lr-base applies', int)
    add(g, '--lr-base-scale', '', 'batch scaling of --lr-base: linear or sqrt (default: by optimizer)', str)
    add(g, '--lr-noise', None, 'epoch fractions where learning-rate noise starts and stops', float, nargs='+')
    add(g, '--lr-noise-pct', 0.67, 'bound of the learning-rate noise, relative', float)
    add(g, '--lr-noise-std', 1.0, 'spread of the learning-rate noise', float)
    add(g, '--lr-cycle-mul', 1.0, 'growth of each restart cycle\'s length', float)
    add(g, '--lr-cycle-decay', 0.5, 'peak factor from one restart cycle to the next', float)
    add(g, '--lr-cycle-limit', 1, 'restart cycles (more than 1 turns restarts on)', int)
    add(g, '--lr-k-decay', 1.0, 'k of the k-decay variant of cosine / poly', float)
    add(g, '--warmup-lr', 1e-5, 'learning rate the warmup starts from', float)
    add(g, '--min-lr', 0, 'learning rate the decay ends at', float)
    add(g, '--epochs', 300, 'epochs of the schedule', int)
    add(g, '--epoch-repeats', 0., 'passes over the training split per epoch (readers that support it)', float)
    add(g, '--start-epoch', None, 'epoch to start counting from (overrides the resumed one)', int)
    add(g, '--decay-milestones', [90, 180, 270], 'epochs where multistep decays', int, nargs='+')
    add(g, '--decay-epochs', None, 'step: decay period; wsd / rsqrt: decay length (<1: fraction); timm\'s default',
        float)
    add(g, '--lr-decay-fn', None, 'shape of the wsd / rsqrt decay (default: 1-sqrt / linear)', str)
    add(g, '--lr-stable-timescale', None, 'rsqrt time scale in epochs (default: the warmup)', float)
    add(g, '--stop-epoch', None, 'stop after this many epochs, keeping the full schedule', int)
    add(g, '--save-epochs', None, 'keep milestone-N.pth.tar after N completed epochs', int, nargs='+')
    add(g, '--warmup-epochs', 5, 'epochs of linear warmup', int)
    add(g, '--warmup-prefix', False, 'warmup before the schedule\'s epochs instead of inside them')
    add(g, '--cooldown-epochs', 0, 'epochs at --min-lr after the schedule', int)
    add(g, '--patience-epochs', 10, 'plateau: epochs without progress before a decay', int)
    add(g, '--decay-rate --dr', 0.1, 'factor of each step / plateau decay', float)


def _augmentation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('augmentation and regularisation')
    add(g, '--no-aug', False, 'no training augmentation at all')
    add(g, '--train-crop-mode', None, 'random-resized-crop variant of the training transform', str)
    add(g, '--scale', [0.08, 1.0], 'area range of the random crop', float, nargs='+')
    add(g, '--ratio', [3. / 4., 4. / 3.], 'aspect-ratio range of the random crop', float, nargs='+')
    add(g, '--hflip', 0.5, 'probability of a horizontal flip', float)
    add(g, '--vflip', 0., 'probability of a vertical flip', float)
    add(g, '--color-jitter', 0.4, 'strength of colour jitter', float)
    add(g, '--color-jitter-prob', None, 'probability that colour jitter is applied', float)
    add(g, '--grayscale-prob', None, 'probability of a grayscale conversion', float)
    add(g, '--gaussian-blur-prob', None, 'probability of a Gaussian blur', float)
    add(g, '--aa', None, 'AutoAugment / RandAugment policy string', str)
    add(g, '--aug-repeats', 0, 'repeated augmentation count (distributed sampler)', float)
    add(g, '--aug-splits', 0, 'AugMix views per image (0, or 2 and more)', int)
    add(g, '--jsd-loss', False, 'Jensen-Shannon consistency + CE over the --aug-splits views')
    add(g, '--bce-loss', False, 'binary cross-entropy instead of softmax cross-entropy')
    add(g, '--loss', None, 'loss of timm.loss.create_classification_loss (default: from the flags above)', str,
        choices=LOSS_TYPES)
    add_task_flags(g)
    add(g, '--bce-sum', False, 'BCE summed over classes')
    add(g, '--bce-target-thresh', None, 'binarise soft BCE targets at this value', float)
    add(g, '--bce-pos-weight', None, 'weight of positive BCE terms', float)
    add(g, '--reprob', 0., 'probability of random erasing', float)
    add(g, '--remode', 'pixel', 'fill of erased regions', str)
    add(g, '--recount', 1, 'regions erased per image', int)
    add(g, '--resplit', False, 'leave the first (clean) AugMix view unerased')
    add(g, '--mixup', 0.0, 'mixup alpha (> 0 enables it)', float)
    add(g, '--cutmix', 0.0, 'cutmix alpha (> 0 enables it)', float)
    add(g, '--cutmix-minmax', None, 'cutmix box size range (overrides --cutmix)', float, nargs='+')
    add(g, '--mixup-prob', 1.0, 'probability a batch is mixed', float)
    add(g, '--mixup-switch-prob', 0.5, 'probability of cutmix instead of mixup when both are on', float)
    add(g, '--mixup-mode', 'batch', 'mix per batch, pair or elem', str)
    add(g, '--mixup-off-epoch', 0, 'epoch from which mixing stops (0: never)', int)
    add(g, '--smoothing', 0.1, 'label smoothing', float)
    add(g, '--train-interpolation', 'random', 'resize interpolation of the training transform', str)
    add(g, '--drop', 0.0, 'dropout before the classifier', float)
    add(g, '--drop-connect', None, 'deprecated in timm, no effect (use --drop-path)', float)
    add(g, '--drop-path', None, 'stochastic depth rate', float)
    add(g, '--drop-block', None, 'DropBlock rate', float)


def _norm_ema_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('batch norm and weight averaging')
    add(g, '--bn-momentum', None, 'batch-norm momentum (default: the model\'s)', float)
    add(g, '--bn-freeze-stats', False, 'batch-norm layers normalise with their (pretrained) running statistics while '
                                       'training, and keep them; their weight and bias still train')
    add(g, '--bn-eps', None, 'batch-norm epsilon (default: the model\'s)', float)
    add(g, '--sync-bn', False, 'batch-norm statistics over all processes')
    add(g, '--dist-bn', 'reduce', 'after each epoch: reduce or broadcast batch-norm statistics, or "" (none)', str)
    add(g, '--split-bn', False, 'separate batch norm per AugMix view')
    add(g, '--model-ema', False, 'keep an exponential moving average of the weights (evaluated and saved)')
    add(g, '--model-ema-force-cpu', False, 'keep the average on the CPU, rank 0 only, not evaluated')
    add(g, '--model-ema-decay', 0.9998, 'decay of the weight average', float)
    add(g, '--model-ema-warmup', False, 'ramp the decay up over the first updates')


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('run')
    add(g, '--seed', 42, 'random seed (each process adds its rank)', int)
    add(g, '--worker-seeding', 'all', 'how data-loader workers are seeded', str)
    add(g, '--log-interval', 50, 'updates between training log lines', int)
    add(g, '--val-interval', 1, 'epochs between evaluations and checkpoints', int)
    add(g, '--recovery-interval', 0, 'updates between mid-epoch recovery checkpoints (0: none)', int)
    add(g, '--checkpoint-hist', 10, 'epoch checkpoints kept, the best by --eval-metric', int)
    add(g, '-j --workers', 4, 'data-loader worker processes', int)
    add(g, '--save-images', False, 'write each logged training batch as an image')
    add(g, '--pin-mem', False, 'page-locked loader memory for faster host-to-device copies')
    add(g, '--no-prefetcher', False, 'plain loader: no asynchronous copy and normalisation on the device')
    add(g, '--output', '', f'parent of the experiment folder (default: {DEFAULT_OUTPUT})', str)
    add(g, '--experiment', '', 'experiment folder name (default: date-time, model, size)', str)
    add(g, '--eval-metric', 'top1', 'metric that ranks checkpoints: top1, top5 or loss', str)
    add(g, '--tta', 0, 'test-time augmentation factor of the evaluation (linear heads)', int)
    add(g, '--use-multi-epochs-loader', False, 'keep loader workers alive across epochs')
    add(g, '--log-wandb', False, 'also send the summary rows to Weights & Biases')
    add(g, '--wandb-project', None, 'Weights & Biases project', str)
    add(g, '--wandb-tags', [], 'Weights & Biases tags', str, nargs='+')
    add(g, '--wandb-resume-id', '', 'Weights & Biases run id to continue', str)


def _unsupported_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('parsed, not implemented here (set: the run stops)')
    add(g, '--train-img-sizes', None, 'per-batch image sizes', int, nargs='+')
    add(g, '--train-batch-sizes', None, 'batch size of each --train-img-sizes entry', int, nargs='+')
    add(g, '--train-size-probs', None, 'weights of the --train-img-sizes entries', float, nargs='+')
    add(g, '--train-size-schedule', 'constant', 'how the size choice changes', str, choices=('constant', 'progressive'))
    add(g, '--train-size-schedule-spread', 0.65, 'spread of the progressive size schedule', float)
    add(g, '--train-size-random-mix', 0.1, 'uniform share of the progressive size schedule', float)
    add(g, '--train-batches-per-epoch --train-steps-per-epoch', None, 'fixed batches per epoch', int)
    add(g, '--variable-batch-loss-scale', 'none', 'loss scaling for variable batch sizes', str,
        choices=('none', 'sqrt', 'linear'))
    add(g, '--naflex-loader', False, 'NaFlex variable-resolution loader')
    add(g, '--naflex-train-seq-lens', [128, 256, 576, 784, 1024], 'NaFlex sequence lengths', int, nargs='+')
    add(g, '--naflex-max-seq-len', 576, 'NaFlex evaluation sequence length', int)
    add(g, '--naflex-patch-sizes', None, 'NaFlex patch sizes', int, nargs='+')
    add(g, '--naflex-patch-size-probs', None, 'NaFlex patch size weights', float, nargs='+')
    add(g, '--naflex-loss-scale', 'linear', 'NaFlex loss scaling', str, choices=('none', 'sqrt', 'linear'))
    add(g, '--naflex-patchify-channels-first', False, 'NaFlex channels-first patches')
    add(g, '--kd-model-name', None, 'distillation teacher', str)
    add(g, '--kd-distill-type', 'logit', 'distillation kind', str, choices=['logit', 'feature', 'token'])
    add(g, '--kd-loss-type', 'kl', 'distillation loss', str)
    add(g, '--distill-loss-weight', None, 'distillation loss weight', float)
    add(g, '--task-loss-weight', None, 'task loss weight under distillation', float)
    add(g, '--kd-temperature', 4.0, 'distillation temperature', float)
    add(g, '--kd-student-feature-dim', None, 'student feature size', int)
    add(g, '--kd-teacher-feature-dim', None, 'teacher feature size', int)
    add(g, '--kd-token-distill-type', 'soft', 'token distillation kind', str, choices=['soft', 'hard'])


def _carrot_zzz_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('carrot-zzz')
    add(g, '--head', None, 'classifier on the pooled embedding; "--model X --head zzz" trains X_zzz',
        choices=HEAD_TYPES)
    add(g, '--zzz-rank', None, 'ZZZ head: rank of each class\'s covariance subspace (model default 8)', int)
    add(g, '--zzz-v-min', None, 'ZZZ head: floor of the subspace variances', float)
    add(g, '--zzz-sigma2-min', None, 'ZZZ head: floor of the isotropic variance', float)
    add(g, '--carrot', False, 'add the CARROT regulariser of the pooled embeddings to the loss')
    add(g, '--carrot-weight', 1.0, 'weight w of CARROT: loss = task loss + w R', float)
    add(g, '--carrot-rank-norm', 'dim', 'erank normaliser: the embedding size, or min(n_c - 1, size)',
        choices=RANK_NORMS)
    add(g, '--carrot-scope', 'global', 'CARROT over the batch of all processes, or of each', choices=CARROT_SCOPES)
    add(g, '--head-lr', None, 'classifier learning rate, scheduled with --lr (default: --lr)', float)
    add(g, '--head-weight-decay', None, 'classifier weight decay (default: --weight-decay)', float)
    add(g, '--sampler', 'random', 'batches: random (timm\'s) or pk (P classes x K samples)', choices=('random', 'pk'))
    add(g, '--samples-per-class', 4, 'K of --sampler pk', int)
    add(g, '--head-init', 'default', 'classifier start: default (random, the design\'s) or data (closed-form fit '
                                     'to the features of the training split)', choices=HEAD_INITS)
    add(g, '--holdout-fraction', 0.0, 'evaluate and pick model_best on this fraction of each training class, held '
                                      'out; the evaluation split is then left alone', float)
    add(g, '--calibrate', None, 'fit a temperature on the evaluation split at the end and fold it into '
                                'model_best.safetensors (default: on when there is an evaluation split)',
        choices=CALIBRATE_CHOICES)
    add(g, '--ood-tpr', 0.95, 'with --calibrate: the share of evaluation images the stored "unknown" threshold '
                              'keeps', float)
    add(g, '--zzz-v-shrink', 0.0, 'ZZZ head: weight of the shrinkage penalty on the subspace variances', float)
    add(g, '--zzz-decouple', 0.0, 'ZZZ head: weight of the mean / subspace decoupling penalty', float)
    add(g, '--skip-bad-images', False, 'leave out missing, empty or truncated image files instead of stopping')
    add(g, '--overwrite', False, 'allow a new run into an experiment folder that holds one already')


def build_parser() -> argparse.ArgumentParser:
    """All flags: timm's train.py's, then carrot-zzz's."""
    p = argparse.ArgumentParser(description='Train a timm model (with the ZZZ head and CARROT).')
    add(p, '-c --config', '', 'YAML recipe whose keys set the defaults of these flags', str, metavar='FILE')
    for section in (_data_flags, _model_flags, _device_flags, _optimizer_flags, _schedule_flags,
                    _augmentation_flags, _norm_ema_flags, _run_flags, _unsupported_flags, _carrot_zzz_flags):
        section(p)
    return p


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """(settings, the YAML written to args.yaml): the command line over a -c recipe's values, checked."""
    parser = build_parser()
    cfg, skipped = parse_with_recipe(SCRIPT, parser, argv, skip_unknown=False)
    if skipped:
        _logger.warning(f'Ignoring unknown config keys with empty values: {", ".join(skipped)}')
    text = yaml.safe_dump(vars(cfg), default_flow_style=False)
    for dest in UNSUPPORTED:
        if getattr(cfg, dest) != parser.get_default(dest):
            fail(SCRIPT, f'{flag_name(dest)} is not supported by this train.py yet; remove it (README: '
                         f'unsupported flags)')
    error = single_label_error(cfg)
    if error:
        fail(SCRIPT, error)
    with setting_errors(SCRIPT, parser):
        check_training_settings(cfg)
    if cfg.data and not cfg.data_dir:
        cfg.data_dir = cfg.data
    return cfg, text


def _wandb(cfg: argparse.Namespace, name: str):
    if not cfg.log_wandb:
        return None
    try:
        import wandb
    except ImportError:
        _logger.warning('--log-wandb: the wandb package is not installed (pip install wandb); not logging to it')
        return None
    wandb.init(project=cfg.wandb_project, name=name, config=cfg, tags=cfg.wandb_tags,
               resume='must' if cfg.wandb_resume_id else None, id=cfg.wandb_resume_id or None)
    return wandb


def main(argv: Optional[List[str]] = None) -> Optional[str]:
    """Train; returns the experiment folder (None on ranks other than 0)."""
    setup_default_logging()
    with one_error_line(None):           # the settings checks: one line under torchrun too
        cfg, cfg_text = parse_args(argv)
    parser = build_parser()
    folder = lock = keeper = summary = None
    try:
        with one_error_line(cfg), setting_errors(SCRIPT, parser):
            check_experiment_folder(cfg)
            precision = start_process(cfg)
            model = place_model(create_training_model(cfg), cfg, precision)
            _logger.info(f'Model {cfg.model} created, param count:{sum(p.numel() for p in model.parameters())}')
            data = build_training_data(cfg, model, precision)
            calibrate = wants_calibration(cfg, data)
            resolve_learning_rate(cfg)
            task = build_task(cfg, model, training_loss(cfg, data.soft_targets, data.aug_splits), precision)
            optimizer, scaler = build_optimizer(task.get_trainable_module(), cfg), loss_scaler(precision)
            resume = resume_path(cfg)
            start, saved = load_resume(task, optimizer, scaler, cfg, resume) if resume else (0, {})
            if cfg.head_init == 'data' and not resume:
                init_head_from_data(model, cfg, data, precision, _logger)
            attach_ema(task, cfg, resume)
            compile_and_distribute(task, cfg, precision)
            ranked_by_loss = data.eval_loader is None or cfg.eval_metric == 'loss'
            updates = updates_per_epoch(len(data.train_loader), cfg.grad_accum_steps)
            scheduler, epochs = build_scheduler(optimizer, cfg, updates, decreasing_metric=ranked_by_loss)
            name = experiment_name(cfg, data.data_config['input_size'][-1])
            if cfg.rank == 0:
                folder, lock = open_experiment(cfg.output or DEFAULT_OUTPUT, name, cfg_text, bool(resume),
                                                cfg.overwrite)
                keeper = CheckpointKeeper(folder, cfg.checkpoint_hist, decreasing=ranked_by_loss)
                summary = SummaryLog(os.path.join(folder, 'summary.csv'))
            same_folder = bool(resume) and folder is not None and \
                os.path.abspath(os.path.dirname(resume)) == os.path.abspath(folder)
            if cfg.start_epoch is not None:
                start = cfg.start_epoch
            if summary is not None:
                summary.keep_before(start if same_folder or not resume else 0)
            trainer = Trainer(cfg, task, optimizer, scheduler, scaler, precision, data, keeper, folder)
            continue_run(trainer, saved, start, same_folder)
            results = fit(trainer, start, min(epochs, cfg.stop_epoch or epochs), summary, _wandb(cfg, name))
        return _finish(cfg, trainer, folder, results, calibrate)
    except (TrainingDiverged, CheckpointWriteError, Preempted, ProcessLost) as e:
        fail(SCRIPT, flag_text(str(e), [a.dest for a in parser._actions]))
    finally:
        if lock is not None:
            lock.release()


def _finish(cfg: argparse.Namespace, trainer: Trainer, folder: Optional[str], results,
            calibrate: bool) -> Optional[str]:
    """Leave the process group, export the best weights (a temperature folded in when calibrating), print the best
    metric and timm's `--result` JSON."""
    leave_processes(cfg)
    if trainer.keeper is not None and trainer.keeper.best is not None:
        _logger.info(f'*** Best metric: {trainer.keeper.best[1]} (epoch {trainer.keeper.best[0]})')
    if folder is None:
        return None
    task = trainer.task
    fold = export_calibration(cfg, trainer.data, trainer.precision) if calibrate else None
    for path in export_best_weights(folder, unwrap_model(task.get_trainable_module()),
                                    task.get_trainable_module(ema=True), fold):
        _logger.info(f'Wrote weights to {path}')
    metric = cfg.eval_metric if trainer.data.eval_loader is not None else 'loss'
    ordered = sorted(results, key=lambda r: r.get('validation', r['train']).get(metric, 0),
                     reverse=metric == 'loss')
    print(f'--result\n{json.dumps(ordered[-10:], indent=4)}')
    return folder


if __name__ == '__main__':
    main()
