"""AAA, "Adversarial Attack on Attackers" (Chen et al., NeurIPS 2022, arXiv 2205.12134): an
inference-time defense (``kind = "inference"``) against score-based query attacks (SQAs).

An SQA such as Square keeps a candidate when the model's margin loss (top logit minus the
runner-up) goes down. AAA post-processes the logits so that, inside every interval of width
``tau`` of the margin, the reported margin moves *against* the true one: the margin ``m`` is
sent to a target around the interval's attractor ``a = (round(m / tau + dev) - dev) * tau``
(``dev = 0.5`` puts attractors at tau/2 + k*tau), either

* ``linear``: ``t = a - reverse_step * (m - a)`` (a mirror image around the attractor), or
* ``sine``: ``t = m - 0.7 * tau * sin((1 - 2 (m - a) / tau) * pi)``.

The logits reaching that margin are found by ``steps`` Adam steps (learning rate ``lr``) from the
model's logits on ``|margin - t| + beta * |p_top - p_top_orig|``, the second term keeping the
probability of the predicted class at the (``temperature``-scaled) original one, so calibration
does not suffer. The SQA is then led in wrong directions, while the prediction stays the model's.

Defaults are the reference's (GitHub Sizhe-Chen/AAA): ``victim.py`` (``AAALinear``/``AAASine``:
``dev = 0.5``, sine amplitude 0.7 * tau, Adam, temperature 1) with the values ``square.py``
passes for the paper's experiments (``--attractor_interval 6``, ``--lr 1`` as ``reverse_step``,
``--calibration_loss_weight 5``, ``--aaa_iter 100``, ``--aaa_optimizer_lr 0.1``); the paper's
Table 2 runs ``--defense=AAALinear``, hence ``attractor="linear"``.

Differences from the reference: every row is optimized on its own (the reference averages the
loss over batches of 128 rows; Adam is invariant to that scale, up to its eps), so a row's result
does not depend on the batch it came in; the loss's gradient is written out instead of taken by
autograd (same values, a few times faster); inputs are not quantized to 8 bits (the reference
floors them to multiples of 1/255, which can change predictions); and a final check makes the
prediction exact, which the reference only measures: a row whose argmax would differ from the
model's (or that is not finite) gets the model's logits unchanged (``last_fallbacks`` counts them).

Gradients: the post-processing is a straight-through estimator, ``out = z + (aaa(z) - z).detach()``
with ``z`` the model's logits: the values are AAA's, the gradient with respect to the input is the
model's own. AAA is not meant to stop white-box (gradient) attacks and does not: APGD on the
wrapped model sees the same gradients as on the plain one.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import DataError, UsageError
from robustkit.registry import DEFENSES

ATTRACTORS = ("linear", "sine")
SINE_AMPLITUDE = 0.7  # of tau (victim.py, AAASine)
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the reference uses
ADAM_EPS = 1e-8


def aaa_loss(
    logits: torch.Tensor, top_orig: torch.Tensor, p_top_orig: torch.Tensor, target: torch.Tensor, beta: float
) -> torch.Tensor:
    """AAA's loss per row (victim.py): ``|margin - target| + beta * |p_top - p_top_orig|``, with
    ``margin`` the gap between the two largest ``logits`` and ``p_top`` the softmax probability of
    the originally predicted class ``top_orig`` (N, 1)."""
    top2 = logits.topk(2, dim=1).values
    p_top = F.softmax(logits, dim=1).gather(1, top_orig).squeeze(1)
    return (top2[:, 0] - top2[:, 1] - target).abs() + beta * (p_top - p_top_orig).abs()


def aaa_loss_grad(
    logits: torch.Tensor, top_orig: torch.Tensor, p_top_orig: torch.Tensor, target: torch.Tensor, beta: float
) -> torch.Tensor:
    """Gradient of :func:`aaa_loss` (rows are independent): ``sign(margin - target)`` on the two
    largest logits (+ on the first, - on the second), plus
    ``beta * sign(p_top - p_top_orig) * p_top * (onehot(top_orig) - p)``; ``sign(0) = 0`` as
    autograd's ``abs``."""
    return _LossGrad(logits, top_orig, p_top_orig, target, beta)(logits)


