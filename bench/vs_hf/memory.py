"""Peak resident memory of one system's phase, measured in a process of its own.

    python -m bench.vs_hf.memory '{"system": "hf", "phase": "train", "moe": "top2", ...}'

prints one JSON line: `setup_peak_rss_mib` (high-water mark of imports, data and model set-up),
`rss_ready_mib` (resident when the phase starts) and `peak_rss_mib` (high-water mark at the end).
Before the phase the high-water mark is reset (Linux `/proc/self/clear_refs` "5"), so
`peak_rss_mib` is the peak *during* the phase (everything resident then, model and imports
included); where the reset is not allowed it is the process's peak and `peak_reset` is false.

The high-water mark is VmHWM from /proc/self/status on Linux, not getrusage's ru_maxrss: a
fork+exec'd child's ru_maxrss starts at the RSS of the parent it was forked from (the kernel
carries the pre-exec mm's peak over), so every child of the suite's ~1.5 GiB process would report
at least that. Elsewhere ru_maxrss is used. `measure()` runs it from the suite.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def _peak_mib() -> float:
    """This process's RSS high-water mark (VmHWM; ru_maxrss where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Resets the process's RSS high-water mark to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run(spec: dict) -> dict:
    """Sets up `spec['system']` and runs its phase: `train` (spec['steps'] optimizer steps) or
    `decode` (spec['sentences'] test sentences, beam spec['beam'], batches of spec['batch_size'])."""
    import torch

    from mtmoe.data.corpus import load_test_set
    from mtmoe.data.prepare import prepare_training_data

    from bench.vs_hf.decoding import make_decoder, sentence_batches
    from bench.vs_hf.systems import compose_config, model_vocab
    from bench.vs_hf.training import make_train_step, training_batches

    torch.set_num_threads(spec["threads"])
    cfg = compose_config(spec["moe"], spec["overrides"])
    data = prepare_training_data(cfg.data)
    vocab_size = model_vocab(spec.get("size", "default"), len(data.vocab))  # what the suite times
    if spec["phase"] == "train":
        step = make_train_step(spec["system"], cfg, vocab_size)
        batches = training_batches(data, cfg, spec["steps"])
        setup_peak, ready, reset = _peak_mib(), _rss_mib(), _reset_peak()
        for batch in batches:
            step(batch)
    else:
        decode, model = make_decoder(spec["system"], cfg, vocab_size)
        prefix = str(Path(cfg.data.corpus_dir) / cfg.data.test_prefix)
        lines = load_test_set(prefix, [spec["src"]])[spec["src"]][:spec["sentences"]]
        batches = sentence_batches(data.vocab, lines, spec["batch_size"])
        tag_id = data.vocab.tag_id(spec["tgt"])
        setup_peak, ready, reset = _peak_mib(), _rss_mib(), _reset_peak()
        for batch in batches:
            decode(model, batch, tag_id, spec["beam"])
    return {"system": spec["system"], "phase": spec["phase"], "setup_peak_rss_mib": round(setup_peak, 1),
            "rss_ready_mib": round(ready, 1), "peak_rss_mib": round(_peak_mib(), 1), "peak_reset": reset}


def measure(spec: dict, timeout: int = 600) -> dict:
    """`run(spec)` in a fresh Python process (its own world of one, not this process's)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, "-m", "bench.vs_hf.memory", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {spec['system']}/{spec['phase']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
