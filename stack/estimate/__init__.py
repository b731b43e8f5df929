"""Understanding a model: metadata readers, memory per backend, compatibility.

Public surface (the scheduler and `stack estimate` use only these):

- `read_metadata(source, base_dir) -> ModelMeta` (SourceError when unreadable)
- `meta_from_config(config_dict, source="", ...) -> ModelMeta`
- `evaluate(name, ModelSpec, ModelMeta) -> ModelEvaluation` (the `Evaluation` protocol)
- the values of `stack.estimate.types`: `ModelMeta`, `Claim`, `Evaluation`
"""

from stack.estimate.config import meta_from_config
from stack.estimate.evaluate import ModelEvaluation, default_context, evaluate
from stack.estimate.read import meta_from_gguf, read_metadata, read_path
from stack.estimate.types import Claim, Evaluation, ModelMeta

__all__ = [
    "Claim",
    "Evaluation",
    "ModelEvaluation",
    "ModelMeta",
    "default_context",
    "evaluate",
    "meta_from_config",
    "meta_from_gguf",
    "read_metadata",
    "read_path",
]