class _LossGrad:
    """:func:`aaa_loss_grad` for one query's rows in 9 operations per call: the constants of the
    query and the buffers the operations write into are made once, so no step concatenates or
    slices. ``[v1, v2, 1, p_top] @ select - [target, p_top_orig]`` gives both differences whose
    signs the loss needs; ``[sign_m, sign_p * p_top] @ spread`` gives what is scattered onto the
    top two and the predicted class, ``[sign_m, -sign_m, w]``, and the softmax term's row factor
    ``-w`` (``w = beta * sign_p * p_top``). The values are autograd's up to roundings."""

    def __init__(
        self, logits: torch.Tensor, top_orig: torch.Tensor, p_top_orig: torch.Tensor, target: torch.Tensor,
        beta: float,
    ):
        n, k = logits.shape
        like = {"dtype": logits.dtype, "device": logits.device}
        self.top_orig = top_orig
        self.bias = -torch.stack((target, p_top_orig), 1).to(logits.dtype)  # (N, 2)
        self.select = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], **like)
        self.spread = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, beta, -beta]], **like)
        self.d = torch.ones(n, 4, **like)  # [v1, v2, 1, p_top]
        self.index = torch.empty(n, 3, dtype=torch.long, device=logits.device)  # [i1, i2, top_orig]
        self.index[:, 2:] = top_orig
        self.src = torch.empty(n, 4, **like)
        self.grad = torch.empty(n, k, **like)
        # views made once: writing through them costs no operation per step
        self.top2 = (self.d[:, :2], self.index[:, :2])
        self.p_top, self.factor, self.minus_w = self.d[:, 3:], self.d[:, 2:], self.src[:, 3:]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The gradient at ``logits``, written into (and returned as) this object's buffer."""
        torch.topk(logits, 2, dim=1, out=self.top2)
        p = F.softmax(logits, dim=1)
        torch.gather(p, 1, self.top_orig, out=self.p_top)
        signs = torch.addmm(self.bias, self.d, self.select).sign_()  # [sign(margin - t), sign(p_top - p0)]
        torch.mm(signs.mul_(self.factor), self.spread, out=self.src)  # [sign_m, -sign_m, w, -w]
        torch.mul(p, self.minus_w, out=self.grad)
        return self.grad.scatter_add_(1, self.index, self.src)  # three columns of index: -w is not scattered


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"AAA's {name} must be a number, got {value!r}.")
    return float(value)


def _positive(name: str, value: object) -> float:
    number = _number(name, value)
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"AAA needs a positive, finite {name}, got {number:g}.")
    return number


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


