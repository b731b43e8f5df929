"""Reading a GGUF header: stack's walker vs the `gguf` package's GGUFReader, side by side.

    .venv/bin/python bench/gguf_header_bench.py [--runs 5] [--model PATH]

Every `stack plan`, `apply` and `estimate` reads the header of each GGUF model (key/values
and tensor infos, not the weights). The test model (Gemma 3 270M, STACK_TEST_MODEL or
scripts/setup-model's cache) has a 262,144-token vocabulary: the header is mostly that
string list. Alternates the two readers on the same file (page cache warm after the first
read) and prints the medians and their ratio; both must agree on the tensor bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf import GGUFReader  # noqa: E402

from stack.estimate.gguf_header import read_gguf_header  # noqa: E402

DEFAULT = Path(os.environ.get("STACK_TEST_MODEL") or Path.home() / ".cache" / "modelstack"
               / "models" / "gemma-3-270m-q4_k_m.gguf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", type=Path, default=DEFAULT)
    args = parser.parse_args()
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(args.runs):
        start = time.perf_counter()
        header = read_gguf_header(args.model)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        reader = GGUFReader(args.model)
        theirs.append(time.perf_counter() - start)
        assert header.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"model: {args.model.name} ({args.model.stat().st_size / 2**20:.0f} MiB, "
          f"{header.array_lengths.get('tokenizer.ggml.tokens', 0):,} tokens, "
          f"{len(header.tensors)} tensors)")
    print(f"stack read_gguf_header: median {a * 1000:.1f} ms  runs "
          f"{[round(x * 1000, 1) for x in ours]}")
    print(f"gguf GGUFReader:        median {b * 1000:.1f} ms  runs "
          f"{[round(x * 1000, 1) for x in theirs]}")
    print(f"GGUFReader / stack: {b / a:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
