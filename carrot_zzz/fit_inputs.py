"""The checks of the (features, labels) pairs the closed-form starts take (carrot_zzz.zzz_fit, carrot_zzz.linear_probe):
one-line ValueErrors that name the fix."""
import torch

__all__ = ['check_labelled']


def check_labelled(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, feat_dim: int,
                    what: str, min_rows: int = 0) -> None:
    """One-line ValueErrors for features (N, feat_dim), N >= min_rows, and integer labels (N,) in [0, num_classes)."""
    if not isinstance(feats, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(f'{what}: features and labels must be tensors; pass torch.Tensor (N, d) and (N,)')
    if feats.ndim != 2 or feats.shape[1] != feat_dim:
        raise ValueError(f'{what}: expected features of shape (N, {feat_dim}), got {tuple(feats.shape)}; pass '
                         f'the pooled embeddings the head sees (feat_dim = the embedding size)')
    if not feats.is_floating_point():
        raise ValueError(f'{what}: features must be floating point, got {feats.dtype}; pass feats.float()')
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f'{what}: expected labels of shape ({feats.shape[0]},), got {tuple(labels.shape)}; pass '
                         f'one class index per feature row')
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f'{what}: labels must be integer class indices, got {labels.dtype}; pass labels.long()')
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'{what}: labels must lie in [0, {num_classes}), got [{labels.min().item()}, '
                         f'{labels.max().item()}]; remap the labels to the head\'s class indices')
    if not all(torch.isfinite(block).all() for block in feats.split(8192)):   # blocks: no (N, d) temporaries
        raise ValueError(f'{what}: features contain NaN or inf; remove those rows')
    if feats.shape[0] < min_rows:
        raise ValueError(f'{what}: needs at least {min_rows} feature rows, got {feats.shape[0]}; pass more samples')
