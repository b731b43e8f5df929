"""The llama.cpp CPU estimate against a real llama-server's resident memory (about 15 s)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "estimate_accuracy.py"


def _bench(llama_bin: Path) -> Any:
    """bench/estimate_accuracy.py as a module, using this llama.cpp build."""
    os.environ.setdefault("STACK_LLAMA_BIN", str(llama_bin))
    spec = importlib.util.spec_from_file_location("estimate_accuracy", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.integration
def test_cpu_estimate_is_within_15_percent_of_llama_server_rss(
        llama_bin: Path, gguf_model: Path) -> None:
    bench = _bench(llama_bin)
    claim = bench.estimate(gguf_model, 2048)
    measured = bench.measure(llama_bin, gguf_model, 2048)["VmRSS"]
    assert abs(claim.ram_bytes - measured) / measured <= 0.15, (claim.detail, measured)


@pytest.mark.integration
def test_partial_offload_over_rpc_is_within_15_percent_of_main_and_worker_rss(
        llama_bin: Path, gguf_model: Path) -> None:
    bench = _bench(llama_bin)
    main, worker = bench.estimate_rpc(gguf_model, 2048, 10)
    runs = [bench.measure_rpc(llama_bin, gguf_model, 2048, 10) for _ in range(3)]
    got_main = sorted(r[0] for r in runs)[1]  # the median: the main's mmapped pages vary
    got_worker = sorted(r[1] for r in runs)[1]
    assert abs(main - got_main) / got_main <= 0.15, (main, got_main)
    assert abs(worker - got_worker) / got_worker <= 0.15, (worker, got_worker)
