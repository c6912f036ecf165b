#!/usr/bin/env python3
"""Heads on FROZEN features: a linear head against the ZZZ head, from their random init and from their closed-form
starts (carrot_zzz.zzz_fit, carrot_zzz.linear_probe), with and without the same short training.

Setup (the data of docs/results.md):
- Data: Fashion-MNIST without class 8 "Bag", 600 train / 200 test images per class (5400 / 1800), written by
  `python -m carrot_zzz.data.make_fashion_mnist_subset FM output/data/fmnist9 --train-per-class 600 --test-per-class 200
  --classes 0 1 2 3 4 5 6 7 9`. Labels keep their values 0-9: every head has 10 outputs, one never trained.
- Backbone: timm `mobilenetv2_100` with torchvision's ImageNet weights (benchmarks/convert_mobilenetv2.py),
  num_classes=0, eval mode. Images grey -> RGB, timm's evaluation transform for the model at input size
  (3, 64, 64) (resize, centre crop, ImageNet mean / std), no augmentation. The 1280-d pooled features of both
  splits are computed once and cached (--cache); the backbone never trains.
- Training ("+ steps"): the head alone, AdamW lr 5e-4, weight decay 0.01 on the groups timm decays (not on
  biases, 1-d and scalar parameters), constant lr, cross-entropy with label smoothing 0.1, 420 steps = 5 epochs
  of 84 batches of 64 (a seeded permutation per epoch, the last 24 samples of each epoch dropped).
- Heads: linear = nn.Linear(1280, 10) with its default init (what timm's reset_classifier builds); linear
  probe = carrot_zzz.linear_probe.fit_linear_head (L-BFGS logistic regression from zero, default weight decay;
  fitted once, it does not depend on the seed); ZZZ rank r = ZZZHead with the design's random init; ZZZ fit =
  ZZZHead.init_from_features(train features, labels): per-class PPCA and one temperature fitted on a
  class-stratified 20% of the TRAIN features that init_from_features carves itself (seeded with the run's seed),
  then the Gaussians refitted on all of them. The test set is used for metrics only.
- Metrics on the 1800 test images: carrot_zzz.metrics.classification_metrics (top-1, mean class accuracy, NLL,
  ECE with 15 bins), and the OOD AUROC of telling them from the 1000 test images of the held-out class "Bag"
  (--ood-data-dir, written with `--train-per-class 0 --test-per-class 1000 --classes 8`) by each score of
  carrot_zzz.ood: msp, maxlogit, energy for every head, maha for the ZZZ heads; mean ± sample std over the seeds. The seed sets the head's init, the batches and the
  holdout the temperature is fitted on; the features are the same for every seed.

Command (from the repository root; CPU, 1 thread: about 1.5 minutes the first time, of which 45 s for the
features, and 40 s with the cache):

    python experiments/frozen_heads.py                          # seeds 0 1 2
    python experiments/frozen_heads.py --seeds 0 --steps 84     # quicker
"""
import argparse
import os
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from timm.optim._param_groups import param_groups_weight_decay
from torch import nn

from carrot_zzz import ZZZHead
from carrot_zzz.data import create_dataset
from carrot_zzz.linear_probe import fit_linear_head
from carrot_zzz.metrics import classification_metrics, ood_metrics
from carrot_zzz.ood import OODScorer

NUM_CLASSES = 10     # Fashion-MNIST's labels 0-9; class 8 is absent from both splits
MODEL = 'mobilenetv2_100'
METRICS = [('top1', 'top-1 (%)', 100), ('mean_class_acc', 'mean class acc (%)', 100), ('nll', 'NLL', 1),
           ('ece', 'ECE (%)', 100)] + [(f'auroc_{s}', f'OOD AUROC {s} (%)', 100) for s in ('msp', 'maxlogit',
                                                                                         'energy', 'maha')]

