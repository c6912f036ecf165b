"""The linear head's closed-form start on frozen features: an L2-penalised multinomial logistic regression (a
linear probe; the ZZZ head's start is carrot_zzz.zzz_fit).

Linear probe: on the raw embedding z (timm's linear head sees it unnormalised), mean zbar, and the per-coordinate
RMS s = sqrt(mean_i ||z_i - zbar||^2 / d),

    loss(W, b) = mean_i CE(W z_i + b, y_i) + weight_decay / 2 * s^2 ||W||_F^2

i.e. the penalty weight_decay / 2 ||W'||^2 on W' = s W, the weights acting on the centred features scaled to unit
RMS (weight_decay does not depend on the scale of the backbone's features); full-batch L-BFGS on (W', b').
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .fit_inputs import check_labelled

__all__ = ['fit_linear_head']


def _probe_loss(weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                weight_decay: float, rows: int, backward: bool) -> float:
    """mean CE(z W^T + b, y) + weight_decay / 2 ||W||^2 over row chunks; accumulates gradients if backward."""
    n = z.shape[0]
    total = 0.0
    for start in range(0, n, rows):
        loss = F.cross_entropy(z[start:start + rows] @ weight.T + bias, y[start:start + rows],
                               reduction='sum') / n
        if backward:
            loss.backward()
        total += loss.item()
    penalty = 0.5 * weight_decay * weight.square().sum()
    if backward:
        penalty.backward()
    return total + penalty.item()


def fit_linear_head(linear: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, *, weight_decay: float = 1e-3,
                    max_iter: int = 200, rows: int = 8192) -> Dict[str, float]:
    """Set linear.weight (C, D) and linear.bias (C,) in place to the L2-penalised logistic regression of the
    module docstring on the raw embeddings feats (N, D) with labels (N,) in [0, C).

    Full-batch L-BFGS (strong Wolfe line search, at most max_iter iterations) from zero on the centred, RMS-scaled
    features, gradients accumulated over chunks of `rows` samples; weights mapped back to the raw features:
    W = W' / s, b = b' - W zbar. Returns floats: loss_before (the objective at the layer's weights before),
    loss_after, grad_norm (of the objective in (W', b') at the end), iterations.
    Raises ValueError naming the fix for malformed input.
    """
    what = 'fit_linear_head'
    if not isinstance(linear, nn.Linear):
        raise ValueError(f'{what}: expected an nn.Linear head, got {type(linear).__name__}; pass model.head of a '
                         f'linear-head model')
    check_labelled(feats, labels, linear.out_features, linear.in_features, what, min_rows=2)
    if linear.bias is None:
        raise ValueError(f'{what}: the layer has no bias; create it with nn.Linear(..., bias=True) (timm\'s heads '
                         f'have one)')
    if weight_decay <= 0 or max_iter < 1 or rows < 1:
        raise ValueError(f'{what}: weight_decay must be > 0 (separable features have no finite optimum without '
                         f'it), max_iter and rows >= 1')
    dtype = torch.promote_types(feats.dtype, torch.float32)
    z = feats.detach().to(dtype)
    y = labels.to(z.device).long()
    mean = z.mean(0)
    scale = ((z - mean).square().sum(1).mean() / z.shape[1]).sqrt().clamp_min(torch.finfo(dtype).tiny)
    z = (z - mean) / scale

    with torch.no_grad():   # the objective at the layer's present weights, in the scaled coordinates
        w_now = linear.weight.detach().to(device=z.device, dtype=dtype) * scale
        b_now = linear.bias.detach().to(device=z.device, dtype=dtype) + (w_now / scale) @ mean
        loss_before = _probe_loss(w_now, b_now, z, y, weight_decay, rows, backward=False)

    weight = torch.zeros(linear.out_features, linear.in_features, dtype=dtype, device=z.device, requires_grad=True)
    bias = torch.zeros(linear.out_features, dtype=dtype, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=0.0, line_search_fn='strong_wolfe')

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _probe_loss(weight, bias, z, y, weight_decay, rows, backward=True)
        return torch.tensor(loss, dtype=torch.float64)   # L-BFGS reads float(loss): keep it float64

    with torch.enable_grad():
        optimizer.step(closure)
        optimizer.zero_grad()
        loss_after = _probe_loss(weight, bias, z, y, weight_decay, rows, backward=True)
    grad_norm = torch.cat([weight.grad.flatten(), bias.grad]).norm().item()
    iterations = optimizer.state[weight].get('n_iter', 0)

    with torch.no_grad():
        raw_weight = weight.detach() / scale
        linear.weight.copy_(raw_weight.to(linear.weight))
        linear.bias.copy_((bias.detach() - raw_weight @ mean).to(linear.bias))
    return dict(loss_before=loss_before, loss_after=loss_after, grad_norm=grad_norm, iterations=float(iterations))
