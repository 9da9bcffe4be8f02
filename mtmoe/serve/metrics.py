"""What the serving runtime measures, per MoE layer and in total.

An *activation* is one call of one expert on > 0 rows (an expert with no rows is never loaded).
It is a *hit* when the expert was resident and complete, a *prefetch hit* when it got there by a
prefetch not yet used, a *late prefetch* when compute had to wait for a prefetch still loading,
and a *miss* otherwise (an on-demand load). A prefetch still queued (not started) when compute
needs its expert is taken over by compute and counts as a late prefetch.
*Stall time* is the time compute waited for experts (misses and late prefetches). *Bytes moved*
count every slow -> fast copy, prefetches included, wasted or not. *Resident expert bytes* are
the fast-tier slot buffers allocated so far (slots are allocated on first use and kept).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields


@dataclass
class LayerCounts:
    activations: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    late_prefetches: int = 0
    misses: int = 0
    prefetch_loads: int = 0
    wasted_prefetches: int = 0  # prefetched, then evicted or cancelled before any use
    bytes_moved: int = 0
    stall_s: float = 0.0
    resident_bytes: int = 0


class ServeMetrics:
    """Thread-safe counters (compute adds to them; mtmoe-eval merges its workers' summaries)."""

    def __init__(self, layers: list[str], policy: str, capacities: dict[str, int], all_expert_bytes: int,
                 budget: str):
        self.policy, self.capacities, self.all_expert_bytes, self.budget = policy, capacities, all_expert_bytes, budget
        self.layers = {name: LayerCounts() for name in layers}
        self._lock = threading.Lock()
        self.peak_resident_bytes = 0
        self.sentences, self.decode_s = 0, 0.0

    def add(self, layer: str, **counts) -> None:
        with self._lock:
            c = self.layers[layer]
            for name, value in counts.items():
                setattr(c, name, getattr(c, name) + value)
            if "resident_bytes" in counts:
                self.peak_resident_bytes = max(self.peak_resident_bytes,
                                               sum(x.resident_bytes for x in self.layers.values()))

    def add_decode(self, sentences: int, seconds: float) -> None:
        """Sentences decoded and the wall time it took (the caller times its own decoding)."""
        with self._lock:
            self.sentences += sentences
            self.decode_s += seconds

    def reset(self) -> None:
        """Zeroes the counters (e.g. after a warm-up), keeping what is resident."""
        with self._lock:
            for c in self.layers.values():
                resident = c.resident_bytes
                for f in fields(c):
                    setattr(c, f.name, type(getattr(c, f.name))())
                c.resident_bytes = resident
            self.peak_resident_bytes = sum(c.resident_bytes for c in self.layers.values())
            self.sentences, self.decode_s = 0, 0.0

    def summary(self) -> dict:
        """Totals, rates and a per-layer breakdown, JSON-ready."""
        with self._lock:
            total = LayerCounts()
            for c in self.layers.values():
                for f in fields(c):
                    setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
            out = {"policy": self.policy, "experts_per_layer": dict(self.capacities), "budget": self.budget,
                   **asdict(total)}
            del out["resident_bytes"]
            out.update(hit_rate=_rate(total.hits, total.activations),
                       prefetch_hit_rate=_rate(total.prefetch_hits, total.activations),
                       stall_s=round(total.stall_s, 4),
                       peak_resident_expert_bytes=self.peak_resident_bytes,
                       all_expert_bytes=self.all_expert_bytes,
                       sentences=self.sentences, decode_s=round(self.decode_s, 3),
                       sentences_per_s=round(self.sentences / self.decode_s, 2) if self.decode_s else None,
                       layers={name: {"activations": c.activations, "hit_rate": _rate(c.hits, c.activations),
                                      "prefetch_hits": c.prefetch_hits, "stall_s": round(c.stall_s, 4)}
                               for name, c in self.layers.items()})
            return out


def _rate(part: int, whole: int):
    return round(part / whole, 4) if whole else None


def format_summary(s: dict) -> str:
    """One line for a terminal or a report table."""
    mib = 1 << 20
    return (f"serving: prefetch={s['policy']} experts/layer={s['experts_per_layer']} budget={s['budget']} "
            f"hit rate {s['hit_rate']} (prefetch hits {s['prefetch_hits']} of {s['activations']} activations), "
            f"{s['bytes_moved'] / mib:.1f} MiB moved, stall {s['stall_s']:.2f} s, "
            f"peak resident experts {s['peak_resident_expert_bytes'] / mib:.2f} of "
            f"{s['all_expert_bytes'] / mib:.2f} MiB"
            + (f", {s['sentences_per_s']} sentences/s" if s.get("sentences_per_s") else ""))


def merge_summaries(summaries: list[dict], sentences: int, seconds: float) -> dict:
    """Summaries of the processes that decoded one job (mtmoe-eval workers) as one, with the job's
    sentences and wall time: counters and stall times add up, the peak resident bytes is the
    largest single process's (each process has its own fast tier)."""
    out = dict(summaries[0])
    for key in ("activations", "hits", "prefetch_hits", "late_prefetches", "misses", "prefetch_loads",
                "wasted_prefetches", "bytes_moved", "stall_s"):
        out[key] = sum(s[key] for s in summaries)
    out["peak_resident_expert_bytes"] = max(s["peak_resident_expert_bytes"] for s in summaries)
    out["hit_rate"] = _rate(out["hits"], out["activations"])
    out["prefetch_hit_rate"] = _rate(out["prefetch_hits"], out["activations"])
    out.update(sentences=sentences, decode_s=round(seconds, 3),
               sentences_per_s=round(sentences / seconds, 2) if seconds else None)
    if len(summaries) > 1:
        out["layers"] = None  # per-layer rates of separate processes are not merged
        out["processes"] = len(summaries)
    return out
