"""sacrebleu BLEU and chrF per direction, with the metric signatures, as JSON and a table."""

from __future__ import annotations

from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF


def score_direction(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (13a tokenization) and chrF of one direction, with sacrebleu signatures."""
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": round(b.score, 2), "chrf": round(c.score, 2), "lines": len(hypotheses),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def summarize(per_direction: dict[str, dict]) -> dict:
    """Mean BLEU/chrF over directions."""
    if not per_direction:
        return {"bleu": 0.0, "chrf": 0.0}
    n = len(per_direction)
    return {"bleu": round(sum(d["bleu"] for d in per_direction.values()) / n, 2),
            "chrf": round(sum(d["chrf"] for d in per_direction.values()) / n, 2)}


def format_table(per_direction: dict[str, dict], title: str = "") -> str:
    """A fixed-width table: direction, BLEU, chrF, lines (+ a mean row)."""
    rows = [f"{'direction':<10} {'BLEU':>6} {'chrF':>6} {'lines':>6}"]
    for name, r in per_direction.items():
        rows.append(f"{name:<10} {r['bleu']:>6.2f} {r['chrf']:>6.2f} {r.get('lines', 0):>6}")
    mean = summarize(per_direction)
    rows.append(f"{'mean':<10} {mean['bleu']:>6.2f} {mean['chrf']:>6.2f}")
    return (title + "\n" if title else "") + "\n".join(rows)
