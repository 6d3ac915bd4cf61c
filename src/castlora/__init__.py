"""castlora: port LoRA adapters between LLM architectures (CAST: activation-space transfer).

The pipeline, one module per stage: families (model specs) -> capture / tokens (alignment) ->
adapters / site_map -> heads / cast_module -> losses / train -> export -> evaluate -> cli.
"""

__version__ = "0.1.0"

from .adapters import LoraAdapter, LoraKernel, load_adapter  # noqa: E402
from .errors import CastloraError  # noqa: E402
from .evaluate import evaluate, retention  # noqa: E402
from .families import model_sites, register_family, supported_model_types  # noqa: E402
from .train_lora import train_lora  # noqa: E402
from .translate import translate  # noqa: E402

__all__ = ["translate", "train_lora", "evaluate", "retention", "load_adapter", "model_sites",
           "register_family", "supported_model_types", "LoraAdapter", "LoraKernel", "CastloraError",
           "__version__"]
