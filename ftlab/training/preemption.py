"""SLURM preemption: save at the end of the step, requeue the job, and continue after the requeue.

SLURM warns a job before its time limit with the signal the job asked for
(``#SBATCH --signal=USR1@120``, or ``TERM@120``) and preempts with SIGTERM. ftlab stops on
SIGUSR1 exactly as on SIGTERM (:class:`ftlab.training.faults.GracefulStop`: the optimizer step
in progress finishes, ``checkpoints/last.ckpt`` is written, ``metrics.json`` says
``"interrupted"``); then, when the process runs under SLURM (``SLURM_JOB_ID`` set, not an
interactive ``srun --pty bash`` session), rank zero asks SLURM to requeue the job with
``scontrol requeue <job id>``, as Lightning's own SLURM handler does.

A requeued job runs the same batch script again, with the same job id: the same
``python -m ftlab ...`` command. On its first start a run under SLURM records the job id and the
command line in ``<run dir>/slurm.json``; a later start of the same job with the same command
finds that run (:func:`requeued_run`) and continues it (``resume=<run dir>``), with no change
to the script. A run that had written no checkpoint yet is started again in its directory.

Lightning's own SLURM auto-requeue is switched off (:func:`slurm_plugins`): it would save a
second checkpoint (``hpc_ckpt_N.ckpt``) from inside the signal handler, in the middle of a step.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from ftlab.console import is_rank_zero
from ftlab.io import read_json, write_json

SLURM_FILE = "slurm.json"
# Signals after which a job under SLURM is requeued (SIGINT is a person at a terminal).
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def slurm_job_id() -> str | None:
    """The job to requeue (``<array job>_<task>`` for an array task), None outside a SLURM batch job."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None  # an interactive allocation: nothing to requeue
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(signum: int) -> str | None:
    """After a stop by ``signum``: ``scontrol requeue`` this job (rank zero, under SLURM).
    Returns what happened, for the user, or None when nothing was to be done."""
    job = slurm_job_id()
    if job is None or signum not in REQUEUE_SIGNALS or not is_rank_zero():
        return None
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job} ({type(err).__name__}: {err})"
    if proc.returncode != 0:
        reason = " ".join((proc.stderr or proc.stdout).split())[:200]
        return f"scontrol requeue {job} failed with status {proc.returncode} ({reason})"
    return f"requeued SLURM job {job}; it continues this run when it starts again"


def record_job(run_dir: Path, argv: list[str]) -> None:
    """Under SLURM: note the job and its command line in the run directory (rank zero)."""
    job = slurm_job_id()
    if job is not None and is_rank_zero():
        write_json(Path(run_dir) / SLURM_FILE, {"job_id": job, "argv": list(argv)})


def requeued_run(argv: list[str], run_dir: Path | None, root: Path = Path("outputs")) -> Path | None:
    """The unfinished run this SLURM job started before its requeue, if any: the run directory
    given (``hydra.run.dir``) or one under ``root`` whose ``slurm.json`` has this job id and
    this command line."""
    from ftlab.rundir import read_metrics

    job = slurm_job_id()
    if job is None:
        return None
    candidates = [run_dir] if run_dir is not None else sorted(p.parent for p in root.glob(f"*/*/{SLURM_FILE}"))
    for candidate in candidates:
        recorded = read_json(Path(candidate) / SLURM_FILE)
        if recorded.get("job_id") == job and recorded.get("argv") == list(argv) \
                and read_metrics(candidate).get("status") != "completed":
            return Path(candidate)
    return None


def slurm_plugins() -> list:
    """Lightning's SLURM environment without its auto-requeue, when running under SLURM."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []

