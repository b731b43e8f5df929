"""`balancing = "prefix"`: the key of a prompt's first block (router.prefix) and real router
processes in front of canned upstreams, driven by the official `openai` client."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam
from router_harness import Harness, Proc, metric, replica, stats

from router.balance import HOMES, Homes, Load, choose
from router.prefix import PREFIX_BLOCK, prefix_key

CHAT = "/v1/chat/completions"
WORDS = ["cache", "prefix", "replica", "slot", "token", "prompt", "system", "router",
         "balance", "load"]


def system_prompt(seed: int, words: int = 400) -> str:
    """A made-up system prompt of about 2,500 characters, more than a block."""
    rng = random.Random(seed)
    return f"You are assistant {seed}. " + " ".join(rng.choice(WORDS) for _ in range(words))


def chat(system: str, user: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def chats(*procs: Proc) -> list[int]:
    return [stats(p).get(CHAT, 0) for p in procs]


def added(procs: tuple[Proc, ...], before: list[int]) -> list[int]:
    return [n - m for n, m in zip(chats(*procs), before, strict=True)]


# the key (pure)

def test_a_shared_system_prompt_is_one_key_whatever_follows() -> None:
    system = system_prompt(1)
    keys = {prefix_key("chat", {"messages": chat(system, f"question {i}")}) for i in range(5)}
    assert len(keys) == 1 and None not in keys
    conversation = [*chat(system, "q1"), {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}]
    assert prefix_key("chat", {"messages": conversation}) in keys
    others = {prefix_key("chat", {"messages": chat(system_prompt(s), "q")}) for s in range(2, 7)}
    assert len(others) == 5 and not others & keys


def test_a_prompt_shorter_than_a_block_has_no_key() -> None:
    assert prefix_key("chat", {"messages": chat("Be brief.", "hi")}) is None
    assert prefix_key("completions", {"prompt": "x" * (PREFIX_BLOCK - 1)}) is None
    assert prefix_key("completions", {"prompt": "x" * PREFIX_BLOCK}) is not None
    assert prefix_key("embeddings", {"input": "x" * 10 * PREFIX_BLOCK}) is None
    assert prefix_key("chat", {}) is None


def test_a_conversation_keeps_its_key_once_past_a_block() -> None:
    """A short system prompt: the key reaches into the first messages, the same every turn."""
    history: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "a long question " * 80}]
    first = prefix_key("chat", {"messages": history})
    for turn in range(3):
        history += [{"role": "assistant", "content": f"answer {turn}"},
                    {"role": "user", "content": f"follow-up {turn}"}]
        assert prefix_key("chat", {"messages": history}) == first is not None


def test_every_endpoint_with_a_prompt_has_its_key() -> None:
    long = system_prompt(3)
    assert prefix_key("completions", {"prompt": long}) == prefix_key(
        "completions", {"prompt": [long + " and more", "another prompt"]})
    tokens = prefix_key("completions", {"prompt": list(range(400))})
    assert tokens is not None and tokens == prefix_key("completions",
                                                       {"prompt": [list(range(500))]})
    responses = {prefix_key("responses", {"instructions": long, "input": text})
                 for text in ("q1", [{"role": "user", "content": [
                     {"type": "input_text", "text": "q2"}]}])}
    assert len(responses) == 1 and None not in responses
    messages = {prefix_key("messages", {"system": system, "messages": [
        {"role": "user", "content": q}]}) for system, q in (
        (long, "q1"), ([{"type": "text", "text": long}], [{"type": "text", "text": "q2"}]))}
    assert len(messages) == 1 and None not in messages


def test_roles_parts_and_images_are_part_of_the_key() -> None:
    long = system_prompt(4)
    as_system = prefix_key("chat", {"messages": [{"role": "system", "content": long}]})
    as_user = prefix_key("chat", {"messages": [{"role": "user", "content": long}]})
    assert as_system != as_user
    split = [{"role": "user", "content": long[:500]}, {"role": "user", "content": long[500:]}]
    assert prefix_key("chat", {"messages": split}) != as_user
    parts = [{"type": "text", "text": long[:500]}, {"type": "text", "text": long[500:]}]
    assert prefix_key("chat", {"messages": [{"role": "user", "content": parts}]}) not in (
        as_user, None)
    one_part = [{"role": "user", "content": [{"type": "text", "text": long}]}]
    assert prefix_key("chat", {"messages": one_part}) == as_user

    def image(url: str) -> str | None:
        return prefix_key("chat", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": long}]}]})

    assert image("data:image/png;base64,AAAA") != image("data:image/png;base64,BBBB")


def test_hostile_documents_cost_one_block_and_never_raise() -> None:
    long = "x" * PREFIX_BLOCK
    odd: list[Any] = [None, 7, "text", {"role": 5, "content": {"a": 1}}, [1, 2],
                      {"role": "user", "content": [None, 3, {"text": 4}, {"image_url": 5}]}]
    assert prefix_key("chat", {"messages": odd}) is None
    assert prefix_key("chat", {"messages": "not a list"}) is None
    assert prefix_key("completions", {"prompt": [None, {"a": 1}, True]}) is None
    # only the start is read: a million messages or 20 MB of text cost one block
    many = [{}] * 1_000_000
    started = time.perf_counter()
    assert prefix_key("chat", {"messages": many}) == prefix_key("chat",
                                                                {"messages": many[:2000]})
    huge = {"messages": [{"role": "user", "content": long + "y" * 20_000_000}]}
    assert prefix_key("chat", huge) == prefix_key("chat", {"messages": [
        {"role": "user", "content": long}]})
    assert time.perf_counter() - started < 0.5
    parts = {"messages": [{"role": "user", "content": [{"type": "text"}] * 1_000_000}]}
    assert prefix_key("chat", parts) is not None


def test_a_key_goes_home_until_its_replica_is_over_the_bound() -> None:
    key = prefix_key("chat", {"messages": chat(system_prompt(5), "q")})
    assert key is not None
    idle = [Load(r, 0) for r in "abc"]
    home = choose(idle, random.Random(0), key)
    assert home is not None and {choose(idle, random.Random(s), key) for s in range(20)} == {home}
    # 2 in flight on the home replica: 3 > ceil((2 + 1) * 1.25 / 3) = 2, the next one takes it
    busy = [Load(r, 2 if i == home else 0) for i, r in enumerate("abc")]
    assert choose(busy, random.Random(0), key) not in (None, home)


# real router processes

def routed(harness: Harness, count: int) -> tuple[int, tuple[Proc, ...]]:
    """A router with `balancing = "prefix"` over `count` canned replicas."""
    procs = tuple(harness.upstream() for _ in range(count))
    r = harness.router({"balancing": "prefix", "models": [
        {"name": "m", "replicas": [replica(n, p) for n, p in zip("abc", procs, strict=False)]}]})
    return r.port, procs


def test_a_shared_system_prompt_lands_on_one_replica_and_others_spread(
        harness: Harness) -> None:
    port, procs = routed(harness, 3)
    c = client(port)
    system = system_prompt(10)
    for i in range(8):
        c.chat.completions.create(model="m", messages=chat(system, f"question {i}"))
    first = chats(*procs)
    assert sorted(first) == [0, 0, 8], first
    for i in range(8):  # a conversation that began with it, turn after turn
        c.chat.completions.create(model="m", messages=[
            *chat(system, "question 0"), {"role": "assistant", "content": "answer"},
            {"role": "user", "content": f"follow-up {i}"}])
    assert added(procs, first) == [8 if n else 0 for n in first]
    before = chats(*procs)
    for seed in range(20, 38):  # other system prompts, each on its own replica
        for i in range(2):
            c.chat.completions.create(model="m", messages=chat(system_prompt(seed), f"q{i}"))
    spread = added(procs, before)
    assert sum(spread) == 36 and min(spread) >= 4 and all(n % 2 == 0 for n in spread), spread
    # the Responses API: `instructions` is the system prompt
    before = chats(*procs)
    served = [stats(p).get("/v1/responses", 0) for p in procs]
    for i in range(6):
        c.responses.create(model="m", instructions=system, input=f"question {i}")
    answered = [stats(p).get("/v1/responses", 0) - n for p, n in zip(procs, served, strict=True)]
    assert sorted(answered) == [0, 0, 6], answered


def slow(port: int, messages: list[ChatCompletionMessageParam], errors: list[BaseException],
         delay: float = 2.0) -> threading.Thread:
    """A request that keeps its replica busy for `delay` seconds, sent from a thread."""
    def run() -> None:
        try:
            client(port).chat.completions.create(model="m", messages=messages,
                                                 extra_body={"canned_delay": delay})
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_in_flight(port: int, count: int) -> None:
    deadline = time.monotonic() + 10
    while metric(port, "modelstack_router_replica_in_flight") < count:
        assert time.monotonic() < deadline, "the slow requests never arrived"
        time.sleep(0.02)


def homed(harness: Harness, seed: int,
          first: str) -> tuple[int, tuple[Proc, ...], openai.OpenAI, str, int]:
    """Two replicas behind a prefix router and a system prompt sent once: (router port,
    replicas, client, system prompt, index of the replica that became its home)."""
    port, procs = routed(harness, 2)
    c = client(port)
    system = system_prompt(seed)
    before = chats(*procs)
    c.chat.completions.create(model="m", messages=chat(system, first))
    return port, procs, c, system, added(procs, before).index(1)


def test_a_busy_prefix_replica_passes_new_requests_to_another(harness: Harness) -> None:
    port, procs, c, system, home = homed(harness, 11, "where do you live?")
    errors: list[BaseException] = []
    # 2 slow requests of the prefix, both at home (the second is within the bound,
    # ceil((1 + 1) * 1.25 / 2) = 2); a third would be over it: ceil((2 + 1) * 1.25 / 2) = 2
    before = chats(*procs)
    threads = [slow(port, chat(system, "slow 0"), errors)]
    wait_in_flight(port, 1)
    threads.append(slow(port, chat(system, "slow 1"), errors))
    wait_in_flight(port, 2)
    assert added(procs, before) == [2 if n == home else 0 for n in (0, 1)]
    before = chats(*procs)
    for i in range(3):
        c.chat.completions.create(model="m", messages=chat(system, f"while busy {i}"))
    elsewhere = added(procs, before)
    assert elsewhere == [0 if n == home else 3 for n in (0, 1)], (home, elsewhere)
    for t in threads:
        t.join(20)
    assert errors == []
    before = chats(*procs)
    c.chat.completions.create(model="m", messages=chat(system, "idle again"))
    assert added(procs, before)[home] == 1  # back home once it is idle


def test_short_prompts_are_balanced_by_load(harness: Harness) -> None:
    port, procs, c, system, home = homed(harness, 12, "hello")
    errors: list[BaseException] = []
    # 1 in flight at home, none on the other: under the bound, ceil((1 + 1) * 1.25 / 2) = 2
    thread = slow(port, chat(system, "slow"), errors)
    wait_in_flight(port, 1)
    before = chats(*procs)
    for i in range(4):
        c.chat.completions.create(model="m", messages=chat("Be brief.", f"short {i}"))
    short = added(procs, before)
    assert short == [0 if n == home else 4 for n in (0, 1)], (home, short)  # the idle one
    before = chats(*procs)
    c.chat.completions.create(model="m", messages=chat(system, "long"))
    assert added(procs, before)[home] == 1  # a long prompt still goes home, by its prefix
    thread.join(20)
    assert errors == []


def test_least_outstanding_ignores_the_prefix(harness: Harness) -> None:
    """The default is unchanged: with a request in flight on one replica, a prompt with the
    same prefix goes to the idle one."""
    a, b = harness.upstream(), harness.upstream()
    r = harness.router({"models": [{"name": "m", "replicas": [replica("a", a),
                                                               replica("b", b)]}]})
    system = system_prompt(13)
    errors: list[BaseException] = []
    thread = slow(r.port, chat(system, "slow"), errors)
    wait_in_flight(r.port, 1)
    busy = [n for n in (0, 1) if metric(r.port, "modelstack_router_replica_in_flight",
                                        replica="ab"[n])]
    before = chats(a, b)
    client(r.port).chat.completions.create(model="m", messages=chat(system, "fast"))
    assert added((a, b), before)[busy[0]] == 0
    thread.join(20)
    assert errors == []


def test_a_new_key_goes_to_the_least_loaded_replica_which_becomes_its_home() -> None:
    """`balancing = "prefix"` learns each key's home: first seen, the least loaded
    replica (so new prompts spread by load, not by a hash that may put several on one
    replica); after that the home while it is under the bound."""
    homes = Homes()
    loads = [Load("a", 3), Load("b", 0), Load("c", 2)]
    assert choose(loads, random.Random(0), "k1", homes) == 1 and homes == {"k1": "b"}
    even = [Load("a", 1), Load("b", 1), Load("c", 1)]  # 2 <= ceil(4 * 1.25 / 3) = 2
    assert choose(even, random.Random(0), "k1", homes) == 1  # home, within the bound
    over = [Load("a", 0), Load("b", 3), Load("c", 0)]  # 4 > ceil(4 * 1.25 / 3) = 2
    spilled = choose(over, random.Random(0), "k1", homes)
    assert spilled in (0, 2) and homes == {"k1": "b"}  # the home stays where the cache is
    gone = [Load("a", 0), Load("c", 1)]  # its home left the config: a new home
    assert choose(gone, random.Random(0), "k1", homes) == 0 and homes == {"k1": "a"}
    # new keys on idle replicas: the one holding the fewest keys, so keys spread evenly
    for i in range(6):
        choose([Load("a", 0), Load("b", 0), Load("c", 0)], random.Random(i), f"n{i}", homes)
    assert sorted(homes.counts.values()) == [2, 2, 3]


def test_the_homes_a_worker_remembers_are_bounded() -> None:
    homes = Homes()
    for i in range(HOMES + 10):
        homes[f"key-{i}"] = "a"
    assert len(homes) == HOMES and "key-0" not in homes and f"key-{HOMES + 9}" in homes
    assert homes.counts == {"a": HOMES}
