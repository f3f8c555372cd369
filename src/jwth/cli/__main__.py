"""`python -m jwth.cli` runs the command-line interface (also under `torchrun -m`)."""

from jwth.cli import main

main()
