"""The real-encoder alignment benchmark (`make demo-full`), written under benchmarks/results/.

Every task of `sotalign.align.tasks` (emoji-out: OpenClipArt + WordNet unpaired pools;
emoji-in: the other emoji, images and names of disjoint halves; emoji-hidden: the other emoji,
pairing withheld), 100/300/1000 pairs, seeds 0–2, methods teacher, ridge, SAIL,
STRUCTURE, NNCLR and SOTAlign with the settings of `sotalign.demo.METHODS`:

    python benchmarks/alignment/run.py --machine <name>          # ≈ 40 min a task on a busy 2-core machine
    python benchmarks/alignment/run.py --machine <name> --tasks emoji-in --pairs 100

Writes `benchmarks/results/<machine>-benchmark.{md,png,jsonl}`.
"""

import sys
from pathlib import Path

from sotalign.demo import main

if __name__ == "__main__":
    main(["--full", "--out", str(Path(__file__).resolve().parents[1] / "results"), *sys.argv[1:]])
