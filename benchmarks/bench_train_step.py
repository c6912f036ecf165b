#!/usr/bin/env python3
"""Full training step time: a timm backbone with its linear head vs `--head zzz --zzz-rank 8 --carrot`.

One step = forward (under autocast when --amp), loss, backward, AdamW step, zero_grad: the path train.py runs
(timm's ClassificationTask vs carrot_zzz's CarrotClassificationTask on `<model>_zzz`). Both variants get the
same input and labels; their steps alternate so that load on a shared machine hits both alike. Reported per
variant: the median and the minimum step time, their overheads against the baseline (the first variant), and
the median of the paired ratios (step i of a variant over step i of the baseline, run next to each other):
the figure least moved by slow drifts of the machine's load.

Labels follow the P x K sampler (batch / K classes, K samples each) and CARROT gets its static bounds, as
train.py does with `--sampler pk`; `--sampler random` draws labels uniformly over the classes instead.

    python benchmarks/bench_train_step.py                                   # CPU, resnet18, 224 px
    python benchmarks/bench_train_step.py --device cuda --model vit_base_patch16_224 --amp --amp-dtype bfloat16
"""
import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch import nn
import timm
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask

import carrot_zzz  # noqa: F401  registers the `<arch>_zzz` models
from carrot_zzz.regularised_task import CarrotClassificationTask


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet18')
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--num-classes', type=int, default=200)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--zzz-rank', type=int, default=8)
    p.add_argument('--samples-per-class', type=int, default=4, help='K of the P x K labels')
    p.add_argument('--sampler', default='pk', choices=('pk', 'random'))
    p.add_argument('--amp', action='store_true', help='autocast (default dtype bfloat16)')
    p.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--torchcompile', nargs='?', const='inductor', default=None,
                   help='torch.compile the model (task.compile, as train.py --torchcompile)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10, help='timed steps per variant')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads on CPU')
    p.add_argument('--variants', default='linear,zzz+carrot',
                   help='comma list of linear (timm model), zzz (ZZZ head, no CARROT), linear+carrot, zzz+carrot; '
                        'the first is the baseline')
    p.add_argument('--json', default='', help='also write the results to this file')
    return p.parse_args()


def build(kind, args, device):
    """(task, optimizer) for one variant, all from the same seed."""
    torch.manual_seed(0)
    if kind == 'linear':
        model = timm.create_model(args.model, num_classes=args.num_classes)
    else:
        head = 'linear' if kind.startswith('linear') else 'zzz'
        extra = dict(zzz_rank=args.zzz_rank) if head == 'zzz' else {}
        model = timm.create_model(args.model + '_zzz', num_classes=args.num_classes, head_type=head, **extra)
    if kind.endswith('+carrot'):
        bounds = {}
        if args.sampler == 'pk':
            bounds = dict(max_classes=args.batch_size // args.samples_per_class, max_per_class=args.samples_per_class)
        task = CarrotClassificationTask(model, nn.CrossEntropyLoss(), device=device, verbose=False, **bounds)
    else:
        task = ClassificationTask(model, nn.CrossEntropyLoss(), device=device, verbose=False)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-4, weight_decay=0.05)
    if args.torchcompile:
        task.compile(backend=args.torchcompile)
    return task, opt


def batch(args, device: torch.device):
    """(images (B, 3, H, W), labels (B,)), seeded: P x K labels (B / K classes, K images each) or uniform ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if args.sampler == 'pk':
        k = args.samples_per_class
        classes = torch.randperm(args.num_classes, generator=g)[:args.batch_size // k]
        y = classes.repeat_interleave(k)
    else:
        y = torch.randint(args.num_classes, (args.batch_size,), generator=g)
    return x, y.to(device)


def step_times(args, device: torch.device, variants: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Seconds of each measured step per variant, the variants alternating step by step (a shared machine's load
    hits them alike); `--warmup` steps each first."""
    amp = (lambda: torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype))) if args.amp else nullcontext

    def step(task, opt):
        with amp():
            loss = task(x, y)['loss']
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    times = {k: [] for k in variants}
    for i in range(args.warmup + args.iters):
        for kind, (task, opt) in variants.items():
            sync()
            t0 = time.perf_counter()
            step(task, opt)
            sync()
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
    return times


def summary(args, device: torch.device, times: dict, base: str) -> dict:
    """The JSON result: the run's settings and, per variant, median / min ms and the overheads against `base`."""
    med = {k: statistics.median(v) for k, v in times.items()}
    fast = {k: min(v) for k, v in times.items()}
    return dict(
        model=args.model, device=str(device), batch_size=args.batch_size, num_classes=args.num_classes,
        img_size=args.img_size, zzz_rank=args.zzz_rank, sampler=args.sampler,
        amp=args.amp and args.amp_dtype, torchcompile=args.torchcompile, threads=torch.get_num_threads(),
        iters=args.iters, baseline=base,
        variants={k: dict(
            median_ms=round(1e3 * med[k], 2), min_ms=round(1e3 * fast[k], 2),
            overhead_pct=round(100.0 * (med[k] / med[base] - 1.0), 2),
            overhead_min_pct=round(100.0 * (fast[k] / fast[base] - 1.0), 2),
            overhead_paired_pct=round(100.0 * (statistics.median(
                t / t_base for t, t_base in zip(times[k], times[base])) - 1.0), 2),
            all_ms=[round(1e3 * t, 1) for t in times[k]]) for k in times},
    )


def main():
    args = parse()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    x, y = batch(args, device)
    kinds = args.variants.split(',')
    variants = {kind: build(kind, args, device) for kind in kinds}
    base = kinds[0]
    result = summary(args, device, step_times(args, device, variants, x, y), base)
    print(f"{args.model} on {device} (batch {args.batch_size}, {args.num_classes} classes, {args.img_size} px, "
          f"amp {result['amp']}, {args.sampler} labels, compile {args.torchcompile}, {args.iters} steps each, "
          f"alternating)")
    for k, v in result['variants'].items():
        print(f"  {k:>14}: {v['median_ms']:8.1f} ms/step median, {v['min_ms']:8.1f} min   "
              f"vs {base}: {v['overhead_pct']:+6.1f}% median, {v['overhead_min_pct']:+6.1f}% min, "
              f"{v['overhead_paired_pct']:+6.1f}% paired")
    print(json.dumps(result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
