"""Session affinity end to end, speech and image forwarding, TLS: real router processes in
front of canned upstreams, driven by the official `openai` client."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from openai.types.chat import ChatCompletionMessageParam
from router_harness import Harness, Proc, replica, stats

from router.balance import in_turn

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
SPEECH = b"ID3canned-audio" + bytes(range(256)) * 64
"""What the canned upstream answers on /v1/audio/speech."""


def client(port: int, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                         **kw)  # type: ignore[arg-type]


def chats(*procs: Proc) -> list[int]:
    return [stats(p).get(CHAT, 0) for p in procs]


def test_user_affinity_sticks_while_load_is_low_and_spills_when_overloaded(
        harness: Harness) -> None:
    a, b = harness.upstream(), harness.upstream()
    r = harness.router({"affinity": "user", "models": [
        {"name": "m", "replicas": [replica("a", a), replica("b", b)]}]})
    c = client(r.port)
    for _ in range(10):
        c.chat.completions.create(model="m", messages=MSG, user="alice")
    after_alice = chats(a, b)
    assert sorted(after_alice) == [0, 10]  # one replica took every request of alice
    home = a if after_alice[0] == 10 else b
    for i in range(20):
        c.chat.completions.create(model="m", messages=MSG, user=f"user-{i}")
    spread = [n - m for n, m in zip(chats(a, b), after_alice, strict=True)]
    assert min(spread) >= 3, spread  # other sessions hash to both replicas

    # 4 slow requests of alice at once: the bound (25% over the average, plus one) is
    # reached at the third, which goes to the other replica (3 + 1 when all 4 overlap)
    before = chats(a, b)
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            client(r.port).chat.completions.create(
                model="m", messages=MSG, user="alice", extra_body={"canned_delay": 1.0})
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(20)
    assert errors == []
    added = [n - m for n, m in zip(chats(a, b), before, strict=True)]
    at_home = added[0] if home is a else added[1]
    assert sum(added) == 4 and 2 <= at_home <= 3, added


def test_header_affinity_keeps_a_session_on_one_replica(harness: Harness) -> None:
    a, b = harness.upstream(), harness.upstream()
    r = harness.router({"affinity": "header", "affinity_header": "X-Session-Id", "models": [
        {"name": "m", "replicas": [replica("a", a), replica("b", b)]}]})
    for session in ("s-1", "s-2", "s-3"):
        before = chats(a, b)
        c = client(r.port, default_headers={"X-Session-Id": session})
        for _ in range(6):
            c.chat.completions.create(model="m", messages=MSG)
        added = sorted(n - m for n, m in zip(chats(a, b), before, strict=True))
        assert added == [0, 6], (session, added)


def test_speech_is_relayed_as_it_comes_and_images_are_forwarded(harness: Harness) -> None:
    up = harness.upstream("--api-key", "inst")
    r = harness.router({"models": [
        {"name": "tts", "kind": "tts", "replicas": [replica("a", up, "inst")]},
        {"name": "img", "kind": "image", "replicas": [replica("a", up, "inst")]}]})
    c = client(r.port)
    audio = c.audio.speech.create(model="tts", voice="alloy", input="Hello there.")
    assert audio.content == SPEECH
    assert audio.response.headers["content-type"] == "audio/mpeg"
    # 4 pieces 0.4 s apart: the first reaches the client long before the last is made
    started = time.monotonic()
    with c.audio.speech.with_streaming_response.create(
            model="tts", voice="alloy", input="Hello.", extra_body={"canned_gap": 0.4}) as resp:
        pieces = resp.iter_bytes()
        got = next(pieces)
        first = time.monotonic() - started
        got += b"".join(pieces)
    assert got == SPEECH
    assert first < 0.8 and time.monotonic() - started >= 1.2, first  # buffered: >= 1.2

    image = c.images.generate(model="img", prompt="a red pixel")
    assert image.data is not None and image.data[0].revised_prompt == "a red pixel"
    assert (image.data[0].b64_json or "").startswith("iVBORw0KGgo")  # a PNG
    # sd-server serves no URLs: the router asks for b64_json and answers a data: URL
    linked = c.images.generate(model="img", prompt="a red pixel", response_format="url")
    assert linked.data is not None and linked.data[0].b64_json is None
    assert (linked.data[0].url or "").startswith("data:image/png;base64,iVBORw0KGgo")
    with pytest.raises(openai.NotFoundError):
        c.images.generate(model="no-such-model", prompt="x")
    counts = stats(up, "inst")
    assert counts["/v1/audio/speech"] == 2 and counts["/v1/images/generations"] == 2


def test_cohere_v2_rerank_and_vllm_score_are_routed(harness: Harness) -> None:
    up = harness.upstream("--api-key", "inst")
    r = harness.router({"models": [
        {"name": "ranker", "kind": "rerank", "replicas": [replica("a", up, "inst")]}]})
    base = f"http://127.0.0.1:{r.port}"
    body = {"model": "ranker", "query": "cat", "documents": ["kitten", "stock market"]}
    for path in ("/v2/rerank", "/score", "/v1/score"):
        reply = httpx.post(base + path, json=body, timeout=10,
                           headers={"Authorization": "Bearer none"})
        assert reply.status_code == 200, (path, reply.text)
    counts = stats(up, "inst")
    # Cohere's v2 request is the v1 one, which every rerank backend serves (llama-server
    # has no /v2/rerank); /score is vLLM's own and goes as it is
    assert counts.get("/v1/rerank") == 1 and "/v2/rerank" not in counts
    assert counts.get("/score") == 1 and counts.get("/v1/score") == 1


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelstack test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_the_openai_client(harness: Harness) -> None:
    cert, key = self_signed(harness.tmp)
    up = harness.upstream("--chunks", "5")
    r = harness.router({"tls_cert": str(cert), "tls_key": str(key),
                        "models": [{"name": "m", "replicas": [replica("a", up)]}]})
    assert "https://127.0.0.1" in (harness.tmp / "router.log").read_text()
    base = f"https://127.0.0.1:{r.port}/v1"
    trusted = ssl.create_default_context(cafile=str(cert))
    c = openai.OpenAI(base_url=base, api_key="none", max_retries=0,
                      http_client=httpx.Client(verify=trusted))
    reply = c.chat.completions.create(model="m", messages=MSG)
    assert reply.choices[0].message.content == "Hello from the canned upstream."
    stream = c.chat.completions.create(model="m", messages=MSG, stream=True)
    assert [ch.choices[0].delta.content for ch in stream] == [f"t{i} " for i in range(5)]
    assert [m.id for m in c.models.list()] == ["m"]
    # a client that does not trust the certificate is refused; plain HTTP gets no answer
    untrusting = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        untrusting.models.list()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{r.port}/v1/models", timeout=3)


def test_in_turn_interleaves_by_weight() -> None:
    turns = [0, 0, 0]
    order = [in_turn([5, 1, 1], turns) for _ in range(14)]
    assert order[:7] == [0, 0, 1, 0, 2, 0, 0] and order[7:] == order[:7]  # nginx's order
    assert turns == [0, 0, 0]  # back where it started after each round of 7


def test_round_robin_takes_turns_by_weight_and_skips_a_failed_replica(
        harness: Harness) -> None:
    a, b, c = harness.upstream(), harness.upstream(), harness.upstream()
    models = [{"name": "m", "replicas": [
        {**replica("a", a), "weight": 2}, replica("b", b), replica("c", c)]}]
    r = harness.router({"balancing": "round-robin", "models": models})
    cl = client(r.port)
    for _ in range(12):
        cl.chat.completions.create(model="m", messages=MSG)
    assert chats(a, b, c) == [6, 3, 3]  # exactly, one request at a time
    c.stop()
    for _ in range(12):
        cl.chat.completions.create(model="m", messages=MSG)  # c's turns fail over
    added = [n - m for n, m in zip(chats(a, b), [6, 3], strict=True)]
    assert sum(added) == 12 and added[0] > added[1], added


def test_least_outstanding_does_not_take_turns(harness: Harness) -> None:
    """Without `round-robin`, idle replicas tie and are picked at random: the exact
    turns above are the round robin's."""
    procs = [harness.upstream() for _ in range(3)]
    models = [{"name": "m", "replicas": [replica(str(i), p) for i, p in enumerate(procs)]}]
    r = harness.router({"models": models})
    cl = client(r.port)
    counts = []
    for _ in range(5):
        before = chats(*procs)
        for _ in range(12):
            cl.chat.completions.create(model="m", messages=MSG)
        counts.append([n - m for n, m in zip(chats(*procs), before, strict=True)])
    assert any(c != [4, 4, 4] for c in counts), counts
    # ties are broken at random, not always towards one replica: each takes a share of the
    # 60 requests (one getting none by chance: 3 * (2/3)^60, about 1e-10)
    assert all(sum(column) > 0 for column in zip(*counts, strict=True)), counts
