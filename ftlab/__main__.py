"""``python -m ftlab``: the command line (:mod:`ftlab.cli`)."""
from ftlab.cli import main

main()
