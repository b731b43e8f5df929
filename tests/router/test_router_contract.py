"""The router true to the OpenAI contract in front of a replica that knows its model by
one name only (as vLLM and SGLang do: `--served-model-name`; the canned upstream's
`--served-name` answers 404 to any other): a request by alias reaches the replica by the
served name and the client gets its own name back, streaming or not, JSON or multipart.
And the routes beyond chat: `/v1/models/{id}`, `/v1/responses`, `/v1/messages`,
`/v1/audio/translations`, `/v1/images/edits`, each with its own semantics, through the
official client (httpx for Anthropic's Messages, which it has no method for)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from router_harness import Harness, Proc, key_hash, metric, replica, stats

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
KEY, OTHER = "sk-contract-key", "sk-other-key"


@pytest.fixture
def router(harness: Harness) -> tuple[Proc, Proc]:
    """The router in front of one replica serving `served-name` only, which stack.toml
    calls by the aliases `default` and `chat`; a second key may use only `other`."""
    upstream = harness.upstream("--served-name", "served-name")
    other = harness.upstream()
    proc = harness.router({"models": [
        {"name": "served-name", "aliases": ["default", "chat"],
         "replicas": [replica("a", upstream)]},
        {"name": "other", "replicas": [replica("b", other)]}],
        "keys": [{"name": "team", "hash": key_hash(KEY)},
                 {"name": "narrow", "hash": key_hash(OTHER), "models": ["other"]}]})
    return proc, upstream


def client(port: int, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)


def test_a_request_by_alias_reaches_the_replica_by_its_served_name(
        router: tuple[Proc, Proc]) -> None:
    r, upstream = router
    c = client(r.port)
    for name in ("default", "chat", "served-name"):
        answer = c.chat.completions.create(model=name, messages=MSG)
        assert answer.model == name  # the client's own name, back
        assert answer.choices[0].message.content == "Hello from the canned upstream."
    chunks = list(c.chat.completions.create(model="default", messages=MSG, stream=True))
    assert {chunk.model for chunk in chunks} == {"default"}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert stats(upstream)["/v1/chat/completions"] == 4
    # the usage of the stream the router asked for was counted, under the model's name
    assert metric(r.port, "modelstack_router_tokens_total", model="served-name",
                  type="completion") == 3 * 5 + 100


def test_without_the_rewrite_the_replica_refuses_the_alias(router: tuple[Proc, Proc]) -> None:
    """The stand-in is strict: straight to it, the alias is a 404 (what users saw)."""
    _, upstream = router
    answer = httpx.post(f"http://127.0.0.1:{upstream.port}/v1/chat/completions",
                        json={"model": "default", "messages": MSG})
    assert answer.status_code == 404


def test_v1_models_id_answers_a_model_the_key_may_use(router: tuple[Proc, Proc]) -> None:
    r, _ = router
    c = client(r.port)
    assert c.models.retrieve("default").id == "default"
    assert c.models.retrieve("served-name").owned_by == "modelstack"
    assert {m.id for m in c.models.list()} == {"served-name", "default", "chat", "other"}
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("nope")
    assert err.value.code == "model_not_found"
    narrow = client(r.port, OTHER)
    assert narrow.models.retrieve("other").id == "other"
    with pytest.raises(openai.NotFoundError):
        narrow.models.retrieve("default")  # not this key's: as if it did not exist
    with pytest.raises(openai.AuthenticationError):
        client(r.port, "sk-wrong").models.retrieve("default")
    assert httpx.post(f"http://127.0.0.1:{r.port}/v1/models/default",
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 405


def test_responses_by_alias_whole_and_streamed_with_their_usage(
        router: tuple[Proc, Proc]) -> None:
    r, upstream = router
    c = client(r.port)
    answer = c.responses.create(model="chat", input="hi", max_output_tokens=16)
    assert answer.model == "chat" and answer.output_text == "Hello from the canned upstream."
    events = list(c.responses.create(model="chat", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "response.output_text.delta",
                                        "response.completed"]
    done = events[-1]
    assert done.type == "response.completed" and done.response.model == "chat"
    assert stats(upstream)["/v1/responses"] == 2
    # input_tokens / output_tokens, in the body and nested in `response.completed`
    assert metric(r.port, "modelstack_router_tokens_total", model="served-name",
                  type="prompt") == 2 * 12
    assert metric(r.port, "modelstack_router_tokens_total", model="served-name",
                  type="completion") == 2 * 4


def test_anthropic_messages_whole_and_streamed_count_running_usage_once(
        router: tuple[Proc, Proc]) -> None:
    r, _ = router
    url = f"http://127.0.0.1:{r.port}/v1/messages"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "default", "max_tokens": 32, "messages": [{"role": "user",
                                                                 "content": "hi"}]}
    whole = httpx.post(url, json=body, headers=headers)
    assert whole.status_code == 200 and whole.json()["model"] == "default"
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    names = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event:")]
    assert names == ["message_start", "content_block_delta", "message_delta", "message_stop"]
    start = next(json.loads(line[6:]) for line in text.splitlines()
                 if line.startswith("data: ") and "message_start" in line)
    assert start["message"]["model"] == "default"
    # message_start says 12 in, message_delta 6 out so far: 12 + 6 each time, not summed
    assert metric(r.port, "modelstack_router_tokens_total", model="served-name",
                  type="prompt") == 2 * 12
    assert metric(r.port, "modelstack_router_tokens_total", model="served-name",
                  type="completion") == 2 * 6


def test_translations_are_uploads_rendered_like_transcriptions(
        router: tuple[Proc, Proc]) -> None:
    r, upstream = router
    c = client(r.port)
    audio = ("speech.wav", io.BytesIO(b"RIFF" + bytes(5000)), "audio/wav")
    json_answer = c.audio.translations.create(model="default", file=audio)
    assert json_answer.text == "canned"
    audio[1].seek(0)
    srt = c.audio.translations.create(model="default", file=audio, response_format="srt")
    assert "00:00:01,250 --> 00:00:02,500\nwords" in srt  # made from verbose_json
    assert stats(upstream)["/v1/audio/translations"] == 2


def test_image_edits_are_uploads_answered_with_data_urls(router: tuple[Proc, Proc]) -> None:
    r, upstream = router
    c = client(r.port)
    picture = ("in.png", io.BytesIO(b"\x89PNG" + bytes(3000)), "image/png")
    answer = c.images.edit(model="default", image=picture, prompt="a hat",
                           response_format="url")
    assert answer.data is not None and answer.data[0].url is not None
    assert answer.data[0].url.startswith("data:image/png;base64,")
    assert base64.b64decode(answer.data[0].url.split(",", 1)[1]).startswith(b"\x89PNG")
    picture[1].seek(0)
    raw = httpx.post(f"http://127.0.0.1:{r.port}/v1/images/edits",
                     headers={"Authorization": f"Bearer {KEY}"},
                     data={"model": "default", "prompt": "a hat"},
                     files={"image": ("in.png", picture[1], "image/png")})
    assert raw.status_code == 200 and raw.json()["asked"] is None
    assert stats(upstream)["/v1/images/edits"] == 2


def test_a_key_limited_to_other_models_cannot_reach_new_routes(
        router: tuple[Proc, Proc]) -> None:
    r, _ = router
    narrow = client(r.port, OTHER)
    with pytest.raises(openai.PermissionDeniedError):
        narrow.responses.create(model="default", input="hi")
    with pytest.raises(openai.PermissionDeniedError):
        narrow.audio.translations.create(
            model="chat", file=("a.wav", io.BytesIO(b"RIFF" + bytes(100)), "audio/wav"))
