"""CUDA settings under which robustkit's promises hold: a resumed or sharded run gives the numbers
of one uninterrupted run, and the same command gives the same numbers on the same machine.

On the CPU nothing needs setting. On CUDA two defaults break run-to-run identity: cuDNN's
``benchmark`` times several convolution algorithms and keeps the fastest, which can differ from
run to run, and some of those algorithms are not deterministic; TF32 (Ampere and newer) rounds
fp32 convolution and matmul inputs to 10 mantissa bits, so fp32 results depend on a flag someone
else may have set. :func:`deterministic_cuda` fixes both for the process; call it once where
the device is chosen, before the first CUDA kernel runs.
"""

from __future__ import annotations

import torch


def deterministic_cuda(*, allow_tf32: bool = False) -> dict[str, bool]:
    """cuDNN deterministic, cuDNN benchmark off, TF32 off for convolutions and matmuls (on with
    ``allow_tf32``). Returns the previous settings (pass them to :func:`restore` to undo)."""
    before = settings()
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return before


def settings() -> dict[str, bool]:
    """The four settings :func:`deterministic_cuda` changes, as they are now."""
    return {
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def restore(previous: dict[str, bool]) -> None:
    """Put back settings returned by :func:`deterministic_cuda` or :func:`settings`."""
    torch.backends.cudnn.deterministic = previous["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = previous["cudnn_benchmark"]
    torch.backends.cudnn.allow_tf32 = previous["cudnn_allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = previous["matmul_allow_tf32"]
