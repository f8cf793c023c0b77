"""``python -m capsexp ...`` (and ``torchrun -m capsexp train ...``)."""

from capsexp.cli import main

main()
