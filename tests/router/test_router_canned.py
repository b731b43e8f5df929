"""The router as a real process in front of canned upstreams, driven by the `openai` client."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from router_harness import ROUTER, Harness, get, key_hash, metric, replica

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def client(port: int, key: str = "none", **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                         **kw)  # type: ignore[arg-type]


def test_chat_sync_async_stream_and_alias(harness: Harness) -> None:
    up = harness.upstream("--api-key", "inst-1", "--chunks", "7")
    r = harness.router({"models": [{"name": "m", "aliases": ["m-alias"],
                                    "replicas": [replica("a", up, "inst-1")]}]})
    c = client(r.port)
    reply = c.chat.completions.create(model="m-alias", messages=MSG)
    assert reply.choices[0].message.content == "Hello from the canned upstream."
    raw = c.chat.completions.with_raw_response.create(model="m", messages=MSG)
    assert float(raw.headers["x-modelstack-overhead-ms"]) >= 0
    chunks = list(c.chat.completions.create(model="m", messages=MSG, stream=True))
    assert [ch.choices[0].delta.content for ch in chunks] == [f"t{i} " for i in range(7)]
    with_usage = list(c.chat.completions.create(model="m", messages=MSG, stream=True,
                                                stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 7

    async def run_async() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{r.port}/v1", api_key="x",
                                max_retries=0)
        out = [(await ac.chat.completions.create(model="m", messages=MSG)
                ).choices[0].message.content or ""]
        stream = await ac.chat.completions.create(model="m", messages=MSG, stream=True)
        out += [ch.choices[0].delta.content or "" async for ch in stream]
        await ac.close()
        return out

    assert len(asyncio.run(run_async())) == 8
    emb = c.embeddings.create(model="m", input="hello")
    assert emb.data[0].embedding == [0.1, 0.2, 0.3]
    # stream tokens counted although the client asked for no usage: 3 streams of 7 tokens
    assert metric(r.port, "modelstack_router_tokens_total", model="m", type="completion") \
        == 5 + 5 + 7 + 7 + 5 + 7
    assert metric(r.port, "modelstack_router_requests_total", model="m", status="2xx") == 7


def test_errors_are_openai_shaped(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"max_body_bytes": 2000, "models": [{"name": "m",
                                                            "replicas": [replica("a", up)]}]})
    c = client(r.port)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="nope", messages=MSG)
    assert nf.value.code == "model_not_found"
    resp = httpx.post(f"http://127.0.0.1:{r.port}/v1/chat/completions", content=b"{not json")
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx.post(f"http://127.0.0.1:{r.port}/v1/chat/completions", content=b"x" * 5000)
    assert resp.status_code == 413


def test_keys_allowlist_expiry_rpm_and_model_filter(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({
        "models": [{"name": "m", "replicas": [replica("a", up)]},
                   {"name": "other", "replicas": [replica("b", up)]}],
        "keys": [
            {"name": "alice", "hash": key_hash("sk-alice"), "models": ["m"], "rpm": 3},
            {"name": "old", "hash": key_hash("sk-old"),
             "expires": (date.today() - timedelta(days=2)).isoformat()},
            {"name": "tok", "hash": key_hash("sk-tok"), "tpm": 300},
        ]})
    with pytest.raises(openai.AuthenticationError) as bad:
        client(r.port, "sk-wrong").chat.completions.create(model="m", messages=MSG)
    assert bad.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(r.port, "sk-old").chat.completions.create(model="m", messages=MSG)
    alice = client(r.port, "sk-alice")
    assert [m.id for m in alice.models.list()] == ["m"]
    assert sorted(m.id for m in client(r.port, "sk-tok").models.list()) == ["m", "other"]
    with pytest.raises(openai.PermissionDeniedError):
        alice.chat.completions.create(model="other", messages=MSG)
    for _ in range(3):  # rpm 3; the refused 403 above did not count
        alice.chat.completions.create(model="m", messages=MSG)
    with pytest.raises(openai.RateLimitError) as limited:
        alice.chat.completions.create(model="m", messages=MSG)
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    # tpm: each request reserves body/4 + max_tokens, settles at the real 15 tokens
    tok = client(r.port, "sk-tok")
    for _ in range(5):
        tok.chat.completions.create(model="m", messages=MSG, max_tokens=200)
    with pytest.raises(openai.RateLimitError):
        for _ in range(30):
            tok.chat.completions.create(model="m", messages=MSG, max_tokens=200)
    text = get(r.port, "/metrics")[1].decode()
    assert 'rate_limited_total{key="alice",limit="rpm"} 1' in text
    assert "sk-alice" not in text and "sk-alice" not in (harness.tmp / "router.log").read_text()


def test_killing_a_replica_mid_loop_fails_no_request(harness: Harness) -> None:
    a, b = harness.upstream(), harness.upstream()
    r = harness.router({"models": [{"name": "m", "replicas": [replica("a", a), replica("b", b)]}],
                        "health": {"interval": 0.5, "eject_after": 2}})
    c = client(r.port)
    errors: list[BaseException] = []

    def loop() -> None:
        for _ in range(300):
            try:
                c.chat.completions.create(model="m", messages=MSG)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    a.stop()
    for t in threads:
        t.join(60)
    assert errors == []
    assert metric(r.port, "modelstack_router_requests_total", status="2xx") == 1200
    assert metric(r.port, "modelstack_router_replica_up", replica="a") == 0


def test_5xx_and_429_fail_over_and_mid_stream_death_ends_with_error(harness: Harness) -> None:
    bad, good = harness.upstream("--status", "503"), harness.upstream()
    r = harness.router({"models": [
        {"name": "m", "replicas": [replica("bad", bad), replica("good", good)]},
        {"name": "dies", "replicas": [replica("good", good)]},
        {"name": "only-bad", "replicas": [replica("bad", bad)]}]})
    c = client(r.port)
    for _ in range(6):
        assert c.chat.completions.create(model="m", messages=MSG).choices
    assert metric(r.port, "modelstack_router_retries_total", model="m") >= 1
    with pytest.raises(openai.InternalServerError):
        c.chat.completions.create(model="only-bad", messages=MSG)
    stream = c.chat.completions.create(model="dies", messages=MSG, stream=True,
                                       extra_body={"canned_die_after": 3})
    got: list[str] = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for ch in stream:
            got.append(ch.choices[0].delta.content or "")
    assert got == ["t0 ", "t1 ", "t2 "]


def test_timeouts_first_byte_and_idle(harness: Harness) -> None:
    slow, fast = harness.upstream("--delay", "3"), harness.upstream()
    r = harness.router({"timeouts": {"connect": 1, "first_byte": 0.5, "idle": 0.5},
                        "models": [{"name": "m", "replicas": [replica("slow", slow),
                                                              replica("fast", fast)]},
                                   {"name": "gappy", "replicas": [replica("fast", fast)]}]})
    c = client(r.port)
    started = time.monotonic()
    for _ in range(3):
        c.chat.completions.create(model="m", messages=MSG)
    assert time.monotonic() - started < 2.5
    stream = c.chat.completions.create(model="gappy", messages=MSG, stream=True,
                                       extra_body={"canned_gap": 2, "canned_chunks": 3})
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for _ in stream:
            pass


def test_reload_under_load_loses_nothing(harness: Harness) -> None:
    a, b = harness.upstream(), harness.upstream()
    config = {"models": [{"name": "m", "replicas": [replica("a", a)]}]}
    r = harness.router(config)
    c = client(r.port)
    errors: list[BaseException] = []
    stop = threading.Event()
    done = [0]

    def loop() -> None:
        while not stop.is_set():
            try:
                list(c.chat.completions.create(model="m", messages=MSG, stream=True))
                c.chat.completions.create(model="m", messages=MSG)
                done[0] += 2
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(4):
        time.sleep(0.3)
        reps = [replica("a", a), replica("b", b)] if i % 2 == 0 else [replica("b", b)]
        harness.write({"listen": "127.0.0.1:0", "models": [{"name": "m", "replicas": reps},
                                                           {"name": f"new-{i}"}]})
        r.signal(signal.SIGHUP)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == [] and done[0] > 20
    assert client(r.port).models.list().data[-1].id == "new-3"
    log = (harness.tmp / "router.log").read_text()
    assert "reloaded" in log


def test_transcription_upload_is_streamed_to_the_replica(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"models": [{"name": "whisper", "kind": "stt",
                                    "replicas": [replica("a", up)]}]})
    audio = Path(harness.tmp / "a.wav")
    audio.write_bytes(b"RIFF" + b"\0" * 300_000)
    c = client(r.port)
    result = c.audio.transcriptions.with_raw_response.create(model="whisper", file=audio.open("rb"))
    assert result.http_response.json()["bytes"] > 300_000


def test_transcription_text_srt_and_vtt_are_made_from_verbose_json(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"models": [{"name": "whisper", "kind": "stt",
                                    "replicas": [replica("a", up)]}]})
    audio = Path(harness.tmp / "b.wav")
    audio.write_bytes(b"RIFF" + b"\0" * 50_000)
    c = client(r.port)

    def ask(fmt: str) -> httpx.Response:
        return c.audio.transcriptions.with_raw_response.create(
            model="whisper", file=audio.open("rb"), response_format=fmt).http_response

    # the replica is asked for verbose_json (its answer has segments) and gets the whole
    # file: the router's Content-Length follows the rewritten field
    text = ask("text")
    assert (text.text, text.headers["content-type"]) == ("canned\n", "text/plain; charset=utf-8")
    assert ask("srt").text == ("1\n00:00:00,000 --> 00:00:01,250\ncanned\n\n"
                               "2\n00:00:01,250 --> 00:00:02,500\nwords\n")
    assert ask("vtt").text == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.250\ncanned\n\n"
                               "00:00:01.250 --> 00:00:02.500\nwords\n")
    plain = ask("json").json()
    assert plain["text"] == "canned" and "segments" not in plain and plain["bytes"] > 50_000
    verbose = ask("verbose_json").json()
    assert [s["text"] for s in verbose["segments"]] == [" canned", " words"]


def test_bad_config_and_public_listen_without_keys_refuse_to_start(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text('{"listen": "0.0.0.0:0"}')
    out = subprocess.run([*ROUTER, "--config", str(path)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1
    assert f"error: `keys` in `{path}`" in out.stderr and "hint: " in out.stderr


def test_two_workers_share_the_port(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"workers": 2, "models": [{"name": "m", "replicas": [replica("a", up)]}]})
    c = client(r.port)
    for _ in range(20):
        client(r.port).chat.completions.create(model="m", messages=MSG)
    assert c.models.list().data[0].id == "m"
    children = subprocess.run(["pgrep", "-P", str(r.proc.pid)], capture_output=True, text=True)
    assert len(children.stdout.split()) == 2

