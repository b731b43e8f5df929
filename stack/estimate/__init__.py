"""Understanding a model: metadata readers, memory per backend, compatibility.

Public surface (the scheduler and `stack estimate` use only these):

- `read_metadata(source, base_dir) -> ModelMeta` (SourceError when unreadable)
- `meta_from_config(config_dict, source="", ...) -> ModelMeta`
- `evaluate(name, ModelSpec, ModelMeta) -> ModelEvaluation` (the `Evaluation` protocol)
- the values of `stack.estimate.types`: `ModelMeta`, `Claim`, `Evaluation`

The names are loaded on first use: the scheduler imports only `stack.estimate.types`, and
must not pay for the metadata readers (gguf, numpy, httpx).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stack.estimate.evaluation import ModelEvaluation, default_context, evaluate
    from stack.estimate.model_config import meta_from_config
    from stack.estimate.read import meta_from_gguf, read_metadata, read_path
    from stack.estimate.types import Claim, Evaluation, ModelMeta

_WHERE = {
    "meta_from_config": "model_config", "ModelEvaluation": "evaluation",
    "default_context": "evaluation", "evaluate": "evaluation", "meta_from_gguf": "read",
    "read_metadata": "read", "read_path": "read", "Claim": "types",
    "Evaluation": "types", "ModelMeta": "types",
}

__all__ = [
    "Claim", "Evaluation", "ModelEvaluation", "ModelMeta", "default_context", "evaluate",
    "meta_from_config", "meta_from_gguf", "read_metadata", "read_path",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
