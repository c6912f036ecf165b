"""End-to-end runs of train.py on a tiny image folder (CPU, in-process), plus its failure modes.

Every run trains timm's `test_vit` at 32 px on 4 classes whose images differ in colour (a learnable task)
for 2-3 epochs; the whole file runs in well under a minute on 2 cores.
"""
import csv
import logging
import os

import numpy as np
import pytest
import timm
import torch

import train
from carrot_zzz.engine.checkpoints import CheckpointKeeper
from carrot_zzz.engine.loop import Trainer
from carrot_zzz.engine.means import RunningMeans
from carrot_zzz.engine.models import model_name_and_head
from carrot_zzz.engine.optim import build_optimizer, clip_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 4


# ------------------------------------------------------------------------------------------------------------
# data and runs
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp('data'), num_classes=NUM_CLASSES)


BASE = [
    '--model', 'test_vit', '--input-size', '3', '32', '32', '--num-classes', str(NUM_CLASSES),
    '--batch-size', '16', '--workers', '0', '--device', 'cpu', '--opt', 'adamw', '--lr', '2e-3',
    '--weight-decay', '0.01', '--warmup-epochs', '0', '--no-aug', '--log-interval', '2', '--seed', '0',
]


def run(data_dir, out, experiment, *extra, epochs=2):
    argv = [data_dir, *BASE, '--epochs', str(epochs), '--output', str(out), '--experiment', experiment, *extra]
    return train.main(argv)


def read_summary(out_dir):
    with open(os.path.join(out_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))


CARROT_COLUMNS = ['train_task_loss', 'train_R', 'train_R_var', 'train_R_rank', 'train_classes_used',
                  'train_min_r', 'train_min_erank_frac', 'train_used_frac']


# ------------------------------------------------------------------------------------------------------------
# end-to-end
# ------------------------------------------------------------------------------------------------------------

