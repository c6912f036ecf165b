#!/usr/bin/env python3
"""Eval forward of the ZZZ head: its fold (FoldedZZZHead, what validate.py and inference.py predict with) against
the head itself under torch.no_grad, same head and features, CPU or CUDA.

    python benchmarks/bench_zzz_eval.py                 # (B, C, d, r) = (256, 1000, 2048, 8) and (64, 200, 768, 8)
    python benchmarks/bench_zzz_eval.py --quick         # tiny smoke run

Time: `--warmup` calls, then the median of `--iters` calls of each form, the two forms alternating call by
call (a shared machine's load hits both alike), torch.cuda.synchronize on CUDA; threads: torch's default.
`build ms` is the one-off cost of folding the parameters (FoldedZZZHead(head)). `max|diff|` is the largest logit
difference between the two forms, over the largest |logit|.
"""
import argparse
import statistics
import time

import torch

from carrot_zzz import FoldedZZZHead, ZZZHead

CONFIGS = [(256, 1000, 2048, 8), (64, 200, 768, 8)]
QUICK = [(8, 10, 32, 4), (8, 10, 32, 0)]


def _ms(fn, device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _median_ms(fns, warmup: int, iters: int, device: torch.device):
    """Median ms of each function in `fns`, called in turn `warmup + iters` times."""
    times = [[_ms(fn, device) for fn in fns] for _ in range(warmup + iters)][warmup:]
    return [statistics.median(column) for column in zip(*times)]


def compare(B: int, C: int, d: int, r: int, warmup: int, iters: int, device: torch.device) -> dict:
    """Median ms of both eval forms, the build time and the relative logit difference for one configuration."""
    torch.manual_seed(0)
    head = ZZZHead(C, d, r).to(device)
    with torch.no_grad():   # away from the init, so that every term of the logits matters
        head.mu.normal_()
        head.bias.normal_()
        head.sigma2_raw.fill_(-1.0)
        if r:
            head.A.normal_()
            head.v_raw.normal_()
    feats = torch.randn(B, d, device=device)
    with torch.no_grad():
        reference = head(feats)                                                 # the head: the exact form
        build_ms, = _median_ms([lambda: FoldedZZZHead(head)], 1, 3, device)
        folded = FoldedZZZHead(head)
        diff = ((folded(feats) - reference).abs().max() / reference.abs().max()).item()
        training_ms, inference_ms = _median_ms([lambda: head(feats), lambda: folded(feats)], warmup, iters, device)
    return dict(B=B, C=C, d=d, r=r, training_ms=training_ms, inference_ms=inference_ms, build_ms=build_ms,
                speedup=training_ms / inference_ms, rel_diff=diff)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--quick', action='store_true', help='tiny shapes, 1 warmup, 3 iterations')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)
    configs, warmup, iters = (QUICK, 1, 3) if args.quick else (CONFIGS, args.warmup, args.iters)
    print(f'device {device}, {torch.get_num_threads()} threads, median of {iters} eval forward calls (no_grad)')
    print('| (B, C, d, r) | head ms | folded ms | speed-up | build ms | max|diff| / max|logit| |')
    print('|---|---|---|---|---|---|')
    for B, C, d, r in configs:
        row = compare(B, C, d, r, warmup, iters, device)
        print(f"| ({B}, {C}, {d}, {r}) | {row['training_ms']:.2f} | {row['inference_ms']:.2f} | "
              f"{row['speedup']:.2f}x | {row['build_ms']:.1f} | {row['rel_diff']:.1e} |")


if __name__ == '__main__':
    main()
