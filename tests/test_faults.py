"""Nothing lost, nothing silently wrong: train.py under the faults a careful user meets (two runs into one folder,
a diverging loss, a kill between two writes, broken images, an empty class folder, a rerun, corrupt checkpoints,
a full disk). Faults are injected by monkeypatching the writes or the step, or by killing a subprocess."""
import csv
import logging
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import train
from carrot_zzz import carrot_regularizer
from carrot_zzz.engine import checkpoints as checkpoints_module
from carrot_zzz.engine import fit as fit_module
from carrot_zzz.engine.experiment import ExperimentLock
from carrot_zzz.engine.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--model', 'test_vit', '--input-size', '3', '32', '32', '--num-classes', '4', '--batch-size', '16',
        '--workers', '0', '--device', 'cpu', '--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.01',
        '--warmup-epochs', '0', '--no-aug', '--log-interval', '2', '--seed', '0']
pytestmark = pytest.mark.usefixtures('one_thread')


class Killed(BaseException):
    """Stands for SIGKILL inside a step: nothing of the process runs after it (no except / finally of ours)."""


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp('data'))


def run(data, out, experiment, *extra, epochs=2):
    return train.main([data, *BASE, '--epochs', str(epochs), '--output', str(out), '--experiment', experiment,
                       *extra])


def summary(folder):
    with open(os.path.join(folder, 'summary.csv')) as f:
        return list(csv.reader(f))


def stored_epoch(path):
    return torch.load(path, weights_only=True, mmap=True)['epoch']


# --- 1. one run per experiment folder ---------------------------------------------------------------------------

def test_a_second_run_into_a_busy_folder_stops_naming_the_owner(data_dir, tmp_path):
    folder = tmp_path / 'busy'
    folder.mkdir()
    lock = ExperimentLock(str(folder))                       # a run that is still training
    try:
        with pytest.raises(SystemExit, match=r'--experiment busy: .*busy is in use by a running training '
                                             r'\(host .* pid \d+\); wait for it or pass another --experiment NAME'):
            run(data_dir, tmp_path, 'busy', epochs=1)
    finally:
        lock.release()
    assert not os.path.exists(folder / 'last.pth.tar')


def test_a_killed_owner_leaves_no_lock_and_no_temporaries(data_dir, tmp_path):
    """A process holding the lock is killed with SIGKILL: the next run starts, and the temporary file the killed
    process left (a unique name: pid and random suffix) is removed."""
    folder = tmp_path / 'killed'
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from carrot_zzz.engine.experiment import ExperimentLock
        lock = ExperimentLock({str(folder)!r})
        open({str(folder / '.last.pth.tar.999.abcdef12.partial')!r}, 'wb').write(b'half')
        print('locked', flush=True)
        time.sleep(600)
    ''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(SystemExit, match=r'in use by a running training \(host .* pid %d\)' % holder.pid):
            run(data_dir, tmp_path, 'killed', epochs=1)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    run(data_dir, tmp_path, 'killed', epochs=1)
    assert not [f for f in os.listdir(folder) if f.endswith('.partial')]
    assert stored_epoch(folder / 'last.pth.tar') == 0