def test_plain_model_timm_layout(data_dir, tmp_path):
    out = run(data_dir, tmp_path, 'plain', epochs=3)
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'checkpoint-0.pth.tar', 'checkpoint-2.pth.tar',
                 'model_best.pth.tar', 'model_best.safetensors'):
        assert os.path.exists(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.endswith('.partial')]
    rows = read_summary(out)
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']  # timm's columns
    assert float(rows[-1]['eval_top1']) > 50.0  # chance is 25
    ckpt = torch.load(os.path.join(out, 'last.pth.tar'), weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['arch'] == 'test_vit' and 'optimizer' in ckpt
    # weights alone, loadable the timm way
    model = timm.create_model(
        'test_vit', num_classes=NUM_CLASSES, pretrained=True,
        pretrained_cfg_overlay=dict(file=os.path.join(out, 'model_best.safetensors'), num_classes=NUM_CLASSES))
    best = torch.load(os.path.join(out, 'model_best.pth.tar'), weights_only=True)['state_dict']
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k


def test_zzz_carrot_pk_learns(data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger='train')
    # on 4 toy classes the barrier at weight 1 outweighs the task loss for the few steps a test can afford
    out = run(data_dir, tmp_path, 'zzz', '--head', 'zzz', '--zzz-rank', '2', '--carrot', '--sampler', 'pk',
              '--samples-per-class', '4', '--head-lr', '5e-2', '--carrot-weight', '0.1', epochs=3)
    rows = read_summary(out)
    for col in CARROT_COLUMNS:
        assert col in rows[0], col
        assert np.isfinite(float(rows[-1][col])), col
    assert float(rows[0]['train_used_frac']) == 1.0            # P x K: every sample's class has K samples
    assert float(rows[0]['train_classes_used']) == 4.0
    assert float(rows[-1]['eval_top1']) > 50.0
    assert any('R:' in r.message and 'Min erank' in r.message for r in caplog.records)
    ckpt = torch.load(os.path.join(out, 'last.pth.tar'), weights_only=True)
    assert ckpt['arch'] == 'test_vit_zzz' and ckpt['args']['head'] == 'zzz'
    assert any(k.endswith('sigma2_raw') for k in ckpt['state_dict'])
    from safetensors.torch import load_file
    path = os.path.join(out, 'model_best.safetensors')
    weights = load_file(path)
    assert weights.keys() == ckpt['state_dict'].keys()
    model = timm.create_model('test_vit_zzz', num_classes=NUM_CLASSES, zzz_rank=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_carrot_linear_head_mixup_smoothing(data_dir, tmp_path):
    out = run(data_dir, tmp_path, 'mix', '--carrot', '--head', 'linear', '--mixup', '0.4', '--cutmix', '0.4',
              '--smoothing', '0.1', '--mixup-mode', 'elem', '--sampler', 'pk', '--samples-per-class', '4')
    rows = read_summary(out)
    assert all(np.isfinite(float(r['train_loss'])) and np.isfinite(float(r['train_R'])) for r in rows)
    assert isinstance(torch.load(os.path.join(out, 'last.pth.tar'), weights_only=True)['state_dict']['head.weight'],
                      torch.Tensor)


@pytest.mark.parametrize('extra', [
    ('--grad-accum-steps', '2'),
    ('--model-ema', '--model-ema-decay', '0.9'),
    ('--amp', '--amp-dtype', 'bfloat16', '--channels-last'),
], ids=['accum', 'ema', 'amp-bf16'])
def test_zzz_carrot_variants(data_dir, tmp_path, extra):
    out = run(data_dir, tmp_path, 'v', '--head', 'zzz', '--zzz-rank', '2', '--carrot', *extra)
    rows = read_summary(out)
    assert len(rows) == 2 and all(np.isfinite(float(r['train_R'])) for r in rows)
    assert 0.0 < float(rows[0]['train_used_frac']) <= 1.0      # random sampler: logged fraction CARROT sees
    if '--model-ema' in extra:
        assert os.path.exists(os.path.join(out, 'model_best_ema.safetensors'))


def test_device_means_keep_a_nan_loss():
    """A diverged loss shows as NaN in the logged mean (as in timm); the CARROT minima skip their NaN batches."""
    means = RunningMeans(skip_nan=('min_r',))
    nan, one = torch.tensor(float('nan')), torch.tensor(1.0)
    means.add({'loss': one, 'min_r': one})
    means.add({'loss': nan, 'min_r': nan})
    out = means.means()
    assert np.isnan(out['loss']) and out['min_r'] == 1.0


def test_compile_and_grad_checkpointing_match_eager(data_dir, tmp_path, caplog):
    """--torchcompile (aot_eager: dynamo and AOT autograd through the head's and CARROT's autograd Functions,
    no C++ compiler needed), --grad-checkpointing and --channels-last give the eager run's numbers."""
    caplog.set_level(logging.INFO, logger='train')
    extra = ('--head', 'zzz', '--zzz-rank', '2', '--carrot', '--sampler', 'pk', '--samples-per-class', '4')
    eager = read_summary(run(data_dir, tmp_path, 'eager', *extra, epochs=1))
    fast = read_summary(run(data_dir, tmp_path, 'compiled', *extra, '--torchcompile', 'aot_eager',
                            '--grad-checkpointing', '--channels-last', epochs=1))
    assert any('Compiling task components with backend=aot_eager' in r.message for r in caplog.records)
    for key in ('train_loss', 'train_R', 'train_R_rank', 'eval_loss', 'eval_top1'):
        assert float(fast[0][key]) == pytest.approx(float(eager[0][key]), rel=1e-4, abs=1e-5), key


def test_resume_matches_uninterrupted(data_dir, tmp_path, monkeypatch):
    # random sampler: the shuffle of epoch 2 depends on the RNG state restored from the checkpoint
    extra = ('--head', 'zzz', '--zzz-rank', '2', '--carrot', '--model-ema', '--model-ema-decay', '0.9')
    full = run(data_dir, tmp_path / 'a', 'full', *extra, epochs=2)
    # interrupted after its first epoch (timm's loop ends cleanly on KeyboardInterrupt) ...
    real = Trainer.train_epoch

    def stop_at_epoch_1(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(Trainer, 'train_epoch', stop_at_epoch_1)
    part = run(data_dir, tmp_path / 'b', 'part', *extra, epochs=2)
    assert len(read_summary(part)) == 1
    monkeypatch.setattr(Trainer, 'train_epoch', real)
    # ... then resumed from last.pth.tar into the same folder
    run(data_dir, tmp_path / 'b', 'part', *extra, '--resume', os.path.join(part, 'last.pth.tar'), epochs=2)
    a, b = read_summary(full), read_summary(part)
    assert [r['epoch'] for r in b] == ['0', '1']
    for col in ('train_loss', 'train_R', 'eval_loss', 'eval_top1', 'lr'):
        assert float(a[1][col]) == pytest.approx(float(b[1][col]), rel=1e-5, abs=1e-7), col


def test_stop_epoch_milestones_and_resume_auto(data_dir, tmp_path):
    """timm 1.0.31's --stop-epoch (stop, schedule unchanged), --save-epochs (milestone-N after N epochs) and
    --resume auto (continue the experiment folder in place) give the uninterrupted run's numbers."""
    extra = ('--head', 'zzz', '--zzz-rank', '2', '--carrot', '--warmup-epochs', '1')
    full = read_summary(run(data_dir, tmp_path / 'a', 'full', *extra, epochs=3))
    out = run(data_dir, tmp_path / 'b', 'part', *extra, '--resume', 'auto', '--stop-epoch', '2',
              '--save-epochs', '1', '2', epochs=3)                     # no last.pth.tar yet: a fresh start
    assert [r['epoch'] for r in read_summary(out)] == ['0', '1']
    for n in (1, 2):
        assert torch.load(os.path.join(out, f'milestone-{n}.pth.tar'), weights_only=True)['epoch'] == n - 1
    run(data_dir, tmp_path / 'b', 'part', *extra, '--resume', 'auto', epochs=3)
    part = read_summary(out)
    assert [r['epoch'] for r in part] == ['0', '1', '2']
    for a, b in zip(full, part):
        for col in ('train_loss', 'train_R', 'eval_loss', 'lr'):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-5, abs=1e-7), (a['epoch'], col)
    with pytest.raises(SystemExit, match='--resume auto: continues the experiment folder in place; pass --experiment'):
        train.main([data_dir, *BASE, '--resume', 'auto'])


def test_timm_1_0_31_losses_schedules_and_tasks(data_dir, tmp_path):
    # wsd with timm 1.0.31's default decay phase (the last 20%; the old fixed default, 90 epochs, cannot run)
    rows = read_summary(run(data_dir, tmp_path, 'poly', '--loss', 'poly', '--sched', 'wsd', epochs=3))
    assert len(rows) == 3 and all(np.isfinite(float(r['train_loss'])) for r in rows)
    lrs = [float(r['lr']) for r in read_summary(run(data_dir, tmp_path, 'wsd', '--sched', 'wsd', '--decay-epochs', '2',
                                                    epochs=4))]
    assert lrs[0] == lrs[1] == lrs[2] > lrs[3] > 0                        # stable, then the decay phase
    for flags, message in ((('--loss', 'twoway'), '--loss twoway: .*requires multi-label'),
                           (('--task', 'multilabel'), '--task multilabel: multi-label training and validation are not supported'),
                           (('--target-format', 'multihot'), '--target-format multihot: multi-label'),
                           (('--loss', 'ce', '--bce-loss'), '--loss ce: contradicts --bce-loss')):
        with pytest.raises(SystemExit, match=message):
            run(data_dir, tmp_path, 'x', *flags)


def test_checkpoint_write_is_atomic(data_dir, tmp_path, monkeypatch):
    out = run(data_dir, tmp_path, 'atomic', epochs=1)
    last = os.path.join(out, 'last.pth.tar')
    before = open(last, 'rb').read()
    keeper = CheckpointKeeper(out)

    def killed(obj, f, *a, **kw):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt('killed during save')

    monkeypatch.setattr(torch, 'save', killed)
    with pytest.raises(KeyboardInterrupt):
        keeper.save({'state_dict': {}}, 5, metric=1.0)
    assert open(last, 'rb').read() == before
    assert not [f for f in os.listdir(out) if f.endswith('.partial')]
    torch.load(last, weights_only=True)


def test_head_lr_param_groups():
    model = timm.create_model('test_vit_zzz', num_classes=NUM_CLASSES, zzz_rank=2, head_type='zzz')
    args, _ = train.parse_args(['--data-dir', ROOT, '--opt', 'adamw', '--lr', '1e-5', '--head-lr', '5e-4',
                                '--layer-decay', '0.75', '--weight-decay', '0.05'])
    opt = build_optimizer(model, args)
    timm.scheduler.create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=0)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    for g in opt.param_groups:
        if id(g['params'][0]) in head_ids:
            assert g['lr'] == pytest.approx(5e-4)
        else:
            assert g['lr'] <= 1e-5 + 1e-12       # backbone: lr x layer-decay scale
    assert min(g['lr'] for g in opt.param_groups) < 1e-5


def test_head_weight_decay():
    """The design's 0.01 head / 0.05 backbone: head weights at --head-weight-decay, no-decay params stay at 0."""
    model = timm.create_model('test_vit_zzz', num_classes=NUM_CLASSES, zzz_rank=2, head_type='zzz')
    args, _ = train.parse_args(['--data-dir', ROOT, '--lr', '1e-5', '--weight-decay', '0.05',
                                '--head-weight-decay', '0.01'])
    groups = build_optimizer(model, args).param_groups
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    decay = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    assert set(decay) == {id(p) for p in model.parameters()}
    head = model.get_classifier()
    assert decay[id(head.A)] == decay[id(head.mu)] == 0.01 and decay[id(head.bias)] == 0.0
    assert {decay[i] for i in decay if i not in head_ids} == {0.0, 0.05}


# ------------------------------------------------------------------------------------------------------------
# command line and bad input
# ------------------------------------------------------------------------------------------------------------

# every flag of timm's reference train.py (timm 1.0.29 main, listed in the owners' CLI reference) and its default
# there; --decay-epochs defaults to None as in timm 1.0.31 (90 for step, 0.2 of the schedule for wsd / rsqrt)
TIMM_TRAIN_DEFAULTS = {
    'data': None, '--data-dir': None, '--dataset': '', '--train-split': 'train', '--val-split': 'validation',
    '--train-num-samples': None, '--val-num-samples': None, '--dataset-download': False, '--class-map': '',
    '--input-img-mode': None, '--input-key': None, '--target-key': None, '--dataset-trust-remote-code': False,
    '--model': 'resnet50', '--pretrained': False, '--pretrained-path': None, '--initial-checkpoint': '',
    '--resume': '', '--no-resume-opt': False, '--num-classes': None, '--gp': None, '--img-size': None,
    '--in-chans': None, '--input-size': None, '--crop-pct': None, '--mean': None, '--std': None,
    '--interpolation': '', '--batch-size': 128, '--validation-batch-size': None, '--channels-last': False,
    '--fuser': '', '--grad-accum-steps': 1, '--grad-checkpointing': False, '--fast-norm': False, '--model-kwargs': {},
    '--head-init-scale': None, '--head-init-bias': None, '--torchcompile-mode': None, '--torchscript': False,
    '--torchcompile': None, '--device': 'cuda', '--amp': False, '--amp-dtype': 'float16', '--model-dtype': None,
    '--no-ddp-bb': False, '--synchronize-step': False, '--local_rank': 0, '--device-modules': None, '--opt': 'sgd',
    '--opt-eps': None, '--opt-betas': None, '--momentum': 0.9, '--weight-decay': 2e-05, '--clip-grad': None,
    '--clip-mode': 'norm', '--layer-decay': None, '--layer-decay-min-scale': 0, '--layer-decay-no-opt-scale': None,
    '--opt-kwargs': {}, '--sched': 'cosine', '--sched-on-updates': False, '--lr': None, '--lr-base': 0.1,
    '--lr-base-size': 256, '--lr-base-scale': '', '--lr-noise': None, '--lr-noise-pct': 0.67, '--lr-noise-std': 1.0,
    '--lr-cycle-mul': 1.0, '--lr-cycle-decay': 0.5, '--lr-cycle-limit': 1, '--lr-k-decay': 1.0, '--warmup-lr': 1e-05,
    '--min-lr': 0, '--epochs': 300, '--epoch-repeats': 0.0, '--start-epoch': None,
    '--decay-milestones': [90, 180, 270], '--decay-epochs': None, '--warmup-epochs': 5, '--warmup-prefix': False,
    '--cooldown-epochs': 0, '--patience-epochs': 10, '--dr': 0.1, '--no-aug': False, '--train-crop-mode': None,
    '--scale': [0.08, 1.0], '--ratio': [0.75, 1.3333333333333333], '--hflip': 0.5, '--vflip': 0.0,
    '--color-jitter': 0.4, '--color-jitter-prob': None, '--grayscale-prob': None, '--gaussian-blur-prob': None,
    '--aa': None, '--aug-repeats': 0, '--aug-splits': 0, '--jsd-loss': False, '--bce-loss': False, '--bce-sum': False,
    '--bce-target-thresh': None, '--bce-pos-weight': None, '--reprob': 0.0, '--remode': 'pixel', '--recount': 1,
    '--resplit': False, '--mixup': 0.0, '--cutmix': 0.0, '--cutmix-minmax': None, '--mixup-prob': 1.0,
    '--mixup-switch-prob': 0.5, '--mixup-mode': 'batch', '--mixup-off-epoch': 0, '--smoothing': 0.1,
    '--train-interpolation': 'random', '--drop': 0.0, '--drop-connect': None, '--drop-path': None,
    '--drop-block': None, '--bn-momentum': None, '--bn-eps': None, '--sync-bn': False, '--dist-bn': 'reduce',
    '--split-bn': False, '--model-ema': False, '--model-ema-force-cpu': False, '--model-ema-decay': 0.9998,
    '--model-ema-warmup': False, '--seed': 42, '--worker-seeding': 'all', '--log-interval': 50, '--val-interval': 1,
    '--recovery-interval': 0, '--checkpoint-hist': 10, '--workers': 4, '--save-images': False, '--pin-mem': False,
    '--no-prefetcher': False, '--output': '', '--experiment': '', '--eval-metric': 'top1', '--tta': 0,
    '--use-multi-epochs-loader': False, '--log-wandb': False, '--wandb-project': None, '--wandb-tags': [],
    '--wandb-resume-id': '', '--train-img-sizes': None, '--train-batch-sizes': None, '--train-size-probs': None,
    '--train-size-schedule': 'constant', '--train-size-schedule-spread': 0.65, '--train-size-random-mix': 0.1,
    '--train-steps-per-epoch': None, '--variable-batch-loss-scale': 'none', '--naflex-loader': False,
    '--naflex-train-seq-lens': [128, 256, 576, 784, 1024], '--naflex-max-seq-len': 576, '--naflex-patch-sizes': None,
    '--naflex-patch-size-probs': None, '--naflex-loss-scale': 'linear', '--naflex-patchify-channels-first': False,
    '--kd-model-name': None, '--kd-distill-type': 'logit', '--kd-loss-type': 'kl', '--distill-loss-weight': None,
    '--task-loss-weight': None, '--kd-temperature': 4.0, '--kd-student-feature-dim': None,
    '--kd-teacher-feature-dim': None, '--kd-token-distill-type': 'soft',
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_amp_pk_carrot(data_dir, tmp_path):
    """On a GPU: fp16 AMP with the loss scaler, channels-last, accumulation, P x K bounds (CUDA-graphed CARROT)."""
    argv = [data_dir, *BASE, '--device', 'cuda', '--epochs', '2', '--output', str(tmp_path), '--experiment', 'cuda',
            '--head', 'zzz', '--zzz-rank', '2', '--carrot', '--sampler', 'pk', '--amp', '--channels-last',
            '--grad-accum-steps', '2', '--model-ema']
    out = train.main(argv)
    rows = read_summary(out)
    assert all(np.isfinite(float(r['train_R'])) for r in rows) and float(rows[0]['train_used_frac']) == 1.0


def _sample_argv(flag, action):
    """A command line that sets `flag` to a value other than its default, and that value as argparse stores it."""
    if action.nargs == 0:
        return [flag], action.const
    if action.option_strings == []:                     # the positional data folder
        return ['some/folder'], 'some/folder'
    if action.choices:
        value = [c for c in action.choices if c != action.default][0]
        return [flag, str(value)], value
    kind = action.type or str
    one = {int: 3, float: 0.25, str: 'x'}.get(kind, 'x')
    if action.nargs in ('+', '*') and not isinstance(action.default, dict):
        return [flag, str(one), str(one)], [one, one]
    if isinstance(action.nargs, int):
        return [flag, *[str(one)] * action.nargs], [one] * action.nargs
    if isinstance(action.default, dict):                 # key=value pairs (timm's ParseKwargs)
        return [flag, 'a=1'], {'a': 1}
    return [flag, str(one)], one


def test_every_timm_flag_parses_with_timms_default(tmp_path):
    """Each flag of timm's train.py exists here with timm's default, and a value given on the command line lands
    where timm's own script would put it."""
    parser = train.build_parser()
    actions = {s: a for a in parser._actions for s in (a.option_strings or [a.dest])}
    missing = [f for f in TIMM_TRAIN_DEFAULTS if f not in actions]
    assert not missing
    for flag, default in TIMM_TRAIN_DEFAULTS.items():
        action = actions[flag]
        assert parser.get_default(action.dest) == default, flag
        argv, stored = _sample_argv(flag, action)
        assert getattr(parser.parse_args(argv), action.dest) == stored, flag
    # YAML recipes set the defaults, the command line overrides them
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('batch_size: 32\nsmoothing: 0.0\nmodel: test_resnet\n')
    args, text = train.parse_args(['-c', str(cfg), '--data-dir', ROOT, '--batch-size', '8'])
    assert (args.batch_size, args.smoothing, args.model, args.opt, args.lr_base, args.epochs) == \
        (8, 0.0, 'test_resnet', 'sgd', 0.1, 300)
    assert 'batch_size: 8' in text


@pytest.mark.parametrize('argv, message', [
    (['--naflex-loader'], '--naflex-loader is not supported'),
    (['--kd-model-name', 'resnet18'], '--kd-model-name is not supported'),
    (['--sampler', 'pk', '--samples-per-class', '32', '--batch-size', '16'], 'raise --batch-size'),
    (['--head', 'zzz', '--head-init-scale', '0.1'], 'use --head linear'),
    (['--head', 'zzz', '--head-init-bias', '0'], 'use --head linear'),
    (['--head', 'zzz', '--tta', '2'], 'use --head linear'),
    (['--head', 'linear', '--zzz-rank', '4'], 'add --head zzz'),
], ids=['naflex', 'kd', 'k-gt-batch', 'init-scale', 'init-bias', 'tta', 'rank-linear'])
def test_rejected_flags(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_args(['--data-dir', ROOT, *argv])


def test_unknown_yaml_key_is_rejected(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('batch_size: 32\nbatch_sise: 16\nsome_new_timm_flag: null\n')
    with pytest.raises(SystemExit, match="unknown key 'batch_sise'"):
        train.parse_args(['-c', str(cfg), '--data-dir', ROOT])
    cfg.write_text('batch_size: 32\nsome_new_timm_flag: null\n')
    assert train.parse_args(['-c', str(cfg), '--data-dir', ROOT])[0].batch_size == 32


def test_bad_input_stops_before_training(data_dir, tmp_path, image_folder):
    with pytest.raises(SystemExit, match='does not exist'):
        run(str(tmp_path / 'missing'), tmp_path, 'x')
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    with pytest.raises(SystemExit, match='check --data-dir'):
        run(str(empty), tmp_path, 'x')
    five = image_folder(tmp_path / 'five', num_classes=5, train_per_class=2, val_per_class=1)
    with pytest.raises(SystemExit, match='pass --num-classes 5'):
        run(five, tmp_path, 'x')
    with pytest.raises(SystemExit, match='rank'):
        run(data_dir, tmp_path, 'x', '--head', 'zzz', '--zzz-rank', '100000')
    with pytest.raises(SystemExit, match='distinct classes'):
        run(data_dir, tmp_path, 'x', '--sampler', 'pk', '--samples-per-class', '2', '--carrot')
    with pytest.raises(SystemExit, match='--torchscript: is not supported for carrot_zzz models'):
        run(data_dir, tmp_path, 'x', '--model', 'test_vit_zzz.r160_in1k', '--torchscript')
    for flags, message in ((('--opt', 'adamz'), '--opt adamz: cannot create this optimizer .*not found'),
                           (('--sched', 'cosinus'), "--sched cosinus: cannot create this schedule .*Unknown scheduler"),
                           (('--eval-metric', 'top3'), '--eval-metric top3: .*pass one'),
                           (('--clip-mode', 'l2', '--clip-grad', '1'), '--clip-mode l2: pass one of norm, value, agc')):
        with pytest.raises(SystemExit, match=message):
            run(data_dir, tmp_path, 'x', *flags)
    assert not os.path.exists(os.path.join(tmp_path, 'x'))


def test_remote_readers_and_deprecated_flags_run_as_in_timm(tmp_path, caplog):
    """A data folder that a hub / tfds / webdataset reader makes itself is not required to exist, and
    --drop-connect (deprecated, ignored by timm) runs with a warning instead of stopping."""
    args, _ = train.parse_args(['--data-dir', str(tmp_path / 'cache'), '--dataset', 'hfds/some/dataset'])
    assert args.dataset == 'hfds/some/dataset'
    caplog.set_level(logging.WARNING, logger='train')
    train.parse_args(['--data-dir', str(tmp_path), '--drop-connect', '0.1'])
    assert any('--drop-connect is deprecated' in r.message for r in caplog.records)
    caplog.set_level(logging.WARNING)
    train.parse_args(['--data-dir', str(tmp_path), '--multilabel-threshold', '0.5'])   # timm 1.0.31 args.yaml
    assert any('--multilabel-threshold applies to multi-label' in r.message for r in caplog.records)


def test_missing_or_corrupt_checkpoints_stop_with_one_line(data_dir, tmp_path):
    out = run(data_dir, tmp_path, 'good', '--head', 'zzz', '--zzz-rank', '2', epochs=1)
    good = os.path.join(out, 'last.pth.tar')
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(open(good, 'rb').read()[:5000])
    for flag in ('--resume', '--initial-checkpoint', '--pretrained-path'):
        with pytest.raises(SystemExit, match=f'{flag} .*missing.pth.tar: no such file'):
            run(data_dir, tmp_path, 'x', '--head', 'zzz', '--zzz-rank', '2', flag, str(tmp_path / 'missing.pth.tar'))
    with pytest.raises(SystemExit, match='--resume .*truncated.pth.tar: cannot resume from it'):
        run(data_dir, tmp_path, 'x', '--head', 'zzz', '--zzz-rank', '2', '--resume', str(truncated))
    with pytest.raises(SystemExit, match=r'--initial-checkpoint .*truncated.pth.tar: cannot load it'):
        run(data_dir, tmp_path, 'x', '--head', 'zzz', '--zzz-rank', '2', '--initial-checkpoint', str(truncated))
    # a checkpoint as timm's own train.py writes it (args as an argparse.Namespace) resumes
    import argparse
    ckpt = torch.load(good, weights_only=True)
    ckpt['args'] = argparse.Namespace(**ckpt['args'])
    ckpt.pop('rng_state')
    timm_style = tmp_path / 'timm_style.pth.tar'
    torch.save(ckpt, timm_style)
    rows = read_summary(run(data_dir, tmp_path, 'from_timm', '--head', 'zzz', '--zzz-rank', '2', '--resume',
                            str(timm_style), epochs=2))
    assert [r['epoch'] for r in rows] == ['1']
    # the checkpoint of another model (a linear head) does not resume a ZZZ run
    with pytest.raises(SystemExit, match='--resume .*last.pth.tar: cannot resume from it'):
        run(data_dir, tmp_path, 'x', '--head', 'linear', '--resume', good)
    assert not os.path.exists(os.path.join(tmp_path, 'x'))      # nothing was trained or written


@pytest.mark.parametrize('model, flags, expected', [
    ('resnet18', ['--head', 'zzz'], ('resnet18_zzz', 'zzz')),
    ('vit_base_patch16_224.augreg_in21k', ['--head', 'zzz'], ('vit_base_patch16_224_zzz.augreg_in21k', 'zzz')),
    ('resnet18.a1_in1k', ['--carrot'], ('resnet18_zzz.a1_in1k', 'linear')),
    ('resnet18_zzz.a1_in1k', ['--head', 'zzz'], ('resnet18_zzz.a1_in1k', 'zzz')),
    ('resnet18.a1_in1k', [], ('resnet18.a1_in1k', None)),
])
def test_model_name_keeps_pretrained_tag(model, flags, expected):
    args, _ = train.parse_args(['--data-dir', ROOT, '--model', model, *flags])
    name, kwargs = model_name_and_head(args)
    assert (name, kwargs.get('head_type')) == expected


def test_tagged_model_trains_with_carrot(data_dir, tmp_path):
    """A pretrained tag (here without its weights) runs end to end with --carrot: the model is `<arch>_zzz.<tag>`."""
    out = run(data_dir, tmp_path, 'tag', '--model', 'test_vit.r160_in1k', '--carrot', '--head', 'zzz',
              '--zzz-rank', '2', epochs=1)
    ckpt = torch.load(os.path.join(out, 'last.pth.tar'), weights_only=True)
    assert ckpt['arch'] == 'test_vit_zzz.r160_in1k' and np.isfinite(float(read_summary(out)[0]['train_R']))


def test_agc_leaves_out_the_whole_zzz_head():
    """--clip-mode agc: timm drops a linear head's 2 parameters from clipping; all 5 of a ZZZ head stay out."""
    from timm.task import ClassificationTask
    zzz = timm.create_model('test_vit_zzz', num_classes=NUM_CLASSES, zzz_rank=2, head_type='zzz')
    task = ClassificationTask(zzz, torch.nn.CrossEntropyLoss())
    clipped = {id(p) for p in clip_parameters(task, 'agc')}
    head = {id(p) for p in zzz.get_classifier().parameters()}
    assert len(head) == 5 and not clipped & head
    assert clipped | head == {id(p) for p in zzz.parameters()}
    assert len(list(clip_parameters(task, 'norm'))) == len(list(zzz.parameters()))
    plain = timm.create_model('test_vit', num_classes=NUM_CLASSES)
    plain_task = ClassificationTask(plain, torch.nn.CrossEntropyLoss())
    assert [id(p) for p in clip_parameters(plain_task, 'agc')] == \
        [id(p) for p in plain_task.get_clip_parameters(exclude_head=True)]


def test_bad_recipe_file_stops_with_one_line(tmp_path):
    """train.py and validate.py read -c through carrot_zzz.recipe: a missing file or a non-mapping names the fix."""
    import validate
    listing = tmp_path / 'list.yaml'
    listing.write_text('- 1\n- 2\n')
    for parse in (lambda a: train.parse_args(a + ['--data-dir', ROOT]), validate.parse_args):
        with pytest.raises(SystemExit, match='not found; pass -c'):
            parse(['-c', str(tmp_path / 'missing.yaml')])
        with pytest.raises(SystemExit, match='not a YAML mapping'):
            parse(['-c', str(listing)])
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('samples-per-class: 8\nmodel: test_vit\nepochs: 3\n')
    assert train.parse_args(['-c', str(recipe), '--data-dir', ROOT])[0].samples_per_class == 8
    args = validate.parse_args(['-c', str(recipe)])           # training-only keys (epochs) are skipped
    assert args.model == 'test_vit' and not hasattr(args, 'epochs')


# ------------------------------------------------------------------------------------------------------------
# --holdout-fraction and --head-init data
# ------------------------------------------------------------------------------------------------------------

def test_holdout_replaces_the_evaluation_split(data_dir, tmp_path, caplog):
    """The evaluation after each epoch uses a held-out part of the training split; the evaluation split is not
    even opened (here it does not exist)."""
    caplog.set_level(logging.INFO)
    out = run(data_dir, tmp_path, 'held', '--holdout-fraction', '0.25', '--val-split', 'no_such_split', epochs=1)
    assert any('Evaluating on 16 of the 64 training samples' in r.message for r in caplog.records)
    assert 0.0 <= float(read_summary(out)[0]['eval_top1']) <= 100.0


def _built(data_dir, tmp_path, *flags):
    """What train.main builds before the epochs: settings, precision, model and data of a run."""
    from carrot_zzz.engine.data import build_training_data
    from carrot_zzz.engine.models import create_training_model
    from carrot_zzz.engine.process import place_model, start_process
    cfg, _ = train.parse_args([data_dir, *BASE, '--output', str(tmp_path), '--experiment', 'e', *flags])
    precision = start_process(cfg)
    model = place_model(create_training_model(cfg), cfg, precision)
    return cfg, precision, model, build_training_data(cfg, model, precision)


@pytest.mark.parametrize('head', ['zzz', 'linear'])
@pytest.mark.parametrize('holdout', ['0', '0.25'])
def test_head_init_fits_the_features_of_the_training_split(data_dir, tmp_path, head, holdout, monkeypatch):
    """--head-init data: the head is fitted to the backbone's pooled embeddings of the training samples, one by
    one through the evaluation transform (computed here naively), with the held-out part as the ZZZ temperature's
    data; the result equals the fit called directly on those features."""
    import copy
    from carrot_zzz import ZZZHead
    from carrot_zzz.engine.head_init import init_head_from_data
    from carrot_zzz.linear_probe import fit_linear_head
    flags = ('--head', head, *(('--zzz-rank', '2') if head == 'zzz' else ()), '--holdout-fraction', holdout,
             '--no-prefetcher')                                   # the data set's transform normalises
    cfg, precision, model, data = _built(data_dir, tmp_path, *flags)
    fresh = copy.deepcopy(model.get_classifier())
    init_head_from_data(model, cfg, data, precision, logging.getLogger('test'))
    model.eval()

    def naive(dataset):
        with torch.no_grad():
            rows = [(model.forward_head(model.forward_features(dataset[i][0][None]), pre_logits=True)[0],
                     dataset[i][1]) for i in range(len(dataset))]
        return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    feats, labels = naive(data.fit_view)
    assert len(labels) == (48 if holdout == '0.25' else 64)
    if isinstance(fresh, ZZZHead):
        held = naive(data.eval_dataset) if holdout != '0' else None
        fresh.init_from_features(feats, labels, holdout=held)
        for (name, got), want in zip(model.get_classifier().state_dict().items(), fresh.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    else:   # L-BFGS stops at its iteration limit on separable data: compare what it fits, not the last digits
        fit_linear_head(fresh, feats, labels)
        with torch.no_grad():
            got, want = model.get_classifier()(feats), fresh(feats)
        assert torch.equal(got.argmax(1), want.argmax(1))
        loss = torch.nn.functional.cross_entropy
        assert loss(got, labels).item() == pytest.approx(loss(want, labels).item(), rel=0.05, abs=1e-3)
        assert loss(got, labels).item() < 0.5 * np.log(4)          # well below chance (log 4)


def test_head_init_runs_once_not_on_resume(data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    flags = ('--head', 'zzz', '--zzz-rank', '2', '--head-init', 'data', '--resume', 'auto')
    run(data_dir, tmp_path, 'once', *flags, '--stop-epoch', '1', epochs=2)
    assert sum('Head fitted to the data' in r.message for r in caplog.records) == 1
    caplog.clear()
    run(data_dir, tmp_path, 'once', *flags, epochs=2)
    assert not any('Head fitted to the data' in r.message for r in caplog.records)


def test_bn_freeze_stats_keeps_running_statistics(data_dir, tmp_path):
    """--bn-freeze-stats: every batch-norm layer normalises with its running statistics and never updates them
    (num_batches_tracked stays 0, running_mean unchanged) while its affine weights still train."""
    flags = ['--model', 'test_resnet', '--epochs', '1']
    states = {}
    for name, extra in (('frozen', ['--bn-freeze-stats']), ('plain', [])):
        folder = run(data_dir, tmp_path, name, *flags, *extra, epochs=1)
        states[name] = torch.load(os.path.join(folder, 'last.pth.tar'), weights_only=True)['state_dict']
    start = timm.create_model('test_resnet', num_classes=NUM_CLASSES).state_dict()
    frozen, plain = states['frozen'], states['plain']
    tracked = [k for k in frozen if k.endswith('num_batches_tracked')]
    assert tracked and all(int(frozen[k]) == 0 for k in tracked) and all(int(plain[k]) > 0 for k in tracked)
    for key in (k.replace('num_batches_tracked', 'running_mean') for k in tracked):
        assert torch.equal(frozen[key], start[key]) and not torch.equal(plain[key], start[key])
    weights = [k.replace('num_batches_tracked', 'weight') for k in tracked]
    assert any(not torch.equal(frozen[k], start[k]) for k in weights)
