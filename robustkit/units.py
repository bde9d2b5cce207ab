"""Radii as people write them: ``8/255`` in, ``8/255`` out (papers' fractions), so that the
command line, configs, tables and the leaderboard's key read the same. No torch: the command
line's help and option parsing use it."""

from __future__ import annotations

import math
from fractions import Fraction

from robustkit.errors import UsageError


def parse_eps(text: str | float) -> float:
    """Parse ``8/255``, ``0.031`` or a number into a float (fractions are what papers write)."""
    if isinstance(text, int | float):
        return float(text)
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UsageError(
            f"Cannot read eps {text!r}; write a number such as 0.03 or a fraction such as 8/255."
        ) from None


def eps_str(eps: float) -> str:
    """Eps as papers write it (``8/255`` when eps*255 is an integer, else ``0.5``); also the key.

    Being the stored key, it absorbs float noise: 8/255 computed another way, or passed through
    float32, gives the same text (tolerance 1e-5 on eps*255, 7 significant digits otherwise).
    """
    k = eps * 255
    if math.isfinite(k) and eps != int(eps) and abs(k - round(k)) <= 1e-5:
        return f"{round(k)}/255"
    return f"{eps + 0.0:.7g}"  # + 0.0 folds -0.0 into 0.0


def eps_label(eps: float) -> str:
    """Eps as shown to people, one style everywhere (tables, titles, progress, warnings): a short
    decimal when the radius is one (``0.1``, ``0.2``, ``0.5``), else ``k/255`` when it is a whole
    number of 8-bit grey levels (``8/255``), else 4 significant digits. Not a key: :func:`eps_str`
    is (it keeps ``51/255`` for 0.2, as stored)."""
    if not math.isfinite(eps):
        return str(eps)
    if eps == round(eps, 3):
        return f"{eps + 0.0:g}"
    k = eps * 255
    if abs(k - round(k)) <= 1e-5 and round(k) > 0:
        return f"{round(k)}/255"
    return f"{eps:.4g}"
