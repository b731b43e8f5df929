"""Prefix-aware routing against least outstanding: two real llama-server replicas of
Gemma 3 270M (CPU) behind a real router, a chat workload of conversations that share
system prompts, time to first token and throughput.

    .venv/bin/python bench/prefix_bench.py [--rounds 3] [--prompts 8] [--conversations 2]
        [--turns 4] [--clients 8] [--think 1.0] [--max-tokens 16] [--ctx 8192]
        [--parallel 4] [--cache-ram 8192]

Each round runs the same workload twice, once with `balancing = "prefix"` and once with
`"least-outstanding"` (ABBA order over the rounds, so drift in the machine's load falls on
both), each time on freshly started replicas (empty prompt caches) and a fresh router.
The workload: `--prompts` distinct system prompts of about 800 tokens, `--conversations`
conversations on each, `--turns` turns per conversation (each turn sends the conversation
so far: the system prompt, the earlier questions and answers, a new question), run by
`--clients` concurrent users, each taking the next conversation when its last one ends
and thinking between turns (uniformly 0 to 2 x `--think` seconds). Without thinking, a
closed loop flatters least outstanding: a user's next turn finds the replica its last one
just left the least loaded, so conversations stick by accident. Conversations of one
system prompt are not next to each other. Every request streams (`max_tokens` small);
TTFT is the time to the first chunk with content. A round uses its own system prompts
(seeded by the round).

Replicas: `llama-server -c CTX -np PARALLEL -t 1` with its default prompt cache (slots
reused by longest common prefix, idle slots saved in RAM up to `--cache-ram` MiB), one
pinned to each core; router and clients are not pinned. Prints a Markdown
report: every run, then per mode the medians over rounds and their ratios.

Binaries and model come from STACK_LLAMA_BIN / STACK_TEST_MODEL, else from
scripts/setup-llama-cpp and scripts/setup-model (cached per machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

sys.path.insert(0, str(Path(__file__).resolve().parent / "router"))
from run import ROOT, Procs, free_port

MODES = ("prefix", "least-outstanding")
WORDS = ["cache", "replica", "prompt", "token", "router", "balance", "model", "slot", "batch",
         "context", "window", "answer", "question", "system", "user", "assistant", "stream",
         "chunk", "latency", "queue", "memory", "layer", "weight", "shard", "tensor", "kernel",
         "thread", "core", "socket", "header", "request", "response"]


@dataclass
class Run:
    """One mode's pass over one round's workload."""

    mode: str
    round: int
    ttfts: list[float] = field(default_factory=list)
    wall: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def p50(self) -> float:
        return statistics.median(self.ttfts)

    @property
    def p95(self) -> float:
        return statistics.quantiles(self.ttfts, n=20)[18]

    @property
    def rps(self) -> float:
        return len(self.ttfts) / self.wall

    @property
    def tps(self) -> float:
        return self.completion_tokens / self.wall


def _setup(env_name: str, script: str) -> Path:
    value = os.environ.get(env_name)
    if not value:
        out = subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, text=True,
                             capture_output=True, cwd=ROOT)
        value = out.stdout.strip().splitlines()[-1]
    return Path(value)


def start_replica(procs: Procs, tmp: Path, bin_dir: Path, model: Path, port: int, core: int,
                  args: argparse.Namespace) -> None:
    procs.start([str(bin_dir / "llama-server"), "-m", str(model),
                 "--host", "127.0.0.1", "--port", str(port), "-c", str(args.ctx),
                 "-np", str(args.parallel), "--cache-ram", str(args.cache_ram), "-t", "1"],
                tmp / f"llama-{port}.log", cpus=str(core),
                env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                # one short request: the first one pays for setting up the compute graph
                httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                return
        time.sleep(0.2)
    raise RuntimeError(f"llama-server on port {port} did not become healthy")


def start_router(procs: Procs, mode: str, ports: list[int], tmp: Path) -> int:
    config = tmp / f"router-{mode}.json"
    config.write_text(json.dumps({"listen": "127.0.0.1:0", "balancing": mode, "models": [
        {"name": "gemma", "replicas": [{"id": f"r{i}", "url": f"http://127.0.0.1:{port}"}
                                       for i, port in enumerate(ports)]}]}))
    log = tmp / f"router-{mode}.log"
    procs.start([sys.executable, "-m", "router.main", "--config", str(config)], log,
                cpus=f"0-{(os.cpu_count() or 1) - 1}", cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"the router did not start:\n{log.read_text()}")


def system_prompt(rng: random.Random, number: int) -> str:
    """About 800 Gemma tokens (5,300 characters) of instructions, different from their
    first words."""
    rules = " ".join(rng.choice(WORDS) for _ in range(760))
    return f"You are assistant number {number} of the bench. Follow these rules: {rules}"


def workload(seed: int, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(system prompt, its questions) per conversation, prompts interleaved."""
    rng = random.Random(seed)
    prompts = [system_prompt(rng, i) for i in range(args.prompts)]
    return [(prompts[p], [f"Question {t + 1} of conversation {k}.{p}: what do "
                          + " ".join(rng.choice(WORDS) for _ in range(12)) + " mean?"
                          for t in range(args.turns)])
            for k in range(args.conversations) for p in range(args.prompts)]


