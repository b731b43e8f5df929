"""Engine metrics: each backend's page mapped to one set of names (the data cases in
`engine_pages/`), the bounds on broken pages, and the scraper against hostile backends
(real sockets on loopback: a huge page, garbage, silence)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.assignment import Instance
from agent.engine_metrics import DOWN, EngineSample, Histogram, PageError, read_page
from agent.engine_scraper import EngineScraper, Target, targets
from agent.metrics import render_metrics
from agent.status import InstanceStatus

PAGES = Path(__file__).parent / "engine_pages"
CASES = sorted(PAGES.glob("*.json"))


def _bound(le: float) -> str:
    return "+Inf" if le == float("inf") else f"{le:g}"


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_backend_page_maps_to_the_engine_names(case_file: Path) -> None:
    case = json.loads(case_file.read_text())
    sample = read_page(case["backend"], (PAGES / case["page"]).read_text())
    expect = dict(case["expect"])
    ttft = expect.pop("time_to_first_token")
    for key, value in expect.items():
        assert getattr(sample, key) == pytest.approx(value), key
    if ttft is None:
        assert sample.time_to_first_token is None
        return
    got = sample.time_to_first_token
    assert got is not None
    assert (got.count, got.sum) == pytest.approx((ttft["count"], ttft["sum"]))
    buckets = {_bound(le): count for le, count in got.buckets}
    assert len(buckets) == ttft["bucket_count"]
    assert {le: buckets[le] for le in ttft["buckets"]} == ttft["buckets"]


def test_a_backend_without_metrics_reads_nothing() -> None:
    page = (PAGES / "vllm-0.33.0.txt").read_text()
    assert read_page("vox-box", page) == EngineSample(up=True)
    assert targets([(_inst("vox-box"), "ready"), (_inst("stable-diffusion.cpp"), "ready"),
                    (_inst("mindie"), "ready"), (_inst("custom"), "ready")]) == []


@pytest.mark.parametrize("page, reason", [
    ("<html><body>Not Found</body></html>\n", "not a sample line"),
    ('vllm:num_requests_running{model_name="q 1\n', "not closed"),
    ("vllm:num_requests_running\n", "has no value"),
    ("vllm:num_requests_running 1 2 3\n", "has no value"),
    ("vllm:num_requests_running one\n", "not a number"),
    ("vllm:time_to_first_token_seconds_bucket{model_name=\"q\"} 1\n", "has no `le`"),
    ("x" * 70000 + " 1\n", "longer than 64 KiB"),
    ("".join(f'vllm:time_to_first_token_seconds_bucket{{le="{i}"}} 1\n' for i in range(101)),
     "more than 100 histogram buckets"),
])
def test_a_broken_page_is_refused(page: str, reason: str) -> None:
    with pytest.raises(PageError, match=reason):
        read_page("vllm", page)


def test_nan_and_infinite_values_are_left_out_not_zero() -> None:
    page = ("vllm:num_requests_running NaN\nvllm:num_requests_waiting +Inf\n"
            'vllm:kv_cache_usage_perc{engine="0",note="a } in a \\" label"} 0.5\n')
    sample = read_page("vllm", page)
    assert sample.requests_running is None and sample.requests_waiting is None
    assert sample.kv_cache_usage_ratio == 0.5


def _inst(backend: str, role: str = "single", iid: str = "m-0") -> Instance:
    peers = [{"node": "n", "host": "127.0.0.1", "port": 1}] if role != "single" else []
    return Instance.model_validate({"id": iid, "model": "m", "source": "/m", "backend": backend,
                                    "port": 40000, "role": role, "peers": peers,
                                    "runtime_path": "/r", "api_key": "sk-k"})


def test_only_serving_mains_and_singles_of_backends_with_metrics_are_scraped() -> None:
    wanted = targets([(_inst("llama.cpp", iid="a"), "ready"),
                      (_inst("vllm", iid="b"), "unhealthy"),
                      (_inst("sglang", "main", iid="c"), "ready"),
                      (_inst("llama.cpp", "worker", iid="d"), "ready"),
                      (_inst("vllm", iid="e"), "starting"),
                      (_inst("vllm", iid="f"), "crash-looping"),
                      (_inst("vllm", iid="g"), "failed")])
    assert [t.instance for t in wanted] == ["a", "b", "c"]
    assert "sk-k" not in repr(wanted)


# ---- the scraper against real sockets ----------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _answer(body: bytes, status: str = "200 OK", seen: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head)
        writer.write(f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()
    return handle


async def _scrape(handler: Handler, backend: str = "llama.cpp",
                  **scraper: Any) -> tuple[EngineSample, float]:
    server, port = await _serve(handler)
    try:
        start = time.monotonic()
        got = await EngineScraper(**scraper).read([Target("m-0", backend, "127.0.0.1", port,
                                                          "sk-k")])
        return got["m-0"], time.monotonic() - start
    finally:
        server.close()


def test_scrape_reads_the_page_with_the_instance_key() -> None:
    seen: list[bytes] = []
    page = (PAGES / "llama-cpp-0.3.36.txt").read_bytes()
    sample, _ = asyncio.run(_scrape(_answer(page, seen=seen)))
    assert sample.up and sample.prompt_tokens_total == 25
    assert seen[0].startswith(b"GET /metrics HTTP/1.0\r\n")
    assert b"Authorization: Bearer sk-k\r\n" in seen[0]


def test_an_endless_page_fails_at_the_size_limit() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
        line = b"llamacpp:requests_processing 1\n" * 2048
        try:
            while True:  # never ends: only the reader's limit stops it
                writer.write(line)
                await writer.drain()
        except (ConnectionError, OSError):
            writer.close()

    sample, took = asyncio.run(_scrape(endless, timeout=60.0, limit=1024 * 1024))
    assert sample == DOWN
    assert took < 30  # stopped by the limit, not by the (60 s) timeout


def test_a_page_over_the_limit_fails_even_when_it_ends() -> None:
    page = b"llamacpp:requests_processing 1\n" * 40000  # 1.2 MB
    sample, _ = asyncio.run(_scrape(_answer(page), limit=1024 * 1024))
    assert sample == DOWN
    ok, _ = asyncio.run(_scrape(_answer(page), limit=2 * 1024 * 1024))
    assert ok.up and ok.requests_running == 40000


def test_garbage_an_error_status_and_no_http_fail() -> None:
    assert asyncio.run(_scrape(_answer(b"<html>hello</html>\n")))[0] == DOWN
    page = (PAGES / "llama-cpp-0.3.36.txt").read_bytes()
    assert asyncio.run(_scrape(_answer(page, status="501 Not Implemented")))[0] == DOWN

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x00\x01 binary noise")
        writer.close()
    assert asyncio.run(_scrape(not_http))[0] == DOWN


def test_a_silent_backend_fails_after_the_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    sample, took = asyncio.run(_scrape(silent, timeout=0.5))
    assert sample == DOWN
    assert took < 20


def test_nothing_listening_fails() -> None:
    async def closed_port() -> EngineSample:
        server, port = await _serve(_answer(b""))
        server.close()
        await server.wait_closed()
        got = await EngineScraper().read([Target("m-0", "vllm", "127.0.0.1", port)])
        return got["m-0"]

    assert asyncio.run(closed_port()) == DOWN


def test_requests_within_the_fresh_time_share_one_scrape() -> None:
    seen: list[bytes] = []
    page = (PAGES / "llama-cpp-0.3.36.txt").read_bytes()
    now = [100.0]

    async def run() -> list[dict[str, EngineSample]]:
        server, port = await _serve(_answer(page, seen=seen))
        scraper = EngineScraper(fresh_seconds=2.0, clock=lambda: now[0])
        wanted = [Target("m-0", "llama.cpp", "127.0.0.1", port)]
        try:
            together = await asyncio.gather(*(scraper.read(wanted) for _ in range(5)))
            now[0] += 1.0
            cached = await scraper.read(wanted)
            now[0] += 1.5
            again = await scraper.read(wanted)
            return [*together, cached, again]
        finally:
            server.close()

    results = asyncio.run(run())
    assert len(seen) == 2  # five requests at once and one a second later: one scrape
    assert all(r["m-0"].prompt_tokens_total == 25 for r in results)


# ---- the exported series -----------------------------------------------------------------

def _status(*instances: dict[str, Any]) -> dict[str, Any]:
    return {"node": "n1", "instances": list(instances)}


def _ready(iid: str, backend: str, model: str = "m") -> dict[str, Any]:
    return {"id": iid, "model": model, "backend": backend, "state": "ready", "restarts": 0}


def test_series_carry_the_labels_and_leave_out_what_the_backend_lacks() -> None:
    llama = read_page("llama.cpp", (PAGES / "llama-cpp-0.3.36.txt").read_text())
    vllm = read_page("vllm", (PAGES / "vllm-0.33.0.txt").read_text())
    text = render_metrics(_status(_ready("a-0", "llama.cpp"), _ready("b-0", "vllm"),
                                  _ready("c-0", "vox-box"), _ready("d-0", "vllm")),
                          "unavailable", [], {"a-0": llama, "b-0": vllm, "d-0": DOWN})
    labels = 'node="n1",model="m",instance="a-0",backend="llama.cpp"'
    assert f"modelstack_engine_up{{{labels}}} 1" in text
    assert f"modelstack_engine_prompt_tokens_total{{{labels}}} 25" in text
    assert f"modelstack_engine_generation_tokens_total{{{labels}}} 5" in text
    assert f"modelstack_engine_requests_waiting{{{labels}}} 0" in text
    assert 'kv_cache_usage_ratio{node="n1",model="m",instance="a-0"' not in text
    assert 'time_to_first_token_seconds_bucket{node="n1",model="m",instance="a-0"' not in text
    vl = 'node="n1",model="m",instance="b-0",backend="vllm"'
    assert f"modelstack_engine_kv_cache_usage_ratio{{{vl}}} 0.5" in text
    assert f'modelstack_engine_time_to_first_token_seconds_bucket{{{vl},le="+Inf"}} 5' in text
    assert f'modelstack_engine_time_to_first_token_seconds_bucket{{{vl},le="0.06"}} 2' in text
    assert f"modelstack_engine_time_to_first_token_seconds_count{{{vl}}} 5" in text
    # a failed scrape: up 0 and nothing else; a backend without metrics: nothing at all
    assert 'modelstack_engine_up{node="n1",model="m",instance="d-0",backend="vllm"} 0' in text
    assert [line for line in text.splitlines() if 'instance="d-0"' in line
            and line.startswith("modelstack_engine_")] == [
        'modelstack_engine_up{node="n1",model="m",instance="d-0",backend="vllm"} 0']
    assert not [line for line in text.splitlines()
                if 'instance="c-0"' in line and line.startswith("modelstack_engine_")]
    for name in ("up", "requests_running", "prompt_tokens_total", "time_to_first_token_seconds"):
        assert text.count(f"# TYPE modelstack_engine_{name} ") == 1


def test_label_values_are_escaped() -> None:
    text = render_metrics(_status(_ready('x"0', "vllm", model='a\\b\nc')), "unavailable", [],
                          {'x"0': EngineSample(up=True, requests_running=1)})
    assert ('modelstack_engine_requests_running{node="n1",model="a\\\\b\\nc",instance="x\\"0",'
            'backend="vllm"} 1') in text


def test_status_engine_object_has_every_field_and_nulls_for_missing_ones() -> None:
    sample = EngineSample(up=True, requests_running=2.0, kv_cache_usage_ratio=1.0,
                          prompt_tokens_total=10.0,
                          time_to_first_token=Histogram(((1.0, 1.0),), 0.5, 1.0))
    assert sample.as_status("vllm") == {
        "backend": "vllm", "up": True, "requests_running": 2, "requests_waiting": None,
        "kv_cache_usage_ratio": 1.0, "prompt_tokens_total": 10,
        "generation_tokens_total": None}
    assert DOWN.as_status("sglang") == {
        "backend": "sglang", "up": False, "requests_running": None, "requests_waiting": None,
        "kv_cache_usage_ratio": None, "prompt_tokens_total": None,
        "generation_tokens_total": None}


def test_the_controller_reads_and_carries_the_engine_object() -> None:
    sample = EngineSample(up=True, requests_running=3.0, kv_cache_usage_ratio=0.25)
    engine = sample.as_status("vllm")
    inst = InstanceStatus.model_validate({"id": "q-0", "model": "q", "backend": "vllm",
                                          "port": 1, "engine": engine})
    assert inst.engine is not None and inst.engine.requests_running == 3
    assert inst.to_json()["engine"] == engine
    assert "engine" not in InstanceStatus(id="q-0", model="q", backend="vllm", port=1).to_json()