# name -> (head kind, ZZZ rank, closed-form start, train)
VARIANTS = {
    'linear, default init + steps': ('linear', None, False, True),
    'linear, probe (no step)': ('linear', None, True, False),
    'linear, probe + steps': ('linear', None, True, True),
    'ZZZ r8, random init + steps': ('zzz', 8, False, True),
    'ZZZ r8, fit + temperature (no step)': ('zzz', 8, True, False),
    'ZZZ r8, fit + temperature + steps': ('zzz', 8, True, True),
    'ZZZ r0, fit + temperature (no step)': ('zzz', 0, True, False),
}


# --- features ---------------------------------------------------------------------------------------------------

def extract_features(args) -> dict:
    """{'train': (feats (N, 1280), labels (N,)), 'test': ...} of the frozen backbone, from the cache when it
    was made with the same data, weights and input size."""
    key = dict(model=MODEL, data_dir=os.path.abspath(args.data_dir), weights=os.path.abspath(args.weights),
               img_size=args.img_size, ood_data_dir=os.path.abspath(args.ood_data_dir))
    if os.path.isfile(args.cache):
        cached = torch.load(args.cache)
        if cached.get('key') == key:
            return cached
    model = timm.create_model(MODEL, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=args.weights)).eval()
    config = resolve_data_config(dict(input_size=(3, args.img_size, args.img_size)), model=model)
    transform = create_transform(**config, is_training=False)
    print(f'features: {MODEL}, transform {transform}')
    out = dict(key=key)
    for name, root, split in (('train', args.data_dir, 'train'), ('test', args.data_dir, 'validation'),
                              ('ood', args.ood_data_dir, 'validation')):
        dataset = create_dataset('fashion_mnist', root=root, split=split, input_img_mode='RGB')
        dataset.transform = transform
        loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, num_workers=0)
        with torch.inference_mode():
            batches = [(model(images), labels) for images, labels in loader]
        out[name] = (torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches]).long())
    os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
    torch.save(out, args.cache)
    return out


# --- heads ------------------------------------------------------------------------------------------------------

def make_head(kind: str, rank, closed_form: bool, feats: torch.Tensor, labels: torch.Tensor, seed: int,
              probe: nn.Linear):
    """(head, fit info): a fresh head seeded with `seed`, started from its closed-form fit if closed_form (for a
    linear head: a copy of `probe`, the same for every seed)."""
    torch.manual_seed(seed)
    if kind == 'linear':
        head = nn.Linear(feats.shape[1], NUM_CLASSES)
        if closed_form:
            head.load_state_dict(probe.state_dict())
        return head, {}
    head = ZZZHead(NUM_CLASSES, feats.shape[1], rank=rank)
    info = head.init_from_features(feats, labels, seed=seed) if closed_form else {}
    return head, info


