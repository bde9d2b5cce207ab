"""The training hook protocol, in two parts:

* :class:`TrainingHooks` — what the one training loop calls on a method for every batch
  (:class:`~robustkit.defenses.adversarial_training.TrainingStrategy` and its subclasses,
  distillation's wrapper, the prompt strategy implement it);
* :class:`RunHooks` — how a run lays out its epochs around that step: the data order and batch,
  the optimizer and its learning rate, the model's mode, the generator the step draws from, how
  the per-epoch sums are combined and what is added to each epoch's row. The base class is the
  standard single-process run; DAT (one worker of a torchrun job: sharded order, DDP, per-example
  starts), RiFT's fine-tuning (one module trained, the rest frozen, augmentation) and prompting
  (a frame trained with normalized steps) subclass it.

The loop (:class:`~robustkit.training.loop.EpochLoop`) reads nothing else: no attribute probing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import nn

from robustkit.data import Dataset
from robustkit.defenses.adversarial_training import StepOutput
from robustkit.errors import UserError
from robustkit.evaluation.grid import EvalSpec, run_grid
from robustkit.evaluation.runner import resolve_device
from robustkit.models.sidecar import read_sidecar, sidecar_model_name
from robustkit.training.optim import make_optimizer

if TYPE_CHECKING:  # annotations only: the loop imports this module
    from robustkit.training.checkpoints import EMA
    from robustkit.training.config import TrainConfig
    from robustkit.training.loop import TrainResult

T = TypeVar("T")


class TrainingHooks(Protocol):
    """A training method as the loop sees it."""

    name: str
    adversarial: bool  # whether the batch is made adversarial (held-out metrics and the CO detector)
    default_schedule: str  # the learning-rate schedule when --schedule is not given
    soft_targets: bool  # step() takes N×K soft targets (batches mixed with --mix)
    aux: nn.Module | None  # trained and checkpointed with the model (AUX_NAME.safetensors), or None
    aux_name: str

    def config(self) -> dict[str, Any]:
        """The method's options, stored in the sidecar and the metrics."""

    def prepare_model(self, model: nn.Module, sample: torch.Tensor) -> list[dict[str, Any]]:
        """Once, before training: architecture transforms in place; their replayable specs."""

    def set_eps(self, eps: float) -> None:
        """Per step: the training radius (eps warm-up)."""

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> StepOutput:
        """Per batch: the loss (to backpropagate), the logits and named loss parts."""

    def passes_per_image(self) -> float | None:
        """Forward/backward passes per image relative to standard training (--same-budget), or None."""


class RunHooks:
    """The standard run: one process; every epoch re-seeds the global RNG from ``(seed, epoch)``
    and visits the examples in an order and with an attack generator seeded from it; the step is
    the method's ``step``. Subclasses override what their run does differently."""

    #: This process reports progress, runs the held-out checks and writes the files.
    primary: bool = True
    #: Every process gets the primary's epoch row and stop decision after each epoch (DAT).
    shares_epochs: bool = False
    epoch = 0  # the epoch under way (for error messages)
    checkpointed = 0  # the last epoch with a checkpoint on disk

    # -- the run (robustkit.training.loop.train) ---------------------------------------------------
    def device(self, config: TrainConfig) -> torch.device:
        return resolve_device(config.device)

    def error(self, err: UserError) -> UserError:
        """``err`` as this run raises it (DAT: marked as raised alike by every worker)."""
        return err

    def check(self, config: TrainConfig) -> None:
        """Checks that need the run (DAT: the global batch splits over the workers)."""

    def training_data(self, config: TrainConfig) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
        """The training set and the images and labels the epochs visit (DAT adds unlabeled images)."""
        data = config.training_set()
        return data, data.x, data.y

    def optimizer(self, config: TrainConfig, trained: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(config.optimizer, trained, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, nesterov=config.nesterov)

    def peak_lr(self, config: TrainConfig) -> float:
        """The learning rate the schedule multiplies."""
        return config.lr

    def resume(self, load: Callable[[], dict[str, Any] | None], optimizer: torch.optim.Optimizer,
               ema: EMA | None) -> dict[str, Any] | None:  # fmt: skip
        """Load the checkpoint (``load()``); returns the saved healthy snapshot, if any."""
        return load()

    def wrap(self, model: nn.Module, config: TrainConfig) -> None:
        """After resuming, before the first step (DAT: DistributedDataParallel, gradient compression)."""

    def start_info(self, config: TrainConfig) -> dict[str, Any]:
        """Extra fields of the ``start`` progress event."""
        return {}

    def state_extra(self) -> dict[str, Any]:
        """Extra fields of the checkpoint's ``state.json``."""
        return {}

    def sidecar_extra(self, config: TrainConfig) -> dict[str, Any]:
        """Extra fields of the final weights' sidecar."""
        return {}

    def evaluate(self, config: TrainConfig, result: TrainResult, out: Path) -> None:
        """``--eval``: evaluate the saved checkpoint with the evaluation grid (one cell: this model
        at this eps), write its leaderboard rows and keep the cell reports in ``result``."""
        result.eval_report = evaluate_checkpoint(config, result.weights or out / "model.safetensors")

    # -- the epochs (robustkit.training.loop.EpochLoop) -------------------------------------------

    def per_process_batch(self, batch_size: int) -> int:
        """The batch one process takes per step (DAT: the global batch split over the workers)."""
        return batch_size

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        return math.ceil(n / batch_size)

    def begin_epoch(self, epoch: int, epoch_seed: int) -> None:
        """Before the epoch's first batch: re-seed the global RNG (resume continues bit for bit)."""
        torch.manual_seed(epoch_seed)

    def epoch_order(self, n: int, epoch: int, epoch_seed: int) -> torch.Tensor:
        """The indices of this process's examples, in the epoch's order."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed))

    def generator(self, epoch_seed: int, device: torch.device) -> torch.Generator:
        """The generator the method's step draws its random starts from this epoch."""
        return torch.Generator(device=device).manual_seed(epoch_seed + 1)

    def load_batch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at ``idx`` (on the CPU; augmentations go here)."""
        return x[idx], y[idx]

    def train_mode(self, model: nn.Module) -> None:
        """The model's mode while it trains (at every epoch start and after a held-out check)."""
        model.train()

    def lr_factor(self, lr_factor: Callable[[float], float], progress: float) -> float:
        """The learning-rate multiplier at ``progress`` epochs (default: the config's schedule)."""
        return lr_factor(progress)

    def step(self, strategy: TrainingHooks, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator, idx: torch.Tensor, epoch_seed: int) -> StepOutput:  # fmt: skip
        """One batch of the method (``idx``: the examples' indices, ``epoch_seed``: the epoch's seed)."""
        return strategy.step(model, x, y, generator)

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` combined over all processes (sum, or ``op="max"``); one process: as they are."""
        return values

    def shared(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed by the primary process and given to every process."""
        return fn()

    def end_epoch(self, model: nn.Module, row: dict[str, Any], totals: dict[str, float]) -> None:
        """After the epoch's held-out checks: add to (or read) the epoch's row."""


def evaluate_checkpoint(config: TrainConfig, weights: Path, *, dist_timeout: float = 600.0) -> Any:
    """Run the evaluation grid on ``weights`` (a robustkit-train checkpoint) with ``config``'s
    --eval attacks, eps and held-out data (``dist_timeout``: under torchrun); returns the list of cell reports."""
    side = read_sidecar(weights)
    assert side is not None
    spec = EvalSpec(
        model=[sidecar_model_name(side)],
        checkpoint=[str(weights)],
        normalize=side["normalize"],
        dataset=config.val_dataset or config.dataset,
        data_dir=config.data_dir,
        split=config.val_split,
        n_examples=config.eval_n_examples,
        attack=list(config.eval_attacks),
        norm=config.norm,
        eps=[config.eps],
        seed=config.seed,
        batch_size=max(config.batch_size, 256),
        device=config.device,
        dist_timeout=dist_timeout,
    )
    return run_grid(spec, db=config.db)
