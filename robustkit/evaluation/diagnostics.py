"""Signs that an evaluation cannot be trusted: gradient masking and models attacks misread.

Each check returns warnings (short sentences) that are printed and stored with the result; none
of them stops an evaluation. The list follows AutoAttack's checks and the classic
gradient-masking symptoms (Athalye et al., 2018; Carlini et al., 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attack import Attack, attack_mode, logits_of
from robustkit.evaluation.runner import EvalResult
from robustkit.threat import ThreatModel

# Larger Linf radii than these are unusual for the data set (a likely typo such as 8 for 8/255).
TYPICAL_LINF_EPS = {"cifar10": 16 / 255, "cifar100": 16 / 255, "svhn": 16 / 255, "mnist": 0.4, "digits": 0.4}


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                  threat: ThreatModel, dataset: str) -> list[str]:
    """Model-level checks on a small batch: randomness, probabilities, gradients, classes, eps."""
    warnings = []
    with attack_mode(model), torch.no_grad():
        raw = model(x)
        first, second = logits_of(raw), logits_of(model(x))
    if not isinstance(raw, torch.Tensor):
        warnings.append(f"The model returns a {type(raw).__name__}, not a tensor: robustkit attacks its "
                        f"{'first element' if isinstance(raw, tuple | list) else 'logits entry'}; check that "
                        "these are the logits.")
    if not torch.equal(first, second):
        warnings.append("The model is randomized (two forward passes on the same input disagree): "
                        "use an EOT attack (AutoAttack 'rand') or results are not reliable.")
    rows = first.float().sum(1)
    if (first >= 0).all() and (first <= 1).all() and torch.allclose(rows, torch.ones_like(rows), atol=1e-4):
        warnings.append("The model's outputs sum to 1 like probabilities: attacks expect logits "
                        "(remove the final softmax), otherwise their losses are flattened.")
    if first.shape[1] != num_classes:
        warnings.append(f"The model has {first.shape[1]} outputs but the data set has {num_classes} classes.")
    with attack_mode(model):
        xg = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(logits_of(model(xg)).float(), y, reduction="sum"), xg)
    if not torch.isfinite(grad).all():
        warnings.append("The loss gradient with respect to the input contains NaN or inf values.")
    else:
        zero = float((grad.flatten(1).abs().amax(1) == 0).float().mean())
        if zero > 0:
            warnings.append(f"The input gradient is exactly zero on {100 * zero:.0f}% of the checked points "
                            "(gradient masking: gradient-based attacks cannot work there).")
    typical = TYPICAL_LINF_EPS.get(dataset)
    if threat.norm == "linf" and typical is not None and threat.eps > typical:
        warnings.append(f"Linf eps {threat.eps:.4g} is larger than usual for {dataset} (≤ {typical:.4g}).")
    return warnings


def black_box_stronger(result: EvalResult, score_based: Sequence[str], gradient_based: Sequence[str]) -> list[str]:
    """Points that a score-based attack broke but every gradient attack missed: gradient masking."""
    if not score_based or not gradient_based:
        return []
    black = np.zeros(result.n, dtype=bool)
    for name in score_based:
        black |= result.broken(name)
    white = np.zeros(result.n, dtype=bool)
    for name in gradient_based:
        white |= result.broken(name)
    count = int((black & ~white).sum())
    if not count:
        return []
    return [f"Black-box ({', '.join(score_based)}) broke {count} points that the gradient attacks "
            f"({', '.join(gradient_based)}) missed: a sign of gradient masking."]


def square_after_gradient_stages(result: EvalResult, attack: str) -> list[str]:
    """In a cascade, Square (score-based) should find nothing the gradient stages before it missed
    (AutoAttack's ``check_square_sr``); if it does, the gradients are likely masked."""
    stages = list(result.stage_accs(attack))
    if "square" not in stages or stages.index("square") == 0:
        return []
    before = result.arrays[f"stage:{attack}|{stages[stages.index('square') - 1]}"]
    count = int((result.arrays[f"stage:{attack}|square"] & ~before).sum())
    if not count:
        return []
    return [f"{attack}: Square broke {count} points that the gradient-based attacks before it missed: "
            "a sign of gradient masking; the gradient-based results alone would overestimate robustness."]


def unbounded_and_loss_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                              make_pgd: type[Attack]) -> list[str]:
    """An unbounded attack must reach 0% accuracy; PGD must increase the loss."""
    warnings = []
    huge = ThreatModel(threat.norm, 1.0 if threat.norm == "linf" else float(x[0].numel()) ** 0.5)
    unbounded = make_pgd(huge, steps=20)(model, x, y)
    if not bool(unbounded.success.all()):
        left = 100 * float((~unbounded.success).float().mean())
        warnings.append(f"An unbounded attack (eps={huge.eps:.3g}) leaves {left:.0f}% of the checked points "
                        "correctly classified; robust accuracy should reach 0 (gradient masking?).")
    pgd = make_pgd(threat, steps=10, early_stop=False)(model, x, y)
    with attack_mode(model), torch.no_grad():
        before = F.cross_entropy(logits_of(model(x)).float(), y)
        after = F.cross_entropy(logits_of(model(pgd.x_adv)).float(), y)
    if not after > before:
        warnings.append(f"PGD did not increase the loss ({before:.3g} -> {after:.3g}): the gradients are not useful.")
    return warnings


def non_monotone_in_eps(points: Sequence[tuple[float, float]], label: str) -> list[str]:
    """Robust accuracy must not grow with eps (pairs of eps, robust accuracy)."""
    ordered = sorted(points)
    for (e1, a1), (e2, a2) in zip(ordered, ordered[1:], strict=False):
        if a2 > a1 + 1e-12:
            return [f"{label}: robust accuracy rises from {100 * a1:.2f}% at eps={e1:.4g} to {100 * a2:.2f}% "
                    f"at eps={e2:.4g}; it should not grow with eps (the attack is too weak)."]
    return []
