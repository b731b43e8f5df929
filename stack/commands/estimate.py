"""Estimate what a model needs: parameters, weights, KV cache per token, and the memory
claim of a backend at a context size, from its metadata only (no weights are read).

SOURCE is any form stack.toml accepts: `hf://ORG/NAME[/FILE][@REV]`,
`modelscope://ORG/NAME[/FILE][@REV]`, a path, or `local://PATH`. A folder holding only
config.json is enough. Examples:

  stack estimate hf://Qwen/Qwen2.5-7B-Instruct --gpus 2
  stack estimate ./models/gemma-3-270m-q4_k_m.gguf --ctx 8192 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stack.errors import ConfigError
from stack.estimate import Claim, ModelEvaluation, evaluate, read_metadata
from stack.estimate.memory import gib
from stack.spec import BACKENDS, ModelSpec

HELP = "estimate the memory a model needs (parameters, weights, KV cache, claim)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `stack estimate`."""
    parser.add_argument("source", metavar="SOURCE", help="the model source")
    parser.add_argument("--backend", choices=BACKENDS, help="backend to size (default: the "
                        "preferred compatible one)")
    parser.add_argument("--ctx", type=int, metavar="N", help="context size in tokens")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="GPUs per replica (default: 1 for GPU backends; 0 means CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _source_text(source: str) -> str:
    """A plain relative path on the command line means a controller path."""
    if "://" in source or source.startswith("/"):
        return source
    return f"local://{source}"


def estimate(source: str, base_dir: Path, backend: str | None, ctx: int | None,
             gpus: int | None) -> tuple[ModelEvaluation, str, Claim | str]:
    """The evaluation, chosen backend and its claim (or the reason it has none)."""
    if ctx is not None and ctx < 1:
        raise ConfigError(f"`--ctx` must be a positive number of tokens, got {ctx}",
                          hint="pass e.g. `--ctx 8192`.")
    if gpus is not None and gpus < 0:
        raise ConfigError(f"`--gpus` cannot be negative, got {gpus}", hint="pass 0 for CPU.")
    text = _source_text(source)
    meta = read_metadata(text, base_dir)
    try:
        spec = ModelSpec.model_validate({
            "source": text, "backend": backend, "context": ctx,
            "command": "{model_path}" if backend == "custom" else None,
        })
    except ValidationError as exc:
        raise ConfigError(f"`--ctx` {ctx} is too small", hint="pass at least 256.") from exc
    evaluation = evaluate("estimate", spec, meta)
    chosen = backend or evaluation.backends[0]
    claim = evaluation.claim(chosen, 1 if gpus is None else gpus, None)
    return evaluation, chosen, claim


def as_json(evaluation: ModelEvaluation, backend: str, claim: Claim | str) -> dict[str, Any]:
    """The `stack estimate --json` contract of docs/estimate.md (plus a few informative
    keys)."""
    meta = evaluation.meta
    out: dict[str, Any] = {
        "source": meta.source,
        "format": meta.format,
        "architecture": meta.architecture,
        "kind": evaluation.kind,
        "quantization": meta.quantization,
        "params": meta.params,
        "weights_bytes": meta.weights_bytes,
        "kv_bytes_per_token": meta.kv_bytes_per_token,
        "context": evaluation.context_for(backend),
        "max_context": meta.max_context,
        "backends": list(evaluation.backends),
        "backend": backend,
    }
    if isinstance(claim, Claim):
        out.update(gpus=claim.gpus, vram_bytes=claim.vram_bytes_per_gpu,
                   ram_bytes=claim.ram_bytes, disk_bytes=claim.disk_bytes, detail=claim.detail)
    else:
        out.update(vram_bytes=None, ram_bytes=None, reason=claim)
    return out


def _render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{data['source']}", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    params = data["params"]
    table.add_row("model", f"{data['architecture']} ({data['kind']}, {data['format']}"
                  + (f", {data['quantization']}" if data["quantization"] else "") + ")")
    table.add_row("parameters", f"{params / 1e9:.3f} B" if params >= 1e8 else f"{params:,}")
    table.add_row("weights", gib(data["weights_bytes"]))
    if data["context"]:  # a backend that runs with a context length
        table.add_row("KV cache", f"{data['kv_bytes_per_token']:,} B/token (16-bit)")
        table.add_row("context", f"{data['context']:,} tokens (training "
                                 f"{data['max_context']:,})")
    table.add_row("backends", ", ".join(data["backends"]))
    if data.get("reason"):
        table.add_row(data["backend"], f"[red]{data['reason']}[/red]")
    else:
        where = f"{data['gpus']} GPU(s)" if data["gpus"] else "CPU"
        table.add_row(f"{data['backend']} on {where}",
                      f"VRAM {gib(data['vram_bytes'])} per GPU, RAM {gib(data['ram_bytes'])}")
        table.add_row("", data["detail"])
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Print the estimate; exit 1 when the chosen layout cannot hold the model."""
    base_dir = Path.cwd()
    evaluation, backend, claim = estimate(args.source, base_dir, args.backend, args.ctx,
                                          args.gpus)
    data = as_json(evaluation, backend, claim)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _render(data)
    return 0
