"""Embeddings and rerank served for real, through `stack apply` on a loopback host over real
SSH: all-MiniLM-L6-v2 converted to GGUF (`scripts/setup-embedding-model`) as a `local://`
file, once as it is (its GGUF metadata says BERT with mean pooling: an embedding model) and
once with `kind = "rerank"`, both on the catalogue's llama.cpp on the host's CPU. Through
the router, the official `openai` client's `embeddings.create` puts "kitten" nearer to
"cat" than "stock market" (cosine 0.79 against 0.19, the same as a numpy BERT forward pass
of the safetensors weights gives), and `/v1/rerank`, `/rerank` and Cohere's `/v2/rerank`
(which the router asks on llama-server's /v1/rerank) answer in the Jina/Cohere shape.
MiniLM has no classifier head, so the rerank scores mean nothing: the shape is what is
proven. A plan afterwards is empty.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet import one_host_stack, run_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          embedding_model: Path) -> Iterator[dict[str, Any]]:
    models = f'''[models.minilm]
source = "local://{embedding_model}"
args = ["-t", "1"]

[models.ranker]
source = "local://{embedding_model}"
kind = "rerank"
args = ["-t", "1"]
'''
    with one_host_stack(tmp_path_factory.mktemp("embed"), "embedtest", models) as world:
        yield world


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_the_plan_reads_the_kinds(world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--json", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    kinds = {p["model"]: p["kind"] for p in json.loads(plan.stdout)["placements"]}
    assert kinds == {"minilm": "embedding", "ranker": "rerank"}, kinds


def test_embeddings_put_kitten_nearer_to_cat_than_stock_market(world: dict[str, Any]) -> None:
    result = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    reply = client.embeddings.create(model="minilm", input=["cat", "kitten", "stock market"])
    cat, kitten, stocks = (d.embedding for d in sorted(reply.data, key=lambda d: d.index))
    assert len(cat) == 384
    assert _cosine(cat, kitten) == pytest.approx(0.788, abs=0.01)
    assert _cosine(cat, stocks) == pytest.approx(0.190, abs=0.01)
    assert reply.usage.prompt_tokens == 10  # [CLS] word(s) [SEP] each


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_answers_in_the_jina_cohere_shape(world: dict[str, Any], path: str) -> None:
    base = world["url"].removesuffix("/v1")
    documents = ["kitten", "stock market", "a small cat"]
    reply = httpx.post(base + path, timeout=60,
                       headers={"Authorization": f"Bearer {world['key']}"},
                       json={"model": "ranker", "query": "cat", "documents": documents,
                             "top_n": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    results = body["results"]
    assert len(results) == 2
    assert all(set(r) >= {"index", "relevance_score"} for r in results), results
    assert {r["index"] for r in results} <= {0, 1, 2}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert body["usage"]["prompt_tokens"] > 0


def test_a_plan_after_apply_is_empty(world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "No changes. The fleet matches stack.toml." in plan.stdout
