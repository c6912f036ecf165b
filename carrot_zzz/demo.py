"""A short demo of the ZZZ head and CARROT on a random batch: `python -m carrot_zzz.demo`.

Embeddings of C Gaussian classes in D dimensions go through a linear 'backbone'; the ZZZ head and the
backbone are trained with cross-entropy + CARROT on class-balanced batches, and the script prints the
loss, CARROT's statistics and the accuracy as training proceeds.
"""
import argparse

import torch
import torch.nn.functional as F

from .carrot import carrot_regularizer
from .zzz_head import ZZZHead


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--classes', type=int, default=20)
    parser.add_argument('--dim', type=int, default=64)
    parser.add_argument('--rank', type=int, default=8)
    parser.add_argument('--per-class', type=int, default=4, help='K of the P x K batches')
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    centres = torch.randn(args.classes, args.dim)
    backbone = torch.nn.Linear(args.dim, args.dim)
    head = ZZZHead(args.classes, args.dim, rank=args.rank)
    opt = torch.optim.AdamW([
        {'params': backbone.parameters(), 'lr': 1e-3, 'weight_decay': 0.05},
        {'params': head.parameters(), 'lr': 5e-3, 'weight_decay': 0.01},
    ])
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    print(f'ZZZ head: {head}; CARROT on {args.classes} x {args.per_class} batches')
    for step in range(args.steps + 1):
        x = centres[labels] + 1.5 * torch.randn(labels.numel(), args.dim)
        z = backbone(x)
        logits = head(z)
        task = F.cross_entropy(logits, labels)
        reg, stats = carrot_regularizer(z, labels, max_classes=args.classes, max_per_class=args.per_class)
        loss = task + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:   # the only host syncs: at the log interval
            acc = (logits.argmax(1) == labels).float().mean().item()
            print(f'step {step:4d}  task {task.item():.3f}  R {stats["R"].item():.3f} '
                  f'(var {stats["R_var"].item():.3f}, rank {stats["R_rank"].item():.3f})  '
                  f'classes {stats["classes_used"].item()}  min r_c {stats["min_r"].item():.3f}  '
                  f'min erank/D {stats["min_erank_frac"].item():.3f}  batch acc {acc:.2%}')
    return acc


if __name__ == '__main__':
    main()
