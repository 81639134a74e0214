"""fastbn: fused BatchNorm for PyTorch (Triton kernels on CUDA, a PyTorch path elsewhere)."""

from fastbn.backend import use_backend
from fastbn.convert import convert, revert
from fastbn.functional import batch_norm
from fastbn.modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "revert",
    "use_backend",
]

__version__ = "0.1.0"
