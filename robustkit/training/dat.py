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
import time
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
from robustkit.data import Dataset, images_to_tensor, load_dataset, load_held_out
from robustkit.errors import DataError, UsageError, UserError
from robustkit.evaluation.runner import check_model_fits, resolve_device
from robustkit.models import ZooModel
from robustkit.models.sidecar import cpu_state, sidecar_path, write_text
from robustkit.registry import DEFENSES
from robustkit.training.co_detector import CODetector
from robustkit.training.compression import COMPRESSIONS, check_bucket, levels, register_compression
from robustkit.training.loop import (
    EMA,
    ProgressFn,
    TrainConfig,
    TrainEvent,
    TrainResult,
    _check_resumable,
    _Checkpoints,
    _clone_optimizer_state,
    _epoch_seed,
    _evaluate_final,
    _save_final,
    _write_metrics,
    build_training_model,
)
from robustkit.training.optim import LAMB, lr_factor, make_optimizer

log = logging.getLogger("robustkit.training.loop")

DAT_METHODS = ("dat", "dat-fgsm")
LR_SCALINGS = ("none", "linear", "sqrt")
#: LAMB as in DAT's reference: raw moments (no bias correction), ||w|| clamped to 10 in the trust ratio.
LAMB_OPTIONS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-6, "bias_correction": False, "max_weight_norm": 10.0}
T = TypeVar("T")


def is_dat_method(name: str | None) -> bool:
    """Whether ``name`` (or an alias) is one of the DAT methods that :func:`train_dat` runs."""
    import robustkit.defenses  # noqa: F401 - registers the training methods

    return bool(name) and str(name) in DEFENSES and DEFENSES.canonical(str(name)) in DAT_METHODS


class WorkerLostError(UserError):
    """This worker stopped because another worker died or could not be reached (exit 1)."""


class _Terminated(Exception):
    """SIGTERM arrived (torchrun stops the other workers when one of them fails)."""


# -- configuration --------------------------------------------------------------------------------


@dataclass
class DATConfig(TrainConfig):
    """A :class:`~robustkit.training.loop.TrainConfig` with DAT's defaults and options (module docstring).

    ``batch_size`` is global. The peak learning rate is ``lr`` times ``batch_size /
    base_batch_size`` (``lr_scaling="linear"``), its square root (``"sqrt"``), or 1 (``"none"``).
    ``clean_weight`` (None: the method's, 1 for dat and 0 for dat-fgsm) weighs the clean CE.
    ``grad_compression``: none, fp16, bf16 or qsgd with ``quant_bits`` bits (sign included) and one
    norm per parameter gradient (DAT) or per ``quant_bucket`` elements (QSGD's bucketing).
    ``unlabeled``: ``npz:PATH`` of extra images (array ``x`` or ``x_<split>``, labels ignored,
    first ``n_unlabeled``), trained on with the current model's pseudo-labels. ``dist_timeout``:
    seconds a worker waits for the others before it gives up.
    """

    method: str = "dat"
    optimizer: str = "lamb"
    lr: float = 0.01
    weight_decay: float | None = None  # type: ignore[assignment]  # None: 1e-4 (lamb) or 5e-4
    schedule: str | None = "multistep"
    milestones: list[float] = field(default_factory=lambda: [0.75, 0.9, 0.95])
    warmup_epochs: float = 5.0
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
        if not is_dat_method(self.method):
            raise UsageError(f"DATConfig trains {' or '.join(DAT_METHODS)}, not {self.method!r}.")
        super().validate()
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
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be non-negative, got {self.weight_decay!r}.")
        if self.unlabeled is not None and not str(self.unlabeled).startswith("npz:"):
            raise UsageError(f"--unlabeled takes npz:PATH (an array 'x' of images), got {self.unlabeled!r}.")
        if self.n_unlabeled is not None and (self.unlabeled is None or self.n_unlabeled < 1):
            raise UsageError("--n-unlabeled must be at least 1 and needs --unlabeled npz:PATH.")
        if not (isinstance(self.dist_timeout, int | float) and self.dist_timeout > 0):
            raise UsageError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout!r}.")
        if self.on_co == "rollback" or self.co_every:
            raise UsageError("dat checks catastrophic overfitting at epoch ends only, with --on-co continue or stop.")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise UsageError(
                f"--warmup-epochs {self.warmup_epochs:g} (DAT's default is 5) must be shorter than --epochs "
                f"{self.epochs}; pass e.g. --warmup-epochs {max(self.epochs / 5, 0.5):g}."
            )

    def strategy_options(self) -> dict[str, Any]:
        return {**super().strategy_options(), "clean_weight": self.clean_weight}

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 1e-4 if self.optimizer.lower() == "lamb" else 5e-4

    def peak_lr(self) -> float:
        """``lr`` scaled with the global batch (``lr_scaling``)."""
        ratio = self.batch_size / self.base_batch_size
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]


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


