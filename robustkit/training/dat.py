"""Distributed adversarial training (DAT; Zhang et al., UAI 2022) on torch.distributed.

``torchrun --nproc-per-node N -m robustkit train dat ...`` runs :func:`train_dat` in every worker
(one process is fine too). Each worker takes its shard of every global batch from a
``DistributedSampler`` (re-seeded every epoch), makes it adversarial itself (``dat``: PGD-10,
``dat-fgsm``: FGSM with a random start; :mod:`robustkit.defenses.dat`), and
``DistributedDataParallel`` averages the gradients, optionally compressed
(:mod:`robustkit.training.compression`). Backend: nccl with CUDA, gloo otherwise. Only rank 0 reads and
writes ``--out`` (checkpoints, metrics, final weights and sidecar, as ``robustkit train``); the
epoch metrics are summed over all workers; the final ``--eval`` is sharded over the workers.

``--batch-size`` is the *global* batch (each of N workers takes batch/N), and every example's
random start depends only on ``(seed, epoch, example index)``, so 1 and N workers compute the
same training up to floating-point summation order, and a run can resume on another worker count.

Defaults (``DATConfig``) and their source in the reference code (dat-2022/dat):

======================  ===================================================================
optimizer ``lamb``       ``main.py``: ``Lamb(lr=args.lr, weight_decay=1e-4, betas=(.9, .999))``;
                         ``lamb.py``: no bias correction, ``||w||`` clamped to 10, eps 1e-6
lr 0.01                  ``main.py`` ``--lr`` default (README commands use 0.01)
weight decay             1e-4 with LAMB, 5e-4 with SGD (momentum 0.9): ``main.py`` (CIFAR)
warmup 5 epochs          ``main.py``: 5 warmup epochs, lr ``(step+1)/(5·steps_per_epoch)``
multistep 75/90/95 %     ``main.py``: CIFAR ``MultiStepLR([75, 90, 95], gamma=0.1)``
lr scaling ``none``      the reference keeps ``--lr`` whatever the batch and worker count
grad compression none    ``main.py`` has the quantizer switched off (``quantization = False``);
                         ``qsgd`` with 8 bits is its ``RandomQuantizer`` (7 bits + sign)
======================  ===================================================================

In the reference the warmup epochs come in front of ``--num-epochs``; here they are the first
``warmup_epochs`` of ``epochs``. Its ``--batch-size`` is per worker; here it is global.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from robustkit import distributed
from robustkit.data import Dataset, images_to_tensor
from robustkit.defenses.adversarial_training import StepOutput
from robustkit.defenses.dat import DAT, UNLABELED
from robustkit.errors import DataError, UsageError, UserError
from robustkit.evaluation.runner import resolve_device
from robustkit.models import ZooModel
from robustkit.models.sidecar import cpu_state, sidecar_path
from robustkit.registry import DEFENSES
from robustkit.training.compression import COMPRESSIONS, check_bucket, levels, register_compression
from robustkit.training.hooks import RunHooks, TrainingHooks, evaluate_checkpoint
from robustkit.training.loop import (
    EMA,
    ProgressFn,
    TrainConfig,
    TrainResult,
    _clone_optimizer_state,
    flat_options,
    train,
)
from robustkit.training.optim import LAMB, make_optimizer

log = logging.getLogger("robustkit.training.loop")

DAT_METHODS = ("dat", "dat-fgsm")
LR_SCALINGS = ("none", "linear", "sqrt")
#: LAMB as in DAT's reference: raw moments (no bias correction), ||w|| clamped to 10 in the trust ratio.
LAMB_OPTIONS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-6, "bias_correction": False, "max_weight_norm": 10.0}
T = TypeVar("T")


def is_dat_method(name: str | None) -> bool:
    """Whether ``name`` (or an alias) is one of the DAT methods that :func:`train_dat` runs."""
    return bool(name) and str(name) in DEFENSES and DEFENSES.canonical(str(name)) in DAT_METHODS


class WorkerLostError(UserError):
    """This worker stopped because another worker died or could not be reached (exit 1)."""


class _Terminated(Exception):
    """SIGTERM arrived (torchrun stops the other workers when one of them fails)."""


# -- configuration --------------------------------------------------------------------------------


@dataclass
class DATOptions:
    """DAT's own options (``robustkit train dat``; module docstring). The peak learning rate is
    ``lr`` times ``batch_size / base_batch_size`` (``lr_scaling="linear"``), its square root
    (``"sqrt"``), or 1 (``"none"``). ``clean_weight`` (None: the method's, 1 for dat and 0 for
    dat-fgsm) weighs the clean CE. ``grad_compression``: none, fp16, bf16 or qsgd with
    ``quant_bits`` bits (sign included) and one norm per parameter gradient (DAT) or per
    ``quant_bucket`` elements (QSGD's bucketing). ``unlabeled``: ``npz:PATH`` of extra images (array
    ``x`` or ``x_<split>``, labels ignored, first ``n_unlabeled``), trained on with the current
    model's pseudo-labels. ``dist_timeout``: seconds a worker waits for the others before it gives up.
    """

    lr_scaling: str = "none"
    base_batch_size: int = 256
    clean_weight: float | None = None
    grad_compression: str = "none"
    quant_bits: int = 8
    quant_bucket: int | None = None
    unlabeled: str | None = None
    n_unlabeled: int | None = None
    dist_timeout: float = 600.0

    def validate(self) -> None:
        if self.lr_scaling not in LR_SCALINGS:
            raise UsageError(f"Unknown --lr-scaling {self.lr_scaling!r}; accepted: {', '.join(LR_SCALINGS)}.")
        batch = self.base_batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UsageError(f"--base-batch-size must be an integer >= 1, got {self.base_batch_size!r}.")
        if self.grad_compression not in COMPRESSIONS:
            raise UsageError(
                f"Unknown --grad-compression {self.grad_compression!r}; accepted: {', '.join(COMPRESSIONS)}."
            )
        levels(self.quant_bits)
        check_bucket(self.quant_bucket)

    def validate_data(self) -> None:
        if self.unlabeled is not None and not str(self.unlabeled).startswith("npz:"):
            raise UsageError(f"--unlabeled takes npz:PATH (an array 'x' of images), got {self.unlabeled!r}.")
        if self.n_unlabeled is not None and (self.unlabeled is None or self.n_unlabeled < 1):
            raise UsageError("--n-unlabeled must be at least 1 and needs --unlabeled npz:PATH.")
        if not (isinstance(self.dist_timeout, int | float) and self.dist_timeout > 0):
            raise UsageError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout!r}.")


@flat_options
@dataclass
class DATConfig(TrainConfig):
    """A :class:`~robustkit.training.loop.TrainConfig` with DAT's defaults (module docstring) and
    its own options in ``dat`` (:class:`DATOptions`; also taken and read flat, e.g.
    ``DATConfig(grad_compression="qsgd")``). ``batch_size`` is global."""

    OPTION_GROUPS = ("trick", "dat")

    method: str = "dat"
    optimizer: str = "lamb"
    lr: float = 0.01
    weight_decay: float | None = None  # type: ignore[assignment]  # None: 1e-4 (lamb) or 5e-4
    schedule: str | None = "multistep"
    milestones: list[float] = field(default_factory=lambda: [0.75, 0.9, 0.95])
    warmup_epochs: float = 5.0
    dat: DATOptions = field(default_factory=DATOptions)

    def validate(self) -> None:
        if not is_dat_method(self.method):
            raise UsageError(f"DATConfig trains {' or '.join(DAT_METHODS)}, not {self.method!r}.")
        super().validate()
        self.dat.validate()
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be non-negative, got {self.weight_decay!r}.")
        self.dat.validate_data()
        if self.on_co == "rollback" or self.co_every:
            raise UsageError("dat checks catastrophic overfitting at epoch ends only, with --on-co continue or stop.")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise UsageError(
                f"--warmup-epochs {self.warmup_epochs:g} (DAT's default is 5) must be shorter than --epochs "
                f"{self.epochs}; pass e.g. --warmup-epochs {max(self.epochs / 5, 0.5):g}."
            )

    def strategy_options(self) -> dict[str, Any]:
        return {**super().strategy_options(), "clean_weight": self.dat.clean_weight}

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 1e-4 if self.optimizer.lower() == "lamb" else 5e-4

    def peak_lr(self) -> float:
        """``lr`` scaled with the global batch (``dat.lr_scaling``)."""
        ratio = self.batch_size / self.dat.base_batch_size
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.dat.lr_scaling]


def make_dat_optimizer(config: DATConfig, model: nn.Module) -> torch.optim.Optimizer:
    """LAMB with the reference's settings (:data:`LAMB_OPTIONS`), or any other optimizer of
    :func:`~robustkit.training.optim.make_optimizer`; weight decay from :meth:`DATConfig.resolved_weight_decay`."""
    decay = config.resolved_weight_decay()
    if config.optimizer.lower() == "lamb":
        params = [p for p in model.parameters() if p.requires_grad]
        return LAMB(params, lr=config.peak_lr(), weight_decay=decay, **LAMB_OPTIONS)
    return make_optimizer(config.optimizer, model, lr=config.peak_lr(), momentum=config.momentum,
                          weight_decay=decay, nesterov=config.nesterov)


# -- data ---------------------------------------------------------------------------------------------


def load_unlabeled(spec: str, like: Dataset, *, split: str = "train", n: int | None = None) -> torch.Tensor:
    """Images of ``npz:PATH`` (array ``x`` or ``x_<split>``; any labels are ignored), first ``n``,
    as float NCHW in [0, 1]; they must have the shape of ``like``'s images."""
    path = Path(spec[4:]).expanduser()
    if not path.is_file():
        raise DataError(f"--unlabeled file not found: {path}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            key = next((k for k in ("x", f"x_{split}") if k in f.files), None)
            if key is None:
                raise DataError(f"{path} must hold an array 'x' (or 'x_{split}') of images; it has {sorted(f.files)}.")
            arr = f[key][:n] if n is not None else f[key]
    except (OSError, ValueError) as e:
        raise DataError(f"Cannot read {path} as an npz archive ({e}).") from None
    x = images_to_tensor(arr, str(path))
    if tuple(x.shape[1:]) != tuple(like.x.shape[1:]):
        raise DataError(f"--unlabeled images are {tuple(x.shape[1:])} but {like.name} images are "
                        f"{tuple(like.x.shape[1:])}.")
    return x


def example_starts(threat: Any, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Random starts drawn per example from a generator seeded with its key, so an example's start
    does not depend on which worker or batch position it lands on."""
    generator = torch.Generator(device=x.device)
    rows = []
    for xi, key in zip(x, keys.tolist(), strict=True):
        generator.manual_seed(int(key))
        rows.append(threat.random_init(xi[None], generator))
    return torch.cat(rows)


def start_keys(epoch_seed: int, indices: torch.Tensor) -> torch.Tensor:
    return (indices.long() + epoch_seed * 1_000_003) % (2**62)


def epoch_indices(n: int, rank: int, world: int, seed: int, epoch: int) -> torch.Tensor:
    """This worker's shard of the epoch's order: ``DistributedSampler`` with ``set_epoch``
    (padded by repeating a few examples when ``n`` is not a multiple of the worker count)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


# -- collective helpers --------------------------------------------------------------------------------


def _from_rank0(fn: Callable[[], T], world: int) -> T:
    """Run ``fn`` on rank 0 and give every rank its value, or raise its user error on every rank."""
    rank = dist.get_rank() if world > 1 else 0
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload[0] = ("ok", fn())
        except UserError as e:
            if world == 1:
                raise
            payload[0] = ("error", type(e), str(e))
    if world > 1:
        dist.broadcast_object_list(payload, src=0)
    if payload[0][0] == "error":
        _, cls, message = payload[0]
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        raise _shared(err)
    return payload[0][1]


def _shared(err: UserError) -> UserError:
    """Mark ``err`` as raised alike by every worker (the CLI prints it on rank 0 only)."""
    err.shared = True  # type: ignore[attr-defined]
    return err


def _local(err: UserError, rank: int, message: str | None = None) -> UserError:
    """Mark ``err`` as this worker's own (the CLI prints it on every rank, not only rank 0)."""
    if message is not None:
        Exception.__init__(err, message)
    err.worker = rank  # type: ignore[attr-defined]
    return err


def _reduce(values: list[float], device: torch.device, world: int, op: str = "sum") -> list[float]:
    """``values`` summed (or their maximum, ``op="max"``) over all workers."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _is_comm_failure(e: BaseException) -> bool:
    """A collective that failed because a peer died or the network broke (not a bug here)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out",
                            "Timed out", "Socket Timeout")
    )  # fmt: skip


