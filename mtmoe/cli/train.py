"""mtmoe-train: train a multilingual (MoE) translation model with DeepSpeed.

    mtmoe-train model=tiny train.max_steps=50 hydra.run.dir=runs/tiny
    deepspeed --no_local_rank --num_gpus 2 --module mtmoe.train parallel=ed
    mtmoe-train -m launch.ranks=2 parallel=ed moe.use_rts=true,false   # one 2-rank launch per job
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtmoe.cli import rundir
from mtmoe.cli.common import friendly_errors, setup
from mtmoe.paths import CONF_DIR

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@friendly_errors
@rundir.restore_if_refused
def main(cfg: DictConfig) -> float:
    from mtmoe.cli.launch import run_job_under_launcher, under_launcher

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.launch.ranks > 0 and not under_launcher():
        try:
            results = run_job_under_launcher(cfg.launch.ranks, cfg.launch.launcher_args,
                                             list(hydra_cfg.overrides.task), run_dir, hydra_cfg.sweep.dir)
        except SystemExit as e:
            if e.code == 2:  # the launched job refused to start
                rundir.refused()
            raise
    else:
        from mtmoe.train.trainer import train

        results = train(OmegaConf.to_object(cfg), run_dir, on_start=rundir.accepted)
    if results:
        print(json.dumps({k: results[k] for k in ("step", "train_minutes", "valid_loss", "valid_bleu") if k in results}))
    return float(results.get("valid_loss", 0.0)) if results else 0.0


if __name__ == "__main__":
    main()
