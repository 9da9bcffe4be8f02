"""mtmoe-translate: a Unix filter. One source line in, one translation out, nothing else on stdout.

    mtmoe-translate model=exports/main src=en tgt=de beam=4 < in.en > out.de
    mtmoe-translate model=exports/main src=en tgt=de serve.experts_per_layer=0.25 serve.prefetch=language
    mtmoe-translate model=exports/main src=en tgt=de subset.mass=0.9

With `serve.*` only some experts stay resident (mtmoe.serve); the serving metrics go to stderr.
With `subset.mass` only the experts en-de needs are loaded (mtmoe.export.subset); what is held goes
to stderr.
"""

from __future__ import annotations

import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mtmoe.cli.common import friendly_errors, setup
from mtmoe.paths import CONF_DIR, resolve

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR / "tools"), config_name="translate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from mtmoe.config import ConfigError, validate_subset
    from mtmoe.eval.decode import translate
    from mtmoe.export.artifact import read_export_config
    from mtmoe.export.subset import format_held, load_subset
    from mtmoe.serve.metrics import format_summary
    from mtmoe.serve.runtime import load_for_serving

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    serve, subset = OmegaConf.to_object(cfg.serve), OmegaConf.to_object(cfg.subset)
    validate_subset(subset, serve)
    langs = read_export_config(resolve(cfg.model))["langs"]
    for lang, field in ((cfg.src, "src"), (cfg.tgt, "tgt")):
        if lang not in langs:
            raise ConfigError(f"{field}={lang!r}: unknown language (the model knows {langs})")
    runtime = None
    if subset.mass:
        model, vocab, _, held = load_subset(resolve(cfg.model), f"{cfg.src}-{cfg.tgt}", subset.mass)
        print(format_held(held), file=sys.stderr)
    else:
        model, vocab, _, runtime = load_for_serving(resolve(cfg.model), serve)
        if runtime is not None:
            runtime.set_direction(cfg.src, cfg.tgt)  # language-aware serving seeds its caches for it

    def flush(lines: list[str]) -> None:
        keep = [i for i, line in enumerate(lines) if line.strip()]
        outs = [""] * len(lines)  # an empty input line gives an empty output line
        started = time.perf_counter()
        for i, hyp in zip(keep, translate(model, vocab, [lines[i].strip() for i in keep], cfg.tgt, cfg.beam,
                                          cfg.length_penalty)):
            outs[i] = hyp
        if runtime is not None:
            runtime.metrics.add_decode(len(keep), time.perf_counter() - started)
        sys.stdout.write("".join(o + "\n" for o in outs))
        sys.stdout.flush()

    pending: list[str] = []
    for line in sys.stdin:
        pending.append(line.rstrip("\n"))
        if len(pending) >= cfg.batch_lines:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    if runtime is not None:  # stdout carries translations only
        runtime.close()
        print(format_summary(runtime.metrics.summary()), file=sys.stderr)


if __name__ == "__main__":
    main()
