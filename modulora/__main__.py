"""``python -m modulora ...`` (what ``torchrun -m modulora finetune ...`` runs): the ``modulora`` command."""

from modulora.cli import main

main()
