"""The llama.cpp CPU estimate against a real llama-server's resident memory (about 15 s)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "estimate_accuracy.py"


@pytest.mark.integration
def test_cpu_estimate_is_within_15_percent_of_llama_server_rss(
        llama_bin: Path, gguf_model: Path) -> None:
    spec = importlib.util.spec_from_file_location("estimate_accuracy", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    os.environ.setdefault("STACK_LLAMA_BIN", str(llama_bin))
    spec.loader.exec_module(bench)
    claim = bench.estimate(gguf_model, 2048)
    measured = bench.measure(llama_bin, gguf_model, 2048)["VmRSS"]
    assert abs(claim.ram_bytes - measured) / measured <= 0.15, (claim.detail, measured)
