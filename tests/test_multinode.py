"""Two machines, simulated on this one: `torchrun --nnodes 2 --nproc-per-node 1` with a localhost
rendezvous, one process per "node", so LOCAL_RANK is 0 on both while RANK is 0 and 1. The device and
rank decisions must hold (each node's rank takes its node's first GPU; rank 0 writes the run's
files), both nodes write their checkpoint shards to one run dir, and a second launch resumes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import BIN, ROOT, clean_env, tiny_overrides
from mtmoe.train.distributed import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch_two_nodes(args: list[str], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """One torchrun per node, both started before either is waited for (the rendezvous needs both)."""
    port = str(free_port())
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                               "--master-addr", "127.0.0.1", "--master-port", port, "-m", "mtmoe.train", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(), cwd=ROOT)
             for node in (0, 1)]
    done = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return done


def test_two_nodes_train_checkpoint_and_resume_in_one_run_dir(tmp_path, corpus, cache_dir):
    run: Path = tmp_path / "run"
    args = tiny_overrides(corpus, cache_dir, run, steps=4, **{"moe.ep_size": 2, "train.save_every": 2,
                                                             "train.valid_bleu": "never"})
    for node, proc in enumerate(launch_two_nodes(args)):
        assert proc.returncode == 0, f"node {node}:\n{proc.stdout[-4000:]}"
    log = (run / "train.log").read_text()
    assert "rank 0 trains on cpu" in log and "rank 1 trains on cpu" in log
    # both ranks' expert shards of each checkpoint, in the one run dir (ep 2: experts split over the nodes)
    for tag in ("step00000002", "step00000004"):
        names = {p.name for p in (run / "checkpoints" / tag).iterdir()}
        assert any("expp_rank_0" in n for n in names) and any("expp_rank_1" in n for n in names), names
    assert json.loads((run / "results.json").read_text())["world_size"] == 2

    args = [a if not a.startswith("train.max_steps=") else "train.max_steps=6" for a in args]
    for node, proc in enumerate(launch_two_nodes(args)):
        assert proc.returncode == 0, f"node {node}:\n{proc.stdout[-4000:]}"
    assert "resumed from step 4" in (run / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [2, 4, 6] and json.loads((run / "results.json").read_text())["step"] == 6
