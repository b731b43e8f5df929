"""Engine metrics: a backend's own Prometheus page, read within bounds and mapped to the
agent's one set of names (docs/operating.md, "Engine metrics").

Pure: `read_page(backend, text)` parses the text exposition format and returns an
`EngineSample`, or raises `PageError` for a page that is not what it should be (the
scrape then counts as failed: `modelstack_engine_up` 0). `agent.engine_scraper` fetches
the pages.

Each backend's names are in one table, `SOURCES`. A value the backend does not provide
stays None (never 0). A name that appears with several label sets (vLLM's engines,
SGLang's ranks and `is_streaming`) is summed, except the KV cache ratio, which is the
fullest one's (max). Where each name was read:

- llama.cpp: `llama-server --metrics` (the llama.cpp sources in llama-cpp-python 0.3.36),
  run on Gemma 3 270M; it has no KV cache ratio and no time-to-first-token histogram.
- vLLM: vllm/v1/metrics/loggers.py in vLLM 0.33.0 (`PrometheusStatLogger`); the older
  `vllm:gpu_cache_usage_perc` from the same file up to 0.11 (deprecated in 0.9.2 for
  `vllm:kv_cache_usage_perc`). Counters are written by prometheus_client with `_total`.
- SGLang: sglang/srt/observability/metrics_collector.py in SGLang 0.5.23;
  `sglang:token_usage` is the KV pool's used fraction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# one sample line: name, optional {labels}, value, optional timestamp
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*(,|$)')
MAX_LINE = 64 * 1024
MAX_BUCKETS = 100

FIELDS = ("requests_running", "requests_waiting", "kv_cache_usage_ratio",
          "prompt_tokens_total", "generation_tokens_total")

# backend -> our field -> the backend's sample names, preferred first
SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama.cpp": {
        "requests_running": ("llamacpp:requests_processing",),
        "requests_waiting": ("llamacpp:requests_deferred",),
        # prompt tokens evaluated, not those reused from the cache
        "prompt_tokens_total": ("llamacpp:prompt_tokens_total",),
        "generation_tokens_total": ("llamacpp:tokens_predicted_total",),
    },
    "vllm": {
        "requests_running": ("vllm:num_requests_running",),
        "requests_waiting": ("vllm:num_requests_waiting",),
        "kv_cache_usage_ratio": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "prompt_tokens_total": ("vllm:prompt_tokens_total",),
        "generation_tokens_total": ("vllm:generation_tokens_total",),
    },
    "sglang": {
        "requests_running": ("sglang:num_running_reqs",),
        "requests_waiting": ("sglang:num_queue_reqs",),
        "kv_cache_usage_ratio": ("sglang:token_usage",),
        "prompt_tokens_total": ("sglang:prompt_tokens_total",),
        "generation_tokens_total": ("sglang:generation_tokens_total",),
    },
}
# backend -> its time-to-first-token histogram (`_bucket`, `_sum`, `_count`)
TTFT: dict[str, str] = {
    "vllm": "vllm:time_to_first_token_seconds",
    "sglang": "sglang:time_to_first_token_seconds",
}
# the ratio of the fullest engine; everything else adds up over label sets
_MAX_FIELDS = frozenset({"kv_cache_usage_ratio"})


def has_metrics(backend: str) -> bool:
    """True for the backends with a metrics page the agent reads."""
    return backend in SOURCES


class PageError(Exception):
    """A metrics page that cannot be read (the scrape failed)."""


@dataclass(frozen=True)
class Histogram:
    """A histogram summed over label sets: cumulative counts per upper bound."""

    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), le ascending
    sum: float
    count: float


@dataclass(frozen=True)
class EngineSample:
    """One scrape of one instance's backend; `up` False when it failed."""

    up: bool
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage_ratio: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    time_to_first_token: Histogram | None = None

    def as_status(self, backend: str) -> dict[str, object]:
        """The `engine` object of an instance in `/v1/status`."""
        values: dict[str, object] = {"backend": backend, "up": self.up}
        for name in FIELDS:
            value = getattr(self, name)
            counted = value is not None and name not in _MAX_FIELDS and value.is_integer()
            values[name] = int(value) if counted else value  # counts as JSON integers
        return values


DOWN = EngineSample(up=False)


def _name(line: str) -> str:
    match = _NAME.match(line)
    if match is None:
        raise PageError(f"not a sample line: {line[:60]!r}")
    return match.group()


def _split_sample(line: str, name: str) -> tuple[str, str]:
    """(label text, value) of the sample line of `name`; PageError when it is not one."""
    rest = line[len(name):]
    labels = ""
    if rest.startswith("{"):
        end = _labels_end(rest)
        labels, rest = rest[1:end], rest[end + 1:]
    words = rest.split()
    if not words or len(words) > 2:
        raise PageError(f"sample {name} has no value")
    return labels, words[0]


def _labels_end(text: str) -> int:
    """The index of the `}` closing the label set that opens `text` (quotes respected)."""
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return i
    raise PageError("a label set is not closed")


def _le(labels: str) -> float:
    pos = 0
    while pos < len(labels):
        match = _LABEL.match(labels, pos)
        if match is None:
            raise PageError(f"bad labels: {labels[:60]!r}")
        if match.group(1) == "le":
            return float(match.group(2))
        pos = match.end()
    raise PageError("a histogram bucket has no `le`")


def _value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PageError(f"not a number: {text[:30]!r}") from None


def read_page(backend: str, text: str) -> EngineSample:
    """The engine sample in one backend's metrics page; PageError for a broken page."""
    fields = SOURCES.get(backend, {})
    wanted = {name: field for field, names in fields.items() for name in names}
    ttft = TTFT.get(backend)
    family = {f"{ttft}_bucket", f"{ttft}_sum", f"{ttft}_count"} if ttft else set()
    found: dict[str, float] = {}
    buckets: dict[float, float] = {}
    ttft_sum = ttft_count = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE:
            raise PageError("a line is longer than 64 KiB")
        name = _name(line)
        if name not in wanted and name not in family:
            continue  # read only as far as its name: the rest of the page costs little
        labels, raw = _split_sample(line, name)
        value = _value(raw)
        if not math.isfinite(value) and not (name.endswith("_bucket") and value == math.inf):
            continue  # NaN or an infinite gauge says nothing
        if name in wanted:
            old = found.get(name)
            found[name] = value if old is None else (
                max(old, value) if wanted[name] in _MAX_FIELDS else old + value)
        elif name == f"{ttft}_bucket":
            le = _le(labels)
            if le not in buckets and len(buckets) >= MAX_BUCKETS:
                raise PageError(f"more than {MAX_BUCKETS} histogram buckets")
            buckets[le] = buckets.get(le, 0.0) + value
        elif name == f"{ttft}_sum":
            ttft_sum = (ttft_sum or 0.0) + value
        else:  # the histogram's count
            ttft_count = (ttft_count or 0.0) + value
    values: dict[str, float | None] = {
        field: next((found[n] for n in names if n in found), None)
        for field, names in fields.items()}
    histogram = None
    if buckets and ttft_sum is not None and ttft_count is not None:
        histogram = Histogram(tuple(sorted(buckets.items())), ttft_sum, ttft_count)
    return EngineSample(up=True, time_to_first_token=histogram, **values)
