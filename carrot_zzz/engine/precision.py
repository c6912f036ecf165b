"""Where a run computes and in which precision: device, parameter dtype, autocast region, loss scaling.

    precision = resolve_precision('cuda', amp=True, amp_dtype='bfloat16', model_dtype=None)
    with precision.autocast():
        loss = task(x, y)['loss']

float16 autocast on CUDA is the one setting whose gradients need a loss scaler (`needs_loss_scaling`).
"""
import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import SettingError

__all__ = ['Precision', 'resolve_precision', 'require_device', 'fast_cuda_math', 'input_channels', 'DTYPES']

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
AMP_DTYPES = ('float16', 'bfloat16')


@dataclass(frozen=True)
class Precision:
    """device; model_dtype None keeps the model's float32 parameters; amp_dtype None runs without autocast."""
    device: torch.device
    model_dtype: Optional[torch.dtype] = None
    amp_dtype: Optional[torch.dtype] = None

    def autocast(self):
        """The region the forward pass and the loss run in."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype the loaders hand images over in."""
        return self.model_dtype or torch.float32

    @property
    def needs_loss_scaling(self) -> bool:
        """float16 autocast on CUDA: small gradients underflow unless the loss is scaled."""
        return self.amp_dtype == torch.float16 and self.device.type == 'cuda'

    def describe(self) -> str:
        if self.amp_dtype is not None:
            return f'autocast to {str(self.amp_dtype).replace("torch.", "")} on {self.device}'
        return f'{str(self.input_dtype).replace("torch.", "")} on {self.device}, no autocast'


def fast_cuda_math() -> None:
    """TF32 matrix products and cudnn autotuning on CUDA, as timm's scripts set them (no effect elsewhere)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = True


def require_device(device: str) -> None:
    """SettingError when `device` names CUDA on a machine without it (torch would fail later, less clearly)."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SettingError('device', device, 'CUDA is not available here; pass device=cpu')


def resolve_precision(device: torch.device, amp: bool, amp_dtype: str, model_dtype: Optional[str]) -> Precision:
    """Precision from the flag values; SettingError for an unknown dtype or autocast over a non-float32 model."""
    if model_dtype is not None and model_dtype not in DTYPES:
        raise SettingError('model_dtype', model_dtype, f'pass one of {", ".join(DTYPES)}')
    params = DTYPES[model_dtype] if model_dtype else None
    if not amp:
        return Precision(torch.device(device), params, None)
    if amp_dtype not in AMP_DTYPES:
        raise SettingError('amp_dtype', amp_dtype, f'pass one of {", ".join(AMP_DTYPES)}')
    if params not in (None, torch.float32):
        raise SettingError('model_dtype', model_dtype, 'autocast (amp) needs float32 parameters; drop amp or model_dtype')
    return Precision(torch.device(device), params, DTYPES[amp_dtype])


def input_channels(in_chans: Optional[int], input_size: Optional[Sequence[int]]) -> int:
    """Image channels the model is built for: in_chans, else the first of input_size (C, H, W), else 3."""
    if in_chans is not None:
        return in_chans
    return input_size[0] if input_size else 3
