"""ftlab: compose, run and compare fine-tuning methods for language models.

Importing the package changes no global state; the commands (``ftlab.cli``, ``ftlab.eval``,
``ftlab.export``, ``ftlab.report``) quiet third-party noise when they start.
"""

__version__ = "0.1.0"
