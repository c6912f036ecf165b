"""Evaluation metrics over a whole split, vectorised (no loop over classes or bins). All return fractions in [0, 1]
(validate.py reports them x 100, as timm reports top-1) except the NLL, in nats.

Notation: N samples, C classes, logits (N, C), targets (N,) int in [0, C), p = softmax(logits).

    topk_accuracy          mean_i [targets_i in the k largest logits_i]
    per_class_accuracy     acc_c = #{i: y_i = c, pred_i = c} / n_c,  n_c = #{i: y_i = c}  (NaN where n_c = 0)
    mean_class_accuracy    mean of acc_c over the classes with n_c > 0
    nll                    mean_i -log p_{i, y_i}
    ece                    sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|, conf_i = max_c p_ic, 15 equal-width bins
                           B_b = {i: conf_i in (b/M, (b+1)/M]}, b = 0..M-1 (Guo et al., 2017)
    auroc                  P(s_in > s_out) + P(s_in = s_out) / 2 (Mann-Whitney U / (n_in n_out)); the split is
                           the positive class, so higher scores must mean "in-distribution"
    fpr_at_tpr             fraction of s_out >= t, t = the largest threshold with #(s_in >= t) >= tpr * n_in
                           (sklearn's roc_curve point at the first TPR >= 0.95)

A split too large for its logits to be kept is measured batch by batch: `sample_scores` per batch (per-sample
values, no host sync), concatenated, then `split_metrics`; `classification_metrics` is the two in one call.
"""
import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['topk_accuracy', 'per_class_accuracy', 'mean_class_accuracy', 'nll', 'calibration_bins', 'ece', 'auroc',
           'fpr_at_tpr', 'threshold_at_tpr', 'sample_scores', 'split_metrics', 'classification_metrics', 'ood_metrics']


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """{k: fraction of samples whose target is among the top-k logits}; k is capped at C."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                                  # (N, kmax)
    hit = top == targets.view(-1, 1)                                        # (N, kmax)
    return {k: hit[:, :min(k, kmax)].any(1).float().mean().item() for k in ks}


def per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor,
                       num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(acc (C,) float64, NaN for absent classes; support n_c (C,) int64) from predictions (N,) and targets (N,)."""
    targets = targets.long()
    support = torch.bincount(targets, minlength=num_classes)
    correct = torch.bincount(targets[preds.long() == targets], minlength=num_classes)
    acc = correct.double() / support.double()                               # 0/0 -> NaN
    return acc, support


def mean_class_accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Mean of the per-class accuracies over the classes present in targets (balanced accuracy)."""
    acc, support = per_class_accuracy(preds, targets, num_classes)
    return acc[support > 0].mean().item()


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits), in nats (float64)."""
    return F.cross_entropy(logits.double(), targets.long()).item()


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor,
                     n_bins: int = 15) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, sum of confidence, sum of correct), each (n_bins,) float64, over n_bins equal-width bins
    B_b = {i: conf_i in (b/M, (b+1)/M]} of the confidence (N,) in [0, 1]; confidence 0 falls in the first bin.

    correct: (N,) bool / 0-1. The one binning of ece and carrot_zzz.reliability.reliability_bins.
    """
    conf = confidence.double().flatten()
    corr = correct.double().flatten()
    bins = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()    # (N,) bin index
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    corr_sum = torch.bincount(bins, weights=corr, minlength=n_bins)
    return count, conf_sum, corr_sum


def ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with n_bins equal-width bins (b/M, (b+1)/M] of the confidence (N,) in [0, 1].

    correct: (N,) bool / 0-1, whether the top-1 prediction is right. Confidence 0 falls in the first bin.
    """
    _, conf_sum, corr_sum = calibration_bins(confidence, correct, n_bins)
    return ((corr_sum - conf_sum).abs().sum() / confidence.numel()).item()  # sum_b |B_b|/N |acc_b - conf_b|


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x (N,), ties get the mean of their ranks."""
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()                                  # rank of each tie group's last
    avg = last - (counts.double() - 1) / 2                                   # mean rank of the group
    ranks = torch.empty_like(avg[inverse])
    ranks[order] = avg[inverse]
    return ranks


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve of separating scores_in (positives, (N_in,)) from scores_out ((N_out,)), ties 1/2."""
    n_in, n_out = scores_in.numel(), scores_out.numel()
    if n_in == 0 or n_out == 0:
        return math.nan
    ranks = _average_ranks(torch.cat([scores_in.double().flatten(), scores_out.double().flatten()]))
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2                           # Mann-Whitney U of the positives
    return (u / (n_in * n_out)).item()


