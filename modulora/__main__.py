"""``python -m modulora ...`` (what ``torchrun -m modulora finetune ...`` runs): the ``modulora`` command."""

from modulora_core.cli import main

main()
