"""Started by Python in every process when this directory is on PYTHONPATH (see ftlab_probe)."""

import os

if os.environ.get("FTLAB_PROBE_DIR") and os.environ.get("FTLAB_PROBE_RUN_DIR"):
    import ftlab_probe

    ftlab_probe.watch_writes(os.environ["FTLAB_PROBE_RUN_DIR"])
