"""mtmoe-train: train a multilingual (MoE) translation model with DeepSpeed.

    mtmoe-train model=tiny train.max_steps=50 hydra.run.dir=runs/tiny
    deepspeed --no_local_rank --num_gpus 2 -m mtmoe.train moe.ep_size=2
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtmoe.cli.common import friendly_errors, setup
from mtmoe.paths import CONF_DIR

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float:
    from mtmoe.train.engine import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results = train(OmegaConf.to_object(cfg), run_dir)
    if results:
        print(json.dumps({k: results[k] for k in ("step", "train_minutes", "valid_loss", "valid_bleu") if k in results}))
    return float(results.get("valid_loss", 0.0)) if results else 0.0


if __name__ == "__main__":
    main()