async def run_round(port: int, convs: list[tuple[str, list[str]]], run: Run,
                    args: argparse.Namespace) -> None:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                max_retries=0, timeout=300)
    queue: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()
    for conv in convs:
        queue.put_nowait(conv)

    async def one(messages: list[ChatCompletionMessageParam]) -> str:
        started = time.monotonic()
        first = None
        text = []
        stream = await client.chat.completions.create(
            model="gemma", messages=messages, max_tokens=args.max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.monotonic() - started
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                run.completion_tokens += chunk.usage.completion_tokens
                run.prompt_tokens += chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                run.cached_tokens += (details.cached_tokens or 0) if details else 0
        run.ttfts.append(first if first is not None else time.monotonic() - started)
        return "".join(text)

    async def client_loop(rng: random.Random) -> None:
        while not queue.empty():
            system, questions = queue.get_nowait()
            messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": system}]
            for question in questions:
                messages.append({"role": "user", "content": question})
                messages.append({"role": "assistant", "content": await one(messages)})
                await asyncio.sleep(rng.uniform(0, 2 * args.think))

    started = time.monotonic()
    await asyncio.gather(*(client_loop(random.Random(i)) for i in range(args.clients)))
    run.wall = time.monotonic() - started
    await client.close()


def measure(mode: str, rnd: int, bin_dir: Path, model: Path, ports: list[int], tmp: Path,
            args: argparse.Namespace) -> Run:
    procs = Procs()
    run = Run(mode, rnd)
    try:
        for core, port in enumerate(ports):
            start_replica(procs, tmp, bin_dir, model, port, core % (os.cpu_count() or 1), args)
        router = start_router(procs, mode, ports, tmp)
        asyncio.run(run_round(router, workload(1000 + rnd, args), run, args))
    finally:
        procs.stop()
    return run


def report(runs: list[Run], load: tuple[str, str], args: argparse.Namespace) -> None:
    print(f"workload: {args.prompts} system prompts x {args.conversations} conversations x "
          f"{args.turns} turns = {args.prompts * args.conversations * args.turns} requests "
          f"per run, {args.clients} users thinking {args.think} s on average, max_tokens "
          f"{args.max_tokens}; replicas -c {args.ctx} -np {args.parallel} --cache-ram "
          f"{args.cache_ram} -t 1\n")
    print("| round | mode | TTFT p50 s | TTFT p95 s | req/s | completion tok/s | "
          "prompt tokens cached | wall s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r.round} | {r.mode} | {r.p50:.3f} | {r.p95:.3f} | {r.rps:.2f} | "
              f"{r.tps:.1f} | {r.cached_tokens / max(r.prompt_tokens, 1):.0%} | "
              f"{r.wall:.1f} |")
    med: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        med[mode] = {name: statistics.median(getattr(r, name) for r in mine)
                     for name in ("p50", "p95", "rps", "tps")}
        med[mode]["cached"] = statistics.median(r.cached_tokens / max(r.prompt_tokens, 1)
                                                for r in mine)
    print("\n| mode | TTFT p50 s | TTFT p95 s | req/s | completion tok/s | prompt tokens "
          "cached |\n|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        m = med[mode]
        print(f"| {mode} (median of {args.rounds}) | {m['p50']:.3f} | {m['p95']:.3f} | "
              f"{m['rps']:.2f} | {m['tps']:.1f} | {m['cached']:.0%} |")
    p, lo = med["prefix"], med["least-outstanding"]
    ratio = lo["p50"] / p["p50"]
    print(f"\nTTFT p50 least-outstanding / prefix: {ratio:.2f}x; p95: "
          f"{lo['p95'] / p['p95']:.2f}x; throughput prefix / least-outstanding: "
          f"{p['rps'] / lo['rps']:.2f}x req/s")
    print(f"target (TTFT p50 at least 2x better at no lower throughput): "
          f"{'met' if ratio >= 2 and p['rps'] >= 0.95 * lo['rps'] else 'not met'}")
    print(f"load average before: {load[0]}; after: {load[1]}")


def loadavg() -> str:
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=2,
                        help="conversations per system prompt")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--think", type=float, default=1.0,
                        help="mean seconds a user takes before the next turn (uniform)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--cache-ram", type=int, default=8192,
                        help="llama-server's prompt cache in RAM, MiB (its default: 8192)")
    args = parser.parse_args()
    bin_dir = _setup("STACK_LLAMA_BIN", "setup-llama-cpp")
    model = _setup("STACK_TEST_MODEL", "setup-model")
    ports = [free_port(), free_port()]
    runs: list[Run] = []
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="prefix-bench-") as tmp:
        for rnd in range(args.rounds):
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                run = measure(mode, rnd, bin_dir, model, ports, Path(tmp), args)
                print(f"round {rnd} {mode}: TTFT p50 {run.p50:.3f} s, p95 {run.p95:.3f} s, "
                      f"{run.rps:.2f} req/s, wall {run.wall:.1f} s", file=sys.stderr)
                runs.append(run)
    report(runs, (before, loadavg()), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
