"""The training loop: a :class:`TrainConfig` in, a trained model, metrics and files out.

Training methods are strategies registered in ``DEFENSES`` with ``kind = "training"``
(``defenses/adversarial_training.py``); the loop here owns everything else — data order, the
optimizer and its schedule, autocast, channels_last, gradient clipping, EMA weights, the
catastrophic-overfitting detector, per-epoch checkpoints with resume, metrics files, and the
final ``.safetensors`` weights with a JSON sidecar that ``read_sidecar`` reads back.
:class:`EpochLoop` is the one loop (DAT, RiFT's fine-tuning and prompting run it too, through
their :class:`~robustkit.training.hooks.RunHooks`); :func:`train` runs it with checkpoints
(:mod:`robustkit.training.checkpoints`) for a :class:`~robustkit.training.config.TrainConfig`.

Files written under ``config.out``::

    config.yaml                      the resolved configuration (``--config`` reads it back)
    metrics.csv, metrics.json        one row per epoch (+ every CO check in the JSON)
    checkpoint/state.json            progress, detector state, history; points at the latest
    checkpoint/epoch-NNNN/           model.safetensors, optimizer.pt (weights_only), ema.safetensors,
                                     aux.safetensors (a strategy's extra trained modules)
    model.safetensors, model.json    final network weights and their sidecar
    projection.safetensors           the extra modules, named by the strategy (distillation's projections)

Determinism: the global RNG, the data order and the attacks' generator are re-seeded from
``(seed, epoch)`` at every epoch start and the learning rate is a pure function of progress, so a
run resumed from its last epoch checkpoint ends with the same weights as an uninterrupted one
(on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.data import Dataset
from robustkit.errors import UsageError
from robustkit.evaluation.runner import check_model_fits
from robustkit.models import (
    ZooModel,
    build_model,
    file_sha256,
    is_external,
    load_model,
    model_info,
)
from robustkit.models.normalize import training_normalize
from robustkit.models.sidecar import (
    SIDECAR_FORMAT,
    cpu_state,
    normalize_spec,
    save_safetensors,
    sidecar_path,
    versions,
    write_text,
)
from robustkit.registry import MODELS
from robustkit.training.checkpoints import (
    EMA,
    _Checkpoints,
    _clone_optimizer_state,
    _write_metrics,
    check_resumable,
)
from robustkit.training.co_detector import COCheck, CODetector
from robustkit.training.config import TrainConfig, flat_options
from robustkit.training.hooks import RunHooks, TrainingHooks
from robustkit.training.mixing import make_mixer
from robustkit.training.optim import lr_factor

log = logging.getLogger("robustkit.training.loop")

#: TrainConfig, flat_options (training/config.py) and EMA (training/checkpoints.py) are imported from here too.
__all__ = ["EMA", "EpochLoop", "TrainConfig", "TrainEvent", "TrainResult", "build_training_model", "flat_options",
           "train"]

MAX_ROLLBACKS = 3


# -- results and progress ------------------------------------------------------------------------


@dataclass
class TrainEvent:
    """What ``progress`` receives: ``kind`` is start, step, check, co, epoch or end."""

    kind: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """The trained model (final weights: EMA ones when enabled) and what happened."""

    config: TrainConfig
    model: ZooModel
    history: list[dict[str, Any]]
    checks: list[COCheck]
    co_detected: bool
    stopped_early: bool
    weights: Path | None = None
    sidecar: Path | None = None
    architecture: list[dict[str, Any]] = field(default_factory=list)
    eval_report: Any = None
    aux: nn.Module | None = None
    aux_weights: Path | None = None


# -- helpers ---------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


def _fingerprint(data: Dataset) -> str:
    digest = hashlib.sha256()
    digest.update(data.x.numpy().tobytes())
    digest.update(data.y.numpy().tobytes())
    return digest.hexdigest()


def build_training_model(config: TrainConfig, data: Dataset) -> ZooModel:
    """A fresh (or ``config.checkpoint``-initialized) ZooModel for ``data``: classes and input
    channels from the data, the normalization ``config.normalize`` asks for in front."""
    key = config.model if is_external(config.model) else MODELS.canonical(config.model)
    info = model_info(key)
    channels = int(data.x.shape[1])
    if config.checkpoint:
        zoo = load_model(key, config.checkpoint, normalize=config.normalize, num_classes=data.num_classes)
        return zoo.train()
    in_channels = channels if channels != info.input_size[0] else None
    net = build_model(key, num_classes=data.num_classes, in_channels=in_channels)
    layer, note = training_normalize(config.normalize, info.normalize, channels, key, data.name)
    if note:
        log.warning(note)
    return ZooModel(key, info, net, layer).train()


# -- the loop --------------------------------------------------------------------------------------


class EpochLoop:
    """The one training loop: per epoch the order and generator of ``hooks``, per batch optional
    mixing, the learning rate (schedule x rollback scale), the eps warm-up, the method's step
    under optional autocast, backward (GradScaler for fp16), clip, optimizer step and EMA. The
    sums of loss, correct labels and loss parts come back combined over all processes.

    :func:`train` runs it with checkpoints, resume, the CO detector and the final files; RiFT's
    fine-tuning and prompt training run it with their own :class:`RunHooks`.
    """

    def __init__(
        self, config: TrainConfig, model: nn.Module, strategy: TrainingHooks, optimizer: torch.optim.Optimizer,
        x: torch.Tensor, y: torch.Tensor, *, device: torch.device, hooks: RunHooks | None = None,
        schedule: str | None = None, peak_lr: float | None = None, trained: nn.Module | None = None,
        ema: EMA | None = None, mixer: Any = None, soft_ok: bool = True, emit: ProgressFn | None = None,
    ):  # fmt: skip
        self.config, self.model, self.strategy, self.optimizer = config, model, strategy, optimizer
        self.x, self.y, self.device = x, y, device
        self.hooks = hooks or RunHooks()
        self.schedule = schedule or config.schedule or strategy.default_schedule
        self.peak_lr = config.lr if peak_lr is None else peak_lr
        self.trained = trained if trained is not None else model
        self.ema, self.mixer, self.soft_ok = ema, mixer, soft_ok
        self.emit = emit or (lambda _e: None)
        self.batch_size = self.hooks.per_process_batch(config.batch_size)
        self.steps = self.hooks.steps_per_epoch(len(y), self.batch_size)
        self.scaler = torch.amp.GradScaler("cuda") if config.autocast == "fp16" else None
        self.global_step = 0
        self.lr_scale = 1.0
        self.last_lr = self.peak_lr * self.lr_scale

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.config.autocast:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _factor(self, progress: float) -> float:
        c = self.config
        return lr_factor(self.schedule, progress, c.epochs, milestones=c.milestones, gamma=c.gamma,
                         warmup_epochs=c.warmup_epochs)

    def run_epoch(self, epoch: int, after_step: Callable[[int], bool] | None = None) -> tuple[dict[str, float], bool]:
        """Train one epoch; ``after_step(b)`` may stop it early (returns True). Returns the sums
        (``loss``, ``correct``, ``seen``, ``labeled``, ``loss_<part>``) over all processes and
        whether ``after_step`` stopped the epoch."""
        config, hooks, model, optimizer = self.config, self.hooks, self.model, self.optimizer
        seed = _epoch_seed(config.seed, epoch)
        hooks.begin_epoch(epoch, seed)
        order = hooks.epoch_order(len(self.y), epoch, seed)
        generator = hooks.generator(seed, self.device)
        mix_gen = torch.Generator().manual_seed(seed + 2) if self.mixer is not None else None
        hooks.train_mode(model)
        aux = self.strategy.aux
        if aux is not None:
            aux.train()
        sums: dict[str, float] = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "labeled": 0.0}
        stopped = False
        for b in range(self.steps):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb, yb = hooks.load_batch(self.x, self.y, idx)
            x = xb.to(self.device, non_blocking=True)
            y = yb.to(self.device, non_blocking=True)
            target: torch.Tensor = y
            if self.mixer is not None:
                x, target = self.mixer(x, y, mix_gen)
                y = target.argmax(1)  # the dominant label: train accuracy (and hard-label methods)
                if not self.soft_ok:
                    target = y
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            progress_epochs = epoch + b / self.steps
            self.last_lr = self.peak_lr * self.lr_scale * hooks.lr_factor(self._factor, progress_epochs)
            for group in optimizer.param_groups:
                group["lr"] = self.last_lr
            if config.eps_warmup_epochs:
                ramp = min(1.0, (progress_epochs + 1 / self.steps) / config.eps_warmup_epochs)
                self.strategy.set_eps(config.eps * ramp)
            with self.autocast():
                result = hooks.step(self.strategy, model, x, target, generator, idx, seed)
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(result.loss).backward()
                self.scaler.unscale_(optimizer)
            else:
                result.loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trained.parameters(), config.grad_clip)
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            if self.ema is not None:
                self.ema.update(model)
            self.global_step += 1
            batch_loss = float(result.loss.detach())
            if not math.isfinite(batch_loss):
                log.warning("Non-finite loss at epoch %d, step %d.", epoch + 1, self.global_step)
            labeled = y >= 0  # DAT's unlabeled examples (label -1) train on pseudo-labels
            sums["loss"] += batch_loss * len(y)
            sums["correct"] += float(((result.logits.argmax(1) == y) & labeled).sum())
            sums["seen"] += len(y)
            sums["labeled"] += float(labeled.sum())
            for k, v in result.parts.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + v * len(y)
            self.emit(TrainEvent("step", epoch, config.epochs, b + 1, self.steps, batch_loss, {"lr": self.last_lr}))
            if after_step is not None and after_step(b):
                stopped = True
                break
        keys = sorted(sums)
        return dict(zip(keys, hooks.reduce([sums[k] for k in keys]), strict=True)), stopped


def _read_checkpoint(ckpts: _Checkpoints | None, config: TrainConfig, out: Path | None) -> dict[str, Any] | None:
    """The interrupted run's state to resume (None: start afresh); a one-line error when ``out``
    holds a run and ``--resume`` is not given, or when the options differ."""
    if ckpts is None or not ckpts.exists():
        if config.resume:
            log.warning("--resume: %s holds no checkpoint; starting a new run.", out)
        return None
    if not config.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it or choose another --out.")
    saved = ckpts.read_state()
    check_resumable(saved.get("config", {}), config.to_dict())
    return saved


def train(config: TrainConfig, *, progress: ProgressFn | None = None, model: ZooModel | None = None,
          hooks: RunHooks | None = None) -> TrainResult:
    """Train ``config.model`` with ``config.method``; see the module docstring for the files.

    ``model`` replaces building from ``config.model`` (e.g. a ZooModel from ``load_model``).
    ``progress(event)`` receives :class:`TrainEvent` objects (steps, checks, epochs). ``hooks``
    is how the run differs from the standard one (:class:`~robustkit.training.hooks.RunHooks`; DAT's
    :class:`~robustkit.training.dat.DistributedRun` under torchrun).
    """
    config.validate()
    run = hooks or RunHooks()
    emit = (progress or (lambda _e: None)) if run.primary else (lambda _e: None)
    device = run.device(config)
    if config.autocast == "fp16" and device.type != "cuda":
        raise run.error(UsageError("fp16 autocast needs a CUDA device; use --autocast bf16 on the CPU."))
    run.check(config)
    threat = config.threat()
    strategy = config.make_strategy()
    if config.same_budget:
        config = _same_budget(config, strategy)
    schedule = config.schedule or strategy.default_schedule

    out = Path(config.out).expanduser() if config.out else None
    ckpts = _Checkpoints(out) if out else None
    saved = run.shared(lambda: _read_checkpoint(ckpts, config, out))

    data, train_x, train_y = run.training_data(config)
    val = config.held_out() if run.primary else None

    torch.manual_seed(config.seed)
    zoo = model if model is not None else build_training_model(config, data)
    if not isinstance(zoo, ZooModel):
        raise UsageError("train(model=...) takes a ZooModel (from load_model or build_training_model).")
    sample = data.x[:2]
    architecture = strategy.prepare_model(zoo, sample)
    check_model_fits(zoo, data, torch.device("cpu"))
    zoo.to(device)
    if config.channels_last:
        zoo.to(memory_format=torch.channels_last)
    zoo.train()
    # extra trained modules a strategy owns (distillation's projections): optimized with the model
    aux = strategy.aux
    trained: nn.Module = zoo
    if aux is not None:
        aux.to(device).train()
        trained = nn.ModuleList([zoo, aux])
    optimizer = run.optimizer(config, trained)
    mixer = make_mixer(config.mix, data.num_classes, config.mix_alpha)
    soft_ok = mixer is None or strategy.soft_targets
    if not soft_ok:
        log.warning("%s trains on hard labels; with --mix it gets each mixed image's dominant label.", strategy.name)
    ema = EMA(zoo, config.ema) if config.ema else None
    detector = None
    if val is not None:
        detector = CODetector(threat, val.x.to(device), val.y.to(device), ratio=config.co_ratio, gap=config.co_gap,
                              min_best=config.co_min_best, patience=config.co_patience, seed=config.seed)
    loop = EpochLoop(config, zoo, strategy, optimizer, train_x, train_y, device=device, hooks=run, schedule=schedule,
                     peak_lr=run.peak_lr(config), trained=trained, ema=ema, mixer=mixer, soft_ok=soft_ok, emit=emit)

    n = len(train_y)
    steps_per_epoch = loop.steps
    start_epoch, rollbacks, stopped = 0, 0, False
    history: list[dict[str, Any]] = []
    healthy: dict[str, Any] | None = None
    if saved is not None and ckpts is not None:

        def load() -> dict[str, Any] | None:
            assert ckpts is not None and saved is not None
            return ckpts.load(saved, zoo, optimizer, ema, aux)

        healthy = run.resume(load, optimizer, ema)
        start_epoch = int(saved["epoch"])
        loop.global_step = int(saved["global_step"])
        loop.lr_scale = float(saved.get("lr_scale", 1.0))
        rollbacks = int(saved.get("rollbacks", 0))
        stopped = bool(saved.get("stopped", False))
        history = list(saved.get("history", []))
        if detector is not None:
            detector.load_state_dict(saved.get("detector", {}))
        log.info("Resuming %s from epoch %d.", out, start_epoch)
        run.checkpointed = start_epoch
    if out and run.primary:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", config.to_yaml())
    run.wrap(zoo, config)

    emit(TrainEvent("start", start_epoch, config.epochs, 0, steps_per_epoch,
                    info={"method": strategy.name, "device": str(device), "n": n, "schedule": schedule,
                          **run.start_info(config)}))

    def snapshot(best: float) -> dict[str, Any]:
        return {
            "model": cpu_state(zoo.state_dict()),
            "optimizer": _clone_optimizer_state(optimizer.state_dict()),
            "ema": cpu_state(ema.state_dict()) if ema else None,
            "aux": cpu_state(aux.state_dict()) if aux is not None else None,
            "best_pgd": best,
        }

    def handle(check: COCheck, epoch: int) -> str:
        """React to one detector verdict; returns "stop", "rolled-back" or ""."""
        nonlocal healthy, rollbacks
        emit(TrainEvent("check", epoch, config.epochs, loop.global_step, steps_per_epoch, info=check.as_dict()))
        if not check.flagged:
            if config.on_co == "rollback" and not check.suspect:
                healthy = snapshot(check.best_pgd)
            return ""
        log.warning("Catastrophic overfitting at epoch %d, step %d: %s.", epoch + 1, check.step, check.reason)
        emit(TrainEvent("co", epoch, config.epochs, loop.global_step, steps_per_epoch, info=check.as_dict()))
        if config.on_co == "stop":
            return "stop"
        if config.on_co == "rollback":
            if healthy is None or rollbacks >= MAX_ROLLBACKS:
                log.warning("No rollback left (%d done); stopping.", rollbacks)
                return "stop"
            zoo.load_state_dict({k: v.to(device) for k, v in healthy["model"].items()})
            if aux is not None and healthy.get("aux") is not None:
                aux.load_state_dict({k: v.to(device) for k, v in healthy["aux"].items()})
            optimizer.load_state_dict(_clone_optimizer_state(healthy["optimizer"]))
            if ema is not None and healthy.get("ema") is not None:
                ema.load_state_dict(healthy["ema"])
            rollbacks += 1
            loop.lr_scale *= 0.5
            assert detector is not None
            detector.reset_best(float(healthy["best_pgd"]))
            log.warning("Rolled back to the last healthy weights; learning rate halved (x%g).", loop.lr_scale)
            return "rolled-back"
        return ""

    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        run.epoch = epoch
        t_start = time.perf_counter()
        check_seconds = 0.0
        epoch_checks: list[COCheck] = []

        def after_step(b: int, epoch: int = epoch, epoch_checks: list[COCheck] = epoch_checks) -> bool:
            """The every-``co_every``-steps check (not after the epoch's last step: the epoch end checks)."""
            nonlocal check_seconds
            due = config.co_every and loop.global_step % config.co_every == 0 and b + 1 < steps_per_epoch
            if detector is None or not due:
                return False
            t0 = time.perf_counter()
            check = detector.check(zoo, epoch + 1, loop.global_step)
            epoch_checks.append(check)
            action = handle(check, epoch)
            run.train_mode(zoo)
            check_seconds += time.perf_counter() - t0
            return action == "stop"

        totals, stopped = loop.run_epoch(epoch, after_step)
        (train_seconds,) = run.reduce([time.perf_counter() - t_start - check_seconds], op="max")
        seen = max(totals["seen"], 1)
        row: dict[str, Any] = {
            "epoch": epoch + 1, "steps": loop.global_step, "lr": loop.last_lr, "loss": totals["loss"] / seen,
            "train_acc": totals["correct"] / max(totals["labeled"], 1), "clean_acc": float("nan"),
            "fgsm_acc": float("nan"), "pgd_acc": float("nan"), "co": False, "co_reason": "", "seconds": train_seconds,
            "eval_seconds": check_seconds, "rollbacks": rollbacks,
        }  # fmt: skip
        for k in sorted(totals):
            if k.startswith("loss_"):
                row[k] = totals[k] / seen
        if detector is not None:
            t0 = time.perf_counter()
            check = detector.check(zoo, epoch + 1, loop.global_step)
            epoch_checks.append(check)
            action = handle(check, epoch) if not stopped else ""
            stopped = stopped or action == "stop"
            row.update(clean_acc=check.clean_acc, fgsm_acc=check.fgsm_acc, pgd_acc=check.pgd_acc)
            row["eval_seconds"] = check_seconds + time.perf_counter() - t0
        flagged = [c for c in epoch_checks if c.flagged]
        row["co"] = bool(flagged)
        row["co_reason"] = flagged[0].reason if flagged else ""
        row["rollbacks"] = rollbacks
        run.end_epoch(zoo, row, totals)
        if run.primary:
            history.append(row)
            if ckpts is not None and out is not None:
                state = {
                    "epoch": epoch + 1, "global_step": loop.global_step, "lr_scale": loop.lr_scale,
                    "rollbacks": rollbacks, "stopped": stopped, "history": history, "config": config.to_dict(),
                    "detector": detector.state_dict() if detector else {},
                    "healthy_best_pgd": healthy["best_pgd"] if healthy else None, **run.state_extra(),
                }  # fmt: skip
                ckpts.save(epoch + 1, state, zoo, optimizer, ema, healthy if config.on_co == "rollback" else None, aux)
                run.checkpointed = epoch + 1
                _write_metrics(out, history, detector.history if detector else [], _metrics_extra(detector, stopped))
        if run.shares_epochs:
            row, stopped = run.shared(lambda row=row, stopped=stopped: (row, stopped))
            if not run.primary:
                history.append(row)
            if out is not None:
                run.checkpointed = epoch + 1
        emit(TrainEvent("epoch", epoch, config.epochs, steps_per_epoch, steps_per_epoch, row["loss"], info=row))

    if ema is not None:
        zoo.load_state_dict(ema.state_dict())
    zoo.eval()
    checks = detector.history if detector else []
    result = TrainResult(
        config=config, model=zoo, history=history, checks=checks,
        co_detected=any(c.flagged for c in checks) or any(bool(r.get("co")) for r in history),
        stopped_early=stopped, architecture=architecture, aux=aux.eval() if aux is not None else None,
    )  # fmt: skip
    if out is not None:
        if run.primary:
            _write_metrics(out, history, checks, {"co_detected": result.co_detected, "stopped_early": stopped})
            result.weights, result.sidecar = _save_final(out, config, zoo, data, val, architecture, strategy,
                                                         schedule, history, result, run.sidecar_extra(config))
        if config.eval_attacks:
            run.evaluate(config, result, out)
    emit(TrainEvent("end", len(history), config.epochs, steps_per_epoch, steps_per_epoch,
                    info={"co_detected": result.co_detected, "stopped_early": stopped}))
    return result


def _same_budget(config: TrainConfig, strategy: TrainingHooks) -> TrainConfig:
    """``--same-budget``: the run shortened to the image passes of standard training, as the
    Fast AdvProp reference's ``exact_same_training_budget`` (epochs ÷ passes per image, rounded).
    The returned config is the run as it happens (``same_budget`` off), so a saved config reruns it."""
    passes = strategy.passes_per_image()
    if passes is None:
        raise UsageError(f"--same-budget needs a method that states its cost per image (advprop, fast-advprop), "
                         f"not {config.method}.")
    epochs = max(1, round(config.epochs / passes))
    log.info("--same-budget: %.3g passes per image, %d epochs -> %d.", passes, config.epochs, epochs)
    return dataclasses.replace(config, epochs=epochs, same_budget=False)


def _metrics_extra(detector: CODetector | None, stopped: bool) -> dict[str, Any]:
    return {"co_detected": bool(detector and detector.flagged), "stopped_early": stopped}


def _save_final(
    out: Path, config: TrainConfig, zoo: ZooModel, data: Dataset, val: Dataset | None,
    architecture: list[dict[str, Any]], strategy: TrainingHooks, schedule: str, history: list[dict[str, Any]],
    result: TrainResult, extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    weights = out / "model.safetensors"
    save_safetensors(zoo.net.state_dict(), weights, metadata={"format": SIDECAR_FORMAT, "model": zoo.name})
    side = {
        "format": SIDECAR_FORMAT,
        "model": zoo.name,
        "normalize": normalize_spec(zoo.normalization),
        "num_classes": data.num_classes,
        "in_channels": int(data.x.shape[1]),
        "input_size": list(data.x.shape[1:]),
        "architecture": architecture,
        "weights": "ema" if config.ema else "final",
        "sha256": file_sha256(weights),
        "recipe": {**strategy.config(), "schedule": schedule, "config": config.to_dict()},
        "data": {
            "dataset": data.name, "split": config.split, "n_examples": len(data), "sha256": _fingerprint(data),
            "val_dataset": val.name if val is not None else None, "val_split": config.val_split,
            "val_size": len(val) if val is not None else 0,
        },  # fmt: skip
        "seed": config.seed,
        "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv else "",
        "co_detected": result.co_detected,
        "stopped_early": result.stopped_early,
        "epochs_trained": len(history),
        "final_metrics": history[-1] if history else {},
    }
    if result.aux is not None:  # a strategy's extra trained modules (distillation's projections)
        name = strategy.aux_name
        aux_path = out / f"{name}.safetensors"
        save_safetensors(result.aux.state_dict(), aux_path, metadata={"format": SIDECAR_FORMAT, "aux": name})
        side["aux"] = {"file": aux_path.name, "sha256": file_sha256(aux_path)}
        result.aux_weights = aux_path
    side.update(extra or {})
    path = sidecar_path(weights)
    write_text(path, json.dumps(side, indent=1, default=str))
    return weights, path