@DEFENSES.register("aaa", aliases=("adversarial-attack-on-attackers",))
class AAA(nn.Module):
    """AAA (Chen et al., 2022): post-processes the logits to mislead score-based query attacks,
    keeping every prediction (argmax) of the wrapped model exactly."""

    kind: ClassVar[str] = "inference"
    description: ClassVar[str] = (
        "AAA (Chen et al. 2022): post-processed logits that mislead score-based query attacks (model wrapper)"
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        attractor: str = "linear",
        tau: float = 6.0,
        dev: float = 0.5,
        reverse_step: float | None = None,
        beta: float = 5.0,
        steps: int = 100,
        lr: float = 0.1,
        temperature: float = 1.0,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise UsageError(f"AAA wraps a torch.nn.Module, got {type(model).__name__}.")
        if attractor not in ATTRACTORS:
            raise UsageError(f"AAA's attractor must be one of {', '.join(ATTRACTORS)}, got {attractor!r}.")
        if reverse_step is not None and attractor != "linear":
            raise UsageError("reverse_step is an option of the linear attractor; the sine attractor has none.")
        self.model = model
        self.attractor = attractor
        self.tau = _positive("tau (attractor interval)", tau)
        self.dev = _number("dev", dev)
        if not 0 <= self.dev < 1:
            raise UsageError(f"AAA needs 0 <= dev < 1 (attractor offset, in intervals), got {self.dev:g}.")
        self.reverse_step = _positive("reverse_step", 1.0 if reverse_step is None else reverse_step)
        self.beta = _number("beta", beta)
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise UsageError(f"AAA needs a non-negative calibration weight beta, got {self.beta:g}.")
        self.steps = _count("AAA's steps", steps)
        self.lr = _positive("lr (Adam learning rate)", lr)
        self.temperature = _positive("temperature", temperature)
        self.last_fallbacks = 0  # rows of the last forward that kept the model's logits (diagnostic)

    def config(self) -> dict[str, Any]:
        """The options that define this defense (stored with results)."""
        cfg: dict[str, Any] = {"attractor": self.attractor, "tau": self.tau, "dev": self.dev}
        if self.attractor == "linear":
            cfg["reverse_step"] = self.reverse_step
        cfg.update(beta=self.beta, steps=self.steps, lr=self.lr, temperature=self.temperature)
        return cfg

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    # -- the post-processing --------------------------------------------------------------
    def target_margin(self, margin: torch.Tensor) -> torch.Tensor:
        """The margin AAA reports for the true margin ``margin`` (top-1 minus top-2 logit)."""
        tau = self.tau
        attractor = ((margin / tau + self.dev).round() - self.dev) * tau
        if self.attractor == "linear":
            return attractor - self.reverse_step * (margin - attractor)
        phase = (1 - 2 / tau * (margin - attractor)) * math.pi
        return margin - SINE_AMPLITUDE * tau * torch.sin(phase)

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """AAA's logits for the model's ``logits`` (N, K): float32 (float64 for float64 logits),
        detached. Rows are optimized independently; the argmax is *not* yet guaranteed here (:meth:`forward` does that).

        ``steps`` Adam updates (``torch.optim.Adam``'s, betas 0.9 / 0.999, eps 1e-8, as the
        reference) from the logits, with the loss's gradient written out (:func:`aaa_loss_grad`):
        no autograd graph, so it runs the same under ``no_grad`` / ``inference_mode``, and a few
        times faster than autograd on the small (N, K) tensors of a query. The tensors are tiny,
        so the cost is the number of operations (kernels on a GPU): 10 per step (9 for the
        gradient, one for ``torch.optim.Adam(fused=True)``'s update kernel), about 1,000 per query
        (``tests/test_aaa.py`` bounds it; it was 23 per step). The values are autograd's and
        torch's Adam's up to roundings: in float64 within 1e-12 over 100 steps; in float32 a
        rare row whose margin sits on a sign change may end elsewhere, as it may between
        processors."""
        z = logits.detach().to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        top_orig = z.argmax(1, keepdim=True)
        p_top_orig = F.softmax(z / self.temperature, dim=1).max(1).values
        top2 = z.topk(2, dim=1).values
        target = self.target_margin(top2[:, 0] - top2[:, 1])
        out = z.clone()
        exp_avg = torch.zeros_like(out)
        exp_avg_sq = torch.zeros_like(out)
        loss_grad = _LossGrad(out, top_orig, p_top_orig, target, self.beta)
        # torch.optim.Adam(fused=True)'s update, one operation per step; it takes the step as a tensor
        steps = torch.arange(1, self.steps + 1, dtype=torch.float32, device=out.device).unbind()
        b1, b2 = ADAM_BETAS
        for step in steps:
            torch._fused_adam_(
                [out], [loss_grad(out)], [exp_avg], [exp_avg_sq], [], [step], lr=self.lr, beta1=b1, beta2=b2,
                weight_decay=0.0, eps=ADAM_EPS, amsgrad=False, maximize=False,
            )
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Post-processed logits of ``x``; ``argmax`` is exactly the wrapped model's on every row.

        Works under ``torch.no_grad()``. When ``x`` requires grad, the gradient is the wrapped
        model's (straight-through; see the module docstring)."""
        z = self.model(x)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] < 2:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise DataError(f"AAA needs a model returning logits of shape (N, classes >= 2), got {shape}.")
        if len(z) == 0:
            self.last_fallbacks = 0
            return z
        delta = (self.postprocess(z) - z.detach()).to(z.dtype)
        out = z + delta
        bad = (out.detach().argmax(1) != z.detach().argmax(1)) | ~torch.isfinite(out.detach()).all(1)
        if bad.any():  # keep the model's logits there: the prediction must never change
            delta = torch.where(bad[:, None], torch.zeros_like(delta), delta)
            out = z + delta
        self.last_fallbacks = int(bad.sum())
        return out


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017) of the softmax confidence, as a fraction:
    ``sum_b |acc_b - conf_b| * n_b / n`` over ``n_bins`` equal bins ``(b/n_bins, (b+1)/n_bins]``
    (the reference's ``utils.ece_score``, 15 bins)."""
    n_bins = _count("n_bins", n_bins)
    if logits.dim() != 2 or y.shape != (logits.shape[0],):
        raise DataError(
            f"expected_calibration_error needs logits (N, K) and labels (N,), got {tuple(logits.shape)} "
            f"and {tuple(y.shape)}."
        )
    if len(y) == 0:
        return float("nan")
    conf, pred = F.softmax(logits.detach().double(), dim=1).max(1)
    correct = (pred == y.to(pred.device)).double()
    edges = torch.arange(1, n_bins + 1, dtype=torch.float64, device=conf.device) / n_bins
    bins = torch.bucketize(conf, edges, right=False)  # edges[b-1] < conf <= edges[b]
    counts = torch.bincount(bins, minlength=n_bins)[: n_bins].double()
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)[: n_bins]
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)[: n_bins]
    return float((acc_sum - conf_sum).abs().sum() / counts.sum())
