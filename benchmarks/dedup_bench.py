"""Dedup benchmarks (issue 14): ``python benchmarks/dedup_bench.py perceptual|semantic [ARGS...]``.

- ``perceptual``: near-pair search by multi-index hashing on random 64-bit hashes with planted
  pairs, against a brute-force scan on a subset (benchmarks/dedup_perceptual_bench.py; ``--help``).
- ``semantic``: SemDeDup on synthetic clustered embeddings with planted near-duplicates, against
  exact all-pairs search on a subset (benchmarks/dedup_semantic_bench.py; ``--help``).

Each prints its figures and the ratio against the reference measured in the same run.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SCRIPTS = {"perceptual": "dedup_perceptual_bench.py", "semantic": "dedup_semantic_bench.py"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in SCRIPTS:
        sys.exit(f"usage: python benchmarks/dedup_bench.py {{{'|'.join(SCRIPTS)}}} [ARGS...]")
    script = Path(__file__).with_name(SCRIPTS[sys.argv[1]])
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")
