"""Model sources: parse the forms stack.toml accepts and find their metadata files.

Forms (docs/stack-toml.md, `models.NAME.source`): `hf://ORG/NAME[/FILE][@REV]`, `modelscope://ORG/NAME[/FILE][@REV]`,
an absolute path on the hosts (`/models/qwen`), and `local://PATH` (a controller file or
folder relative to stack.toml, or absolute as `local:///abs/path`).

`parse_source` is pure. `fetch_metadata` brings only the small files the estimator reads
(config.json, the safetensors index, model_index.json, GGUF headers) onto the controller:
Hugging Face through `huggingface_hub` (which honours `HF_ENDPOINT`, `HF_TOKEN`,
`HF_HUB_OFFLINE` and the cache under `HF_HOME`), ModelScope through its cache folder
(`MODELSCOPE_CACHE`, default `~/.cache/modelscope/hub`) or its library when installed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stack.errors import MetadataUnavailable, SourceError

Scheme = Literal["hf", "modelscope", "path", "local"]

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = re.compile(rf"^({_NAME})/({_NAME})(?:/(.+))?$")
_REV = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_FORMS = (
    "`hf://ORG/NAME[/FILE][@REV]`, `modelscope://ORG/NAME[/FILE][@REV]`, "
    "an absolute path, or `local://PATH`"
)

# Files the estimator reads; weights are never downloaded for an estimate.
METADATA_FILES = ("config.json", "model.safetensors.index.json", "model_index.json",
                  "params.json", "adapter_config.json", "cosyvoice.yaml", "cosyvoice2.yaml",
                  "cosyvoice3.yaml")


@dataclass(frozen=True)
class Source:
    """A parsed model source."""

    scheme: Scheme
    repo: str | None = None  # ORG/NAME for hf and modelscope
    file: str | None = None  # a file inside the repo (e.g. a GGUF)
    revision: str | None = None
    path: str | None = None  # path and local: the path as written (local: without scheme)

    @property
    def text(self) -> str:
        """The canonical spelling of the source."""
        if self.scheme in ("hf", "modelscope"):
            tail = f"/{self.file}" if self.file else ""
            rev = f"@{self.revision}" if self.revision else ""
            return f"{self.scheme}://{self.repo}{tail}{rev}"
        if self.scheme == "local":
            return f"local://{self.path}"
        return str(self.path)

    def local_path(self, base_dir: Path) -> Path:
        """The controller path of a `local://` source (relative to stack.toml's folder) or
        of a host path (the same path, when the controller has it too)."""
        if self.scheme not in ("local", "path") or self.path is None:
            raise SourceError(f"`{self.text}` is not a local path")
        path = Path(self.path)
        return path if path.is_absolute() else (base_dir / path)


def parse_source(text: str) -> Source:
    """`hf://Qwen/Qwen2.5-7B-Instruct@main` -> Source(scheme="hf", ...); SourceError when
    the text is none of the accepted forms."""
    raw = text.strip()
    if not raw:
        raise SourceError("a model `source` is empty", hint=f"use one of {_FORMS}.")
    for scheme in ("hf", "modelscope"):
        prefix = f"{scheme}://"
        if raw.startswith(prefix):
            return _parse_repo(scheme, raw, raw[len(prefix):])
    if raw.startswith("local://"):
        rest = raw[len("local://"):]
        if not rest:
            raise SourceError(f"`{raw}` names no path", hint="write `local://models/my-model`.")
        return Source(scheme="local", path=rest)
    if raw.startswith("/"):
        return Source(scheme="path", path=raw)
    if "://" in raw:
        scheme = raw.split("://", 1)[0]
        raise SourceError(f"model source scheme `{scheme}://` is not supported in `{raw}`",
                          hint=f"use one of {_FORMS}.")
    if _REPO.match(raw):
        raise SourceError(f"model source `{raw}` has no scheme",
                          hint=f"write `hf://{raw}` for Hugging Face or `local://{raw}` "
                               "for a folder beside stack.toml.")
    raise SourceError(f"model source `{raw}` is not understood",
                      hint=f"use one of {_FORMS}; relative paths need `local://`.")


def _parse_repo(scheme: Scheme, raw: str, rest: str) -> Source:
    revision: str | None = None
    if "@" in rest:
        rest, revision = rest.split("@", 1)
        if not revision or not _REV.match(revision) or ".." in revision:
            raise SourceError(f"revision `{revision}` in `{raw}` is not valid",
                              hint="write a branch, tag or commit after `@`, e.g. `@main`.")
    match = _REPO.match(rest)
    if not match:
        raise SourceError(f"`{raw}` does not name a repository as ORG/NAME",
                          hint=f"write `{scheme}://ORG/NAME[/FILE][@REV]`, "
                               f"e.g. `{scheme}://Qwen/Qwen2.5-7B-Instruct`.")
    org, name, file = match.groups()
    if file is not None:
        parts = file.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise SourceError(f"file `{file}` in `{raw}` is not a clean path inside the repo",
                              hint="name the file as it appears in the repository.")
    return Source(scheme=scheme, repo=f"{org}/{name}", file=file, revision=revision)


# -- finding the metadata on the controller ---------------------------------------------


def fetch_metadata(source: Source, base_dir: Path) -> Path:
    """A controller path (file or folder) holding the source's metadata files."""
    if source.scheme in ("local", "path"):
        path = source.local_path(base_dir)
        if not path.exists():
            where = "beside stack.toml" if source.scheme == "local" else "on the controller"
            raise SourceError(
                f"model source `{source.text}` does not exist {where} ({path})",
                hint="check the path; a host path must also exist on the controller to be "
                     "estimated, or use `local://` to upload it."
                if source.scheme == "path" else "check the path and that the folder exists.",
            )
        return path
    if source.scheme == "hf":
        return _fetch_hf(source)
    return _fetch_modelscope(source)


def _hf_cached(source: Source, filename: str) -> Path | None:
    """A file of the repo from the Hugging Face cache (the library's own lookup)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert source.repo is not None
    try:
        return Path(hf_hub_download(repo_id=source.repo, filename=filename,
                                    revision=source.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _fetch_hf(source: Source) -> Path:
    """The small metadata files of a Hugging Face repo: from the cache, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    assert source.repo is not None
    if source.file:
        cached = _hf_cached(source, source.file)
        if cached is not None:
            return cached
    else:
        for name in ("config.json", "model_index.json"):
            cached = _hf_cached(source, name)
            if cached is not None:
                return cached.parent
    patterns = [*METADATA_FILES, "*.safetensors.index.json", "*/config.json"]
    try:
        folder = Path(snapshot_download(
            repo_id=source.repo, revision=source.revision, allow_patterns=patterns,
        ))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise MetadataUnavailable(
            f"`{source.text}` is not in the Hugging Face cache and the hub cannot be reached",
            hint="download it once with network (`hf download "
                 f"{source.repo}`), or unset `HF_HUB_OFFLINE`; set `HF_ENDPOINT` for a mirror.",
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        error = MetadataUnavailable if _transient(exc) else SourceError
        raise error(f"cannot read `{source.text}` from Hugging Face: {exc}",
                    hint="check the repository name and revision, and `HF_TOKEN` "
                         "for gated models.") from exc
    if source.file:
        return _fetch_hf_file(source, folder)
    return folder


def _fetch_hf_file(source: Source, folder: Path) -> Path:
    """A single file of the repo (a GGUF): a copy of its first bytes, read by range."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    assert source.repo is not None and source.file is not None
    cached = folder / source.file
    if cached.exists():
        return cached
    from stack.estimate.remote import hf_header_copy

    try:
        return hf_header_copy(source.repo, source.file, source.revision)
    except (HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        error = MetadataUnavailable if _transient(exc) else SourceError
        raise error(f"cannot read `{source.text}` from Hugging Face: {exc}",
                    hint="check the file name and `HF_TOKEN` for gated models.") from exc


def hub_file_size(source: Source, filename: str) -> int:
    """The size of one file of a hub repo, asked of the hub (one request, no download):
    for weights the metadata files do not describe (CTranslate2's `model.bin`)."""
    if source.scheme != "hf" or source.repo is None:
        raise MetadataUnavailable(
            f"the size of `{filename}` in `{source.text}` is not known on the controller",
            hint="download the model once on the controller (the library's cache is read), "
                 "or serve it from a `local://` folder.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        found = HfApi().get_paths_info(source.repo, [filename], revision=source.revision)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        error = MetadataUnavailable if _transient(exc) else SourceError
        raise error(f"cannot read the size of `{filename}` in `{source.text}` from Hugging "
                    f"Face: {exc}", hint="check the repository name and revision, and "
                    "`HF_TOKEN` for gated models; set `HF_ENDPOINT` for a mirror.") from exc
    size = next((getattr(f, "size", None) for f in found), None)
    if not isinstance(size, int):
        raise SourceError(f"`{source.text}` has no `{filename}`",
                          hint="point at a CTranslate2 model folder (model.bin and "
                               "config.json).")
    return size


def _transient(exc: Exception) -> bool:
    """Whether a hub error says "not now" (no answer, timeout, gated, server error) rather
    than "no such thing" (404, a bad name): the model's running replicas are kept then."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status in (401, 403, 408, 429) or status >= 500
    return not isinstance(exc, ValueError)  # connection errors and timeouts are OSErrors


def modelscope_cache_dirs(repo: str) -> list[Path]:
    """Where the ModelScope library keeps a repo, newest layout first.

    `MODELSCOPE_CACHE` (default `~/.cache/modelscope/hub`) holds `models/ORG/NAME` (1.x
    from 1.20) or `ORG/NAME` (older); the library writes `.` in names as `___`.
    """
    root = Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache/modelscope/hub")
    org, name = repo.split("/", 1)
    names = [name, name.replace(".", "___")]
    out: list[Path] = []
    for base in (root / "models", root, root / "hub" / "models", root / "hub"):
        for n in names:
            if base / org / n not in out:
                out.append(base / org / n)
    return out


def _fetch_modelscope(source: Source) -> Path:
    assert source.repo is not None
    for folder in modelscope_cache_dirs(source.repo):
        if folder.is_dir():
            return folder / source.file if source.file else folder
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as exc:
        where = modelscope_cache_dirs(source.repo)[0]
        raise MetadataUnavailable(
            f"`{source.text}` is not in the ModelScope cache ({where})",
            hint="download it with `modelscope download` (or `pip install modelscope` on the "
                 "controller), or set `MODELSCOPE_CACHE`.",
        ) from exc
    try:
        folder = Path(snapshot_download(source.repo, revision=source.revision or "master",
                                        allow_patterns=[*METADATA_FILES, "*.index.json"]))
    except Exception as exc:  # the library raises many unrelated types
        error = MetadataUnavailable if _transient(exc) else SourceError
        raise error(f"cannot read `{source.text}` from ModelScope: {exc}",
                    hint="check the repository name and `MODELSCOPE_API_TOKEN`.") from exc
    return folder / source.file if source.file else folder
