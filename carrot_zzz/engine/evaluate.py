"""The one evaluation loop: a model over a loader, per-sample scores gathered, split metrics from carrot_zzz.metrics.

    scores = predict(model, loader, precision)              per-sample tensors over the whole split
    metrics = split_metrics(scores, num_classes)            top1, top5, mean_class_acc, nll, ece (fractions)

train.py evaluates every epoch with it (loss = mean NLL, top1, top5 in %), validate.py reports everything.
Under DDP each rank scores its shard of timm's ordered distributed sampler (rank r holds samples r, r + W, ...,
padded to equal length) and `predict` gathers them back into dataset order, padding dropped: the metrics are
those of the whole split, exactly.
"""
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import is_distributed
from ..metrics import sample_scores, split_metrics
from .data import inner_loader
from .precision import Precision

__all__ = ['predict', 'epoch_metrics', 'split_metrics', 'logits_and_embedding']

_logger = logging.getLogger(__name__)


def _progress_line(name: str, index: int, batches: int, seconds: float, samples: int,
                   scores: Dict[str, List[torch.Tensor]]) -> str:
    """'Test: [  10/50]  Time: ...  Loss: ...  Acc@1: ...  Acc@5: ...' with running means over the batches so far."""
    nll = torch.cat(scores['nll']).double().mean().item()
    top1 = 100 * torch.cat(scores['hit1']).double().mean().item()
    top5 = 100 * torch.cat(scores['hitk']).double().mean().item()
    per_batch = seconds / (index + 1)
    return (f'{name}: [{index:>4d}/{batches}]  Time: {per_batch:.3f}s ({samples / seconds:>7.2f}/s)  '
            f'Loss: {nll:>7.4f}  Acc@1: {top1:>7.3f}  Acc@5: {top5:>7.3f}')


def _gather_in_dataset_order(values: torch.Tensor, length: int) -> torch.Tensor:
    """Per-rank (n, ...) scores of an ordered distributed sampler -> (length, ...) in dataset order."""
    world = dist.get_world_size()
    parts = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(parts, values.contiguous())
    stacked = torch.stack(parts, 1)                              # (n, W, ...): row j holds samples j W .. j W + W - 1
    return stacked.flatten(0, 1)[:length]


def _dataset_size(loader) -> Optional[int]:
    """The size of the data set a loader reads (None when it has none: a streaming reader)."""
    dataset = getattr(inner_loader(loader), 'dataset', None)
    try:
        return len(dataset)
    except TypeError:
        return None


def logits_and_embedding(model: nn.Module) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """images -> (logits (B, C), pooled embedding (B, D)) in one backbone pass, through timm's model API:
    forward_features, then forward_head with and without pre_logits (eval mode: the two heads see the same
    features). DataParallel / torch.compile wrappers are looked through."""
    model = getattr(model, 'module', model)
    model = getattr(model, '_orig_mod', model)

    def forward(images: torch.Tensor):
        features = model.forward_features(images)
        return model.forward_head(features), model.forward_head(features, pre_logits=True)
    return forward


@torch.inference_mode()
def predict(
        model: nn.Module,
        loader,
        precision: Precision,
        *,
        channels_last: bool = False,
        class_subset: Optional[Sequence[int]] = None,
        scorer: Optional[Callable] = None,
        on_logits: Optional[Callable[[torch.Tensor], None]] = None,
        tta: int = 0,
        forward: Optional[Callable] = None,
        keep_logits: bool = False,
        keep_embeddings: bool = True,
        log_every: int = 0,
        log_name: str = 'Test',
        dataset_length: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Per-sample scores (metrics.sample_scores, plus `score_<name>` of the scorer) of `model` over `loader`, on
    the CPU.

    class_subset: keep these logit columns (the labels index into them). scorer(logits, embedding or None): a dict
    of per-sample out-of-distribution scores (carrot_zzz.ood.OODScorer), kept as `score_<name>` (N,).
    on_logits(logits) sees every batch. tta > 1: each group of tta consecutive inputs is one sample, its logits
    averaged. forward(images): logits, or (logits, embedding) (see logits_and_embedding); default model(images).
    keep_embeddings: keep the embeddings a forward gives (`embedding` (N, D) float32). keep_logits: keep `logits`
    (N, C) float32 too. log_every: a progress line every so many batches (the only host syncs). dataset_length:
    the split's size, to drop DDP padding (default: the size of the loader's data set).
    """
    model.eval()
    kept: Dict[str, List[torch.Tensor]] = {}
    start, samples = time.time(), 0
    for index, (images, target) in enumerate(loader):
        images = images.to(device=precision.device, dtype=precision.input_dtype, non_blocking=True)
        target = target.to(device=precision.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            out = forward(images) if forward is not None else model(images)
        embedding = out[1].float() if forward is not None and isinstance(out, tuple) else None
        logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
        if tta > 1:
            logits, target = logits.unflatten(0, (-1, tta)).mean(1), target[::tta]
        if class_subset is not None:
            logits = logits[:, list(class_subset)]
        if on_logits is not None:
            on_logits(logits)
        batch = sample_scores(logits, target)
        if scorer is not None:
            batch.update({f'score_{name}': value for name, value in scorer(logits, embedding).items()})
        if embedding is not None and keep_embeddings:
            batch['embedding'] = embedding
        if keep_logits:
            batch['logits'] = logits
        for key, value in batch.items():
            kept.setdefault(key, []).append(value)
        samples += logits.shape[0]
        if log_every and (index % log_every == 0):
            _logger.info(_progress_line(log_name, index, len(loader), time.time() - start, samples, kept))
    if not kept:
        return {}
    out = {key: torch.cat(values) for key, values in kept.items()}
    if is_distributed():
        length = dataset_length or _dataset_size(loader)
        out = {key: _gather_in_dataset_order(v, length or len(v) * dist.get_world_size()) for key, v in out.items()}
    return {key: value.cpu() for key, value in out.items()}


def epoch_metrics(scores: Dict[str, torch.Tensor], num_classes: int) -> Dict[str, float]:
    """What train.py logs and ranks by after an epoch: loss (mean NLL), top1, top5 (in %), timm's summary columns."""
    if not scores:
        return {'loss': float('nan'), 'top1': 0.0, 'top5': 0.0}
    m = split_metrics(scores, num_classes)
    return {'loss': m['nll'], 'top1': 100 * m['top1'], 'top5': 100 * m['top5']}
