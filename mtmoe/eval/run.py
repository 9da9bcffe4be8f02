"""Scoring an export on a line-aligned test set: every requested direction, BLEU and chrF.

Directions can be decoded by several worker processes (`workers`), each with one torch thread:
on small CPU boxes two single-threaded processes decode faster than one with two threads.

With `serve` offloading experts (mtmoe.serve), each decoding process has its own fast tier and
the report gains a `serving` section: hit rate, bytes moved, stall time, peak resident expert bytes.
With `subset.mass`, each direction is decoded by a model holding only the experts it needs, and the
report gains a `subset` section: the experts and expert bytes held per direction."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from mtmoe.config import TELEMETRY_NEEDS_OUT, ServeConfig, SubsetConfig, check_subset
from mtmoe.data.corpus import available_languages, find_language_file, load_test_set
from mtmoe.data.sampling import parse_directions
from mtmoe.data.vocab import Vocab
from mtmoe.device import resolve_device
from mtmoe.errors import ConfigError, CorpusError
from mtmoe.eval.telemetry import plot_heatmap
from mtmoe.export.routing import collect_routing
from mtmoe.export.subset import choose_subset, format_held, load_subset
from mtmoe.formats.export_format import load_export, read_export_config, trained_directions, warn_zero_shot
from mtmoe.model.generation import translate_per_penalty, warn_cut_lines
from mtmoe.paths import output_path, resolve
from mtmoe.scoring import format_table, score_direction, summarize
from mtmoe.serve.metrics import format_summary, merge_summaries
from mtmoe.serve.runtime import load_for_serving
from mtmoe.serve.validate import check_serve, offloading

log = logging.getLogger("mtmoe")


def _translate_pairs(model_dir: str, texts: dict, pairs: Sequence[tuple], beam: int, length_penalties: Sequence[float],
                     max_tokens: int, serve: Optional[ServeConfig], subset_mass: Optional[float],
                     device: torch.device, on_done=None
                     ) -> tuple[dict[str, list[list[str]]], Optional[dict], dict[str, dict], Optional[tuple], float]:
    """Translates the (src, tgt) `pairs` with one load of the export (with `subset_mass`, one load
    of that direction's expert subset per pair), one beam search for all `length_penalties`.
    Returns (hypotheses per direction, one list per penalty; serving metrics (offloading only),
    experts held per direction (subsets only), (model, vocab) of the full export when it was
    loaded whole and resident, seconds spent decoding: loading the model and building the expert
    store not included)."""
    hyps: dict[str, list[list[str]]] = {}
    held: dict[str, dict] = {}
    model = vocab = runtime = None
    decoding = 0.0
    try:
        for src, tgt in pairs:
            name = f"{src}-{tgt}"
            if subset_mass:
                model, vocab, _, held[name] = load_subset(model_dir, name, subset_mass, device)
            elif model is None:
                model, vocab, _, runtime = load_for_serving(model_dir, serve, device)
            if runtime is not None:
                runtime.set_direction(src, tgt)  # language-aware serving seeds its caches for it
            started = time.monotonic()
            hyps[name] = translate_per_penalty(model, vocab, texts[src], tgt, beam, length_penalties, max_tokens)
            decoding += time.monotonic() - started
            if on_done is not None:
                on_done()
    finally:
        if runtime is not None:
            runtime.close()
    full = (model, vocab) if model is not None and runtime is None and not subset_mass else None
    return hyps, None if runtime is None else runtime.metrics.summary(), held, full, decoding


def _decode_direction(model_dir: str, texts: dict, pair: tuple, beam: int, length_penalties: Sequence[float],
                      max_tokens: int, threads: int, serve: Optional[ServeConfig], subset_mass: Optional[float],
                      device: torch.device):
    """Worker process: translates one (src, tgt) pair (see _translate_pairs)."""
    torch.set_num_threads(threads)
    hyps, metrics, held, _, decoding = _translate_pairs(model_dir, texts, [pair], beam, length_penalties, max_tokens,
                                                        serve, subset_mass, device)
    return hyps, metrics, held, decoding


def select_directions(config: dict, test: str, langs: Optional[Sequence[str]] = None,
                      directions: Optional[str | Sequence[str]] = None) -> list[tuple[str, str]]:
    """The (src, tgt) pairs to score: `directions` when given (against `langs`, else the model's
    languages: a missing test file is then named by the loader), else the directions the model was
    trained on (every direction for exports that do not record them) between `langs` (default: the
    model's languages that have a test file)."""
    known = config["langs"]
    if langs:
        unknown = [lang for lang in langs if lang not in known]
        if unknown:
            raise ConfigError(f"langs: {unknown} unknown to the model (it knows {known})")
    if directions is not None:
        return parse_directions(directions, list(langs) if langs else known)
    langs = list(langs) if langs else available_languages(test, known)
    if not langs:
        raise CorpusError(f"{test}.<lang>[.gz]: no test file for any language of the model ({', '.join(known)})")
    trained = trained_directions(config)
    pairs = [(s, t) for s, t in parse_directions("all", langs) if trained is None or f"{s}-{t}" in trained]
    if not pairs:
        raise ConfigError(f"the test set's languages {langs} hold none of the directions the model was trained on "
                          f"({', '.join(trained)}); ask for directions=... to score them zero-shot")
    return pairs


def check_report_path(out: Path) -> Path:
    """`out` when a report can be written there (its folder made): ConfigError naming `out` for a
    folder, a .txt name (the table is written to `out` with .txt) or a folder that cannot be made."""
    if out.suffix == ".txt":
        raise ConfigError(f"out={out}: the report's table is written beside it with .txt; name the report .json")
    if out.is_dir():
        raise ConfigError(f"out={out} is a folder: give a file name for the report (e.g. {out}/eval.json)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out={out}: cannot make its folder ({e})") from e
    return out


def evaluate_export(model_dir, test: str, langs: Optional[Sequence[str]] = None,
                    directions: Optional[str | Sequence[str]] = None,
                    beam: int = 4, length_penalty: float = 1.0, max_tokens: int = 4096, limit: int = 0,
                    out=None, workers: int = 1, threads: int = 0, telemetry: bool = False,
                    serve: Optional[ServeConfig] = None, subset: Optional[SubsetConfig] = None,
                    tuned: Optional[dict] = None, device: str | torch.device = "cpu") -> dict:
    """Translates and scores the requested directions (`select_directions`); returns (and with
    `out`, writes) the report: `out` (JSON), `out` with .txt (the table) and
    `<out stem>.<src>-<tgt>.hyp` (hypotheses). Directions the model was not trained on are scored
    as zero-shot: a warning, and their own section (`zero_shot`) outside the mean.
    `serve`: the serving runtime's options (default: every expert resident); `subset`: per
    direction, only the experts carrying `subset.mass` of its routing (mtmoe.export.subset).
    `tuned`: how `beam` and `length_penalty` were picked (mtmoe.eval.tune), recorded in the report.
    `device`: a `device=` value (auto, cpu, cuda, cuda:N) or a torch.device; decoding runs there."""
    device = resolve_device(device) if isinstance(device, str) else device
    model_dir = str(resolve(model_dir))
    if telemetry and not read_export_config(model_dir)["moe"]["enabled"]:
        raise ConfigError(f"telemetry=true: {model_dir} is a dense model (no MoE layer routes anything)")
    if telemetry and not out:
        raise ConfigError(TELEMETRY_NEEDS_OUT)
    out = check_report_path(output_path(out)) if out else None  # before the decoding, not after it
    scored = _decode_and_score(model_dir, test, langs, directions, beam, [length_penalty], max_tokens, limit,
                               workers, threads, serve, subset, tuned, device)
    report, hyps = scored.reports[0], scored.hyps[0]
    if telemetry:
        # decoded in workers, offloaded or by subsets: load it here
        model, vocab = scored.full or load_export(model_dir, device=device)[:2]
        routing = collect_routing(model, vocab, scored.texts, scored.pairs, progress="telemetry")
        stem = out.with_suffix("")
        Path(f"{stem}.telemetry.json").write_text(json.dumps(routing, indent=1))
        plot_heatmap(routing, Path(f"{stem}.telemetry.png"))
        report["telemetry"] = f"{stem}.telemetry.json"
        log.info("routing telemetry: %s (.png beside it)", report["telemetry"])
    if out:
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".txt").write_text(report["table"] + "\n")
        for name, lines in hyps.items():
            out.with_name(f"{out.stem}.{name}.hyp").write_text("\n".join(lines) + "\n")
    return report


def evaluate_penalties(model_dir, test: str, length_penalties: Sequence[float], langs: Optional[Sequence[str]] = None,
                       directions: Optional[str | Sequence[str]] = None, beam: int = 4, max_tokens: int = 4096,
                       limit: int = 0, workers: int = 1, threads: int = 0, serve: Optional[ServeConfig] = None,
                       subset: Optional[SubsetConfig] = None, device: str | torch.device = "cpu") -> list[dict]:
    """The report `evaluate_export` gives for each of `length_penalties` (nothing written), from one
    decoding: the penalty only ranks a sentence's finished beam hypotheses, so one search serves all
    (`mtmoe.model.generation.beam_search_finished`)."""
    device = resolve_device(device) if isinstance(device, str) else device
    return _decode_and_score(str(resolve(model_dir)), test, langs, directions, beam, list(length_penalties),
                             max_tokens, limit, workers, threads, serve, subset, None, device).reports


@dataclass
class _Scored:
    reports: list[dict]  # one per length penalty
    hyps: list[dict[str, list[str]]]  # per length penalty: direction -> translations
    texts: dict[str, list[str]]  # language -> the test lines decoded
    pairs: list[tuple[str, str]]
    full: Optional[tuple]  # (model, vocab) when this process decoded with the whole export resident


def _decode_and_score(model_dir: str, test: str, langs, directions, beam: int, length_penalties: list[float],
                      max_tokens: int, limit: int, workers: int, threads: int, serve: Optional[ServeConfig],
                      subset: Optional[SubsetConfig], tuned: Optional[dict], device: torch.device) -> _Scored:
    """Checks the options and the test files, decodes every direction once (one beam search for all
    `length_penalties`) and scores it per penalty."""
    if serve is not None:
        check_serve(serve)
    if subset is not None:
        check_subset(subset, serve or ServeConfig())
    config = read_export_config(model_dir)
    pairs = select_directions(config, test, langs, directions)
    untrained = warn_zero_shot(config, pairs, "directions")
    needed = sorted({lang for pair in pairs for lang in pair})
    texts = load_test_set(test, needed)
    if limit:
        texts = {lang: lines[:limit] for lang, lines in texts.items()}
    spm = Vocab(Path(model_dir) / "spm.model")
    for src in sorted({s for s, _ in pairs}):
        warn_cut_lines(spm, texts[src], config["model"]["max_positions"],
                       str(find_language_file(resolve(test), src) or f"{test}.{src}"))

    subset_mass = subset.mass if subset is not None else None
    if subset_mass:
        for src, tgt in pairs:  # every direction has statistics, before any decoding
            choose_subset(model_dir, f"{src}-{tgt}", subset_mass)

    hyps: dict[str, list[list[str]]] = {}  # direction -> translations per length penalty
    serving: list[dict] = []  # serving metrics of each decoding process (offloading only)
    held: dict[str, dict] = {}  # experts held per direction (subsets only)
    workers = max(1, min(workers, len(pairs)))
    full = None
    with tqdm(total=len(pairs), unit="direction", desc="decode") as bar:
        if workers == 1:
            if threads:
                torch.set_num_threads(threads)
            hyps, metrics, held, full, decoding = _translate_pairs(model_dir, texts, pairs, beam, length_penalties,
                                                                   max_tokens, serve, subset_mass, device,
                                                                   on_done=lambda: bar.update(1))
            serving += [metrics] if metrics is not None else []
        else:
            if offloading(serve):  # write the expert store once, before the workers read it
                load_for_serving(model_dir, serve)[3].close()
            decoding = 0.0
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(_decode_direction, model_dir, texts, pair, beam, length_penalties,
                                       max_tokens, threads or 1, serve, subset_mass, device) for pair in pairs]
                for future in as_completed(futures):
                    lines, metrics, pair_held, seconds = future.result()
                    decoding += seconds
                    hyps.update(lines)
                    held.update(pair_held)
                    if metrics is not None:
                        serving.append(metrics)
                    bar.update(1)
    # The time beam searches took (loading the model and the expert store not included), summed over
    # the workers: sentences/s is one decoding process's speed with any number of workers.
    seconds = decoding
    total = len(pairs) * len(texts[needed[0]])
    reports, per_penalty = [], []
    for i, length_penalty in enumerate(length_penalties):
        lines = {name: per_direction[i] for name, per_direction in hyps.items()}
        per_penalty.append(lines)
        reports.append(_report(model_dir, test, beam, length_penalty, device, pairs, untrained, texts, lines,
                               seconds, total, serving, held, subset_mass, tuned))
    return _Scored(reports, per_penalty, texts, pairs, full)


