"""The ZZZ head folded for inference: a snapshot of its logits with no factorisation left, and the swap into a model.

For x = normalize(feats) (B, d), alpha = 1 / sigma^2, U_c the orthonormal basis, v_c the directional variances,
the logits of ZZZHead expand into one matrix product plus elementwise work:

    logit_c = -1/2 D_c(x) + k_c,         k_c = bias_c - 1/2 log|Sigma_c|                           (C,)
    -1/2 D_c(x) = alpha m_c.x - alpha/2 ||m_c||^2 - alpha/2 ||x||^2 + sum_k (s_ck U_ck.x - s_ck U_ck.m_c)^2
    s_ck^2 = alpha^2 v_ck / (2 (1 + alpha v_ck))

so FoldedZZZHead holds weight (C + C r, d) = [alpha m_c ; s_ck U_ck], offset (C + C r,) = [-alpha/2 ||m_c||^2 ;
-s_ck U_ck.m_c], half_alpha () and k (C,) as buffers, and computes

    [lin | quad] = x @ weight^T + offset;   -1/2 D = lin - half_alpha ||x||^2 + sum_k quad_ck^2;   logits = -1/2 D + k

The fold is explicit and a snapshot: it copies the head's values when it is built, and nothing links it back to
them. Build it when the weights no longer change: for export (the exporters translate a matrix product, not the
head's Cholesky factorisation) and for evaluation in validate.py and inference.py, where it is also faster.

    fold_heads(model)            replace every ZZZHead of a model by its fold, in place (deployment, export)
    with folded_heads(model):    the same inside the block; the ZZZHeads are put back on exit
"""
import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .zzz_head import ZZZHead, compute_dtype

__all__ = ['FoldedZZZHead', 'fold_heads', 'folded_heads']


def _autocast_off(device_type: str):
    """A region with autocast disabled; no context at all when autocast is off (what an exporter traces)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class FoldedZZZHead(nn.Module):
    """A ZZZHead's logits folded into one (C + C r, d) matrix product (see the module docstring), for inference.

    Args:
        head: the ZZZHead to fold; its values are copied now (later changes to it are not seen).
        dtype: the dtype of the folded buffers (default: float32, float64 for a float64 head).

    Shapes: forward(feats (B, d)) -> logits (B, C) in float32 (float64 for float64 features or buffers),
    autocast disabled inside, equal to the head's logits to float32 round-off. Buffers only: no parameter
    to train, and the state_dict holds the folded tensors, not the head's five parameters.
    """

    def __init__(self, head: ZZZHead, dtype: torch.dtype = None):
        super().__init__()
        self.num_classes, self.feat_dim, self.rank = head.num_classes, head.feat_dim, head.rank
        dtype = dtype or compute_dtype(head.mu.dtype)
        # ordinary tensors even when built inside inference_mode (inference_mode(False) turns grad mode back on)
        with torch.inference_mode(False), torch.no_grad(), _autocast_off(head.mu.device.type):
            weight, offset, half_alpha, constant = _fold(head, dtype)
        self.register_buffer('weight', weight)            # (C + C r, d)
        self.register_buffer('offset', offset)            # (C + C r,)
        self.register_buffer('half_alpha', half_alpha)    # ()
        self.register_buffer('constant', constant)        # (C,) k_c = bias_c - 1/2 log|Sigma_c|

    def extra_repr(self) -> str:
        return f'num_classes={self.num_classes}, feat_dim={self.feat_dim}, rank={self.rank}'

    def half_distance(self, feats: torch.Tensor) -> torch.Tensor:
        """-1/2 (x - m_c)^T Sigma_c^-1 (x - m_c) (B, C) for x = normalize(feats)."""
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim:
            raise ValueError(f'FoldedZZZHead: expected features of shape (B, {self.feat_dim}), got '
                             f'{tuple(feats.shape)}; feat_dim must equal the embedding size of the backbone')
        C, r = self.num_classes, self.rank
        dtype = compute_dtype(feats.dtype, self.weight.dtype)
        with _autocast_off(feats.device.type):
            x = F.normalize(feats.to(dtype), dim=1)                                                 # (B, d)
            scores = F.linear(x, self.weight.to(dtype), self.offset.to(dtype))                      # (B, C + C r)
            half = scores[:, :C] - self.half_alpha.to(dtype) * (x * x).sum(1, keepdim=True)        # (B, C)
            if r:
                half = half + scores[:, C:].square().unflatten(1, (C, r)).sum(2)
            return half

    def mahalanobis(self, feats: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances (B, C), as ZZZHead.mahalanobis."""
        return -2 * self.half_distance(feats)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.half_distance(feats) + self.constant.to(compute_dtype(feats.dtype, self.weight.dtype))


def _fold(head: ZZZHead, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight (C + C r, d), offset (C + C r,), half_alpha (), constant (C,)) of the module docstring."""
    C, d, r = head.num_classes, head.feat_dim, head.rank
    m = F.normalize(head.mu.to(dtype), dim=1)                                        # (C, d)
    v = head.variances(dtype)                                                        # (C, r)
    sigma2 = head.sigma2(dtype)                                                      # ()
    alpha = 1.0 / sigma2
    scale = (0.5 * alpha * alpha * v / (1.0 + alpha * v)).sqrt()                     # (C, r)
    quad_weight = (head.basis(dtype) * scale.unsqueeze(1)).transpose(1, 2)           # (C, r, d)
    quad_offset = -(quad_weight @ m.unsqueeze(2)).reshape(C * r)                     # (C r,)
    weight = torch.cat([alpha * m, quad_weight.reshape(C * r, d)])                  # (C + C r, d)
    offset = torch.cat([-0.5 * alpha * (m * m).sum(1), quad_offset])                # (C + C r,)
    return weight, offset, 0.5 * alpha, head.bias.to(dtype) - 0.5 * head.log_determinants(dtype)


def _zzz_heads(model: nn.Module) -> List[Tuple[nn.Module, str, ZZZHead]]:
    """(parent, attribute name, head) of every ZZZHead inside model (model itself included, parent None)."""
    if isinstance(model, ZZZHead):
        return [(None, '', model)]
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, ZZZHead)]


def fold_heads(model: nn.Module) -> nn.Module:
    """model with every ZZZHead replaced by its FoldedZZZHead, in place (a ZZZHead given alone: its fold).
    For deployment and export; the folded model cannot be trained or calibrated further."""
    for parent, name, head in _zzz_heads(model):
        if parent is None:
            return FoldedZZZHead(head)
        setattr(parent, name, FoldedZZZHead(head))
    return model


@contextlib.contextmanager
def folded_heads(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every ZZZHead of model is its fold (built on entry); on exit the heads are put back."""
    heads = [(parent, name, head) for parent, name, head in _zzz_heads(model) if parent is not None]
    for parent, name, head in heads:
        setattr(parent, name, FoldedZZZHead(head))
    try:
        yield model
    finally:
        for parent, name, head in heads:
            setattr(parent, name, head)
