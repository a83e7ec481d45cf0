"""``python -m comkd.cli`` / ``torchrun -m comkd.cli``."""

from comkd.cli import main

main()
