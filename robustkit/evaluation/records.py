"""Per-sample records of an evaluation (parquet with pyarrow, else CSV) and adversarial examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from robustkit.evaluation.runner import EvalResult


def records_frame(result: EvalResult) -> pd.DataFrame:
    """One row per example: index, label, clean and final prediction, per-attack success, norms,
    queries and, for a minimum-norm attack, ``distance_<attack>`` (inf: no adversarial point found;
    0: misclassified from the start)."""
    a = result.arrays
    columns = {"index": a["index"], "label": a["label"], "clean_pred": a["clean_pred"]}
    for name in result.attacks:
        columns[f"success_{name}"] = a[f"success:{name}"]
        columns[f"norm_{name}"] = a[f"norm:{name}"]
        columns[f"queries_{name}"] = a[f"queries:{name}"]
        if f"distance:{name}" in a:
            columns[f"distance_{name}"] = a[f"distance:{name}"]
    for key in a:
        if key.startswith("stage:"):  # a cascade's stages: broken after stage s of attack a
            columns["after_" + key[len("stage:"):]] = a[key]
    columns.update(final_pred=a["final_pred"], final_norm=a["final_norm"], robust=result.robust())
    return pd.DataFrame(columns)


def write_records(result: EvalResult, path_stem: str | Path) -> Path:
    """Write the records next to ``path_stem`` as .parquet (pyarrow installed) or .csv; return the path."""
    frame = records_frame(result)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pyarrow") is not None:
        path = stem.with_suffix(".parquet")
        frame.to_parquet(path, index=False)
    else:
        path = stem.with_suffix(".csv")
        frame.to_csv(path, index=False)
    return path


def read_records(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def save_adversarial(result: EvalResult, path: str | Path) -> Path:
    """Store the worst-case adversarial examples with their indices and labels (safetensors)."""
    if result.x_adv is None:
        raise ValueError("the evaluation kept no adversarial examples (keep_adv=False)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x_adv": result.x_adv.contiguous(), "index": torch.from_numpy(result.arrays["index"]),
               "label": torch.from_numpy(result.arrays["label"]), "robust": torch.from_numpy(result.robust())},
              str(path))
    return path
