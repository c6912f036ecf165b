"""One temperature for a classifier's logits, fitted by held-out NLL, and folded into the head's parameters.

    found = fit_temperature(logits, targets)            {'temperature': T, 'nll_before', 'nll_after'}
    fold_temperature(head, T)                           afterwards head(z) = old head(z) / T

NLL(beta) = mean_i [LSE_c beta l_ic - beta l_iy_i] for beta = 1 / T is convex in beta (a log-sum-exp of functions
linear in beta); the minimiser is found by safeguarded Newton steps in log beta, float64. The same solver fits the
ZZZ head's closed-form start (carrot_zzz.zzz_fit), where the logits are a_ic - beta h_ic. Temperature scaling
keeps every prediction (and so top-1) and can only lower the NLL of the split it is fitted on (Guo et al., 2017).

Folding: a linear head's weight and bias are divided by T; a ZZZ head scales its Gaussians
(ZZZHead.divide_logits), so the calibrated weights load and run like any others (no extra layer, same file format).
"""
import math
from typing import Dict, Tuple

import torch
from torch import nn

__all__ = ['fit_temperature', 'fold_temperature', 'nll_derivatives', 'fit_inverse_temperature']


def nll_derivatives(half_q: torch.Tensor, a: torch.Tensor, target: torch.Tensor, beta: float,
                     rows: int = 1024) -> Tuple[float, float, float]:
    """(NLL, dNLL/dbeta, d2NLL/dbeta2) of the logits a - beta half_q, float64, in row chunks; half_q (N_h, K),
    a (K,), target (N_h,) column indices."""
    total = grad = curv = 0.0
    for start in range(0, half_q.shape[0], rows):
        hq, y = half_q[start:start + rows], target[start:start + rows].unsqueeze(1)
        log_p = torch.log_softmax(a - beta * hq, 1)
        weighted = log_p.exp().mul_(hq)                                      # p half_q
        mean_q = weighted.sum(1)
        total -= log_p.gather(1, y).sum().item()
        grad += (hq.gather(1, y).squeeze(1) - mean_q).sum().item()
        curv += ((weighted.mul_(hq)).sum(1) - mean_q.square()).clamp_min(0).sum().item()
    n = half_q.shape[0]
    return total / n, grad / n, curv / n


def fit_inverse_temperature(half_q: torch.Tensor, a: torch.Tensor, target: torch.Tensor,
                             log_range: float = 18.0, iters: int = 100) -> Tuple[float, float]:
    """(beta, NLL(beta)) for the beta in [e^-log_range, e^log_range] minimising the convex NLL(beta).

    Safeguarded Newton in s = log beta from s = 0 (tau = 1): dNLL/ds = beta g, d2NLL/ds2 = beta^2 h + beta g;
    the sign of g narrows a bracket [lo, hi] (g increases with beta), and a step that leaves it, or a non-convex
    point, bisects it. Stops when a step moves s by less than 1e-10 or when |dNLL/ds| < 1e-9 nats: a held-out set
    that the fit already classifies with a near-zero NLL (whose NLL only tends to 0 as tau -> 0) leaves tau at 1."""
    lo, hi, s = -log_range, log_range, 0.0
    for _ in range(iters):
        beta = math.exp(s)
        nll, g, h = nll_derivatives(half_q, a, target, beta)
        if abs(beta * g) < 1e-9:
            break
        if g < 0:
            lo = s
        else:
            hi = s
        slope, curvature = beta * g, beta * beta * h + beta * g
        step = s - slope / curvature if curvature > 0 else math.nan
        new_s = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(new_s - s) < 1e-10:
            break
        s = new_s
    return beta, nll


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) for logits (N, C) and targets (N,) in
    [0, C); returns {'temperature': T, 'nll_before': NLL at T = 1, 'nll_after': NLL at T} (nats, float64) and
    'identifiable': False when every target has the largest logit: the NLL then falls all the way to T -> 0 (no
    finite minimiser, a split too easy to calibrate on), and T = 1 is returned. T stays in [e^-18, e^18]. Raises ValueError for mismatched shapes, targets out of range or non-finite logits."""
    if logits.ndim != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f'fit_temperature: expected logits (N, C) and targets (N,) with N >= 1, got '
                         f'{tuple(logits.shape)} and {tuple(targets.shape)}')
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f'fit_temperature: targets must lie in [0, {logits.shape[1]}); remap them to the logit '
                         f'columns')
    if not torch.isfinite(logits).all():
        raise ValueError('fit_temperature: the logits are not all finite; the model diverged')
    neg_logits = -logits.detach().double()                       # logits / T = 0 - beta (-logits)
    offset = neg_logits.new_zeros(logits.shape[1])
    target = targets.detach().long().to(logits.device)
    nll_before = nll_derivatives(neg_logits, offset, target, 1.0)[0]
    if bool((logits.detach().gather(1, target.view(-1, 1)).squeeze(1) >= logits.detach().max(1).values).all()):
        return dict(temperature=1.0, nll_before=nll_before, nll_after=nll_before, identifiable=False)
    beta, nll_after = fit_inverse_temperature(neg_logits, offset, target)
    return dict(temperature=1.0 / beta, nll_before=nll_before, nll_after=nll_after, identifiable=True)


def fold_temperature(head: nn.Module, temperature: float) -> bool:
    """Divide the logits of `head` (an nn.Linear or a ZZZHead) by `temperature`, in place, by changing its own
    parameters; returns True when a ZZZ variance hit its floor (the fold is then approximate, see
    ZZZHead.divide_logits). ValueError for another kind of head or a temperature that is not positive."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f'fold_temperature: the temperature must be a positive number, got {temperature}')
    if hasattr(head, 'divide_logits'):     # a ZZZHead (not imported: the head imports its fits)
        return head.divide_logits(temperature)
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.div_(temperature)
            if head.bias is not None:
                head.bias.div_(temperature)
        return False
    raise ValueError(f'fold_temperature: folds into an nn.Linear or a ZZZHead, got {type(head).__name__}')
