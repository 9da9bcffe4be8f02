"""What the tests share besides fixtures (those are in conftest.py): the small corpus cut, the
one tiny model shape of in-process model tests, and runners for the mtmoe console scripts (world
of one), the `deepspeed` launcher (2 CPU ranks), ranks started directly as the launcher starts them,
and the step probe (tests/step_probe.py)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mtmoe.cli.common import compose_train_config
from mtmoe.config import ModelConfig
from mtmoe.train.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "multi30k"
LANGS = ["en", "de", "fr", "cs"]
BIN = Path(sys.executable).parent
TINY = ModelConfig(d_model=32, n_heads=2, d_ff=64, encoder_layers=2, decoder_layers=2, dropout=0.0, max_positions=64)
"""The model shape of the in-process model tests (vocabularies of 50-300 ids)."""


def cut_corpus(out: Path, train_lines: int = 400, val_lines: int = 30, test_lines: int = 20) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_lines), ("val", val_lines), ("test_2016_flickr", test_lines)):
        for lang in LANGS:
            with gzip.open(BUNDLED / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f).strip() for _ in range(n)]
            (out / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def tiny_overrides(corpus: Path, cache_dir: Path, run_dir: Path, steps: int = 12, **extra) -> list[str]:
    """A seconds-scale training config on the small corpus (no end-of-run plot: the `trained`
    fixture's run draws it, and test_usability draws one directly). Validation is loss only: an
    untrained model's greedy translations run to the length limit, and the end-of-run BLEU of 12
    directions took 8 s of a 16 s run (18 s under expert parallelism), so the runs that check it
    (the `trained` fixture, the GPU runs, ZeRO-3 validation) ask for `train.valid_bleu=final`.
    One torch thread per rank, as auto gives a CPU rank: on a GPU auto gives each rank the node's
    cores, and the GPU tests' pytest workers (6) would each start that many."""
    args = {
        "model": "tiny", "data.corpus_dir": str(corpus), "data.vocab_size": 300, "data.cache_dir": str(cache_dir),
        "data.val_lines": 8, "train.max_steps": steps, "train.max_minutes": 0, "train.max_tokens": 256,
        "train.warmup_steps": 5, "train.log_every": 2, "train.valid_every": 0, "train.save_every": 0,
        "train.valid_bleu": "never", "train.threads": 1, "train.progress": "false", "train.plot": "false",
        "wandb.mode": "disabled", "hydra.run.dir": str(run_dir),
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def export_of(trained: Path, out: Path) -> Path:
    proc = run_cli("mtmoe-export", [f"checkpoint={trained}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra) -> dict:
    """The environment minus a process group's variables (a test that built a Trainer in-process
    has set them), so each child starts its own world."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_cli(name: str, args: list[str], stdin: str | None = None, timeout: int = 600, env_extra=None):
    env = clean_env(**(env_extra or {}))
    return subprocess.run([str(BIN / name), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


compose_train = compose_train_config
"""The mtmoe-train config the shipped YAML and `overrides` compose (not validated)."""


def run_module(module: str, args: list[str], stdin: str | None = None, timeout: int = 600, env_extra=None):
    """`python -m module args...` with this interpreter: what runs where the console scripts are not
    installed (the GPU machine)."""
    env = clean_env(**(env_extra or {}))
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def deepspeed_command(module: str, args: list[str], num_ranks: int = 2) -> list[str]:
    """A `deepspeed` launch on a free port (another launch on this box, e.g. a sweep, may hold 29500)."""
    return [str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", str(num_ranks), "--master_port",
            str(free_port()), "--module", module, *args]


def run_deepspeed(module: str, args: list[str], num_ranks: int = 2, timeout: int = 900):
    """A launch through the `deepspeed` launcher: what tests of the launch itself use (the others:
    `run_ranks`)."""
    env = clean_env()
    cmd = deepspeed_command(module, args, num_ranks)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def rank_env(rank: int, world: int, port: int) -> dict:
    """The variables `deepspeed.launcher.launch` sets for local rank `rank` of a one-node launch."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_SIZE": str(world),
            "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_ranks(command: list[str], num_ranks: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python <command>` (`-m module args` or `script args`) as `num_ranks` processes with the
    environment the `deepspeed` launcher gives its ranks, started directly. The launcher's own two
    Python processes (runner, then launch) cost ~10 s of a ~23 s tiny 2-rank run here, and what the
    parity and update tests check does not depend on them; test_train_e2e and test_resilience go
    through the launcher. Like the launcher, a rank that fails stops the others. -> the ranks'
    output joined, and the first non-zero exit code (0 when all succeeded)."""
    port = free_port()
    logs = [Path(tempfile.mkstemp(prefix=f"rank{rank}.", suffix=".log")[1]) for rank in range(num_ranks)]
    procs = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-u", *command], cwd=ROOT, stdout=out,
                                              stderr=subprocess.STDOUT, env=clean_env(**rank_env(rank, num_ranks, port))))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
            time.sleep(0.1)
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(command, timeout)
        output = "".join(log.read_text(errors="replace") for log in logs)
        code = next((p.returncode for p in procs if p.returncode != 0), 0)
        return subprocess.CompletedProcess(command, code, output, "")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.unlink(missing_ok=True)


def nvme_available() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


def require_nvme() -> None:
    """NVMe offload needs DeepSpeed's async_io op, which needs libaio (apt libaio-dev)."""
    if not nvme_available():
        pytest.skip("NVMe offload unavailable here: DeepSpeed's async_io op needs libaio "
                    "(apt-get install libaio-dev; scripts/setup.sh does this where it can)")


def run_step_probe(tmp_path: Path, corpus: Path, cache_dir: Path, overrides: list[str], bad: list[str],
                   ranks: int = 1, steps: int = 4, device: str = "cpu", clip_check: bool = False,
                   forbid_syncs_from: int | None = None, separate_host_group: bool = False) -> list[dict]:
    """tests/step_probe.py on the tiny config (+ `overrides`) for `steps` steps, with the `bad`
    micro-batches' losses made NaN (STEP:MICRO[:RANK]), in a process of its own or a launch of
    `ranks` -> each rank's report."""
    out = tmp_path / "probe"
    args = ["--out", str(out), "--steps", str(steps), *[f"--bad={b}" for b in bad],
            *(["--clip-check"] if clip_check else []),
            *([f"--forbid-syncs-from={forbid_syncs_from}"] if forbid_syncs_from is not None else []),
            *(["--separate-host-group"] if separate_host_group else []),
            "--", *[o for o in tiny_overrides(corpus, cache_dir, tmp_path / "run") if not o.startswith("hydra.")],
            f"train.device={device}", *overrides]
    script = str(ROOT / "tests" / "step_probe.py")
    if ranks == 1:
        proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=clean_env(), capture_output=True,
                              text=True, timeout=600)
    else:
        proc = run_ranks([script, *args], ranks, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in range(ranks)]