# --- 2. a diverging loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('flags, message', [
    (('--carrot', '--carrot-weight', 'nan'), '--carrot-weight nan: must be a finite number >= 0'),
    (('--lr', '-1'), '--lr -1.0: must be a finite number >= 0'),
    (('--head', 'zzz', '--head-lr', 'inf'), '--head-lr inf: must be a finite number >= 0'),
])
def test_non_finite_or_negative_rates_are_refused_up_front(flags, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_args(['--data-dir', ROOT, *flags])


def test_a_nan_loss_stops_the_run_and_keeps_the_finite_checkpoints(data_dir, tmp_path, monkeypatch):
    """From epoch 1 on the task returns a NaN loss: the run stops at the next log line with the step and the loss
    terms, without writing a checkpoint of it; last.pth.tar and model_best stay at epoch 0, finite."""
    from carrot_zzz.regularised_task import CarrotClassificationTask
    real = CarrotClassificationTask.forward
    calls = {'n': 0}

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        calls['n'] += 1
        if calls['n'] > 4:                                # 4 batches per epoch: epoch 1 diverges
            out['loss'] = out['loss'] * float('nan')
        return out

    monkeypatch.setattr(CarrotClassificationTask, 'forward', poisoned)
    with pytest.raises(SystemExit, match=r'the training loss became nan in epoch 1 \(updates up to 0; task_loss '
                                         r'.*R_var .*R_rank .*\); the checkpoints written before are kept\. Lower '
                                         r'--lr / --head-lr \(or --carrot-weight\), or clip gradients with --clip-grad'):
        run(data_dir, tmp_path, 'nan', '--head', 'zzz', '--zzz-rank', '2', '--carrot', epochs=3)
    folder = tmp_path / 'nan'
    for name in ('last.pth.tar', 'model_best.pth.tar'):
        ckpt = torch.load(folder / name, weights_only=True)
        assert ckpt['epoch'] == 0 and all(torch.isfinite(t).all() for t in ckpt['state_dict'].values())
    assert len(summary(folder)) == 2                      # header + epoch 0


def test_a_non_finite_model_is_never_best_nor_exported(data_dir, tmp_path, monkeypatch):
    """Weights that turn NaN after epoch 1's last step (the loss of that epoch was finite): epoch 1 evaluates to
    NaN logits, which score chance top-1; it is kept unranked and model_best stays epoch 0."""
    real = Trainer.train_epoch

    def nan_weights_after_epoch_1(self, epoch):
        means = real(self, epoch)
        if epoch == 1:
            with torch.no_grad():
                next(self.task.get_trainable_module().parameters()).fill_(float('nan'))
        return means

    monkeypatch.setattr(Trainer, 'train_epoch', nan_weights_after_epoch_1)
    folder = run(data_dir, tmp_path, 'nanw', epochs=2)
    assert stored_epoch(os.path.join(folder, 'model_best.pth.tar')) == 0
    assert stored_epoch(os.path.join(folder, 'last.pth.tar')) == 1
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(folder, 'model_best.safetensors')).values())


# --- 3. a kill between two writes --------------------------------------------------------------------------------

def test_a_kill_before_model_best_is_linked_then_resume_restores_the_best(data_dir, tmp_path, monkeypatch):
    """Epoch 1 is the best; the process dies after writing last.pth.tar, before linking model_best. --resume auto
    re-links model_best from the best epoch's file, and the exported weights are that epoch's."""
    scores = iter([50.0, 75.0, 60.0, 60.0])
    monkeypatch.setattr(fit_module, 'evaluate_epoch', lambda trainer, ema=False: {
        'loss': 1.0, 'top1': next(scores), 'top5': 100.0})
    real_link = checkpoints_module.atomic_link

    def link(src, dst):
        if dst.endswith('model_best.pth.tar') and stored_epoch(src) == 1:
            raise Killed()
        return real_link(src, dst)

    monkeypatch.setattr(checkpoints_module, 'atomic_link', link)
    with pytest.raises(Killed):
        run(data_dir, tmp_path, 'kill', '--resume', 'auto', epochs=3)
    folder = tmp_path / 'kill'
    assert stored_epoch(folder / 'model_best.pth.tar') == 0 and stored_epoch(folder / 'last.pth.tar') == 1
    monkeypatch.setattr(checkpoints_module, 'atomic_link', real_link)
    run(data_dir, tmp_path, 'kill', '--resume', 'auto', epochs=3)
    assert stored_epoch(folder / 'model_best.pth.tar') == 1
    best = torch.load(folder / 'model_best.pth.tar', weights_only=True)['state_dict']
    from safetensors.torch import load_file
    exported = load_file(str(folder / 'model_best.safetensors'))
    assert all(torch.equal(exported[k], v) for k, v in best.items())
    assert [r[0] for r in summary(folder)] == ['epoch', '0', '1', '2']


