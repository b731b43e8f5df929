"""The model store: download progress, the finished-download record and its size check.

The hub call itself is replaced by a stand-in that writes into the cache folder the way
huggingface_hub does (the real download path runs against an offline cache in
test_agent_process.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.assignment import Instance
from agent.models import Download, ModelStore


def test_download_reports_progress_then_records_sizes_and_refetches_a_changed_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    calls = []

    def fake_hf(self: Download) -> str:
        calls.append(self.ref.repo)
        blobs = self.cache_dir / "huggingface" / "models--org--m" / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        self.total = 1000
        (blobs / "abc.incomplete").write_bytes(b"x" * 250)
        release.wait(10)
        final = blobs / "abc"
        (blobs / "abc.incomplete").rename(final)
        final.write_bytes(b"x" * 1000)
        return str(final)

    monkeypatch.setattr(Download, "_hf", fake_hf)
    store = ModelStore(tmp_path / "models", tmp_path / "state")
    inst = Instance(id="m-0", model="m", source="hf://org/m/model.gguf", backend="llama.cpp",
                    runtime_path="/r", port=40001)
    first = store.resolve(inst)
    assert first.path is None and first.error is None
    deadline = time.monotonic() + 5
    while store.resolve(inst).progress != {"bytes_done": 250, "bytes_total": 1000,
                                           "fraction": 0.25}:
        assert time.monotonic() < deadline, store.resolve(inst)
        time.sleep(0.01)
    release.set()
    while (done := store.resolve(inst)).path is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert done.path and Path(done.path).stat().st_size == 1000
    assert store.resolve(inst).path == done.path and calls == ["org/m"]  # recorded: no refetch

    release.clear()  # the refetch waits (else it could finish inside the next resolve)
    Path(done.path).write_bytes(b"short")  # a truncated file is fetched again
    assert store.resolve(inst).path is None
    deadline = time.monotonic() + 5
    while calls != ["org/m", "org/m"]:
        assert time.monotonic() < deadline, calls
        time.sleep(0.01)
    release.set()


def test_failed_download_fails_the_instance_with_a_hint_and_retries_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: Download) -> str:
        raise OSError("connection refused")

    monkeypatch.setattr(Download, "_hf", failing)
    store = ModelStore(tmp_path / "models", tmp_path / "state")
    inst = Instance(id="m-0", model="m", source="hf://org/m", backend="vllm",
                    runtime_path="/r", port=40001)
    store.resolve(inst)
    store.downloads["hf://org/m"].thread.join(5)
    status = store.resolve(inst)
    assert status.error is not None
    assert status.error.startswith("download of hf://org/m failed: OSError: connection refused")
    assert "hint: check that this host reaches the hub" in status.error
