"""Model files on this host: where an instance's model is, and fetching it when missing.

Sources (docs/agent.md): `hf://ORG/NAME[/FILE][@REV]` and `modelscope://ORG/NAME[/FILE][@REV]`
are downloaded into the libraries' caches under `PREFIX/models/` (resumable: both keep
partial files and continue them); an absolute path must exist on the host; `local://`
files were uploaded by `stack apply` to the instance's `model_path`. A finished download
leaves a record (`PREFIX/state/downloads/<key>.json`, file sizes) so later passes check
sizes instead of asking the hub again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.assignment import Instance

log = logging.getLogger("agent.models")

RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class SourceRef:
    """A parsed model source."""

    scheme: str  # hf | modelscope | path | local
    repo: str = ""
    file: str = ""
    revision: str | None = None
    path: str = ""


def parse_source(source: str) -> SourceRef:
    """Split a model source into its parts; `ValueError` says what is wrong."""
    for scheme, name in (("hf://", "hf"), ("modelscope://", "modelscope")):
        if source.startswith(scheme):
            rest = source[len(scheme):]
            rest, _, rev = rest.partition("@")
            parts = [p for p in rest.split("/") if p]
            if len(parts) < 2:
                raise ValueError(f"source `{source}` needs ORG/NAME after {scheme}")
            return SourceRef(name, "/".join(parts[:2]), "/".join(parts[2:]), rev or None)
    if source.startswith("local://"):
        return SourceRef("local", path=source[len("local://"):])
    if source.startswith("/"):
        return SourceRef("path", path=source)
    raise ValueError(f"source `{source}` is not hf://, modelscope://, local:// or an absolute path")


@dataclass(frozen=True)
class ModelStatus:
    """Where the model is (`path`), or how its download goes, or why it cannot be had.

    `terminal`: the error is in the instance itself (an invalid source), so asking again
    gives the same answer; other errors (a file not there yet, a failed download) may pass.
    """

    path: str | None = None
    progress: dict[str, Any] | None = None
    error: str | None = None
    terminal: bool = False


def _tree_sizes(path: Path) -> dict[str, int]:
    if path.is_file():
        return {"": path.stat().st_size}
    sizes: dict[str, int] = {}
    for root, _dirs, files in os.walk(path, followlinks=True):
        for name in files:
            full = Path(root) / name
            sizes[str(full.relative_to(path))] = full.stat().st_size
    return sizes


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


class Download:
    """One model download running in a thread."""

    def __init__(self, ref: SourceRef, cache_dir: Path) -> None:
        self.ref = ref
        self.cache_dir = cache_dir
        self.total: int | None = None
        self.result: str | None = None
        self.error: str | None = None
        self.finished_at = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"download {ref.repo}")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = (self._hf() if self.ref.scheme == "hf" else self._modelscope())
        except Exception as exc:  # every failure becomes the instance's message
            self.error = f"{type(exc).__name__}: {exc}"
        self.finished_at = time.monotonic()

    def _hf(self) -> str:
        import huggingface_hub as hub  # lazily: a large import only needed here

        ref, cache = self.ref, str(self.cache_dir / "huggingface")
        # the library reads HF_ENDPOINT once, when imported; the node's `env` may set it
        # later (HF_TOKEN and proxies it reads at each request)
        endpoint = os.environ.get("HF_ENDPOINT") or None
        if ref.file:
            return str(hub.hf_hub_download(ref.repo, ref.file, revision=ref.revision,
                                           cache_dir=cache, endpoint=endpoint))
        try:
            plan = hub.snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache,
                                         dry_run=True, endpoint=endpoint)
            if isinstance(plan, list):
                self.total = sum(int(getattr(f, "file_size", 0) or 0) for f in plan)
        except Exception:  # the size is only for progress; the download itself decides
            self.total = None
        return str(hub.snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache,
                                         endpoint=endpoint))

    def _modelscope(self) -> str:
        try:
            from modelscope.hub.file_download import model_file_download
            from modelscope.hub.snapshot_download import snapshot_download
        except ImportError as exc:
            raise RuntimeError(
                "the `modelscope` library is not installed in the agent's environment"
            ) from exc
        ref, cache = self.ref, str(self.cache_dir / "modelscope")
        if ref.file:
            return str(model_file_download(ref.repo, ref.file, revision=ref.revision,
                                           cache_dir=cache))
        return str(snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache))

    def progress(self) -> dict[str, Any]:
        """Bytes on disk so far (partial files included) against the expected total."""
        lib = "huggingface" if self.ref.scheme == "hf" else "modelscope"
        folder = self.cache_dir / lib / ("models--" + self.ref.repo.replace("/", "--"))
        done = _dir_bytes(folder) if folder.exists() else 0
        fraction = round(min(done / self.total, 1.0), 4) if self.total else None
        return {"bytes_done": done, "bytes_total": self.total, "fraction": fraction}


class ModelStore:
    """Resolves instances' model files, starting downloads in the background."""

    def __init__(self, models_dir: Path, state_dir: Path) -> None:
        self.models_dir = models_dir
        self.records_dir = state_dir / "downloads"
        self.downloads: dict[str, Download] = {}

    def _record_path(self, source: str) -> Path:
        return self.records_dir / (hashlib.sha256(source.encode()).hexdigest()[:16] + ".json")

    def _recorded(self, source: str) -> str | None:
        try:
            record = json.loads(self._record_path(source).read_text())
            path = Path(record["path"])
            if _tree_sizes(path) == record["sizes"]:
                return str(path)
        except (OSError, ValueError, KeyError):
            return None
        log.warning("model files of %s changed on disk; fetching again", source)
        return None

    def _write_record(self, source: str, path: str) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        body = {"source": source, "path": path, "sizes": _tree_sizes(Path(path))}
        tmp = self._record_path(source).with_suffix(".tmp")
        tmp.write_text(json.dumps(body, sort_keys=True))
        os.replace(tmp, self._record_path(source))

    def resolve(self, inst: Instance) -> ModelStatus:
        """The model's path when present; else progress of its download, or the reason."""
        if inst.model_path and Path(inst.model_path).exists():
            return ModelStatus(path=inst.model_path)
        try:
            ref = parse_source(inst.source)
        except ValueError as exc:
            return ModelStatus(error=f"{exc}. hint: fix `source` of model `{inst.model}`.",
                               terminal=True)
        if ref.scheme == "path":
            if Path(ref.path).exists():
                return ModelStatus(path=ref.path)
            return ModelStatus(error=(
                f"model file {ref.path} does not exist on this host. hint: copy it there, "
                "or use a `local://` source so `stack apply` uploads it."))
        if ref.scheme == "local":
            where = inst.model_path or "(no model_path)"
            return ModelStatus(error=(
                f"uploaded model file {where} is missing. hint: run `stack apply` again "
                "to upload it."))
        return self._fetch(inst.source, ref)

    def _fetch(self, source: str, ref: SourceRef) -> ModelStatus:
        recorded = self._recorded(source)
        if recorded:
            return ModelStatus(path=recorded)
        download = self.downloads.get(source)
        if download and download.error:
            if time.monotonic() - download.finished_at < RETRY_SECONDS:
                return ModelStatus(error=self._download_error(ref, download.error))
            download = None
        if download is None:
            log.info("downloading %s", source)
            download = self.downloads[source] = Download(ref, self.models_dir)
        if download.result is None:
            return ModelStatus(progress=download.progress())
        self._write_record(source, download.result)
        del self.downloads[source]
        log.info("downloaded %s to %s", source, download.result)
        return ModelStatus(path=download.result)

    @staticmethod
    def _download_error(ref: SourceRef, error: str) -> str:
        if "modelscope" in error and "not installed" in error:
            hint = "install it (`pip install modelscope`) beside the agent, or use hf:// or local://"
        elif ref.scheme == "hf":
            hint = ("check that this host reaches the hub (or set HF_ENDPOINT), that HF_TOKEN "
                    "is set for gated models, or use a local:// source; retried every minute")
        else:
            hint = ("check that this host reaches modelscope.cn, or use local://; "
                    "retried every minute")
        return f"download of {ref.scheme}://{ref.repo} failed: {error}. hint: {hint}."
