"""What a training run starts from: the model (name, initial weights, normalization) and the data
(the training set and the fixed held-out set). Shared by the configs of the one loop
(:class:`~robustkit.training.loop.TrainConfig`), RiFT and prompting."""

from __future__ import annotations

from dataclasses import dataclass

from robustkit.data import Dataset, load_dataset, load_held_out


@dataclass
class RunInputs:
    """``dataset`` split ``split`` (first ``n_examples``) trains; ``val_size`` images of
    ``val_dataset`` (default: ``dataset``) split ``val_split`` are held out (0: none)."""

    model: str | None = None
    checkpoint: str | None = None
    normalize: str | None = "default"
    dataset: str = "digits"
    data_dir: str | None = None
    split: str = "train"
    n_examples: int | None = None
    val_dataset: str | None = None
    val_split: str = "test"
    val_size: int = 256

    def training_set(self) -> Dataset:
        return load_dataset(self.dataset, data_dir=self.data_dir, split=self.split, n_examples=self.n_examples)

    def held_out(self) -> Dataset | None:
        """The held-out set, or None when ``val_size`` is 0."""
        if not self.val_size:
            return None
        return load_held_out(self.val_dataset or self.dataset, data_dir=self.data_dir, split=self.val_split,
                             size=self.val_size)
