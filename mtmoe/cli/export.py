"""mtmoe-export: a training run's checkpoint -> standalone export (config.json, model.safetensors, spm.model).

    mtmoe-export checkpoint=runs/main out=exports/main
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mtmoe.cli.common import friendly_errors, setup
from mtmoe.paths import CONF_DIR, resolve

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR / "tools"), config_name="export")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from mtmoe.export.artifact import export_run

    out = export_run(resolve(cfg.checkpoint), resolve(cfg.out))
    print(f"exported {cfg.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