# -- the loop --------------------------------------------------------------------------------------------


def train_dat(config: DATConfig, *, progress: ProgressFn | None = None, model: ZooModel | None = None) -> TrainResult:
    """Train ``config.model`` with DAT on every worker torchrun started (or in this one process).

    Returns the :class:`~robustkit.training.loop.TrainResult` on every rank; ``weights``, ``sidecar`` and
    ``eval_report`` are set on rank 0 only. ``progress`` is called on rank 0 only. A worker that
    loses the others raises :class:`WorkerLostError` naming the checkpoint to ``--resume`` from.
    """
    config.validate()
    owned = distributed.init_from_env(config.device, timeout_s=config.dist_timeout)
    rank, world = distributed.world()
    run = _DATRun(config, rank, world, progress if rank == 0 else None)
    try:
        with _sigterm_raises(world > 1):
            result = run.run(model)
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


class _DATRun:
    """One worker's run: set up, epochs, the files on rank 0, the final evaluation."""

    def __init__(self, config: DATConfig, rank: int, world: int, progress: ProgressFn | None):
        self.config, self.rank, self.world = config, rank, world
        self.emit = progress or (lambda _e: None)
        self.epoch = 0
        self.checkpointed = 0
        self.out = Path(config.out).expanduser() if config.out else None

    def lost_message(self, reason: str) -> str:
        where = f" in {self.out}" if self.out else ""
        if self.checkpointed:
            then = (f"the last checkpoint{where} is after epoch {self.checkpointed}; run the same command "
                    "with --resume to continue from it")
        else:
            then = "no checkpoint was written yet; run the same command again"
        return f"Worker {self.rank} of {self.world} stopped during epoch {self.epoch + 1}: {reason}; {then}."

    # -- set-up ----------------------------------------------------------------------------------
    def _read_checkpoint(self, ckpts: _Checkpoints | None) -> dict[str, Any] | None:
        config = self.config
        if ckpts is None or not ckpts.exists():
            if config.resume:
                log.warning("--resume: %s holds no checkpoint; starting a new run.", self.out)
            return None
        if not config.resume:
            raise UsageError(
                f"{self.out} already holds a training run; pass --resume to continue it or choose another --out."
            )
        saved = ckpts.read_state()
        _check_resumable({**saved.get("config", {}), "dist_timeout": config.dist_timeout}, config)
        return saved

    def _data(self) -> tuple[Dataset, torch.Tensor, torch.Tensor, Dataset | None]:
        config = self.config
        data = load_dataset(config.dataset, data_dir=config.data_dir, split=config.split, n_examples=config.n_examples)
        x, y = data.x, data.y
        if config.unlabeled:
            extra = load_unlabeled(config.unlabeled, data, split=config.split, n=config.n_unlabeled)
            from robustkit.defenses.dat import UNLABELED

            x = torch.cat([x, extra])
            y = torch.cat([y, torch.full((len(extra),), UNLABELED, dtype=y.dtype)])
        val = None
        if config.val_size and self.rank == 0:
            val = load_held_out(config.val_dataset or config.dataset, data_dir=config.data_dir,
                                split=config.val_split, size=config.val_size)
        return data, x, y, val

    # -- the run ------------------------------------------------------------------------------------
    def run(self, model: ZooModel | None) -> TrainResult:
        from robustkit.defenses.adversarial_training import build_strategy

        config, rank, world = self.config, self.rank, self.world
        device = resolve_device(distributed.local_device(config.device))
        if config.autocast == "fp16" and device.type != "cuda":
            raise _shared(UsageError("fp16 autocast needs a CUDA device; use --autocast bf16 on the CPU."))
        if config.batch_size % world:
            raise _shared(UsageError(f"--batch-size {config.batch_size} is the global batch; it must be a multiple "
                                     f"of the {world} workers."))
        per_rank = config.batch_size // world
        threat = config.threat()
        strategy = build_strategy(config.method, threat, **config.strategy_options())
        schedule = config.resolved_schedule()
        ckpts = _Checkpoints(self.out) if self.out else None
        saved = _from_rank0(lambda: self._read_checkpoint(ckpts), world)

        data, train_x, train_y, val = self._data()
        torch.manual_seed(config.seed)
        zoo = model if model is not None else build_training_model(config, data)
        if not isinstance(zoo, ZooModel):
            raise UsageError("train_dat(model=...) takes a ZooModel (from load_model or build_training_model).")
        architecture = strategy.prepare_model(zoo, data.x[:2])
        check_model_fits(zoo, data, torch.device("cpu"))
        zoo.to(device)
        if config.channels_last:
            zoo.to(memory_format=torch.channels_last)
        zoo.train()
        optimizer = make_dat_optimizer(config, zoo)
        ema = EMA(zoo, config.ema) if config.ema else None
        detector = None
        if val is not None:
            detector = CODetector(threat, val.x.to(device), val.y.to(device), ratio=config.co_ratio, gap=config.co_gap,
                                  min_best=config.co_min_best, patience=config.co_patience, seed=config.seed)
        scaler = torch.amp.GradScaler("cuda") if config.autocast == "fp16" else None

        start_epoch, global_step, stopped = 0, 0, False
        history: list[dict[str, Any]] = []
        if saved is not None:

            def load() -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
                assert ckpts is not None and saved is not None
                ckpts.load(saved, zoo, optimizer, ema)
                if detector is not None:
                    detector.load_state_dict(saved.get("detector", {}))
                log.info("Resuming %s from epoch %d.", self.out, int(saved["epoch"]))
                if world == 1:
                    return {}, None
                return _clone_optimizer_state(optimizer.state_dict()), cpu_state(ema.state_dict()) if ema else None

            # rank 0 reads the files; the others get its optimizer and EMA state (DDP sends the weights)
            opt_state, ema_state = _from_rank0(load, world)
            if rank:
                optimizer.load_state_dict(opt_state)
                if ema is not None and ema_state is not None:
                    ema.load_state_dict(ema_state)
            start_epoch, global_step = int(saved["epoch"]), int(saved["global_step"])
            stopped = bool(saved.get("stopped", False))
            history = list(saved.get("history", []))
            self.checkpointed = start_epoch
        if rank == 0 and self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "config.yaml", config.to_yaml())

        loss_model: nn.Module = zoo
        quantizer = None
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            loss_model = DistributedDataParallel(zoo, device_ids=ids)  # broadcasts rank 0's weights
            quantizer = register_compression(loss_model, config.grad_compression, bits=config.quant_bits,
                                             bucket=config.quant_bucket, seed=config.seed)
        elif config.grad_compression != "none":
            log.warning("--grad-compression %s has no effect with one worker.", config.grad_compression)

        n = len(train_y)
        steps_per_epoch = math.ceil(math.ceil(n / world) / per_rank)
        peak = config.peak_lr()
        self.emit(TrainEvent("start", start_epoch, config.epochs, 0, steps_per_epoch, info={
            "method": strategy.name, "device": str(device), "n": n, "schedule": schedule, "world_size": world,
            "per_rank_batch": per_rank, "backend": dist.get_backend() if world > 1 else None}))  # fmt: skip

        def autocast_ctx() -> contextlib.AbstractContextManager:
            if not config.autocast:
                return contextlib.nullcontext()
            dtype = torch.bfloat16 if config.autocast == "bf16" else torch.float16
            return torch.autocast(device.type, dtype=dtype)

        last_lr = peak
        for epoch in range(start_epoch, config.epochs):
            if stopped:
                break
            self.epoch = epoch
            seed = _epoch_seed(config.seed, epoch)
            torch.manual_seed(seed)
            if quantizer is not None:
                quantizer.reseed(seed * 7_919 + rank)
            order = epoch_indices(n, rank, world, config.seed, epoch)
            zoo.train()
            t_start = time.perf_counter()
            sums: dict[str, float] = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "labeled": 0.0}
            for b in range(steps_per_epoch):
                idx = order[b * per_rank : (b + 1) * per_rank]
                x = train_x[idx].to(device, non_blocking=True)
                y = train_y[idx].to(device, non_blocking=True)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                progress_epochs = epoch + b / steps_per_epoch
                last_lr = peak * lr_factor(schedule, progress_epochs, config.epochs, milestones=config.milestones,
                                           gamma=config.gamma, warmup_epochs=config.warmup_epochs)
                for group in optimizer.param_groups:
                    group["lr"] = last_lr
                if config.eps_warmup_epochs:
                    ramp = min(1.0, (progress_epochs + 1 / steps_per_epoch) / config.eps_warmup_epochs)
                    strategy.set_eps(config.eps * ramp)
                start = example_starts(strategy.threat, x, start_keys(seed, idx))
                with autocast_ctx():
                    result = strategy.step(zoo, x, y, None, start=start, loss_model=loss_model)  # type: ignore[call-arg]
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(result.loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    result.loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(zoo.parameters(), config.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if ema is not None:
                    ema.update(zoo)
                global_step += 1
                batch_loss = float(result.loss.detach())
                labeled = y >= 0
                sums["loss"] += batch_loss * len(y)
                sums["correct"] += float(((result.logits.argmax(1) == y) & labeled).sum())
                sums["seen"] += len(y)
                sums["labeled"] += float(labeled.sum())
                for k, v in result.parts.items():
                    sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + v * len(y)
                self.emit(TrainEvent("step", epoch, config.epochs, b + 1, steps_per_epoch, batch_loss,
                                     {"lr": last_lr}))
            seconds = time.perf_counter() - t_start
            keys = sorted(sums)
            totals = dict(zip(keys, _reduce([sums[k] for k in keys], device, world), strict=True))
            (seconds,) = _reduce([seconds], device, world, op="max")
            row: dict[str, Any] = {
                "epoch": epoch + 1, "steps": global_step, "lr": last_lr,
                "loss": totals["loss"] / max(totals["seen"], 1),
                "train_acc": totals["correct"] / max(totals["labeled"], 1), "clean_acc": float("nan"),
                "fgsm_acc": float("nan"), "pgd_acc": float("nan"), "co": False, "co_reason": "", "seconds": seconds,
                "eval_seconds": 0.0, "rollbacks": 0, "world_size": world,
                "images_per_s": totals["seen"] / max(seconds, 1e-9),
            }  # fmt: skip
            if config.unlabeled:
                row["pseudo_labeled"] = int(totals["seen"] - totals["labeled"])
            for k in keys:
                if k.startswith("loss_"):
                    row[k] = totals[k] / max(totals["seen"], 1)
            if rank == 0:
                stopped = self._end_epoch(zoo, epoch, row, detector, global_step, steps_per_epoch)
                history.append(row)
                if ckpts is not None and self.out is not None:
                    state = {
                        "epoch": epoch + 1, "global_step": global_step, "lr_scale": 1.0, "rollbacks": 0,
                        "stopped": stopped, "history": history, "config": config.to_dict(),
                        "detector": detector.state_dict() if detector else {}, "healthy_best_pgd": None,
                        "world_size": world,
                    }  # fmt: skip
                    ckpts.save(epoch + 1, state, zoo, optimizer, ema, None)
                    self.checkpointed = self.epoch = epoch + 1  # a failure from here on is past this epoch
                    _write_metrics(self.out, history, detector.history if detector else [],
                                   {"co_detected": bool(detector and detector.flagged), "stopped_early": stopped})
            last, stopped = _from_rank0(lambda stop=stopped: (history[-1], stop), world)
            if rank:
                history.append(last)
            if self.out is not None:
                self.checkpointed = epoch + 1
            self.emit(TrainEvent("epoch", epoch, config.epochs, steps_per_epoch, steps_per_epoch, row["loss"],
                                 info=history[-1]))

        return self._finish(zoo, ema, detector, history, stopped, data, val, architecture, strategy, schedule,
                            steps_per_epoch)

    def _end_epoch(self, zoo: nn.Module, epoch: int, row: dict[str, Any], detector: CODetector | None,
                   global_step: int, steps: int) -> bool:  # fmt: skip
        """Rank 0: held-out clean/FGSM/PGD accuracy and the CO verdict; returns whether to stop."""
        if detector is None:
            return False
        config = self.config
        t0 = time.perf_counter()
        check = detector.check(zoo, epoch + 1, global_step)
        zoo.train()
        row.update(clean_acc=check.clean_acc, fgsm_acc=check.fgsm_acc, pgd_acc=check.pgd_acc,
                   eval_seconds=time.perf_counter() - t0, co=check.flagged,
                   co_reason=check.reason if check.flagged else "")
        self.emit(TrainEvent("check", epoch, config.epochs, global_step, steps, info=check.as_dict()))
        if not check.flagged:
            return False
        log.warning("Catastrophic overfitting at epoch %d: %s.", epoch + 1, check.reason)
        self.emit(TrainEvent("co", epoch, config.epochs, global_step, steps, info=check.as_dict()))
        return config.on_co == "stop"

    def _finish(self, zoo: ZooModel, ema: EMA | None, detector: CODetector | None, history: list[dict[str, Any]],
                stopped: bool, data: Dataset, val: Dataset | None, architecture: list[dict[str, Any]],
                strategy: Any, schedule: str, steps: int) -> TrainResult:  # fmt: skip
        config, rank, world = self.config, self.rank, self.world
        if ema is not None:
            zoo.load_state_dict(ema.state_dict())
        zoo.eval()
        checks = detector.history if detector else []
        result = TrainResult(config=config, model=zoo, history=history, checks=checks,
                             co_detected=any(c.flagged for c in checks) or any(r.get("co") for r in history),
                             stopped_early=stopped, architecture=architecture)
        if rank == 0 and self.out is not None:
            _write_metrics(self.out, history, checks, {"co_detected": result.co_detected, "stopped_early": stopped})
            result.weights, result.sidecar = _save_final(self.out, config, zoo, data, val, architecture, strategy,
                                                         schedule, history, result)
            _add_to_sidecar(result.sidecar, {"distributed": {
                "world_size": world, "backend": dist.get_backend() if world > 1 else None,
                "per_rank_batch": config.batch_size // world, "grad_compression": config.grad_compression,
                "quant_bits": config.quant_bits if config.grad_compression == "qsgd" else None,
                "quant_bucket": config.quant_bucket if config.grad_compression == "qsgd" else None,
                "peak_lr": config.peak_lr(), "weight_decay": config.resolved_weight_decay()}})  # fmt: skip
        if config.eval_attacks and self.out is not None:
            self._evaluate(result)
        self.emit(TrainEvent("end", len(history), config.epochs, steps, steps,
                             info={"co_detected": result.co_detected, "stopped_early": stopped}))
        return result

    def _evaluate(self, result: TrainResult) -> None:
        """``--eval``: every worker evaluates its shard of the held-out set (rows written by rank 0),
        when every worker can read the saved weights; otherwise it is skipped with a warning."""
        assert self.out is not None
        distributed.barrier()  # rank 0 has written the weights
        weights = self.out / "model.safetensors"
        visible = weights.is_file() and sidecar_path(weights).is_file()
        if self.world > 1:
            device = resolve_device(distributed.local_device(self.config.device))
            (visible,) = _reduce([float(visible)], device, self.world)
            visible = visible == self.world
        if not visible:
            log.warning("Skipping --eval: not every worker can read %s (put --out on a shared file system or run "
                        "`robustkit eval --checkpoint %s`).", weights, weights)
            return
        if result.weights is None:
            result.weights = weights
        report = _evaluate_final(self.config, result)
        if self.rank == 0:
            result.eval_report = report
        else:
            result.weights = None


def _add_to_sidecar(path: Path | None, extra: dict[str, Any]) -> None:
    import json

    if path is None:
        return
    side = json.loads(path.read_text())
    side.update(extra)
    write_text(path, json.dumps(side, indent=1, default=str))
