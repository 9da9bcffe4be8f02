"""mtmoe-eval: score an export on a line-aligned test set, per direction, BLEU and chrF.

    mtmoe-eval model=exports/main test=data/multi30k/test_2016_flickr beam=4 out=results/test.json
    mtmoe-eval model=exports/main serve.experts_per_layer=0.25 serve.prefetch=language
    mtmoe-eval model=exports/main subset.mass=0.9        # per direction, only the experts it needs
    mtmoe-eval model=exports/main tune.on=data/multi30k/val  # length penalty picked on val first
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from mtmoe.cli.common import friendly_errors, setup
from mtmoe.paths import TOOLS_CONF_DIR

setup()


@hydra.main(version_base="1.3", config_path=str(TOOLS_CONF_DIR), config_name="eval")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from mtmoe.config import validate_eval

    cfg = OmegaConf.to_object(cfg)
    validate_eval(cfg)
    import torch  # the tools refuse a bad config before importing torch and the model (~4 s of CPU)

    from mtmoe.device import resolve_device
    from mtmoe.eval.run import evaluate_export
    from mtmoe.eval.tune import format_tuning, tune_decoding

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)  # a missing GPU is refused before anything is read or written
    beam, length_penalty, tuned = cfg.beam, cfg.length_penalty, None
    if cfg.tune.on:
        tuned = tune_decoding(cfg.model, cfg.tune, cfg.beam, cfg.test, cfg.langs, cfg.directions, cfg.max_tokens,
                              cfg.workers, cfg.threads, cfg.serve, cfg.subset, device)
        print(format_tuning(tuned))
        beam, length_penalty = tuned["beam"], tuned["length_penalty"]
    report = evaluate_export(cfg.model, cfg.test, cfg.langs, cfg.directions, beam, length_penalty,
                             cfg.max_tokens, cfg.limit, cfg.out, cfg.workers, cfg.threads, cfg.telemetry, cfg.serve,
                             cfg.subset, tuned, device)
    print(report["table"])  # with offloading, its last line is the serving metrics
    print(f"decoding: {report['sentences_per_s']} sentences/s")


if __name__ == "__main__":
    main()