def _report(model_dir: str, test: str, beam: int, length_penalty: float, device: torch.device, pairs, untrained,
            texts: dict, hyps: dict[str, list[str]], seconds: float, total: int, serving: list[dict],
            held: dict[str, dict], subset_mass: Optional[float], tuned: Optional[dict]) -> dict:
    """The report of one decoding setting: scores per direction, mean, zero-shot section, table."""
    scores = {f"{s}-{t}": score_direction(hyps[f"{s}-{t}"], texts[t]) for s, t in pairs}
    per_direction = {name: r for name, r in scores.items() if name not in untrained}
    report = {"model": model_dir, "test": str(test), "beam": beam, "length_penalty": length_penalty,
              "device": str(device),
              "directions": per_direction, "mean": summarize(per_direction) if per_direction else None,
              "decode_seconds": round(seconds, 1), "sentences_per_s": round(total / max(seconds, 1e-9), 2)}
    title = f"{Path(model_dir).name} on {Path(test).name} (beam {beam}" + (
        f", length penalty {length_penalty} picked on {Path(tuned['on']).name})" if tuned else ")")
    tables = [format_table(per_direction, title)] if per_direction else [title]
    if untrained:
        zero = {name: scores[name] for name in untrained}
        report["zero_shot"] = {"directions": zero, "mean": summarize(zero)}
        tables.append(format_table(zero, "zero-shot (directions the model was not trained on; not in the mean above)"
                                   if per_direction else "zero-shot (directions the model was not trained on)"))
    report["table"] = "\n\n".join(tables)
    if tuned:
        report["tuned"] = tuned
    if serving:
        report["serving"] = merge_summaries(serving, total, seconds)
        report["table"] += "\n" + format_summary(report["serving"])
    if held:
        report["subset"] = {"mass": subset_mass, "directions": {f"{s}-{t}": held[f"{s}-{t}"] for s, t in pairs}}
        report["table"] += "".join("\n" + format_held(held[f"{s}-{t}"]) for s, t in pairs)
    return report