def test_a_kill_in_the_first_checkpoint_write_leaves_one_summary(data_dir, tmp_path, monkeypatch):
    real_write = checkpoints_module.atomic_write

    def write(path, fn, *a, **kw):
        if path.endswith('last.pth.tar'):
            raise Killed()
        return real_write(path, fn, *a, **kw)

    monkeypatch.setattr(checkpoints_module, 'atomic_write', write)
    with pytest.raises(Killed):
        run(data_dir, tmp_path, 'first', '--resume', 'auto', epochs=2)
    folder = tmp_path / 'first'
    assert [r[0] for r in summary(folder)] == ['epoch', '0'] and not (folder / 'last.pth.tar').exists()
    monkeypatch.setattr(checkpoints_module, 'atomic_write', real_write)
    run(data_dir, tmp_path, 'first', '--resume', 'auto', epochs=2)       # nothing to resume: a fresh start
    assert [r[0] for r in summary(folder)] == ['epoch', '0', '1']


# --- 4. broken or missing images ----------------------------------------------------------------------------------

@pytest.fixture
def broken_folder(tmp_path, image_folder):
    root = image_folder(tmp_path / 'broken')
    cls = os.path.join(root, 'train', 'class_1')
    open(os.path.join(cls, '0.png'), 'wb').close()                           # 0 bytes
    data = open(os.path.join(cls, '1.png'), 'rb').read()
    open(os.path.join(cls, '1.png'), 'wb').write(data[:len(data) // 2])      # cut short
    return root


def test_broken_training_images_stop_the_run_up_front(broken_folder, tmp_path):
    with pytest.raises(SystemExit, match=r"--data-dir .*: 2 unreadable images in split 'train': .*0.png \(empty\); "
                                         r".*1.png \(truncated\); replace them, or leave them out with "
                                         r"--skip-bad-images"):
        run(broken_folder, tmp_path, 'bad', '--sampler', 'pk', '--carrot', epochs=1)
    assert not (tmp_path / 'bad').exists()


def test_skip_bad_images_keeps_the_p_x_k_batches_whole(broken_folder, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    folder = run(broken_folder, tmp_path, 'skip', '--sampler', 'pk', '--samples-per-class', '4', '--carrot',
                 '--skip-bad-images', epochs=1)
    assert any('Left out 2 unreadable images' in r.message for r in caplog.records)
    with open(os.path.join(folder, 'summary.csv')) as f:
        row = list(csv.DictReader(f))[0]
    assert float(row['train_used_frac']) == 1.0 and float(row['train_classes_used']) == 4.0


def test_a_missing_image_of_an_fgvc_list_stops_up_front(tmp_path):
    root = tmp_path / 'CUB_200_2011'
    classes = ['001.A', '002.B']
    lines = {'images.txt': [], 'image_class_labels.txt': [], 'train_test_split.txt': []}
    for i in range(1, 9):
        rel = f'{classes[i % 2]}/{i}.jpg'
        os.makedirs(root / 'images' / classes[i % 2], exist_ok=True)
        Image.new('RGB', (8, 8), (i * 20, 0, 0)).save(root / 'images' / rel)
        lines['images.txt'].append(f'{i} {rel}')
        lines['image_class_labels.txt'].append(f'{i} {i % 2 + 1}')
        lines['train_test_split.txt'].append(f'{i} {int(i <= 6)}')
    lines['classes.txt'] = [f'{k + 1} {c}' for k, c in enumerate(classes)]
    for name, rows in lines.items():
        (root / name).write_text('\n'.join(rows) + '\n')
    os.remove(root / 'images' / classes[1] / '3.jpg')
    with pytest.raises(SystemExit, match=r"1 unreadable images in split 'train': .*3.jpg \(missing\)"):
        train.main([*BASE, '--data-dir', str(root), '--dataset', 'cub200', '--num-classes', '2', '--epochs', '1',
                    '--output', str(tmp_path), '--experiment', 'cub'])


def test_the_carrot_bounds_message_names_the_replaced_samples():
    z, labels = torch.randn(8, 4), torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    with pytest.raises(RuntimeError, match='replace an image that fails to load by the next sample'):
        carrot_regularizer(z, labels, max_classes=4, max_per_class=2)


# --- 5. an empty class folder -------------------------------------------------------------------------------------

def test_an_empty_class_folder_stops_instead_of_shifting_labels(tmp_path, image_folder):
    root = image_folder(tmp_path / 'empty_class')
    folder = os.path.join(root, 'train', 'class_1')
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    with pytest.raises(SystemExit, match=r"class folders of the 'train' and 'validation' splits differ \(class_1 has "
                                         r"no images in 'train'\).*--class-map FILE"):
        run(root, tmp_path, 'shift', epochs=1)


# --- 6. a rerun into a finished experiment ----------------------------------------------------------------------

def test_a_rerun_without_resume_is_refused_unless_overwrite(data_dir, tmp_path):
    folder = run(data_dir, tmp_path, 'done', epochs=1)
    before = open(os.path.join(folder, 'last.pth.tar'), 'rb').read()
    with pytest.raises(SystemExit, match=r'--experiment done: .*holds a run already; continue it with --resume auto, '
                                         r'pass a new --experiment NAME, or overwrite it with --overwrite'):
        run(data_dir, tmp_path, 'done', epochs=1)
    assert open(os.path.join(folder, 'last.pth.tar'), 'rb').read() == before
    run(data_dir, tmp_path, 'done', '--overwrite', '--seed', '1', epochs=1)
    assert open(os.path.join(folder, 'last.pth.tar'), 'rb').read() != before
    assert [r[0] for r in summary(folder)] == ['epoch', '0']


# --- 7. one line instead of a traceback --------------------------------------------------------------------------

@pytest.mark.parametrize('flag', ['--resume', '--initial-checkpoint', '--pretrained-path'])
def test_corrupt_safetensors_files_are_one_line(data_dir, tmp_path, flag):
    path = tmp_path / 'random.safetensors'
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    extra = ('--pretrained',) if flag == '--pretrained-path' else ()
    with pytest.raises(SystemExit, match=f'{flag} .*random.safetensors: cannot'):
        run(data_dir, tmp_path, 'corrupt', flag, str(path), *extra, epochs=1)


def test_an_output_that_cannot_be_a_folder_is_one_line(data_dir, tmp_path, monkeypatch):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(SystemExit, match=r'--output .*a_file: cannot make the folder .*; pass a writable --output'):
        train.main([data_dir, *BASE, '--epochs', '1', '--output', str(blocker), '--experiment', 'x'])
    real = os.makedirs

    def read_only(path, *a, **kw):
        raise OSError(30, 'Read-only file system')

    monkeypatch.setattr(os, 'makedirs', read_only)
    with pytest.raises(SystemExit, match=r'cannot make the folder .*\(Read-only file system\)'):
        train.main([data_dir, *BASE, '--epochs', '1', '--output', str(tmp_path / 'ro'), '--experiment', 'x'])
    monkeypatch.setattr(os, 'makedirs', real)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    real_save = torch.save

    def full(obj, f, *a, **kw):
        if obj.get('epoch') == 1:
            f.write(b'partial data')
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0')
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoints_module.torch, 'save', full)
    with pytest.raises(SystemExit, match=r'cannot write the checkpoint of epoch 1 in .*unexpected pos.*the files '
                                         r'written before are kept and no partial file is left'):
        run(data_dir, tmp_path, 'full', epochs=2)
    folder = tmp_path / 'full'
    assert stored_epoch(folder / 'last.pth.tar') == 0
    assert not [f for f in os.listdir(folder) if f.endswith('.partial')]
    assert [row[0] for row in summary(folder)[1:]] == ['0']          # no row of the epoch whose checkpoint failed


# --- 8. contradictions -----------------------------------------------------------------------------------------

def test_contradictions_are_refused_or_said(data_dir, tmp_path, caplog):
    with pytest.raises(SystemExit, match='--samples-per-class 1: CARROT needs classes with 2 or more samples'):
        train.parse_args(['--data-dir', ROOT, '--carrot', '--sampler', 'pk', '--samples-per-class', '1'])
    caplog.set_level(logging.WARNING)
    train.parse_args(['--data-dir', ROOT, '--pretrained-path', __file__])
    assert any('--pretrained-path is only read with --pretrained' in r.message for r in caplog.records)
    folder = run(data_dir, tmp_path, 'modes', epochs=1)
    for name in ('model_best.safetensors', 'last.pth.tar', 'model_best.pth.tar', 'summary.csv', 'args.yaml'):
        assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o644, name


def test_in_memory_data_sets_are_not_checked_as_files():
    """Fashion-MNIST keeps its images in arrays (its sample names are not files): nothing to check."""
    from carrot_zzz.data import create_dataset
    from carrot_zzz.data.image_check import sample_paths, unreadable_images
    dataset = create_dataset('fashion_mnist', split='train')
    assert sample_paths(dataset) is None and unreadable_images(dataset) == []


# --- 9. reliability, round two ---------------------------------------------------------------------------------

def _save_image(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture
def odd_images_folder(tmp_path, image_folder):
    """One training image of 64 x 64 pixels (the others 32 x 32), one 16-bit grey PNG (PIL mode I;16)."""
    root = image_folder(tmp_path / 'odd')
    cls = os.path.join(root, 'train', 'class_2')
    _save_image(os.path.join(cls, 'big.png'), np.full((64, 64, 3), 90, dtype=np.uint8))
    _save_image(os.path.join(cls, 'wide.png'), np.full((32, 32), 40000, dtype=np.uint16))
    return root


def test_images_over_the_pixel_limit_or_wider_than_8_bits_are_named(odd_images_folder, tmp_path, caplog):
    """A 16-bit PNG would read as solid white (PIL clips it): named up front, as is an image over the pixel limit
    (--max-image-pixels 2000 here, PIL's decompression-bomb limit by default); --skip-bad-images leaves them out;
    a limit that admits the large image leaves only the 16-bit one."""
    with pytest.raises(SystemExit, match=r"2 unreadable images in split 'train': .*big.png \(4096 pixels, over the "
                                         r"pixel limit of 2000 \(raise it with --max-image-pixels\)\); .*wide.png "
                                         r"\(mode I;16 \(16- or 32-bit or float\): PIL converts it to 8 bits by "
                                         r"clipping; convert it to 8-bit first\)"):
        run(odd_images_folder, tmp_path, 'odd', '--max-image-pixels', '2000', epochs=1)
    caplog.set_level(logging.WARNING)
    run(odd_images_folder, tmp_path, 'skip', '--max-image-pixels', '5000', '--skip-bad-images', epochs=1)
    assert any('Left out 1 unreadable images' in r.message and 'wide.png' in r.message for r in caplog.records)


@pytest.mark.parametrize('script', ['train', 'validate'])
def test_a_recipe_that_does_not_parse_is_one_line(tmp_path, script):
    import validate
    recipe = tmp_path / 'bad.yaml'
    recipe.write_text('model: test_vit\nscale: [0.8, 1.0\nlr: 1e-3\n')
    parse = train.parse_args if script == 'train' else validate.parse_args
    with pytest.raises(SystemExit, match=r'config file .*bad.yaml is not valid YAML at line 3, column 3: '
                                         r"expected ',' or '\]', but got ':'; fix the recipe"):
        parse(['-c', str(recipe), '--data-dir', ROOT])
    recipe.write_text('- model\n- lr\n')
    with pytest.raises(SystemExit, match='is not a YAML mapping of flag names to values \\(it holds a list\\)'):
        parse(['-c', str(recipe), '--data-dir', ROOT])


def test_outputs_are_checked_before_the_work_and_a_late_failure_prints_the_results_first(
        data_dir, tmp_path, monkeypatch, capsys):
    import validate
    ckpt = os.path.join(run(data_dir, tmp_path, 'for_validate', epochs=1), 'model_best.safetensors')
    common = [data_dir, '--model', 'test_vit', '--input-size', '3', '32', '32', '--workers', '0', '--device', 'cpu',
              '--checkpoint', ckpt]
    (tmp_path / 'a_folder').mkdir()
    with pytest.raises(SystemExit, match=r'--per-class-csv .*a_folder: it is a folder; name a file'):
        validate.main(common + ['--per-class-csv', str(tmp_path / 'a_folder')])
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode: False if 'locked' in str(path) else real_access(path, mode))
    (tmp_path / 'locked').mkdir()
    with pytest.raises(SystemExit, match=r'--save-embeddings .*locked/e.safetensors: its folder is not writable'):
        validate.main(common + ['--save-embeddings', str(tmp_path / 'locked' / 'e.safetensors')])
    import inference
    with pytest.raises(SystemExit, match=r'--results-dir .*locked: the folder .*locked is not writable'):
        inference.main(common + ['--results-dir', str(tmp_path / 'locked')])
    capsys.readouterr()

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(validate, 'write_results', disk_full)
    with pytest.raises(SystemExit, match=r'--results-file .*r.csv: cannot write it \(No space left on device\); '
                                         r'the results above are complete'):
        validate.main(common + ['--results-file', str(tmp_path / 'r.csv')])
    assert '"top1"' in capsys.readouterr().out.split('--result', 1)[1]


def test_more_classes_than_the_data_warn_and_plain_weights_say_what_they_are(data_dir, tmp_path, caplog):
    import timm
    import validate
    caplog.set_level(logging.WARNING)
    run(data_dir, tmp_path, 'six', '--num-classes', '6', epochs=1)
    warned = [r.message for r in caplog.records if 'never see a sample' in r.message]
    assert len(warned) == 1 and 'num_classes 6 but the training split has 4 classes: outputs 4..5' in warned[0]
    plain = tmp_path / 'plain.pth'
    torch.save(timm.create_model('test_vit', num_classes=7).state_dict(), plain)
    with pytest.raises(SystemExit, match=r"it holds a plain timm model's weights \(a classifier of 7 classes\), not "
                                         r"a carrot_zzz model's .*validate it as that model \(the name without _zzz\)"):
        validate.main([data_dir, '--model', 'test_vit_zzz', '--input-size', '3', '32', '32', '--workers', '0',
                       '--device', 'cpu', '--checkpoint', str(plain)])


def test_a_runaway_data_start_keeps_the_default_head(data_dir, tmp_path, monkeypatch, caplog):
    """A ZZZ fit whose held-out NLL is no better than uniform (what random features give) keeps the default start
    and says why; without pretrained weights a warning says the features are random."""
    from carrot_zzz import ZZZHead
    from carrot_zzz.engine import head_init
    starts = {}

    def runaway(head, feats, labels, holdout=None, **kw):
        starts['default'] = {k: v.clone() for k, v in head.state_dict().items()}
        with torch.no_grad():
            head.bias.fill_(123.0)
        return dict(tau=6.6e7, classes_fitted=4, nll_after=math.log(4), nll_before=9.0, sigma2=1.0)

    monkeypatch.setattr(ZZZHead, 'init_from_features', runaway)
    kept = {}
    real = head_init.init_head_from_data

    def spy(model, *args):
        out = real(model, *args)
        kept.update({k: v.clone() for k, v in model.get_classifier().state_dict().items()})
        return out

    monkeypatch.setattr(train, 'init_head_from_data', spy)
    caplog.set_level(logging.WARNING)
    run(data_dir, tmp_path, 'runaway', '--head', 'zzz', '--zzz-rank', '2', '--head-init', 'data',
        '--holdout-fraction', '0.25', epochs=1)
    assert all(torch.equal(kept[k], v) for k, v in starts['default'].items())
    messages = ' '.join(r.message for r in caplog.records)
    assert 'the fitted temperature ran away (tau 6.6e+07, held-out NLL 1.386 not below ln 4 = 1.386' in messages
    assert 'the head keeps its default start' in messages and 'its features are random' in messages


# --- 10. preemption ---------------------------------------------------------------------------------------------

def test_sigterm_saves_the_update_and_resume_auto_matches_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    """SIGTERM inside epoch 1 (what a scheduler sends before preemption): a recovery checkpoint of the next update,
    one line naming it and --resume auto, a non-zero exit; --resume auto then continues inside that epoch and the
    run ends with the uninterrupted run's numbers."""
    extra = ('--head', 'zzz', '--zzz-rank', '2', '--carrot', '--model-ema', '--model-ema-decay', '0.9')
    full = summary(run(data_dir, tmp_path / 'a', 'full', *extra, epochs=2))
    real = Trainer._after_update

    def signalled(self, updates_done):
        real(self, updates_done)
        if updates_done == self.updates_per_epoch + 2:                     # epoch 1, update 1
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, '_after_update', signalled)
    with pytest.raises(SystemExit, match=r'stopped by SIGTERM at epoch 1, update 1: the state of update 1 of epoch 1 '
                                         r'is in .*recovery-1-1.pth.tar; continue with --resume auto \(and the same '
                                         r'--experiment\)'):
        run(data_dir, tmp_path / 'b', 'part', *extra, epochs=2)
    monkeypatch.setattr(Trainer, '_after_update', real)
    assert [row[0] for row in summary(tmp_path / 'b' / 'part')[1:]] == ['0']
    run(data_dir, tmp_path / 'b', 'part', *extra, '--resume', 'auto', epochs=2)
    resumed = summary(tmp_path / 'b' / 'part')
    assert [row[0] for row in resumed[1:]] == ['0', '1'] and resumed[0] == full[0]
    columns = full[0]
    for col in ('train_loss', 'train_R', 'eval_loss', 'eval_top1', 'lr'):
        i = columns.index(col)
        assert float(resumed[2][i]) == pytest.approx(float(full[2][i]), rel=1e-5, abs=1e-7), col


def test_a_second_signal_stops_at_once(data_dir, tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import train
        from carrot_zzz.engine.loop import Trainer
        real = Trainer._after_update
        def twice(self, updates_done):
            real(self, updates_done)
            if updates_done == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
        Trainer._after_update = twice
        train.main({[data_dir, *BASE, '--epochs', '2', '--output', str(tmp_path), '--experiment', 'twice']!r})
    """)
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGTERM, p.stderr[-2000:]
    assert not [f for f in os.listdir(tmp_path / 'twice') if f.startswith('recovery')]


def _torchrun_with_signal(tmp_path, image_folder, signal_name, at_update, experiment, log_interval):
    """(launch command, env) of train.py under torchrun (2 processes) whose rank 1 sends itself signal_name after
    its update `at_update` when the environment has SEND_SIGNAL."""
    from test_train import BASE as DDP_BASE
    data = image_folder(tmp_path / 'data')
    wrapper = tmp_path / 'run_train.py'
    wrapper.write_text(textwrap.dedent(f'''
        import os, signal, sys
        sys.path[:0] = [{ROOT!r}]
        import train
        from carrot_zzz.engine.loop import Trainer
        real = Trainer._after_update
        def send(self, updates_done):
            real(self, updates_done)
            if updates_done == {at_update} and os.environ.get('RANK') == '1' and os.environ.get('SEND_SIGNAL'):
                os.kill(os.getpid(), signal.{signal_name})
        Trainer._after_update = send
        train.main()
    '''))
    argv = [data, *DDP_BASE, '--model', 'test_resnet', '--batch-size', '8', '--epochs', '2', '--output', str(tmp_path),
            '--experiment', experiment, '--head', 'zzz', '--zzz-rank', '2', '--carrot', '--sampler', 'pk',
            '--samples-per-class', '4', '--log-interval', str(log_interval)]
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(wrapper),
              *argv]
    return launch, dict(os.environ, OMP_NUM_THREADS='1')


def test_a_lost_rank_is_one_line_on_the_others(tmp_path, image_folder):
    """torchrun, 2 processes, rank 1 killed (SIGKILL) in its 3rd update: rank 0's collective fails; it stops with one
    line naming the lost rank and --resume auto, no traceback of its own (torchrun's report follows)."""
    launch, env = _torchrun_with_signal(tmp_path, image_folder, 'SIGKILL', 3, 'lost', 1)
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=dict(env, SEND_SIGNAL='1'),
                          cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ('train.py: error: rank 1 of 2 was lost (process 0 saw its connection close); this process stops too. '
            'The checkpoints written so far are kept: start the run again with --resume auto') in out, out[-3000:]
    assert '[rank0]: Traceback' not in out and '[rank0]:' not in out


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_update(tmp_path, image_folder):
    """SIGTERM reaching rank 1 alone (in its 2nd update): at the next log line both ranks agree and stop at that
    update, rank 0 writes the recovery checkpoint of it, both say so in one line; --resume auto continues there."""
    launch, env = _torchrun_with_signal(tmp_path, image_folder, 'SIGTERM', 2, 'term', 2)
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=dict(env, SEND_SIGNAL='1'),
                          cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # update 1 (updates_done 2) is not a log line at --log-interval 2: the ranks agree at update 2
    assert 'train.py: error: stopped by SIGTERM at epoch 0, update 2: rank 0 saved the state' in out, out[-3000:]
    assert ('train.py: error: stopped by a signal to another process at epoch 0, update 2: the state of update 2 of '
            'epoch 0 is in ') in out
    assert os.path.exists(tmp_path / 'term' / 'recovery-0-2.pth.tar')
    proc = subprocess.run(launch + ['--resume', 'auto'], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(tmp_path / 'term' / 'summary.csv') as f:
        assert [row['epoch'] for row in csv.DictReader(f)] == ['0', '1']


def test_a_crash_after_a_recovery_checkpoint_resumes_inside_the_epoch(data_dir, tmp_path, monkeypatch):
    """--recovery-interval 2 and a kill in epoch 1 after update 2: --resume auto takes recovery-1-1 (newer than
    last.pth.tar of epoch 0) and continues inside epoch 1 with the uninterrupted run's numbers."""
    extra = ('--head', 'zzz', '--zzz-rank', '2', '--carrot', '--recovery-interval', '2')
    full = summary(run(data_dir, tmp_path / 'a', 'full', *extra, epochs=2))
    real = Trainer._after_update

    def crash(self, updates_done):
        real(self, updates_done)
        if updates_done == self.updates_per_epoch + 3:                     # epoch 1, after update 2
            raise Killed

    monkeypatch.setattr(Trainer, '_after_update', crash)
    with pytest.raises(Killed):
        run(data_dir, tmp_path / 'b', 'part', *extra, epochs=2)
    monkeypatch.setattr(Trainer, '_after_update', real)
    assert os.path.exists(tmp_path / 'b' / 'part' / 'recovery-1-1.pth.tar')
    run(data_dir, tmp_path / 'b', 'part', *extra, '--resume', 'auto', epochs=2)
    resumed = summary(tmp_path / 'b' / 'part')
    assert [row[0] for row in resumed[1:]] == ['0', '1']
    for col in ('train_loss', 'train_R', 'eval_loss', 'eval_top1'):
        i = full[0].index(col)
        assert float(resumed[2][i]) == pytest.approx(float(full[2][i]), rel=1e-5, abs=1e-7), col
