"""RobustBench's model zoo by name: ``robustbench:NAME`` or ``robustbench:DATASET/THREAT_MODEL/NAME``.

The architectures come from the ``robustbench`` package's own zoo definitions (never re-typed
here), so a name builds exactly the network RobustBench builds. Zoo models take [0, 1] pixels
and normalize inside when they need to, as RobustBench evaluates them: robustkit adds no
Normalize layer in front. Parsing a name never imports robustbench; looking it up does.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from robustkit.errors import UnknownNameError, UsageError
from robustkit.models.robustbench_import import import_robustbench
from robustkit.models.zoo import ModelInfo

PREFIX = "robustbench"
DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
#: RobustBench's defaults (robustbench.utils.load_model) for a name that does not say them.
DEFAULT_DATASET, DEFAULT_THREAT_MODEL = "cifar10", "Linf"
#: The radius of each RobustBench leaderboard (its model_info files' ``eps``).
_INPUT_SIZE = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "imagenet": (3, 224, 224)}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


@dataclass(frozen=True)
class ZooRef:
    """One zoo entry: ``dataset`` and ``threat_model`` as RobustBench spells them, and its ``name``."""

    dataset: str
    threat_model: str
    name: str

    @property
    def key(self) -> str:
        """The canonical robustkit model name, e.g. ``robustbench:cifar10/Linf/Carmon2019Unlabeled``."""
        return f"{PREFIX}:{self.dataset}/{self.threat_model}/{self.name}"

    @property
    def listing(self) -> str:
        return (
            f"`robustkit list models --source robustbench --dataset {self.dataset} --threat-model {self.threat_model}`"
        )


def is_robustbench(name: str) -> bool:
    """True for ``robustbench:...`` model names."""
    prefix, sep, _ = name.partition(":")
    return bool(sep) and prefix.strip().lower() == PREFIX


def canonical_dataset(dataset: str) -> str:
    """A RobustBench dataset name (any case), or a UsageError listing them."""
    key = dataset.strip().lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise UsageError(f"RobustBench has no dataset {dataset!r}; its datasets are {', '.join(DATASETS)}.")
    return key


def canonical_threat_model(threat_model: str) -> str:
    """A RobustBench threat model name (any case: ``linf`` -> ``Linf``), or a UsageError."""
    by_lower = {t.lower(): t for t in THREAT_MODELS}
    key = by_lower.get(threat_model.strip().lower())
    if key is None:
        raise UsageError(f"Unknown RobustBench threat model {threat_model!r}; accepted: {', '.join(THREAT_MODELS)}.")
    return key


def threat_model_for_norm(norm: str | None) -> str:
    """The RobustBench threat model of an attack norm (``l2`` -> ``L2``, otherwise ``Linf``)."""
    return "L2" if (norm or "").lower() == "l2" else DEFAULT_THREAT_MODEL


def parse_ref(name: str, dataset: str | None = None, threat_model: str | None = None) -> ZooRef:
    """``robustbench:NAME`` (with ``dataset``/``threat_model``, else RobustBench's defaults) or
    ``robustbench:DATASET/THREAT_MODEL/NAME`` as a :class:`ZooRef`; no import, no lookup."""
    _, _, rest = name.partition(":")
    parts = [p.strip() for p in rest.strip().split("/")]
    if len(parts) == 3 and all(parts):
        return ZooRef(canonical_dataset(parts[0]), canonical_threat_model(parts[1]), parts[2])
    if len(parts) != 1 or not parts[0]:
        raise UsageError(
            f"Model {name!r} is not a RobustBench name; write robustbench:NAME or "
            "robustbench:DATASET/THREAT_MODEL/NAME, e.g. robustbench:cifar10/Linf/Carmon2019Unlabeled."
        )
    return ZooRef(
        canonical_dataset(dataset or DEFAULT_DATASET),
        canonical_threat_model(threat_model or DEFAULT_THREAT_MODEL),
        parts[0],
    )


def qualify(name: str, dataset: str | None = None, threat_model: str | None = None) -> str:
    """The canonical ``robustbench:DATASET/THREAT_MODEL/NAME`` for ``name`` (see :func:`parse_ref`)."""
    return parse_ref(name, dataset, threat_model).key


def zoo(dataset: str, threat_model: str) -> dict[str, dict[str, Any]]:
    """robustbench's ``model_dicts[dataset][threat_model]``: name -> {'model': factory, 'gdrive_id': ...}."""
    import_robustbench()
    # optional extra (robustbench)
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return dict(model_dicts[BenchmarkDataset(dataset)].get(ThreatModel(threat_model), {}))


class UnknownZooModelError(UnknownNameError):
    """A name that is not in the RobustBench zoo of the given dataset and threat model."""

    def __init__(self, ref: ZooRef, known: list[str]):
        close = difflib.get_close_matches(ref.name, known, n=3, cutoff=0.6)
        if not close:  # a prefix is a good hint too (Carmon2019 -> Carmon2019Unlabeled)
            close = [k for k in known if k.lower().startswith(ref.name.lower())][:3]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        UsageError.__init__(
            self,
            f"Unknown RobustBench model {ref.name!r} for {ref.dataset} {ref.threat_model}.{hint} See {ref.listing}.",
        )


def _elsewhere(ref: ZooRef) -> list[ZooRef]:
    """The other (dataset, threat model) zoos that have an entry called ``ref.name``."""
    return [
        ZooRef(d, t, ref.name)
        for d in DATASETS
        for t in THREAT_MODELS
        if (d, t) != (ref.dataset, ref.threat_model) and ref.name in zoo(d, t)
    ]


def zoo_entry(name: str) -> tuple[ZooRef, dict[str, Any]]:
    """The zoo entry of a ``robustbench:`` name; a clear error for a name in another zoo or none."""
    ref = parse_ref(name)
    entries = zoo(ref.dataset, ref.threat_model)
    if ref.name in entries:
        return ref, entries[ref.name]
    other = _elsewhere(ref)
    if not entries and not other:
        boards = ", ".join(f"{d} {t}" for d in DATASETS for t in THREAT_MODELS if zoo(d, t))
        raise UsageError(f"RobustBench has no {ref.dataset} {ref.threat_model} model zoo; it has {boards}.")
    if other:
        where = ", ".join(f"{o.dataset} {o.threat_model} ({o.key})" for o in other)
        raise UsageError(
            f"RobustBench model {ref.name!r} is not in the {ref.dataset} {ref.threat_model} zoo; it is in {where}."
        )
    raise UnknownZooModelError(ref, sorted(entries))


def _call_text(factory: Callable[..., nn.Module]) -> str:
    """How the zoo builds the model, for listings: ``WideResNet(depth=28, widen_factor=10, ...)``."""
    name = getattr(factory, "__name__", "")
    if name != "<lambda>":
        return name or type(factory).__name__
    try:
        source = " ".join(inspect.getsource(factory).split())
    except (OSError, TypeError):
        return "lambda"
    body = source[source.index("lambda") :].partition(":")[2].strip()
    depth, end = 0, len(body)
    for i, ch in enumerate(body):  # the first balanced call expression
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0 or (depth == 0 and ch in ",)" and i > 0):
            end = i + (ch == ")" and depth == 0)
            break
    return re.sub(r"\(\s+", "(", body[:end]).rstrip(", ")


def weight_files(entry: dict[str, Any]) -> int:
    """How many weight files the entry has (0: none in RobustBench's layout, >1: an ensemble)."""
    ids = entry.get("gdrive_id")
    return 0 if ids is None else len(ids) if isinstance(ids, list) else 1


def robustbench_info(name: str) -> ModelInfo:
    """The ModelInfo of a zoo entry: its builder, [0, 1] inputs (no robustkit normalization)."""
    ref, entry = zoo_entry(name)
    return ModelInfo(
        factory=entry["model"],
        normalize=None,  # zoo models take [0, 1] pixels and normalize inside where they need to
        input_size=_INPUT_SIZE[ref.dataset],
        num_classes=_NUM_CLASSES[ref.dataset],
        description=f"RobustBench {ref.dataset} {ref.threat_model}: {_call_text(entry['model'])}",
    )


def zoo_catalog(dataset: str | None = None, threat_model: str | None = None) -> list[tuple[str, list[str], str]]:
    """``robustkit list models --source robustbench`` rows: (model name, [], what builds it)."""
    datasets = [canonical_dataset(dataset)] if dataset else list(DATASETS)
    threats = [canonical_threat_model(threat_model)] if threat_model else list(THREAT_MODELS)
    rows = []
    for d in datasets:
        for t in threats:
            for name, entry in zoo(d, t).items():
                files = weight_files(entry)
                note = (
                    ""
                    if files == 1
                    else " (no weights in RobustBench's layout)"
                    if files == 0
                    else f" (ensemble of {files} weight files)"
                )
                rows.append((ZooRef(d, t, name).key, [], _call_text(entry["model"]) + note))
    return rows


