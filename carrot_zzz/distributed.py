"""All-gather with gradient, for a regulariser that must see the global batch under DDP.

With W ranks each holding z_r (B, D), every rank computes the same R(z_0, ..., z_{W-1}) on the gathered
(W B, D) batch. DDP averages parameter gradients over ranks, so for the parameters to receive dR/dtheta
(as on one process) each rank must backpropagate W * dR/dz_r into its own z_r: the backward of the gather
sums the incoming gradient over ranks (all_reduce SUM; every rank holds the same dR/dz) and keeps the
rank's own slice. The ranks' batches must have the same shape (timm's training loaders drop the last
partial batch; the P x K sampler's batches are always full).
"""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W B, ...) in rank order, differentiable (see module doc)."""
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W B, ...) in rank order, no gradient (labels)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)
