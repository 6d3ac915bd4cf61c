"""castlora: port LoRA adapters between LLM architectures (CAST: activation-space transfer).

The pipeline, one module per stage: families (model specs) -> pair (both models) -> texts / tokens
(training text, alignment) -> adapters / site_map -> heads / cast_module -> teachers / train -> export ->
evaluate; transfers/ holds the methods (cast, weight-space, labels) and cli.py the command line.
"""

from ._version import __version__
from .adapters import LoraAdapter, LoraKernel, load_adapter
from .errors import CastloraError
from .evaluate import evaluate, retention
from .families import model_sites, register_family, supported_model_types
from .teachers import register_objective, register_teacher
from .train_lora import train_lora
from .transfers import register_transfer
from .translate import translate

__all__ = ["translate", "train_lora", "evaluate", "retention", "load_adapter", "model_sites",
           "register_family", "supported_model_types", "register_teacher", "register_objective",
           "register_transfer", "LoraAdapter", "LoraKernel", "CastloraError", "__version__"]
