"""Out-of-distribution scores of a classifier, per sample; higher means "more like the training classes".

For logits l (N, C) and, for a ZZZ head, its input z (N, D) (carrot_zzz.metrics.ood_metrics turns two sets of
scores into AUROC and FPR at 95% TPR):

    msp        max_c softmax(l)_c                  the maximum softmax probability (Hendrycks & Gimpel, 2017)
    maxlogit   max_c l_c                           (Hendrycks et al., 2022)
    energy     log sum_c exp(l_c)                  minus the free energy (Liu et al., 2020)
    maha       -min_c (x - m_c)^T Sigma_c^-1 (x - m_c)     ZZZ heads: minus the smallest squared Mahalanobis
                                                   distance to a class Gaussian (ZZZHead.mahalanobis, x the
                                                   normalised z); no log-determinant, no bias
    ll         max_c (l_c - bias_c)                ZZZ heads: the largest class log-likelihood

msp, maxlogit and energy read the logits only, so they exist for every head; maha and ll need the ZZZ head.
A logit temperature T changes msp and energy (not their ranking for maxlogit), divides maha and ll by T (ranking
unchanged); `maha` does not see the bias nor the class log-determinants, which a closed-form start or training
may move, hence the score to use for a ZZZ head.

    scorer = OODScorer(model.get_classifier(), class_subset=None)
    scores = scorer(logits, embedding)                 {'msp': (N,), 'maxlogit': (N,), ..., 'maha': (N,)}
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .zzz_head import ZZZHead

__all__ = ['OOD_SCORES', 'LOGIT_SCORES', 'ZZZ_SCORES', 'logit_scores', 'OODScorer', 'default_ood_score']

LOGIT_SCORES = ('msp', 'maxlogit', 'energy')
ZZZ_SCORES = ('maha', 'll')
OOD_SCORES = LOGIT_SCORES + ZZZ_SCORES


def logit_scores(logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """msp, maxlogit, energy (N,) float32 of logits (N, C)."""
    logits = logits.float()
    top = logits.max(1).values
    energy = torch.logsumexp(logits, 1)
    return {'msp': torch.exp(top - energy), 'maxlogit': top, 'energy': energy}


def default_ood_score(head: Optional[nn.Module]) -> str:
    """The score to threshold for "unknown": maha for a ZZZ head, maxlogit otherwise."""
    return 'maha' if isinstance(head, ZZZHead) else 'maxlogit'


class OODScorer:
    """scores = OODScorer(head, class_subset)(logits (N, C'), embedding (N, D) or None): the OOD_SCORES that apply,
    each (N,) float32.

    head: the model's classifier (ZZZ scores when it is a ZZZHead: maha from the embedding, or read back from the
    logits without one). class_subset: the logit columns kept (the logits given are already cut to them; the ZZZ
    scores use the same classes)."""

    def __init__(self, head: Optional[nn.Module], class_subset: Optional[Sequence[int]] = None):
        self.head = head if isinstance(head, ZZZHead) else None
        self.columns = list(class_subset) if class_subset is not None else None

    @property
    def names(self):
        return OOD_SCORES if self.head is not None else LOGIT_SCORES

    def _columns(self, values: torch.Tensor) -> torch.Tensor:
        return values[..., self.columns] if self.columns is not None else values

    def __call__(self, logits: torch.Tensor, embedding: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        scores = logit_scores(logits)
        if self.head is None:
            return scores
        bias = self._columns(self.head.bias.detach()).to(device=logits.device, dtype=torch.float32)
        scores['ll'] = (logits.float() - bias).max(1).values
        if embedding is not None:
            distance = self._columns(self.head.mahalanobis(embedding.to(self.head.mu.device)))
        else:
            distance = self._distance_from_logits(logits.double())
        scores['maha'] = -distance.min(1).values.float().to(logits.device)
        return scores

    def _distance_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) squared distances read back from the logits when there is no embedding (an exported model gives
        the logits only): delta^T Sigma_c^-1 delta = -2 (logit_c - bias_c) - log|Sigma_c|. Equal to
        ZZZHead.mahalanobis up to the rounding of the logits (float32: about 1e-7 of |log|Sigma_c||)."""
        head = self.head
        with torch.no_grad():
            logdet = head.log_determinants(torch.float64)                                          # (C,)
            offset = self._columns(head.bias.detach().double() * 2 - logdet).to(logits.device)
        return offset - 2 * logits
