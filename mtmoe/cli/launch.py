"""One `deepspeed` launch per Hydra job: `mtmoe-train -m launch.ranks=2 moe.use_rts=true,false`.

Hydra multirun runs its jobs in one process; tearing a gloo/NCCL world down and building another
in-process hangs or fails, so instead each job re-runs itself under the DeepSpeed launcher with
the job's own overrides and output dir, and all ranks of that job write into that one dir."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mtmoe.errors import ConfigError
from mtmoe.train.distributed import free_port


def under_launcher() -> bool:
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def launcher_command(ranks: int, launcher_args: str, task_overrides: list[str], run_dir: Path) -> list[str]:
    """The `deepspeed` command line for one job (launch.* overrides replaced, run dir pinned)."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    kept = [o for o in task_overrides if not o.lstrip("+~").startswith(("launch.", "hydra."))]
    extra = shlex.split(launcher_args)
    if "--master_port" not in extra and "--hostfile" not in extra:
        extra += ["--master_port", str(free_port())]  # single node: don't collide with other launches
    return [launcher, "--no_local_rank", "--num_gpus", str(ranks), *extra,
            "--module", "mtmoe.train", *kept, "launch.ranks=0", f"hydra.run.dir={run_dir}"]


def run_job_under_launcher(ranks: int, launcher_args: str, task_overrides: list[str], run_dir: Path) -> dict:
    """Runs the job as `ranks` DeepSpeed processes; returns its results.json."""
    if ranks < 1:
        raise ConfigError(f"launch.ranks={ranks} must be >= 1")
    cmd = launcher_command(ranks, launcher_args, task_overrides, run_dir)
    print(f"mtmoe: launching {ranks} ranks: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"mtmoe: error: the launched job failed (exit code {rc}); see {run_dir}", file=sys.stderr)
        sys.exit(rc)
    results = run_dir / "results.json"
    return json.loads(results.read_text()) if results.is_file() else {}
