#!/usr/bin/env python
"""mtmoe vs Hugging Face NLLB-MoE and a dense baseline, side by side (needs `pip install -e ".[bench]"`).

    python scripts/bench_vs_hf.py                      # default size; writes bench/vs_hf/results.{json,md,png}
    python scripts/bench_vs_hf.py --size tiny --threads 1 --train-batches 2 --decode-sentences 8 --out /tmp/b
    python scripts/bench_vs_hf.py --help               # every option

The suite itself lives in bench/vs_hf/ (see bench/vs_hf/suite.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.vs_hf.suite import main  # noqa: E402

if __name__ == "__main__":
    main()
