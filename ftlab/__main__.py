"""``python -m ftlab``: the command line (:mod:`ftlab.commands`; no arguments run the default job)."""
from ftlab.commands import module_main

module_main()
