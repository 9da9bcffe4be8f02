"""mtmoe-eval: score an export on a line-aligned test set, every direction, BLEU and chrF.

    mtmoe-eval model=exports/main test=data/multi30k/test_2016_flickr beam=4 out=results/test.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from mtmoe.cli.common import friendly_errors, setup
from mtmoe.config import ConfigError
from mtmoe.paths import CONF_DIR, resolve

setup()


def evaluate_export(model_dir, test: str, langs=None, directions=None, beam: int = 4, length_penalty: float = 1.0,
                    max_tokens: int = 4096, limit: int = 0, out=None) -> dict:
    """Translates and scores every requested direction; returns (and optionally writes) the report."""
    from mtmoe.data.corpus import available_languages, load_test_set
    from mtmoe.data.sampling import parse_directions
    from mtmoe.eval.decode import translate
    from mtmoe.eval.score import format_table, score_direction, summarize
    from mtmoe.export.artifact import load_export

    model, vocab, config = load_export(resolve(model_dir))
    known = config["langs"]
    if langs is None:
        langs = available_languages(test, known)
    unknown = [lang for lang in langs if lang not in known]
    if unknown:
        raise ConfigError(f"langs: {unknown} unknown to the model (it knows {known})")
    pairs = parse_directions(directions or "all", langs)
    needed = sorted({lang for pair in pairs for lang in pair})
    texts = load_test_set(test, needed)
    if limit:
        texts = {lang: lines[:limit] for lang, lines in texts.items()}
    per_direction, hyps_by_direction = {}, {}
    started = time.monotonic()
    total = len(pairs) * len(texts[needed[0]])
    with tqdm(total=total, unit="sent", desc="decode", mininterval=2.0) as bar:
        for src, tgt in pairs:
            hyps = translate(model, vocab, texts[src], tgt, beam, length_penalty, max_tokens, progress=bar)
            per_direction[f"{src}-{tgt}"] = score_direction(hyps, texts[tgt])
            hyps_by_direction[f"{src}-{tgt}"] = hyps
    seconds = time.monotonic() - started
    report = {"model": str(model_dir), "test": str(test), "beam": beam, "length_penalty": length_penalty,
              "directions": per_direction, "mean": summarize(per_direction),
              "decode_seconds": round(seconds, 1), "sentences_per_s": round(total / max(seconds, 1e-9), 2)}
    table = format_table(per_direction, f"{Path(str(model_dir)).name} on {Path(test).name} (beam {beam})")
    report["table"] = table
    if out:
        out = resolve(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".txt").write_text(table + "\n")
        for name, hyps in hyps_by_direction.items():
            out.with_name(f"{out.stem}.{name}.hyp").write_text("\n".join(hyps) + "\n")
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR / "tools"), config_name="eval")
@friendly_errors
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report = evaluate_export(cfg.model, cfg.test, list(cfg.langs) if cfg.langs else None, cfg.directions,
                             cfg.beam, cfg.length_penalty, cfg.max_tokens, cfg.limit, cfg.out)
    print(report["table"])
    print(f"decoding: {report['sentences_per_s']} sentences/s")


if __name__ == "__main__":
    main()