def _short_reason(e: BaseException) -> str:
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return text.split(". ")[0].rstrip(".")[:160]


@contextlib.contextmanager
def _sigterm_raises(enabled: bool) -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` (so the worker says why it stops) while training. A
    worker that leaves with an error then ignores SIGTERM: torchrun sends it to every worker once one
    fails, and it must not end this one before it has said why (torchrun kills it after its grace
    period if it does not exit)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    failed = True
    try:
        yield
        failed = False
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if failed else previous)


# -- the run ----------------------------------------------------------------------------------------------


def train_dat(config: DATConfig, *, progress: ProgressFn | None = None, model: ZooModel | None = None) -> TrainResult:
    """Train ``config.model`` with DAT on every worker torchrun started (or in this one process):
    :func:`~robustkit.training.loop.train` with this worker's :class:`DistributedRun`.

    Returns the :class:`~robustkit.training.loop.TrainResult` on every rank; ``weights``, ``sidecar`` and
    ``eval_report`` are set on rank 0 only. ``progress`` is called on rank 0 only. A worker that
    loses the others raises :class:`WorkerLostError` naming the checkpoint to ``--resume`` from.
    """
    config.validate()
    owned = distributed.init_from_env(config.device, timeout_s=config.dat.dist_timeout)
    rank, world = distributed.world()
    run = DistributedRun(config, rank, world)
    try:
        with _sigterm_raises(world > 1):
            result = train(config, progress=progress, model=model, hooks=run)
            if owned:
                distributed.finish()
            return result
    except _Terminated:
        raise _local(WorkerLostError(run.lost_message("torchrun stopped it because another worker failed")),
                     rank) from None
    except UserError as e:
        if world > 1 and not getattr(e, "shared", False):  # this worker's own: say which one
            raise _local(type(e).__new__(type(e)), rank, f"Worker {rank}: {e}") from None
        raise
    except Exception as e:
        if world > 1 and _is_comm_failure(e):
            raise _local(WorkerLostError(run.lost_message(f"it lost the other workers ({_short_reason(e)})")),
                         rank) from None
        raise
    finally:
        if owned:  # after finish() only when failing: leave at once, before torchrun's SIGTERM ends this worker
            distributed.shutdown(collect=False)


class DistributedRun(RunHooks):
    """One DAT worker's run (:class:`~robustkit.training.hooks.RunHooks`): its shard of every
    global batch from a ``DistributedSampler``, per-example random starts, the loss through
    ``DistributedDataParallel`` (optionally compressed), sums over all workers; rank 0 reads and
    writes the files, runs the held-out checks and shares each epoch's row."""

    shares_epochs = True

    def __init__(self, config: DATConfig, rank: int, world: int):
        self.config, self.rank, self.world = config, rank, world
        self.primary = rank == 0
        self.out = Path(config.out).expanduser() if config.out else None
        self.loss_model: nn.Module | None = None
        self.quantizer: Any = None
        self._device = torch.device("cpu")

    def lost_message(self, reason: str) -> str:
        where = f" in {self.out}" if self.out else ""
        if self.checkpointed:
            then = (f"the last checkpoint{where} is after epoch {self.checkpointed}; run the same command "
                    "with --resume to continue from it")
        else:
            then = "no checkpoint was written yet; run the same command again"
        return f"Worker {self.rank} of {self.world} stopped during epoch {self.epoch + 1}: {reason}; {then}."

    # -- the run ---------------------------------------------------------------------------------------
    def device(self, config: TrainConfig) -> torch.device:
        self._device = resolve_device(distributed.local_device(config.device))
        return self._device

    def error(self, err: UserError) -> UserError:
        return _shared(err)

    def check(self, config: TrainConfig) -> None:
        if config.batch_size % self.world:
            raise _shared(UsageError(f"--batch-size {config.batch_size} is the global batch; it must be a multiple "
                                     f"of the {self.world} workers."))

    def training_data(self, config: TrainConfig) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
        data, x, y = super().training_data(config)
        if self.config.dat.unlabeled:
            extra = load_unlabeled(self.config.dat.unlabeled, data, split=config.split, n=self.config.dat.n_unlabeled)
            x = torch.cat([x, extra])
            y = torch.cat([y, torch.full((len(extra),), UNLABELED, dtype=y.dtype)])
        return data, x, y

    def optimizer(self, config: TrainConfig, trained: nn.Module) -> torch.optim.Optimizer:
        return make_dat_optimizer(self.config, trained)

    def peak_lr(self, config: TrainConfig) -> float:
        return self.config.peak_lr()

    def shared(self, fn: Callable[[], T]) -> T:
        return _from_rank0(fn, self.world)

    def resume(self, load: Callable[[], dict[str, Any] | None], optimizer: torch.optim.Optimizer,
               ema: EMA | None) -> dict[str, Any] | None:  # fmt: skip
        """Rank 0 reads the files; the others get its optimizer and EMA state (DDP sends the weights)."""

        def read() -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
            load()
            if self.world == 1:
                return {}, None
            return _clone_optimizer_state(optimizer.state_dict()), cpu_state(ema.state_dict()) if ema else None

        opt_state, ema_state = _from_rank0(read, self.world)
        if self.rank:
            optimizer.load_state_dict(opt_state)
            if ema is not None and ema_state is not None:
                ema.load_state_dict(ema_state)
        return None

    def wrap(self, model: nn.Module, config: TrainConfig) -> None:
        self.loss_model = model
        if self.world > 1:
            ids = [self._device.index] if self._device.type == "cuda" else None
            self.loss_model = DistributedDataParallel(model, device_ids=ids)  # broadcasts rank 0's weights
            opts = self.config.dat
            self.quantizer = register_compression(self.loss_model, opts.grad_compression, bits=opts.quant_bits,
                                                  bucket=opts.quant_bucket, seed=config.seed)
        elif self.config.dat.grad_compression != "none":
            log.warning("--grad-compression %s has no effect with one worker.", self.config.dat.grad_compression)

    def start_info(self, config: TrainConfig) -> dict[str, Any]:
        return {"world_size": self.world, "per_rank_batch": config.batch_size // self.world,
                "backend": dist.get_backend() if self.world > 1 else None}

    def state_extra(self) -> dict[str, Any]:
        return {"world_size": self.world}

    def sidecar_extra(self, config: TrainConfig) -> dict[str, Any]:
        c, opts = self.config, self.config.dat
        qsgd = opts.grad_compression == "qsgd"
        return {"distributed": {
            "world_size": self.world, "backend": dist.get_backend() if self.world > 1 else None,
            "per_rank_batch": c.batch_size // self.world, "grad_compression": opts.grad_compression,
            "quant_bits": opts.quant_bits if qsgd else None, "quant_bucket": opts.quant_bucket if qsgd else None,
            "peak_lr": c.peak_lr(), "weight_decay": c.resolved_weight_decay()}}  # fmt: skip

    def evaluate(self, config: TrainConfig, result: TrainResult, out: Path) -> None:
        """Every worker evaluates its shard of the held-out set (rows written by rank 0), when
        every worker can read the saved weights; otherwise it is skipped with a warning."""
        distributed.barrier()  # rank 0 has written the weights
        weights = out / "model.safetensors"
        visible = weights.is_file() and sidecar_path(weights).is_file()
        if self.world > 1:
            (seen,) = self.reduce([float(visible)])
            visible = seen == self.world
        if not visible:
            log.warning("Skipping --eval: not every worker can read %s (put --out on a shared file system or run "
                        "`robustkit eval --checkpoint %s`).", weights, weights)
            return
        report = evaluate_checkpoint(config, weights, dist_timeout=self.config.dat.dist_timeout)
        if self.rank == 0:
            result.eval_report = report

    # -- the epochs ------------------------------------------------------------------------------------
    def per_process_batch(self, batch_size: int) -> int:
        return batch_size // self.world

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        return math.ceil(math.ceil(n / self.world) / batch_size)

    def begin_epoch(self, epoch: int, epoch_seed: int) -> None:
        self.epoch = epoch
        torch.manual_seed(epoch_seed)
        if self.quantizer is not None:
            self.quantizer.reseed(epoch_seed * 7_919 + self.rank)

    def epoch_order(self, n: int, epoch: int, epoch_seed: int) -> torch.Tensor:
        return epoch_indices(n, self.rank, self.world, self.config.seed, epoch)

    def step(self, strategy: TrainingHooks, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator, idx: torch.Tensor, epoch_seed: int) -> StepOutput:  # fmt: skip
        """Pseudo-labels, an attack from each example's own random start (seeded by its index and the
        epoch), the loss through the DDP wrapper."""
        if not isinstance(strategy, DAT):
            raise UsageError(f"train_dat runs {' or '.join(DAT_METHODS)}, not {strategy.name}.")
        start = example_starts(strategy.threat, x, start_keys(epoch_seed, idx))
        return strategy.step(model, x, y, None, start=start, loss_model=self.loss_model)

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return _reduce(values, self._device, self.world, op)

    def end_epoch(self, model: nn.Module, row: dict[str, Any], totals: dict[str, float]) -> None:
        row.update(world_size=self.world, images_per_s=totals["seen"] / max(row["seconds"], 1e-9))
        if self.config.dat.unlabeled:
            row["pseudo_labeled"] = int(totals["seen"] - totals["labeled"])
