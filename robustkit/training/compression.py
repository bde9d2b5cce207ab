"""Gradient compression for DistributedDataParallel, as DDP communication hooks.

``fp16`` and ``bf16`` are torch's own hooks (``ddp_comm_hooks.default_hooks``): the bucket is cast,
all-reduced and cast back. ``qsgd`` is an unbiased n-bit stochastic quantizer in the style of
QSGD (Alistarh et al., 2017) and of DAT's ``RandomQuantizer`` (dat-2022/dat ``quantization.py``):
each segment ``g`` of the gradient is sent as its L2 norm (float32) and, per element, a sign bit
and a level ``l`` in ``0..s`` (``s = 2**(bits-1) - 1``; DAT's 8 bits give ``s = 127``), where
``l`` is ``s·|g_i|/||g||`` rounded down or up at random with the probability that makes
``E[||g||·sign(g_i)·l/s] = g_i``. A segment is one parameter's gradient, as DAT quantizes them
(``bucket=None``), or at most ``bucket`` elements of it, as QSGD's bucketing: the variance of a
segment of ``d`` elements is at most ``d·||g||²/(4s²)``, so smaller segments cost one float per
segment and give a closer step. The codes of all ranks are all-gathered (one byte per element; no
bit packing), decoded and averaged: the averaged gradient is an unbiased estimate of the exact
average. Each rank draws its rounding from its own seeded generator (:meth:`QSGDState.reseed`).
"""

# No ``from __future__ import annotations`` here: DDP checks a hook's annotations at registration
# and string annotations fail that check.
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from robustkit.errors import UsageError

COMPRESSIONS = ("none", "fp16", "bf16", "qsgd")
MIN_BITS, MAX_BITS = 2, 8


def levels(bits: int) -> int:
    """Quantization levels ``s`` of an n-bit code with one sign bit (8 bits -> 127, as DAT)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"--quant-bits must be an integer from {MIN_BITS} to {MAX_BITS} (DAT uses 8), got {bits!r}.")
    return 2 ** (bits - 1) - 1


@functools.lru_cache(maxsize=256)
def _segment_counts(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The segment lengths on ``device``, copied there once per bucket layout (a DDP bucket keeps
    its layout from step to step), not once per quantization."""
    return torch.tensor(sizes, dtype=torch.long).to(device)


def _segment_ids(sizes: Sequence[int] | None, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    if sizes is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    if sum(sizes) != n:
        raise ValueError(f"segment sizes add up to {sum(sizes)}, not {n}")
    counts = _segment_counts(tuple(sizes), torch.device(device))
    # output_size: the device need not report the total back to the host
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts, output_size=n), len(sizes)


def quantize(
    g: torch.Tensor, bits: int, generator: torch.Generator | None = None, sizes: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, norms)``: uint8 codes ``2·l + (g < 0)`` of ``g`` (flattened) and the float32 L2
    norm of each segment (``sizes``: consecutive segment lengths; None: one segment)."""
    s = levels(bits)
    flat = g.detach().reshape(-1).float()
    ids, count = _segment_ids(sizes, flat.numel(), flat.device)
    norms = torch.zeros(count, device=flat.device).index_add_(0, ids, flat * flat).sqrt_()
    scaled = flat.abs() / norms.clamp_min(torch.finfo(torch.float32).tiny)[ids] * s
    low = scaled.floor()
    u = torch.rand(scaled.shape, generator=generator, device=scaled.device)
    level = (low + (u < scaled - low).float()).clamp_(0, s)
    codes = (level * 2 + (flat < 0).float()).to(torch.uint8)
    return codes, norms


def dequantize(codes: torch.Tensor, norms: torch.Tensor, bits: int, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """The flat float32 tensor ``codes`` stand for; the inverse of :func:`quantize` in expectation."""
    c = codes.long()
    ids, _ = _segment_ids(sizes, c.numel(), c.device)
    sign = (1 - 2 * (c & 1)).float()
    return norms.float()[ids] * sign * (c >> 1).float() / levels(bits)


@dataclass
class QSGDState:
    """State of the ``qsgd`` hook: code width, segment size (None: one per parameter, as DAT),
    the gradients' device (for this rank's rounding generator) and the process group (None: the
    default one)."""

    bits: int = 8
    bucket: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: dist.ProcessGroup | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        levels(self.bits)
        check_bucket(self.bucket)
        self.generator = torch.Generator(device=self.device)

    def reseed(self, seed: int) -> None:
        """Restart the rounding draws (called at every epoch start, so a resumed run redraws the same)."""
        self.generator.manual_seed(seed % (2**63))


def check_bucket(bucket: int | None) -> None:
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
        raise UsageError(f"--quant-bucket must be a positive number of elements (QSGD uses 512), got {bucket!r}.")


def segments(bucket: dist.GradBucket, size: int | None = None) -> list[int]:
    """Segment lengths of a DDP bucket: its parameters' gradients (the whole buffer when they do
    not add up to it), each cut into pieces of at most ``size`` elements."""
    sizes = [g.numel() for g in bucket.gradients()]
    total = bucket.buffer().numel()
    if not sizes or sum(sizes) != total:
        sizes = [total]
    if size is None:
        return sizes
    return [min(size, n - start) for n in sizes for start in range(0, n, size)]


def qsgd_hook(state: QSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-gather the n-bit codes of every rank and average their decodings."""
    buffer = bucket.buffer()
    sizes = segments(bucket, state.bucket)
    n = buffer.numel()
    codes, norms = quantize(buffer, state.bits, state.generator, sizes)
    message = torch.cat([codes, norms.view(torch.uint8)])  # one collective: codes, then norms as bytes
    world = dist.get_world_size(state.group)
    gathered = [torch.empty_like(message) for _ in range(world)]
    work = dist.all_gather(gathered, message, group=state.group, async_op=True)
    assert work is not None

    def average(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        total = sum(dequantize(m[:n], m[n:].clone().view(torch.float32), state.bits, sizes) for m in gathered)
        assert isinstance(total, torch.Tensor)
        return buffer.copy_(total.div_(world).to(buffer.dtype))

    return work.get_future().then(average)


def register_compression(
    model: DistributedDataParallel, name: str, *, bits: int = 8, bucket: int | None = None, seed: int = 0
) -> QSGDState | None:
    """Install gradient compression ``name`` (one of :data:`COMPRESSIONS`) on ``model``; returns the
    quantizer state for ``qsgd`` (to :meth:`~QSGDState.reseed`), else None."""
    if name not in COMPRESSIONS:
        raise UsageError(f"Unknown --grad-compression {name!r}; accepted: {', '.join(COMPRESSIONS)}.")
    if name == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "qsgd":
        state = QSGDState(bits=bits, bucket=bucket, device=next(model.parameters()).device)
        state.reseed(seed)
        model.register_comm_hook(state, qsgd_hook)
        return state
    return None