def train_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, args, seed: int) -> None:
    """args.steps AdamW steps on random batches of the frozen features: a seeded permutation per epoch,
    batches of args.batch_size, the incomplete last batch of an epoch dropped."""
    optimizer = torch.optim.AdamW(param_groups_weight_decay(head, weight_decay=args.weight_decay), lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = feats.shape[0] // args.batch_size
    if per_epoch == 0:
        raise SystemExit(f'frozen_heads.py: error: --batch-size {args.batch_size} exceeds the {feats.shape[0]} '
                         f'training features; pass a smaller one')
    head.train()
    step = 0
    while step < args.steps:
        order = torch.randperm(feats.shape[0], generator=generator)
        for batch in order[:per_epoch * args.batch_size].view(per_epoch, args.batch_size)[:args.steps - step]:
            loss = F.cross_entropy(head(feats[batch]), labels[batch], label_smoothing=args.smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


def evaluate(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, ood_feats: torch.Tensor) -> dict:
    """classification_metrics on the test features, plus auroc_<score> of test (positive) against OOD features."""
    head.eval()
    scorer = OODScorer(head)
    with torch.no_grad():
        logits = head(feats)
        found = classification_metrics(logits, labels)
        inside, outside = scorer(logits, feats), scorer(head(ood_feats), ood_feats)
    found.update({f'auroc_{name}': ood_metrics(inside[name], outside[name])['auroc'] for name in inside})
    return found


# --- report -----------------------------------------------------------------------------------------------------

def mean_std(values) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.2f} ± {spread:.2f}'


def markdown_table(results: dict, n_seeds: int) -> str:
    rows = ['| head | n | ' + ' | '.join(label for _, label, _ in METRICS) + ' |',
            '|---|---:|' + '---:|' * len(METRICS)]
    for name, runs in results.items():
        cells = [mean_std([run[key] * scale for run in runs]) if key in runs[0] else '–'
                 for key, _, scale in METRICS]
        rows.append(f'| {name} | {n_seeds} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description='Linear and ZZZ heads on frozen MobileNetV2 features (Fashion-MNIST 9).')
    p.add_argument('--data-dir', default='output/data/fmnist9', help='Fashion-MNIST idx files (train and t10k)')
    p.add_argument('--weights', default='weights/mobilenetv2_100_tv_in1k.safetensors')
    p.add_argument('--ood-data-dir', default='output/data/fmnist_bag', help='Fashion-MNIST "Bag" only (OOD)')
    p.add_argument('--cache', default='output/frozen_heads/features.pt', help='feature cache (.pt)')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--steps', type=int, default=420)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--weight-decay', type=float, default=0.01)
    p.add_argument('--smoothing', type=float, default=0.1)
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (1: OpenMP threads spin on a busy shared CPU, 2 ran 8x slower)')
    args = p.parse_args(argv)
    for flag, folder in (('--data-dir', args.data_dir), ('--ood-data-dir', args.ood_data_dir)):
        if not os.path.isdir(folder) and not os.path.isfile(args.cache):
            p.error(f'{flag} {folder} is not a folder; write the subset first (see the docstring)')
    if not os.path.isfile(args.weights) and not os.path.isfile(args.cache):
        p.error(f'--weights {args.weights} not found; run benchmarks/convert_mobilenetv2.py first')
    if args.steps < 0 or args.batch_size < 1 or args.threads < 1 or len(set(args.seeds)) != len(args.seeds):
        p.error('--steps must be >= 0, --batch-size and --threads >= 1, --seeds distinct')
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = extract_features(args)
    (train_x, train_y), (test_x, test_y), (ood_x, _) = data['train'], data['test'], data['ood']
    print(f'features: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}, '
          f'{time.perf_counter() - start:.1f} s')

    probe = nn.Linear(train_x.shape[1], NUM_CLASSES)   # L-BFGS from zero: deterministic, so fitted once
    probe_info = fit_linear_head(probe, train_x, train_y)
    print(f'linear probe: loss {probe_info["loss_after"]:.4f}, {probe_info["iterations"]:.0f} L-BFGS iterations')

    results, taus = {name: [] for name in VARIANTS}, []
    for seed in args.seeds:
        for name, (kind, rank, closed_form, train) in VARIANTS.items():
            head, info = make_head(kind, rank, closed_form, train_x, train_y, seed, probe)
            if 'tau' in info and rank == 8 and not train:
                taus.append((info['tau'], info['sigma2_ppca']))
            if train:
                train_head(head, train_x, train_y, args, seed)
            results[name].append(evaluate(head, test_x, test_y, ood_x))
            run = results[name][-1]
            print(f'seed {seed} | {name}: top-1 {100 * run["top1"]:.2f}, ECE {100 * run["ece"]:.2f}, '
                  f'NLL {run["nll"]:.3f}, OOD AUROC msp {100 * run["auroc_msp"]:.1f} maxlogit '
                  f'{100 * run["auroc_maxlogit"]:.1f} energy {100 * run["auroc_energy"]:.1f}'
                  + (f' maha {100 * run["auroc_maha"]:.1f}' if 'auroc_maha' in run else '')
                  + (f', tau {info["tau"]:.3g}' if 'tau' in info else ''))

    print()
    print(markdown_table(results, len(args.seeds)))
    print(f'\nZZZ r8 fit: tau {mean_std([t for t, _ in taus])}, sigma0^2 (PPCA) '
          f'{statistics.mean(s for _, s in taus):.3g}; wall time {time.perf_counter() - start:.0f} s, '
          f'{args.threads} thread(s)')


if __name__ == '__main__':
    main()
