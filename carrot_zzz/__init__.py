"""carrot-zzz: the ZZZ Gaussian head and the CARROT regulariser for fine-grained classification with timm."""
from .carrot import CarrotRegularizer, carrot_regularizer
from .zzz_head import ZZZHead
from .folded_head import FoldedZZZHead, fold_heads, folded_heads
from .registry import register_zzz
from .model import ZZZModel
from .weights import load_weights, save_weights
from .version import __version__

__all__ = ['ZZZHead', 'FoldedZZZHead', 'fold_heads', 'folded_heads', 'CarrotRegularizer', 'carrot_regularizer', 'register_zzz', 'ZZZModel', 'save_weights', 'load_weights']
