"""mtmoe-translate: a Unix filter. One source line in, one translation out, nothing else on stdout.

    mtmoe-translate model=exports/main src=en tgt=de beam=4 < in.en > out.de
    mtmoe-translate model=exports/main src=en tgt=de serve.experts_per_layer=0.25 serve.prefetch=language
    mtmoe-translate model=exports/main src=en tgt=de subset.mass=0.9

With `serve.*` only some experts stay resident (mtmoe.serve); the serving metrics go to stderr.
With `subset.mass` only the experts en-de needs are loaded (mtmoe.export.subset); what is held goes
to stderr. stdin is read as UTF-8: a line that is not stops the filter with an error naming it (the
lines before it are translated).
"""

from __future__ import annotations

import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from mtmoe.cli.common import friendly_errors, setup
from mtmoe.paths import TOOLS_CONF_DIR, resolve

setup()


@hydra.main(version_base="1.3", config_path=str(TOOLS_CONF_DIR), config_name="translate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from mtmoe.config import validate_translate
    from mtmoe.errors import ConfigError, CorpusError

    cfg = OmegaConf.to_object(cfg)
    validate_translate(cfg)
    import torch  # the tools refuse a bad config before importing torch and the model (~4 s of CPU)

    from mtmoe.data.corpus import decode_line
    from mtmoe.device import resolve_device
    from mtmoe.export.subset import format_held, load_subset
    from mtmoe.formats.export_format import read_export_config, warn_zero_shot
    from mtmoe.model.generation import translate, warn_cut_lines
    from mtmoe.serve.metrics import format_summary
    from mtmoe.serve.runtime import load_for_serving

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    config = read_export_config(resolve(cfg.model))
    for lang, field in ((cfg.src, "src"), (cfg.tgt, "tgt")):
        if lang not in config["langs"]:
            raise ConfigError(f"{field}={lang!r}: unknown language (the model knows {config['langs']})")
    warn_zero_shot(config, [(cfg.src, cfg.tgt)], "src/tgt")
    runtime = None
    if cfg.subset.mass:
        model, vocab, config, held = load_subset(resolve(cfg.model), f"{cfg.src}-{cfg.tgt}", cfg.subset.mass, device)
        print(format_held(held), file=sys.stderr)
    else:
        model, vocab, config, runtime = load_for_serving(resolve(cfg.model), cfg.serve, device)
        if runtime is not None:
            runtime.set_direction(cfg.src, cfg.tgt)  # language-aware serving seeds its caches for it

    def flush(lines: list[str], numbers: list[int]) -> None:
        if not lines:
            return
        keep = [i for i, line in enumerate(lines) if line.strip()]
        sources = [lines[i].strip() for i in keep]
        warn_cut_lines(vocab, sources, config["model"]["max_positions"], "<stdin>", [numbers[i] for i in keep])
        outs = [""] * len(lines)  # an empty input line gives an empty output line
        started = time.perf_counter()
        for i, hyp in zip(keep, translate(model, vocab, sources, cfg.tgt, cfg.beam, cfg.length_penalty)):
            outs[i] = hyp
        if runtime is not None:
            runtime.metrics.add_decode(len(keep), time.perf_counter() - started)
        sys.stdout.write("".join(o + "\n" for o in outs))
        sys.stdout.flush()

    pending: list[str] = []
    numbers: list[int] = []
    try:
        for number, raw in enumerate(sys.stdin.buffer, start=1):
            try:
                line = decode_line(raw.rstrip(b"\n"), "<stdin>", number)
            except CorpusError:
                flush(pending, numbers)  # one line out per line in, up to the bad one
                raise
            pending.append(line)
            numbers.append(number)
            if len(pending) >= cfg.batch_lines:
                flush(pending, numbers)
                pending, numbers = [], []
        if pending:
            flush(pending, numbers)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return
    finally:
        if runtime is not None:
            runtime.close()
    if runtime is not None:  # stdout carries translations only
        print(format_summary(runtime.metrics.summary()), file=sys.stderr)


if __name__ == "__main__":
    main()
