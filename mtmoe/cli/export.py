"""mtmoe-export: a training run's checkpoint -> standalone export (config.json, model.safetensors, spm.model).

    mtmoe-export checkpoint=runs/main out=exports/main
    mtmoe-export checkpoint=runs/main out=exports/main-avg4 average=4   # mean of the newest 4 checkpoints
    mtmoe-export checkpoint=runs/main out=exports/half-int8 prune.keep=0.5 quant=int8
    mtmoe-export checkpoint=runs/main out=exports/half-cov prune.keep=0.5 prune.rule=coverage
    mtmoe-export checkpoint=exports/main out=exports/en-de prune.direction=en-de prune.mass=0.9
"""

from __future__ import annotations

import dataclasses

import hydra
from omegaconf import DictConfig, OmegaConf

from mtmoe.cli.common import friendly_errors, setup
from mtmoe.paths import TOOLS_CONF_DIR, output_path, resolve

setup()


@hydra.main(version_base="1.3", config_path=str(TOOLS_CONF_DIR), config_name="export")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from mtmoe.config import validate_export

    cfg = OmegaConf.to_object(cfg)
    validate_export(cfg)
    # the tools refuse a bad config before importing torch and the model (~4 s of CPU)
    from mtmoe.device import resolve_device
    from mtmoe.export.pipeline import export_run
    from mtmoe.formats.export_format import export_bytes

    prune = dataclasses.replace(cfg.prune, calibration=str(resolve(cfg.prune.calibration)))
    routing = ({"calibration": prune.calibration, "lines": prune.lines}
               if cfg.routing_stats else None)
    out = export_run(resolve(cfg.checkpoint), output_path(cfg.out), prune, cfg.quant, routing, overwrite=cfg.overwrite,
                     average=cfg.average, device=resolve_device(cfg.device))
    sizes = export_bytes(out)
    print(f"exported {cfg.checkpoint} -> {out} ({sizes['file_bytes'] / 1e6:.2f} MB, "
          f"experts {sizes['expert_bytes'] / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
