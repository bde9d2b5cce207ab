"""Train the embedded default model: ``digits-cnn`` on scikit-learn digits (train split), with
PGD adversarial training at Linf eps 0.1 so the default evaluation shows a non-trivial robust
accuracy. Deterministic on CPU; writes robustkit/models/weights/digits_cnn.safetensors.

    python scripts/train_digits_cnn.py
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from robustkit import ThreatModel
from robustkit.attacks import PGD
from robustkit.data import load_dataset
from robustkit.models import build_model

OUT = Path(__file__).resolve().parents[1] / "robustkit" / "models" / "weights" / "digits_cnn.safetensors"


def main(epochs: int = 30, eps: float = 0.1, seed: int = 0) -> None:
    torch.manual_seed(seed)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    net = build_model("digits-cnn")
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    attack = PGD(ThreatModel("linf", eps), steps=7, step_size=eps / 3, early_stop=False)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), 64):
            idx = perm[i : i + 64]
            x, y = train.x[idx], train.y[idx]
            x_adv = attack(net, x, y).x_adv if epoch >= 2 else x  # two clean warm-up epochs
            net.train()
            loss = F.cross_entropy(net(torch.cat([x, x_adv])), torch.cat([y, y]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            clean = (net(test.x).argmax(1) == test.y).float().mean().item()
        robust = 1 - PGD(ThreatModel("linf", eps), steps=20)(net, test.x, test.y).success.float().mean().item()
        print(f"epoch {epoch + 1}: clean {clean:.3f}  PGD-20 robust {robust:.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