def threshold_at_tpr(scores_in: torch.Tensor, tpr: float = 0.95) -> float:
    """The highest threshold t that keeps at least a tpr share of scores_in (N,) as s >= t (NaN when empty)."""
    n_in = scores_in.numel()
    if n_in == 0:
        return math.nan
    k = max(1, math.ceil(tpr * n_in - 1e-9))                                 # positives to keep
    return torch.sort(scores_in.double().flatten(), descending=True).values[k - 1].item()


def fpr_at_tpr(scores_in: torch.Tensor, scores_out: torch.Tensor, tpr: float = 0.95) -> float:
    """False-positive rate on scores_out at the highest threshold that keeps >= tpr of scores_in (s >= t)."""
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        return math.nan
    return (scores_out.double() >= threshold_at_tpr(scores_in, tpr)).double().mean().item()


def sample_scores(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> Dict[str, torch.Tensor]:
    """What every split metric is computed from, per sample, for one batch (no host sync; concatenate over batches):

        pred (N,) argmax; conf (N,) max softmax probability; nll (N,) -log p_{i, y_i} (NaN for a target outside
        [0, C)); hit1 / hitk (N,) bool, target among the 1 / min(k, C) largest logits; target (N,).
    """
    logits = logits.float()
    log_p = F.log_softmax(logits, dim=1)                                    # (N, C)
    log_conf, pred = log_p.max(1)
    targets = targets.long()
    valid = (targets >= 0) & (targets < logits.shape[1])
    picked = log_p.gather(1, targets.clamp(0, logits.shape[1] - 1).view(-1, 1)).squeeze(1)
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices              # (N, k)
    return dict(target=targets, pred=pred, conf=log_conf.exp(), hit1=pred == targets,
                hitk=(top == targets.view(-1, 1)).any(1),
                nll=torch.where(valid, -picked, torch.full_like(picked, math.nan)))


def split_metrics(scores: Dict[str, torch.Tensor], num_classes: int, n_bins: int = 15) -> Dict[str, float]:
    """top1, top5 (top-k of sample_scores), mean_class_acc, nll, ece (fractions; nll in nats) of a whole split from
    its sample_scores; mean_class_acc over the classes in [0, num_classes) that occur."""
    target, pred = scores['target'], scores['pred']
    in_range = (target >= 0) & (target < num_classes)
    acc, support = per_class_accuracy(pred[in_range], target[in_range], num_classes)
    return dict(
        top1=scores['hit1'].double().mean().item(), top5=scores['hitk'].double().mean().item(),
        mean_class_acc=acc[support > 0].mean().item(), nll=scores['nll'].double().mean().item(),
        ece=ece(scores['conf'], scores['hit1'], n_bins) if torch.isfinite(scores['conf']).all() else math.nan)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> Dict[str, float]:
    """top1, top5, mean_class_acc, nll, ece (fractions; nll in nats) of logits (N, C) against targets (N,)."""
    return split_metrics(sample_scores(logits, targets), logits.shape[1], n_bins)


def ood_metrics(scores_in: torch.Tensor, scores_out: torch.Tensor, tpr: float = 0.95) -> Dict[str, float]:
    """{'auroc', 'fpr95'} of separating the in-distribution scores (positives, higher = in) from the others."""
    return dict(auroc=auroc(scores_in, scores_out), fpr95=fpr_at_tpr(scores_in, scores_out, tpr))
