"""``python -m robustkit`` (also what ``torchrun -m robustkit`` runs)."""

from robustkit.cli import main

main()
