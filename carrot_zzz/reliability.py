"""Reliability diagram: per-bin accuracy against mean confidence, in exactly the bins of carrot_zzz.metrics.ece.

    bins = reliability_bins(confidence, correct, n_bins=15)     per-bin count, accuracy, mean confidence; ECE
    plot_reliability(bins, 'val_reliability.png')               the PNG (needs pip install "carrot-zzz[plot]")

Notation: N samples, M bins, conf_i in [0, 1] the top-1 confidence, correct_i in {0, 1}.

    B_b      = {i: conf_i in (b/M, (b+1)/M]}, b = 0..M-1, confidence 0 in the first bin (metrics.calibration_bins)
    acc_b    = mean_{i in B_b} correct_i,  conf_b = mean_{i in B_b} conf_i      (NaN for an empty bin)
    ECE      = sum_b (|B_b| / N) |acc_b - conf_b|                                (metrics.ece)
"""
import os
from typing import Any, Dict, Optional, Union

import torch

from .files import replacing
from .metrics import calibration_bins, ece

__all__ = ['reliability_bins', 'plot_reliability', 'require_plotting']

PLOT_EXTRA_HINT = 'pip install "carrot-zzz[plot]"'


def require_plotting():
    """matplotlib's Figure class; ImportError naming the extra that installs it when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f'plotting needs matplotlib: {PLOT_EXTRA_HINT}') from None
    return Figure


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> Dict[str, Any]:
    """Per-bin statistics of confidence (N,) in [0, 1] and correct (N,) bool / 0-1, on the CPU:

        edges (M + 1,) float64 b/M; count (M,) int64 |B_b|; accuracy (M,) float64 acc_b; confidence (M,) float64
        conf_b (NaN where count is 0); ece: float, the ECE of these bins (equal to metrics.ece).
    """
    if n_bins < 1:
        raise ValueError(f'reliability_bins: n_bins must be >= 1, got {n_bins}')
    if confidence.numel() != correct.numel():
        raise ValueError(f'reliability_bins: confidence and correct must have one value per sample, got '
                         f'{confidence.numel()} and {correct.numel()}')
    count, conf_sum, correct_sum = (t.cpu() for t in calibration_bins(confidence, correct, n_bins))
    return dict(edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64), count=count.long(),
                accuracy=correct_sum / count, confidence=conf_sum / count, ece=ece(confidence, correct, n_bins))


def plot_reliability(bins: Dict[str, Any], path: Union[str, os.PathLike], title: Optional[str] = None) -> str:
    """Write the reliability diagram of reliability_bins' output to the PNG file path; returns the path.

    Top panel: accuracy per bin (bars) against the diagonal (perfect calibration), the gap to the bin's mean
    confidence (hatched), the ECE in the title. Bottom panel: the number of samples per bin.
    Needs matplotlib (pip install "carrot-zzz[plot]"); uses no pyplot state, so it is safe in any process.
    """
    path = os.fspath(path)
    if not path.lower().endswith('.png'):
        raise ValueError(f"plot_reliability writes a PNG: give a path ending in '.png', got '{path}'")
    if not isinstance(bins, dict) or not {'edges', 'count', 'accuracy', 'confidence', 'ece'} <= set(bins):
        raise ValueError('plot_reliability: bins must be the dict returned by reliability_bins')
    Figure = require_plotting()

    left = bins['edges'][:-1].tolist()
    width = 1.0 / len(left)
    filled = bins['count'] > 0
    accuracy = torch.where(filled, bins['accuracy'], 0.0).tolist()
    gap = torch.where(filled, bins['confidence'] - bins['accuracy'], 0.0).tolist()   # bar from acc_b to conf_b

    fig = Figure(figsize=(5.5, 6), layout='constrained')
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
    top.bar(left, accuracy, width, align='edge', color='tab:blue', edgecolor='black', label='accuracy')
    top.bar(left, gap, width, bottom=accuracy, align='edge', color='tab:red', alpha=0.3, hatch='//',
            edgecolor='tab:red', label='gap to mean confidence')
    top.plot([0, 1], [0, 1], '--', color='gray', label='perfect calibration')
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel='accuracy')
    top.legend(loc='upper left')
    bottom.bar(left, bins['count'].tolist(), width, align='edge', color='tab:gray', edgecolor='black')
    bottom.set(xlabel='confidence', ylabel='samples')
    heading = f"ECE {100 * bins['ece']:.2f}% ({int(bins['count'].sum())} samples, {len(left)} bins)"
    fig.suptitle(f'{title}\n{heading}' if title else heading, fontsize='medium')
    with replacing(path) as tmp:                                            # no half-written PNG under path
        fig.savefig(tmp, format='png', dpi=120)
    return path
