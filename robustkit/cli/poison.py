"""`robustkit poison`: an unlearnable copy of a data set (a data defense)."""

from __future__ import annotations

from pathlib import Path

import click

from robustkit.cli.console import err
from robustkit.errors import UsageError


@click.command("poison")
@click.argument("method")
@click.option("--dataset", default="cifar10", show_default=True, help="Registered name or npz:PATH.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with the torchvision dataset files.")
@click.option("--download", is_flag=True, help="Let torchvision download the dataset.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--n-examples", type=int, help="Poison the first N examples (default: all).")
@click.option("--pattern", type=click.Path(dir_okay=False, exists=True), help="Reuse a saved pattern (JSON).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The poisoned copy (.npz).")
def poison_cmd(method: str, dataset: str, data_dir: str | None, download: bool, split: str, n_examples: int | None,
               pattern: str | None, output: str) -> None:
    """Write an unlearnable copy of a data set with a data defense (ops: One-Pixel Shortcut).

    Labels are unchanged; train on it with --dataset npz:OUTPUT. The pattern is saved next to
    it as OUTPUT.pattern.json.

    \b
    Example:
      robustkit poison ops --dataset cifar10 --data-dir ~/data --output ops.npz
      robustkit train standard --model resnet20 --dataset npz:ops.npz ...
    """
    # lazy: these import torch (the CLI must not at import time)
    import robustkit.defenses  # noqa: F401  (registers the defenses)
    from robustkit.data import load_dataset
    from robustkit.defenses.kinds import defense_of_kind
    from robustkit.defenses.one_pixel_shortcut import save_npz

    key, cls = defense_of_kind(method, "data", "robustkit poison")
    if not output.endswith(".npz"):
        raise UsageError(f"--output must be an .npz file, got {output!r}.")
    with err.status(f"Loading {dataset} ({split})…"):
        data = load_dataset(dataset, data_dir=data_dir, split=split, n_examples=n_examples, download=download)
    defense = cls.from_pattern_file(pattern) if pattern else cls()
    if not pattern:
        with err.status(f"Searching the {key} pattern on {len(data)} images…"):
            defense.fit(data)
    with err.status("Applying and saving…"):
        poisoned = defense.transform(data)
        out = save_npz(poisoned, Path(output))
        side = defense.save_pattern(Path(output).with_suffix(".pattern.json"))
    click.echo(f"{key}: wrote {len(poisoned)} images to {out} (labels unchanged) and the pattern to {side}.")

