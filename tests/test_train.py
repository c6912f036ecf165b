"""End-to-end runs of train.py on a tiny image folder (CPU, in-process), plus its failure modes.

Every run trains timm's `test_vit` at 32 px on 4 classes whose images differ in colour (a learnable task)
for 2-3 epochs; the whole file runs in well under a minute on 2 cores.
"""
import csv
import logging
import os
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 4

sys.path.insert(0, ROOT)
import train  # noqa: E402


# ------------------------------------------------------------------------------------------------------------
# data and runs
# ------------------------------------------------------------------------------------------------------------

def make_image_folder(root, num_classes=NUM_CLASSES, train_per_class=16, val_per_class=8, size=32, seed=0):
    """root/{train,validation}/class_<c>/<i>.png: class c is a distinct colour plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(num_classes, 3))
    for split, n in (('train', train_per_class), ('validation', val_per_class)):
        for c in range(num_classes):
            d = os.path.join(root, split, f'class_{c}')
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f'{i}.png'))
    return str(root)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


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
    means = train.DeviceMeans()
    nan, one = torch.tensor(float('nan')), torch.tensor(1.0)
    means.update({'loss': one, 'min_r': one})
    means.update({'loss': nan, 'min_r': nan})
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
    real = train.train_one_epoch

    def stop_at_epoch_1(epoch, *a, **kw):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(epoch, *a, **kw)

    monkeypatch.setattr(train, 'train_one_epoch', stop_at_epoch_1)
    part = run(data_dir, tmp_path / 'b', 'part', *extra, epochs=2)
    assert len(read_summary(part)) == 1
    monkeypatch.setattr(train, 'train_one_epoch', real)
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
    with pytest.raises(SystemExit, match='--resume auto continues the experiment folder in place; pass --experiment'):
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
                           (('--loss', 'ce', '--bce-loss'), '--loss ce contradicts --bce-loss')):
        with pytest.raises(SystemExit, match=message):
            run(data_dir, tmp_path, 'x', *flags)


def test_checkpoint_write_is_atomic(data_dir, tmp_path, monkeypatch):
    out = run(data_dir, tmp_path, 'atomic', epochs=1)
    last = os.path.join(out, 'last.pth.tar')
    before = open(last, 'rb').read()
    saver = train.AtomicCheckpointSaver(
        model=nn.Linear(2, 2), optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
        checkpoint_dir=out, recovery_dir=out, task=None)

    def killed(obj, f, *a, **kw):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt('killed during save')

    monkeypatch.setattr(torch, 'save', killed)
    saver.task = type('T', (), {'get_checkpoint_state': lambda self, **kw: {}})()
    with pytest.raises(KeyboardInterrupt):
        saver.save_checkpoint(5, metric=1.0)
    assert open(last, 'rb').read() == before
    torch.load(last, weights_only=True)


def test_head_lr_param_groups():
    model = timm.create_model('test_vit_zzz', num_classes=NUM_CLASSES, zzz_rank=2, head_type='zzz')
    args, _ = train.parse_args(['--data-dir', ROOT, '--opt', 'adamw', '--lr', '1e-5', '--head-lr', '5e-4',
                                '--layer-decay', '0.75', '--weight-decay', '0.05'])
    groups = train.head_param_groups(model, args, args.head_lr / args.lr)
    opt = timm.optim.create_optimizer_v2(model, opt='adamw', lr=args.lr, param_group_fn=lambda m: groups)
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
    groups = train.head_param_groups(model, args, 1.0)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    decay = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    assert set(decay) == {id(p) for p in model.parameters()}
    head = model.get_classifier()
    assert decay[id(head.A)] == decay[id(head.mu)] == 0.01 and decay[id(head.bias)] == 0.0
    assert {decay[i] for i in decay if i not in head_ids} == {0.0, 0.05}


# ------------------------------------------------------------------------------------------------------------
# command line and bad input
# ------------------------------------------------------------------------------------------------------------

TIMM_FLAGS = """--config data --data-dir --dataset --train-split --val-split --train-num-samples --val-num-samples
--dataset-download --class-map --input-img-mode --input-key --target-key --dataset-trust-remote-code --model
--pretrained --pretrained-path --initial-checkpoint --resume --no-resume-opt --num-classes --gp --img-size
--in-chans --input-size --crop-pct --mean --std --interpolation --batch-size --validation-batch-size
--channels-last --fuser --grad-accum-steps --grad-checkpointing --fast-norm --model-kwargs --head-init-scale
--head-init-bias --torchcompile-mode --torchscript --torchcompile --device --amp --amp-dtype --model-dtype
--no-ddp-bb --synchronize-step --device-modules --opt --opt-eps --opt-betas --momentum --weight-decay --clip-grad
--clip-mode --layer-decay --layer-decay-min-scale --layer-decay-no-opt-scale --opt-kwargs --sched
--sched-on-updates --lr --lr-base --lr-base-size --lr-base-scale --lr-noise --lr-noise-pct --lr-noise-std
--lr-cycle-mul --lr-cycle-decay --lr-cycle-limit --lr-k-decay --warmup-lr --min-lr --epochs --epoch-repeats
--start-epoch --decay-milestones --decay-epochs --warmup-epochs --warmup-prefix --cooldown-epochs
--patience-epochs --decay-rate --no-aug --train-crop-mode --scale --ratio --hflip --vflip --color-jitter
--color-jitter-prob --grayscale-prob --gaussian-blur-prob --aa --aug-repeats --aug-splits --jsd-loss --bce-loss
--bce-sum --bce-target-thresh --bce-pos-weight --reprob --remode --recount --resplit --mixup --cutmix
--cutmix-minmax --mixup-prob --mixup-switch-prob --mixup-mode --mixup-off-epoch --smoothing
--train-interpolation --drop --drop-connect --drop-path --drop-block --bn-momentum --bn-eps --sync-bn --dist-bn
--split-bn --model-ema --model-ema-force-cpu --model-ema-decay --model-ema-warmup --seed --worker-seeding
--log-interval --val-interval --recovery-interval --checkpoint-hist --workers --save-images --pin-mem
--no-prefetcher --output --experiment --eval-metric --tta --use-multi-epochs-loader --log-wandb --wandb-project
--wandb-tags --wandb-resume-id --train-img-sizes --train-batch-sizes --train-size-probs --train-size-schedule
--train-size-schedule-spread --train-size-random-mix --train-batches-per-epoch --variable-batch-loss-scale
--naflex-loader --naflex-train-seq-lens --naflex-max-seq-len --naflex-patch-sizes --naflex-patch-size-probs
--naflex-loss-scale --naflex-patchify-channels-first --kd-model-name --kd-distill-type --kd-loss-type
--distill-loss-weight --task-loss-weight --kd-temperature --kd-student-feature-dim --kd-teacher-feature-dim
--kd-token-distill-type""".split()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_amp_pk_carrot(data_dir, tmp_path):
    """On a GPU: fp16 AMP with the loss scaler, channels-last, accumulation, P x K bounds (CUDA-graphed CARROT)."""
    argv = [data_dir, *BASE, '--device', 'cuda', '--epochs', '2', '--output', str(tmp_path), '--experiment', 'cuda',
            '--head', 'zzz', '--zzz-rank', '2', '--carrot', '--sampler', 'pk', '--amp', '--channels-last',
            '--grad-accum-steps', '2', '--model-ema']
    out = train.main(argv)
    rows = read_summary(out)
    assert all(np.isfinite(float(r['train_R'])) for r in rows) and float(rows[0]['train_used_frac']) == 1.0


def test_parser_speaks_timms_cli(tmp_path):
    assert len(TIMM_FLAGS) == 172
    _, parser = train.build_parsers()
    options = {s for a in parser._actions for s in a.option_strings} | {'data'}
    assert not [f for f in TIMM_FLAGS if f not in options]
    # timm's defaults, YAML overrides, command line over YAML
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


def test_bad_input_stops_before_training(data_dir, tmp_path):
    with pytest.raises(SystemExit, match='does not exist'):
        run(str(tmp_path / 'missing'), tmp_path, 'x')
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    with pytest.raises(SystemExit, match='check --data-dir'):
        run(str(empty), tmp_path, 'x')
    five = make_image_folder(tmp_path / 'five', num_classes=5, train_per_class=2, val_per_class=1)
    with pytest.raises(SystemExit, match='pass --num-classes 5'):
        run(five, tmp_path, 'x')
    with pytest.raises(SystemExit, match='rank'):
        run(data_dir, tmp_path, 'x', '--head', 'zzz', '--zzz-rank', '100000')
    with pytest.raises(SystemExit, match='distinct classes'):
        run(data_dir, tmp_path, 'x', '--sampler', 'pk', '--samples-per-class', '2', '--carrot')
    with pytest.raises(SystemExit, match='--torchscript is not supported for carrot_zzz models'):
        run(data_dir, tmp_path, 'x', '--model', 'test_vit_zzz.r160_in1k', '--torchscript')
    for flags, message in ((('--opt', 'adamz'), 'cannot create optimizer --opt adamz .*not found'),
                           (('--sched', 'cosinus'), "cannot create scheduler --sched cosinus .*Unknown scheduler"),
                           (('--eval-metric', 'top3'), '--eval-metric top3: .*pass one of them'),
                           (('--clip-mode', 'l2', '--clip-grad', '1'), '--clip-mode l2: pass norm, value or agc')):
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
    name, kwargs = train.resolve_model_name(args)
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
    clipped = {id(p) for p in train.clip_parameters_of(task, 'agc')}
    head = {id(p) for p in zzz.get_classifier().parameters()}
    assert len(head) == 5 and not clipped & head
    assert clipped | head == {id(p) for p in zzz.parameters()}
    assert len(list(train.clip_parameters_of(task, 'norm'))) == len(list(zzz.parameters()))
    plain = timm.create_model('test_vit', num_classes=NUM_CLASSES)
    plain_task = ClassificationTask(plain, torch.nn.CrossEntropyLoss())
    assert [id(p) for p in train.clip_parameters_of(plain_task, 'agc')] == \
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
