"""The inverse of the softplus parameterisation the ZZZ head uses for its variances: value = softplus(raw) + floor.

    raw = inverse_softplus_above(value, floor)     what the closed-form start and the temperature fold write
"""
import torch

__all__ = ['inverse_softplus_above']

_FLOOR_MARGIN = 1e-6        # values at a floor are written as floor * (1 + margin): a finite raw value


def inverse_softplus_above(value: torch.Tensor, floor: float) -> torch.Tensor:
    """raw with softplus(raw) + floor = value; values at or below the floor map to
    softplus^-1(max(floor * margin, tiny)): very negative but finite (about log of that)."""
    tiny = torch.finfo(value.dtype).tiny
    y = (value - floor).clamp_min(max(floor * _FLOOR_MARGIN, tiny))
    return y + torch.log(-torch.expm1(-y))                                   # log(exp(y) - 1), stable
