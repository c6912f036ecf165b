"""timm training tasks that add to the classification loss the ZZZ head's penalties (PenalisedClassificationTask)
and the CARROT regulariser (CarrotClassificationTask, which has the penalties too).

    loss = criterion(logits, target) + w_v P_v + w_d P_d      P_v = ZZZHead.v_shrink_penalty(),
                                                              P_d = ZZZHead.decoupling_penalty() (weights 0: off)

    logits, z = model(x, return_embedding=True)          one backbone pass; z (B, D), logits (B, C)
    y         = argmax(target) for soft targets           (mixup / cutmix / smoothing: dominant class)
    z, y      = gather over ranks                         scope 'global' under DDP, with gradient
    loss      = criterion(logits, target) + w * R(z, y)

The task is called by the training loop inside its autocast region, and the loop then divides `loss` by
the accumulation steps and hands it to the loss scaler: CARROT rides timm's loss path unchanged (fp16
scaling, clipping, accumulation with DDP no_sync, EMA). The returned dict carries detached 0-d tensors for
logging (no host sync): task_loss, R, R_var, R_rank, classes_used, min_r, min_erank_frac and used_frac,
the fraction of the (gathered) batch whose class has at least 2 samples there, i.e. that CARROT sees.
"""
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn
from timm.task import ClassificationTask

from .carrot import CarrotRegularizer, labels_from_target
from .distributed import all_gather_nograd, all_gather_with_grad
from .weights import unwrap_model
from .zzz_head import ZZZHead

CARROT_SCOPES = ('global', 'local')


def used_fraction(labels: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose class occurs at least twice in `labels` (B,): 0-d float, no host sync."""
    if labels.numel() == 0:
        return labels.new_zeros((), dtype=torch.float32)
    s = torch.sort(labels).values
    count = torch.searchsorted(s, s, right=True) - torch.searchsorted(s, s, right=False)
    return (count >= 2).float().mean()


class PenalisedClassificationTask(ClassificationTask):
    """ClassificationTask whose loss adds the ZZZ head's penalties, each with its weight (0: not computed):

        loss = criterion(logits, target) + zzz_v_shrink * P_v + zzz_decouple * P_d

    The returned dict carries task_loss and, for each penalty that is on, its value (zzz_v_shrink, zzz_decouple:
    detached 0-d tensors, no host sync). Weights > 0 need a model whose classifier is a ZZZHead (ValueError).
    """

    def __init__(self, model: nn.Module, criterion: Optional[Union[nn.Module, Callable]] = None,
                 zzz_v_shrink: float = 0.0, zzz_decouple: float = 0.0, **kwargs):
        super().__init__(model, criterion, **kwargs)
        self.penalty_weights = {name: weight for name, weight in
                                (('zzz_v_shrink', zzz_v_shrink), ('zzz_decouple', zzz_decouple)) if weight}
        if self.penalty_weights and not isinstance(self._head(), ZZZHead):
            raise ValueError(f'{", ".join(self.penalty_weights)} penalise a ZZZ head; the model\'s classifier is '
                             f'{type(self._head()).__name__}')

    def _head(self) -> nn.Module:
        return unwrap_model(self.trainable_module).get_classifier()

    def head_penalties(self, loss: torch.Tensor, out: Dict[str, Any]) -> torch.Tensor:
        """loss plus the weighted penalties that are on; their values go into `out`."""
        head = self._head() if self.penalty_weights else None
        for name, weight in self.penalty_weights.items():
            value = head.v_shrink_penalty() if name == 'zzz_v_shrink' else head.decoupling_penalty()
            loss = loss + weight * value
            out[name] = value.detach()
        return loss

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        output = self.trainable_module(input)
        task_loss = self.criterion(output, target)
        out = {'output': output, 'task_loss': task_loss.detach()}
        out['loss'] = self.head_penalties(task_loss, out)
        return out


class CarrotClassificationTask(PenalisedClassificationTask):
    """ClassificationTask whose loss is criterion(logits, target) + carrot_weight * R(embedding, labels).

    Args:
        model: a carrot_zzz model: model(x, return_embedding=True) -> (logits (B, C), embedding (B, D)).
        criterion: the task loss (timm's train.py choice: CE, label smoothing, soft-target CE, BCE).
        carrot_weight: w.
        rank_norm: 'dim' or 'attainable', see carrot_regularizer.
        scope: 'global' gathers embeddings and labels over DDP ranks (with gradient) so R sees the global
            batch; 'local' uses each rank's batch. Without DDP both are the same.
        max_classes, max_per_class: static bounds for carrot_regularizer over the batch it sees (the
            gathered one for 'global'); with both, no host sync (P x K sampler).
        cuda_graph: replay the regulariser as a CUDA graph on CUDA (CarrotRegularizer(cuda_graph=True));
            None: whenever both static bounds are given. Eager elsewhere.
        zzz_v_shrink, zzz_decouple: the ZZZ head's penalties (PenalisedClassificationTask).
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            carrot_weight: float = 1.0,
            rank_norm: str = 'dim',
            scope: str = 'global',
            max_classes: Optional[int] = None,
            max_per_class: Optional[int] = None,
            cuda_graph: Optional[bool] = None,
            zzz_v_shrink: float = 0.0,
            zzz_decouple: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, zzz_v_shrink=zzz_v_shrink, zzz_decouple=zzz_decouple, device=device,
                         dtype=dtype, verbose=verbose)
        if scope not in CARROT_SCOPES:
            raise ValueError(f'carrot scope must be one of {CARROT_SCOPES}, got {scope!r}')
        self.carrot_weight = carrot_weight
        self.scope = scope
        if cuda_graph is None:
            cuda_graph = max_classes is not None and max_per_class is not None
        self.carrot = CarrotRegularizer(
            rank_norm=rank_norm, max_classes=max_classes, max_per_class=max_per_class, cuda_graph=cuda_graph)

    def regularizer(self, embedding: torch.Tensor, target: torch.Tensor):
        """(R, stats) for local embeddings (B, D) and targets (B,) or (B, C), gathered when scope is global."""
        labels = labels_from_target(target, embedding.shape[0])
        if self.scope == 'global':
            embedding = all_gather_with_grad(embedding)
            labels = all_gather_nograd(labels)
        reg, stats = self.carrot(embedding, labels)
        stats['used_frac'] = used_fraction(labels)
        return reg, stats

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        output, embedding = self.trainable_module(input, return_embedding=True)
        task_loss = self.criterion(output, target)
        reg, stats = self.regularizer(embedding, target)
        out = {'output': output, 'task_loss': task_loss.detach(), **stats}
        out['loss'] = self.head_penalties(task_loss + self.carrot_weight * reg, out)
        return out
