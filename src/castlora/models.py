"""Load models and tokenizers from a local folder or a hub id, safely.

safetensors only unless the user allows pickles; `trust_remote_code` stays off unless asked.
"""

from __future__ import annotations

import json
import tempfile
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
    """Fail before loading anything when a local model folder is missing, holds only pickles, or
    has a weights file whose safetensors header is unreadable (truncated or corrupted)."""
    if not is_local(name):
        return  # a hub id: transformers resolves it (needs a network or a local cache)
    path = Path(name).expanduser()
    if not path.exists():
        raise CastloraError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise CastloraError(f"{what} path {path} is a file, not a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise CastloraError(f"{what} folder {path} has no config.json: not a Hugging Face model folder")
    config = _read_json_object(path / "config.json", what)
    _check_tokenizer_fits(path, config, what)
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if not weights:
        if pickles and not allow_pickle:
            raise UnsafeFileError(
                f"{what} folder {path} holds only pickle weights ({', '.join(pickles)}): loading them can "
                "execute arbitrary code. Convert to safetensors or pass --allow-pickle if you trust them.")
        if not pickles:
            raise CastloraError(f"{what} folder {path} has no weights (*.safetensors)")
    for f in weights:
        check_safetensors_header(f, what)


def _read_json_object(file: Path, what: str) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CastloraError(f"{what} file {file} cannot be read as JSON ({e}): copy or download the model again") from e
    if not isinstance(value, dict):
        raise CastloraError(f"{what} file {file} holds a JSON {type(value).__name__}, not an object: it is damaged "
                            "or not a Hugging Face config; copy or download the model again")
    return value


def _check_tokenizer_fits(path: Path, config: dict, what: str) -> None:
    """A tokenizer.json whose token ids run past the model's vocab_size belongs to another model (family)."""
    vocab_size = config.get("vocab_size")
    tok_file = path / "tokenizer.json"
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not tok_file.is_file():
        return
    try:
        tok = json.loads(tok_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CastloraError(f"{what} tokenizer {tok_file} cannot be read as JSON ({e}): copy or download the "
                            "model again") from e
    if not isinstance(tok, dict):
        raise CastloraError(f"{what} tokenizer {tok_file} holds a JSON {type(tok).__name__}, not an object: copy or "
                            "download the model again")
    vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok.get("model"), dict) else None
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab))) if isinstance(vocab, list) else []
    ids += [t.get("id") for t in tok.get("added_tokens") or [] if isinstance(t, dict)]
    ids = [i for i in ids if isinstance(i, int)]
    if ids and max(ids) >= vocab_size:
        raise CastloraError(f"{what} folder {path}: its tokenizer has token ids up to {max(ids)} but the model "
                            f"has vocab_size {vocab_size}: the tokenizer belongs to another model; put the "
                            "model's own tokenizer files in the folder")


def check_safetensors_header(path: Path, what: str = "model") -> None:
    """Read only the header of a safetensors file: it lists every tensor's byte range, so a
    truncated or corrupted file is caught here without loading it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except OSError as e:
        raise CastloraError(f"{what} weights file {path} cannot be read: {e}") from e
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean an unusable file
        raise CastloraError(f"{what} weights file {path} is not a readable safetensors file (truncated or "
                            f"corrupted?): {e}. Download or copy it again.") from e


def local_model_type(name: str) -> str | None:
    """The `model_type` in a local model folder's config.json (None for a hub id or no such field)."""
    if not is_local(name):
        return None
    cfg = Path(name).expanduser() / "config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as e:
        raise CastloraError(f"{cfg} cannot be read as JSON: {e}") from e


def load_model(name: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               device_map=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    check_model_path(name, allow_pickle)
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map
        if isinstance(device_map, dict) and "disk" in device_map.values():
            kwargs["offload_folder"] = tempfile.mkdtemp(prefix="castlora-offload-")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(name).expanduser()) if is_local(name) else name,
                                                     **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many types for a bad folder
        raise CastloraError(f"cannot load model {name!r} ({type(e).__name__}): {_first_line(e)}"
                            f"{_bad_weights_hint(name)}") from e
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
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for a corrupted tokenizer.json
        raise CastloraError(f"cannot load the tokenizer of {name!r} ({type(e).__name__}): {_first_line(e)}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:400] if lines else repr(e)


def _bad_weights_hint(name: str) -> str:
    """Which local weights file is unreadable, when one is (the usual cause of a failed load)."""
    if not is_local(name):
        return ""
    for f in sorted(Path(name).expanduser().glob("*.safetensors")):
        try:
            check_safetensors_header(f)
        except CastloraError:
            return f"; weights file {f} is truncated or corrupted: download or copy it again"
    return ""


def model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
