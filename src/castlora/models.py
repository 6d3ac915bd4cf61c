"""Load models and tokenizers from a local folder or a hub id, safely.

safetensors only unless the user allows pickles; `trust_remote_code` stays off unless asked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CastloraError, UnsafeFileError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CastloraError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_path(name: str, allow_pickle: bool = False, what: str = "model") -> None:
    """Fail before loading anything when a local model folder is missing or holds only pickles."""
    if not is_local(name):
        return  # a hub id: transformers resolves it (needs a network or a local cache)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise CastloraError(f"{what} folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise CastloraError(f"{what} folder {path} has no config.json: not a Hugging Face model folder")
    has_st = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if not has_st:
        if pickles and not allow_pickle:
            raise UnsafeFileError(
                f"{what} folder {path} holds only pickle weights ({', '.join(pickles)}): loading them can "
                "execute arbitrary code. Convert to safetensors or pass --allow-pickle if you trust them.")
        if not pickles:
            raise CastloraError(f"{what} folder {path} has no weights (*.safetensors)")


def load_model(name: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               device_map=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    check_model_path(name, allow_pickle)
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(name).expanduser()) if is_local(name) else name,
                                                     **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise CastloraError(f"cannot load model {name!r}: {str(e).splitlines()[0][:400]}") from e
    if device_map is None:
        model.to(device)
    model.eval()
    for p in model.parameters():  # frozen: no weight gradients, no optimizer state
        p.requires_grad_(False)
    return model


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if is_local(name) else name,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CastloraError(f"cannot load the tokenizer of {name!r}: {str(e).splitlines()[0][:400]}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
