"""The router in front of real llama-server replicas (Gemma 3 270M, CPU), openai client."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from router_harness import Harness, Proc, key_hash, metric

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def llama(harness: Harness, bin_dir: Path, model: Path, key: str, *extra: str) -> Proc:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = Proc([str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                 "--port", str(port), "--api-key", key, "-c", "512", "-t", "1", *extra],
                r"listening on http://127\.0\.0\.1:(\d+)", harness.tmp / f"llama-{key}.log",
                env={"LD_LIBRARY_PATH": str(bin_dir)}, timeout=120)
    harness.procs.append(proc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/health",
                                     headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError((harness.tmp / f"llama-{key}.log").read_text())


@pytest.mark.integration
def test_openai_client_through_router_to_llama_server(
        harness: Harness, llama_bin: Path, gguf_model: Path) -> None:
    os.environ.setdefault("LD_LIBRARY_PATH", str(llama_bin))
    a = llama(harness, llama_bin, gguf_model, "inst-a")
    b = llama(harness, llama_bin, gguf_model, "inst-b")
    emb = llama(harness, llama_bin, gguf_model, "inst-e", "--embeddings", "--pooling", "mean")
    rep = [{"id": n, "url": f"http://127.0.0.1:{p.port}", "api_key": k}
           for n, p, k in (("a", a, "inst-a"), ("b", b, "inst-b"), ("e", emb, "inst-e"))]
    r = harness.router({
        "models": [{"name": "gemma", "replicas": rep[:2]},
                   {"name": "gemma-embed", "replicas": rep[2:]}],
        "keys": [{"name": "dev", "hash": key_hash("sk-dev")}]})
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{r.port}/v1", api_key="sk-dev",
                      max_retries=0)
    reply = c.chat.completions.create(model="gemma", messages=MSG, max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="gemma", messages=MSG, max_tokens=8, stream=True) if ch.choices)
    assert text

    async def run_async() -> str:
        ac = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{r.port}/v1", api_key="sk-dev",
                                max_retries=0)
        stream = await ac.chat.completions.create(model="gemma", messages=MSG, max_tokens=8,
                                                  stream=True)
        out = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        await ac.close()
        return out

    assert asyncio.run(run_async())
    vectors = c.embeddings.create(model="gemma-embed", input=["hello", "world"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 100
    # both streams counted their completion tokens though neither client asked for usage
    assert metric(r.port, "modelstack_router_tokens_total", model="gemma",
                  type="completion") >= reply.usage.completion_tokens + 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{r.port}/v1", api_key="sk-nope",
                      max_retries=0).models.list()
