"""One `deepspeed` launch per Hydra job: `mtmoe-train -m launch.ranks=2 moe.use_rts=true,false`.

Hydra multirun runs its jobs in one process; tearing a gloo/NCCL world down and building another
in-process hangs or fails, so instead each job re-runs itself under the DeepSpeed launcher with
the job's own overrides and output dir, and all ranks of that job write into that one dir."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mtmoe.errors import ConfigError
from mtmoe.train.distributed import free_port


def under_launcher() -> bool:
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


DEEPSPEED_LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
"""The `deepspeed` launcher of this Python's environment, the one mtmoe runs in: the `deepspeed` script
first on PATH may belong to another environment (and run its own Python), and where console scripts
are not installed there is none."""


def launcher_command(ranks: int, launcher_args: str, task_overrides: list[str], run_dir: Path,
                     sweep_dir: str) -> list[str]:
    """The `deepspeed` command line for one job (launch.* overrides replaced, run dir pinned).

    The sweep dir is pinned too, as the sweep resolved it: the launched job is a single run whose
    own default sweep dir (a new time stamp, or none of the user's `hydra.sweep.dir=`) would send a
    `${hydra:sweep.dir}` in the config, e.g. `moe_efd`'s dense checkpoint, somewhere else."""
    kept = [o for o in task_overrides if not o.lstrip("+~").startswith(("launch.", "hydra."))]
    extra = shlex.split(launcher_args)
    if "--master_port" not in extra and "--hostfile" not in extra:
        extra += ["--master_port", str(free_port())]  # single node: don't collide with other launches
    return [*DEEPSPEED_LAUNCHER, "--no_local_rank", "--num_gpus", str(ranks), *extra,
            "--module", "mtmoe.train", *kept, "launch.ranks=0", f"hydra.run.dir={run_dir}",
            f"hydra.sweep.dir={sweep_dir}"]


def run_job_under_launcher(ranks: int, launcher_args: str, task_overrides: list[str], run_dir: Path,
                           sweep_dir: str) -> dict:
    """Runs the job as `ranks` DeepSpeed processes; returns its results.json."""
    if ranks < 1:
        raise ConfigError(f"launch.ranks={ranks} must be >= 1")
    cmd = launcher_command(ranks, launcher_args, task_overrides, run_dir, sweep_dir)
    print(f"mtmoe: launching {ranks} ranks: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"mtmoe: error: the launched job failed (exit code {rc}); see {run_dir}", file=sys.stderr)
        sys.exit(rc)
    results = run_dir / "results.json"
    return json.loads(results.read_text()) if results.is_file() else {}
