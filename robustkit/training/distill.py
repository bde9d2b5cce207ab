"""Knowledge distillation into a student, alone or combined with adversarial training.

``DistillConfig`` is a :class:`~robustkit.training.loop.TrainConfig` plus the teacher and the objectives;
:func:`distill` runs the ordinary training loop (checkpoints, resume, metrics, sidecar) with a
:class:`DistillStrategy` that wraps the ``method``'s strategy:

* ``method`` (``standard``, ``pgd-at``, ...) only decides the student's input: for an
  adversarial method it is that method's adversarial example, crafted **against the student**
  (pgd-at: PGD on the student's cross-entropy). The teacher always sees the **clean** image, as
  in ARD (Goldblum et al., 2020) and RSLAD (Zi et al., 2021): robust distillation from a robust
  teacher.
* ``student_mask_ratio`` (DMAE, arXiv 2208.12256; the paper masks 0.75 of the patches) zeroes
  that fraction of the student's input patches (``student_mask_patch`` pixels, default the image
  side / 14: a ViT-16 grid at 224), the teacher still sees the full image. DMAE's student is a
  masked autoencoder that drops patches and also reconstructs pixels; for a CNN classifier the
  masked patches are set to 0 and there is no pixel decoder.
* objectives (weights ``kd_weight``, ``feature_weight``, ``patch_weight``, plus ``ce_weight`` on
  the labels, 0 by default as Proteus trains without labels):

  - ``kd``: Hinton et al. (2015), ``T^2 KL(softmax(t/T) || softmax(s/T))``, ``T = 4`` (Hinton et
    al. found 2.5-4 best for small students).
  - ``feature``: the penultimate features (the classifier head's input), projected by a learned
    linear layer to the teacher's width. Proteus (arXiv 2407.10366) calls the same objective on
    a ViT's class token its *token* objective.
  - ``patch``: the last spatial feature map (a ViT's token sequence), projected by a learned 1x1
    convolution and resized to the teacher's map. With masking it is computed on the masked cells
    only, as Proteus's *patch* objective on masked tokens; without, on all cells (Proteus's
    *feature* objective on the whole map).

  Features are compared after L2 normalization per position (as DMAE does): ``feature_loss``
  ``mse`` (Proteus's loss; here ``2 - 2 cos``), ``smooth-l1`` (DMAE also offers L1) or ``cosine``.
  Proteus's logit-free setting is ``objectives=feature,patch``.

The projections are trained with the student (same optimizer) and saved next to its weights as
``projection.safetensors``; :func:`load_projections` reads them back. Data mixing (``mix``)
applies to the (proxy) batch both networks see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.defenses.adversarial_training import StepOutput
from robustkit.errors import CheckpointError, UnknownNameError, UsageError
from robustkit.models import PACKAGED_WEIGHTS, is_external, load_model, load_state_dict
from robustkit.models.sidecar import load_trained_model, read_sidecar
from robustkit.registry import MODELS
from robustkit.training.loop import ProgressFn, TrainConfig, TrainResult, flat_options, train

OBJECTIVES = ("kd", "feature", "patch")
FEATURE_LOSSES = ("mse", "smooth-l1", "cosine")
DEFAULT_TEMPERATURE = 4.0


# -- feature taps ----------------------------------------------------------------------------------


class FeatureTap:
    """Records a network's penultimate features (the input of its last ``nn.Linear``, the
    classifier head) and its last spatial map (the last output with more than one spatial cell, or
    a token sequence) — only inside :meth:`record`, so attacks and evaluation pay nothing."""

    def __init__(self, model: nn.Module, sample: torch.Tensor):
        net = getattr(model, "net", model)  # a ZooModel: search the network, not Normalize
        calls: list[tuple[nn.Module, torch.Tensor | None]] = []
        leaves = [m for m in net.modules() if not list(m.children())]

        def seen(mod: nn.Module, _inputs: Any, out: Any) -> None:
            calls.append((mod, out if torch.is_tensor(out) else None))

        hooks = [m.register_forward_hook(seen) for m in leaves]
        was = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(sample)
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        heads = [i for i, (m, _o) in enumerate(calls) if isinstance(m, nn.Linear)]
        if not heads:
            raise UsageError(f"Cannot find a linear classifier head in {getattr(model, 'name', type(net).__name__)}; "
                             "distillation taps the input of the last nn.Linear.")
        self.head: nn.Module = calls[heads[-1]][0]
        self.spatial: nn.Module | None = None
        for mod, out in reversed(calls[: heads[-1]]):
            if out is not None and (out.dim() == 3 or (out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1)):
                self.spatial = mod
                break
        self.recording = False
        self.store: dict[str, torch.Tensor] = {}
        self._hooks = [self.head.register_forward_pre_hook(self._on_head)]
        if self.spatial is not None:
            self._hooks.append(self.spatial.register_forward_hook(self._on_spatial))

    def _on_head(self, _mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self.recording:
            self.store["feature"] = inputs[0].flatten(1)

    def _on_spatial(self, _mod: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        if self.recording:
            self.store["patch"] = out

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[str, torch.Tensor]]:
        """``with tap.record() as feats: model(x)`` -> ``feats["feature"]`` (N×D), ``feats["patch"]``."""
        self.store = {}
        self.recording = True
        try:
            yield self.store
        finally:
            self.recording = False

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def as_map(t: torch.Tensor) -> torch.Tensor:
    """A spatial map N×C×H×W as it is; a token sequence N×L×D as N×D×L×1."""
    return t if t.dim() == 4 else t.transpose(1, 2).unsqueeze(-1)


# -- projections ---------------------------------------------------------------------------------------


class Projections(nn.Module):
    """The learned student -> teacher projections: ``feature`` (linear) and ``patch`` (1x1 conv)."""

    def __init__(self, feature: tuple[int, int] | None = None, patch: tuple[int, int] | None = None):
        super().__init__()
        if feature is not None:
            self.feature = nn.Linear(*feature)
        if patch is not None:
            self.patch = nn.Conv2d(patch[0], patch[1], kernel_size=1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Projections:
        """Rebuild from saved weights (their shapes give the widths)."""
        fw, pw = state.get("feature.weight"), state.get("patch.weight")
        proj = cls(feature=(fw.shape[1], fw.shape[0]) if fw is not None else None,
                   patch=(pw.shape[1], pw.shape[0]) if pw is not None else None)
        try:
            proj.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"Not a distillation projection file ({str(e).splitlines()[0]}).") from None
        return proj


def load_projections(path: str | Path) -> Projections:
    """The projections ``robustkit train distill`` saved (``OUT/projection.safetensors`` or OUT)."""
    p = Path(path)
    if p.is_dir():
        p = p / "projection.safetensors"
    if not p.is_file():
        raise CheckpointError(f"No projection file at {p}.")
    return Projections.from_state_dict(load_state_dict(p))


# -- losses and masking -----------------------------------------------------------------------------------


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss ``T^2 KL(p_t^T || p_s^T)``, mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def match_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, dim: int = 1) -> torch.Tensor:
    """Per-position distance between the L2-normalized features along ``dim`` (as DMAE compares
    them; scale-free, so a teacher with large activations does not swamp the other terms):
    ``mse`` the squared distance (= 2 - 2 cos), ``smooth-l1`` summed over ``dim``, ``cosine`` 1 - cos."""
    s, t = F.normalize(student, dim=dim), F.normalize(teacher, dim=dim)
    if kind == "cosine":
        return 1 - (s * t).sum(dim)
    fn = F.mse_loss if kind == "mse" else F.smooth_l1_loss
    return fn(s, t, reduction="none").sum(dim)


def mask_input(
    x: torch.Tensor, ratio: float, patch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random ``ratio`` of the ``patch``-pixel cells of every image (MAE's per-sample
    shuffle: ``int(L (1 - ratio))`` cells kept). Returns the masked images and the N×1×H×W mask
    (1 where masked)."""
    n, _c, h, w = x.shape
    gh, gw = -(-h // patch), -(-w // patch)
    cells = gh * gw
    keep = int(cells * (1 - ratio))
    noise = torch.rand(n, cells, generator=generator, device=generator.device).to(x.device)
    rank = noise.argsort(1).argsort(1)
    masked = (rank >= keep).to(x.dtype).view(n, 1, gh, gw)
    pixel = masked.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
    return x * (1 - pixel), pixel


# -- the strategy -------------------------------------------------------------------------------------------


class DistillStrategy:
    """Wraps a training strategy: its adversarial example (if any) is the student's input, the
    loss is the distillation loss (module docstring). ``aux`` holds the projections the training
    loop optimizes and saves (as ``projection.safetensors``)."""

    kind = "training"
    aux_name = "projection"

    def __init__(
        self, base: Any, teacher: nn.Module, *, objectives: tuple[str, ...] = ("kd", "feature"),
        temperature: float = DEFAULT_TEMPERATURE, kd_weight: float = 1.0, feature_weight: float = 1.0,
        patch_weight: float = 1.0, ce_weight: float = 0.0, feature_loss: str = "mse", mask_ratio: float = 0.0,
        mask_patch: int | None = None, teacher_source: str | None = None,
    ):  # fmt: skip
        self.base = base
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.objectives = tuple(objectives)
        self.temperature = temperature
        self.weights = {"kd": kd_weight, "feature": feature_weight, "patch": patch_weight}
        self.ce_weight = ce_weight
        self.feature_loss = feature_loss
        self.mask_ratio = mask_ratio
        self.mask_patch = mask_patch
        self.teacher_source = teacher_source
        self.aux: Projections | None = None
        self.student_tap: FeatureTap | None = None
        self.teacher_tap: FeatureTap | None = None
        self.soft_targets = base.soft_targets or base.name == "mart"  # CE-only perturbations

    # -- what the loop reads ------------------------------------------------------------------------
    name = property(lambda self: f"distill+{self.base.name}")
    adversarial = property(lambda self: self.base.adversarial)
    default_schedule = property(lambda self: self.base.default_schedule)

    def set_eps(self, eps: float) -> None:
        self.base.set_eps(eps)

    def passes_per_image(self) -> float | None:
        return self.base.passes_per_image()

    def config(self) -> dict[str, Any]:
        return {**self.base.config(), "distill": {
            "teacher": getattr(self.teacher, "name", type(self.teacher).__name__), "teacher_checkpoint":
            self.teacher_source, "objectives": list(self.objectives), "temperature": self.temperature,
            "weights": {k: self.weights[k] for k in self.objectives}, "ce_weight": self.ce_weight,
            "feature_loss": self.feature_loss, "mask_ratio": self.mask_ratio, "mask_patch": self.mask_patch,
            "teacher_input": "clean",
        }}  # fmt: skip

    def prepare_model(self, model: nn.Module, sample: torch.Tensor) -> list[dict[str, Any]]:
        """The base's architecture tricks, then the feature taps and projections (from one probe batch)."""
        specs = self.base.prepare_model(model, sample)
        if self.mask_patch is None:
            self.mask_patch = max(1, round(sample.shape[-1] / 14))
        self.student_tap = FeatureTap(model, sample)
        try:
            self.teacher_tap = FeatureTap(self.teacher, sample)
        except RuntimeError as e:
            raise UsageError(f"The teacher cannot take the training images of shape {tuple(sample.shape[1:])} "
                             f"({str(e).splitlines()[0]}).") from None
        with self.student_tap.record() as s, self.teacher_tap.record() as t, torch.no_grad():
            was = model.training
            model.eval()
            s_logits, t_logits = model(sample), self.teacher(sample)
            model.train(was)
        if "kd" in self.objectives and s_logits.shape[1] != t_logits.shape[1]:
            raise UsageError(f"The kd objective needs the same classes: the teacher has {t_logits.shape[1]}, "
                             f"the student {s_logits.shape[1]}; drop kd from --objectives.")
        feature = (s["feature"].shape[1], t["feature"].shape[1]) if "feature" in self.objectives else None
        patch = None
        if "patch" in self.objectives:
            if "patch" not in s or "patch" not in t:
                raise UsageError("The patch objective needs a spatial feature map in both networks; drop patch "
                                 "from --objectives.")
            sm, tm = as_map(s["patch"]), as_map(t["patch"])
            if s["patch"].dim() == 3 and sm.shape[2] != tm.shape[2]:
                raise UsageError("The patch objective on token sequences needs the same number of tokens.")
            patch = (sm.shape[1], tm.shape[1])
        self.aux = Projections(feature, patch)
        return specs

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return self.base.regularizer(model)

    # -- one batch ------------------------------------------------------------------------------------
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> StepOutput:
        assert self.aux is not None and self.student_tap is not None and self.teacher_tap is not None
        base = self.base
        x_in = base.adversarial_input(model, x, y, generator)
        pixel_mask = None
        if self.mask_ratio > 0:
            assert self.mask_patch is not None
            x_in, pixel_mask = mask_input(x_in, self.mask_ratio, self.mask_patch, generator)
        if next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad(), self.teacher_tap.record() as t:
            t_logits = self.teacher(x).float()
        with self.student_tap.record() as s:
            s_logits = model(x_in).float()
        loss = s_logits.new_zeros(())
        parts: dict[str, float] = {}
        if self.ce_weight:
            ce = F.cross_entropy(s_logits, y)
            loss = loss + self.ce_weight * ce
            parts["ce"] = float(ce.detach())
        for name in self.objectives:
            if name == "kd":
                term = kd_loss(s_logits, t_logits, self.temperature)
            elif name == "feature":
                pred = self.aux.feature(s["feature"].float())
                term = match_loss(pred, t["feature"].float(), self.feature_loss).mean()
            else:
                term = self._patch_loss(s["patch"], t["patch"], pixel_mask)
            loss = loss + self.weights[name] * term
            parts[name] = float(term.detach())
        reg = self.regularizer(model)
        if reg is not None:
            parts["reg"] = float(reg.detach())
            loss = loss + reg
        return StepOutput(loss, s_logits.detach(), parts)

    def _patch_loss(self, s: torch.Tensor, t: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        assert self.aux is not None
        tokens = s.dim() == 3
        sm, tm = as_map(s.float()), as_map(t.float())
        pred = self.aux.patch(sm)
        if pred.shape[-2:] != tm.shape[-2:]:
            pred = F.interpolate(pred, size=tm.shape[-2:], mode="bilinear", align_corners=False)
        per_cell = match_loss(pred, tm, self.feature_loss)  # N×H×W
        if pixel_mask is None or tokens:
            return per_cell.mean()
        weight = F.interpolate(pixel_mask, size=tm.shape[-2:], mode="area")[:, 0]  # masked share of each cell
        return (per_cell * weight).sum() / weight.sum().clamp_min(1e-6)


# -- configuration and entry point ---------------------------------------------------------------------


def load_teacher(name: str, checkpoint: str | None, normalize: str | None = "default") -> nn.Module:
    """The teacher: a robustkit-trained checkpoint (its sidecar says how to build it), or ``name``
    with ``checkpoint`` (packaged weights for ``digits-cnn``), in eval mode."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"Teacher checkpoint not found: {path}.")
        if read_sidecar(path) is not None:
            return load_trained_model(path).eval()
        return load_model(name, path, normalize=normalize).eval()
    if name not in MODELS and not is_external(name) and not str(name).startswith("robustbench:"):
        MODELS.canonical(name)  # an unknown name: the registry's one-line error with a did-you-mean
    key = MODELS.canonical(name) if name in MODELS else name
    if key not in PACKAGED_WEIGHTS and not str(name).startswith("robustbench:"):
        raise UsageError(f"--teacher {name} has no packaged weights; give --teacher-checkpoint "
                         "(a teacher with random weights teaches nothing).")
    return load_model(name, normalize=normalize).eval()


@dataclass
class DistillOptions:
    """Distillation's own options: the teacher, the objectives and their weights, the feature
    loss and the student's input mask (module docstring)."""

    teacher: str = "digits-cnn"
    teacher_checkpoint: str | None = None
    teacher_normalize: str | None = "default"
    objectives: list[str] = field(default_factory=lambda: ["kd", "feature"])
    temperature: float = DEFAULT_TEMPERATURE
    kd_weight: float = 1.0
    feature_weight: float = 1.0
    patch_weight: float = 1.0
    ce_weight: float = 0.0
    feature_loss: str = "mse"
    student_mask_ratio: float = 0.0
    student_mask_patch: int | None = None

    def __post_init__(self) -> None:
        items = self.objectives.split(",") if isinstance(self.objectives, str) else list(self.objectives or [])
        self.objectives = list(dict.fromkeys(str(o).strip().lower() for o in items if str(o).strip()))
        self.feature_loss = str(self.feature_loss).strip().lower()

    def validate(self) -> None:
        if not self.objectives:
            raise UsageError(f"--objectives needs at least one of {', '.join(OBJECTIVES)}.")
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise UnknownNameError("distillation objective", o, OBJECTIVES)
        if self.feature_loss not in FEATURE_LOSSES:
            raise UsageError(f"Unknown --feature-loss {self.feature_loss!r}; accepted: {', '.join(FEATURE_LOSSES)}.")
        if not (isinstance(self.temperature, int | float) and self.temperature > 0):
            raise UsageError(f"--temperature must be positive, got {self.temperature!r}.")
        for opt, v in (("--kd-weight", self.kd_weight), ("--feature-weight", self.feature_weight),
                       ("--patch-weight", self.patch_weight), ("--ce-weight", self.ce_weight)):
            if not (isinstance(v, int | float) and v >= 0):
                raise UsageError(f"{opt} must be >= 0, got {v!r}.")
        if not (isinstance(self.student_mask_ratio, int | float) and 0 <= self.student_mask_ratio < 1):
            raise UsageError(f"--mask-ratio must be in [0, 1), got {self.student_mask_ratio!r}.")
        if self.student_mask_patch is not None and self.student_mask_patch < 1:
            raise UsageError(f"--mask-patch must be at least 1 pixel, got {self.student_mask_patch}.")

    def make_strategy(self, base: Any) -> DistillStrategy:
        """``base`` (the method's strategy) wrapped with the teacher and these objectives."""
        teacher = load_teacher(self.teacher, self.teacher_checkpoint, self.teacher_normalize)
        return DistillStrategy(
            base, teacher, objectives=tuple(self.objectives), temperature=self.temperature,
            kd_weight=self.kd_weight, feature_weight=self.feature_weight, patch_weight=self.patch_weight,
            ce_weight=self.ce_weight, feature_loss=self.feature_loss, mask_ratio=self.student_mask_ratio,
            mask_patch=self.student_mask_patch, teacher_source=self.teacher_checkpoint,
        )  # fmt: skip


@flat_options
@dataclass
class DistillConfig(TrainConfig):
    """A :class:`~robustkit.training.loop.TrainConfig` (``model`` is the student) plus the teacher and the
    distillation options in ``distill`` (:class:`DistillOptions`; also taken and read flat, e.g.
    ``DistillConfig(teacher="digits-cnn")``). ``method`` defaults to ``standard`` (plain
    distillation); ``pgd-at`` gives robust distillation."""

    OPTION_GROUPS = ("trick", "distill")

    method: str = "standard"
    distill: DistillOptions = field(default_factory=DistillOptions)

    def validate(self) -> None:
        super().validate()
        self.distill.validate()

    def make_strategy(self) -> DistillStrategy:
        return self.distill.make_strategy(super().make_strategy())


def distill(config: DistillConfig, *, progress: ProgressFn | None = None, model: Any = None) -> TrainResult:
    """Train ``config.model`` (the student) from ``config.teacher``; files as :func:`robustkit.training.loop.train`
    writes them, plus ``projection.safetensors``."""
    if not isinstance(config, DistillConfig):
        raise UsageError("distill() takes a DistillConfig.")
    return train(config, progress=progress, model=model)
