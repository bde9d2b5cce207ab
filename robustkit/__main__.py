"""``python -m robustkit`` (also what ``torchrun -m robustkit`` runs)."""

from .cli import main

main()
