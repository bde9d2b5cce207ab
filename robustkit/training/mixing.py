"""Data mixing for training: mixup, CutMix and SDMP's source-dependent mix, with soft labels.

Every function takes a batch ``x`` (N×C×H×W in [0, 1]) with soft targets ``t`` (N×K rows that
sum to 1) and returns the mixed batch with targets weighted by what each image actually holds:

* **mixup** (Zhang et al., ICLR 2018): ``lam x_i + (1 - lam) x_p(i)`` with one ``lam ~
  Beta(alpha, alpha)`` per batch and a random pairing ``p``; ``alpha = 1`` (the paper's CIFAR-10
  value).
* **CutMix** (Yun et al., ICCV 2019): a box of area ``(1 - lam) H W`` from ``x_p(i)`` is pasted
  into ``x_i``, clipped at the border; the label weight is recomputed from the box actually
  pasted, as the official code does; ``alpha = 1`` (the paper's).
* **ResizeMix** (Qin et al., arXiv 2012.11101): the whole partner image is resized into the box.
* **SDMP** (Ren et al., CVPR 2022, arXiv 2206.07692): mixed samples are made from images of the
  same batch (the partner of ``i`` is ``N-1-i``, the flipped batch, as the reference code), one of
  mixup / CutMix / ResizeMix for each pair, ``lam ~ Beta(1, 1)`` per pair scaled to [0.1, 0.9],
  and each mixed sample's target weighs its two sources by the real mixing ratio or area.

SDMP's main point is a *self-supervised* loss: it treats a mixed image as a (weighted) positive of
both of its sources and of the other mixed images sharing them. robustkit has no self-supervised
training method, so that part is not implemented: here SDMP is used as a supervised data mix
(soft-label cross-entropy), the same way as mixup and CutMix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustkit.errors import UsageError

MIXES = ("mixup", "cutmix", "sdmp")
#: Default Beta(alpha, alpha) parameter: mixup's CIFAR-10 value and CutMix's value.
DEFAULT_ALPHA = 1.0


def check_mix(name: str | None) -> str | None:
    """The canonical mix name (``None``/``"none"`` -> None); one-line error for unknown names."""
    if name is None:
        return None
    key = str(name).strip().lower()
    if key in ("", "none", "off"):
        return None
    if key not in MIXES:
        close = difflib.get_close_matches(key, MIXES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"Unknown --mix {name!r}.{hint} Accepted: {', '.join(MIXES)} or none.")
    return key


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels -> float one-hot rows (soft targets that sum to 1)."""
    return F.one_hot(y.long(), num_classes).float()


def mixup(x: torch.Tensor, t: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup with weight ``lam`` on ``x`` and ``1 - lam`` on ``x[perm]`` (``lam = 1``: identity)."""
    return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]


def box(h: int, w: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """CutMix's box ``(y0, y1, x0, x1)``: sides ``sqrt(1 - lam)`` of the image's, a uniform centre,
    clipped at the border (so the area can be smaller than ``(1 - lam) h w``)."""
    ratio = (1.0 - lam) ** 0.5
    ch, cw = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(h, (1,), generator=generator))
    cx = int(torch.randint(w, (1,), generator=generator))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def paste(
    x: torch.Tensor, t: torch.Tensor, perm: torch.Tensor, boxes: list[tuple[int, int, int, int]], *, resize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``x[perm[i]]`` (cropped: CutMix, or resized whole: ResizeMix) into ``boxes[i]`` of ``x[i]``;
    target weights are the pasted box's true share of the image.

    The partners and weights are read and built on the host once (``perm`` on the CPU costs no
    device synchronization at all), not one ``.item()`` per image."""
    out = x.clone()
    h, w = x.shape[-2:]
    partner = perm.tolist()
    shares = [1.0] * len(x)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        if y1 <= y0 or x1 <= x0:
            continue
        src = x[partner[i]]
        if resize:
            patch = F.interpolate(src[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
            out[i, :, y0:y1, x0:x1] = patch.clamp(0, 1)
        else:
            out[i, :, y0:y1, x0:x1] = src[:, y0:y1, x0:x1]
        shares[i] = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    kept = torch.tensor(shares, dtype=t.dtype).to(t.device)
    return out, kept[:, None] * t + (1 - kept[:, None]) * t[perm]


def cutmix(
    x: torch.Tensor, t: torch.Tensor, lam: float, perm: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix with one box for the batch (sides from ``lam``), targets by the pasted area: one copy
    for the whole batch, whatever device ``perm`` is on."""
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = box(h, w, lam, generator)
    out = x.clone()
    kept = torch.ones(len(x), dtype=t.dtype, device=t.device)
    if y1 > y0 and x1 > x0:
        out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        kept.fill_(1.0 - (y1 - y0) * (x1 - x0) / (h * w))
    return out, kept[:, None] * t + (1 - kept[:, None]) * t[perm]


def sdmp(x: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SDMP's source-dependent mix: pair ``i`` with ``N-1-i``; per pair one of mixup / CutMix /
    ResizeMix with ``lam = 0.1 + 0.8 Beta(1, 1)``; targets by the real ratio or area."""
    n = len(x)
    h, w = x.shape[-2:]
    perm = torch.arange(n - 1, -1, -1)  # on the host: the per-image pastes read it without a device sync
    lam = 0.1 + 0.8 * torch.rand(n, generator=generator)  # Beta(1, 1) is uniform
    ops = torch.randint(3, (n,), generator=generator)
    out, mixed_t = x.clone(), t.clone()
    boxes = [box(h, w, value, generator) for value in lam.tolist()]
    for op in range(3):
        idx = (ops == op).nonzero().flatten().tolist()
        if not idx:
            continue
        if op == 0:
            lam_i = lam[idx].to(x.device, x.dtype).view(-1, 1, 1, 1)
            out[idx] = lam_i * x[idx] + (1 - lam_i) * x[perm[idx]]
            mixed_t[idx] = lam_i.view(-1, 1) * t[idx] + (1 - lam_i.view(-1, 1)) * t[perm[idx]]
        else:
            chosen = [b if o == op else (0, 0, 0, 0) for b, o in zip(boxes, ops.tolist(), strict=True)]
            pasted, pt = paste(x, t, perm, chosen, resize=op == 2)
            out[idx], mixed_t[idx] = pasted[idx], pt[idx]
    return out, mixed_t


@dataclass(frozen=True)
class Mixer:
    """A configured mix: ``mixer(x, y, generator) -> (x_mixed, soft_targets)``; ``y`` integer labels."""

    name: str
    num_classes: int
    alpha: float = DEFAULT_ALPHA

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = one_hot(y, self.num_classes).to(x.device)
        if len(x) < 2:
            return x, t
        if self.name == "sdmp":
            return sdmp(x, t, generator)
        beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
        # torch's Beta sampler takes no generator: draw it under a global seed taken from ours
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            lam = float(beta.sample())
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        if self.name == "mixup":
            return mixup(x, t, lam, perm)
        return cutmix(x, t, lam, perm, generator)


def make_mixer(name: str | None, num_classes: int, alpha: float = DEFAULT_ALPHA) -> Mixer | None:
    """The :class:`Mixer` for ``name`` (None for no mixing); checks the name and ``alpha > 0``."""
    key = check_mix(name)
    if key is None:
        return None
    if not (isinstance(alpha, int | float) and alpha > 0):
        raise UsageError(f"--mix-alpha must be positive, got {alpha!r}.")
    return Mixer(key, int(num_classes), float(alpha))
