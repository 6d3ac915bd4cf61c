"""Adapters and models named by a local folder or a Hugging Face hub id.

A local folder is used as it is. Anything else is a hub id, fetched with huggingface_hub's
snapshot_download, restricted to the files castlora reads (safetensors only unless allow_pickle):
the files land in (or, with HF_HUB_OFFLINE=1, are read from) the standard hub cache, and the
snapshot folder is returned. Every hub failure becomes a one-line CastloraError that names the id
and says what to do.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CastloraError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
ADAPTER_PICKLE_FILES = ("adapter_model.bin",)
MODEL_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                  "chat_template.json")
MODEL_PICKLE_PATTERNS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth")


def resolve_adapter(adapter: str, revision: str | None = None, subfolder: str | None = None,
                    allow_pickle: bool = False) -> Path:
    """The folder of a PEFT adapter: `adapter` itself (joined with `subfolder`) when it is a local folder,
    else the snapshot folder of the hub repo `adapter` at `revision` (a branch, tag or commit; default
    main), with only adapter_config.json, adapter_model.safetensors and README.md fetched (under
    `subfolder` when given; adapter_model.bin too with allow_pickle). The hub folder must hold
    adapter_config.json."""
    local = _local_folder(adapter, "adapter")
    if local is not None:
        return local / subfolder if subfolder else local
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    names = ADAPTER_FILES + (ADAPTER_PICKLE_FILES if allow_pickle else ())
    snapshot = _snapshot("adapter", adapter, revision, [prefix + n for n in names])
    folder = snapshot / subfolder if subfolder else snapshot
    if not (folder / "adapter_config.json").is_file():
        hint = "" if subfolder else ", or it lives in a subfolder: pass the subfolder"
        raise CastloraError(
            f"adapter '{adapter}'{_at(revision)} has no {prefix}adapter_config.json on the hub (snapshot "
            f"{snapshot}): it is not a PEFT adapter{hint}")
    return folder


def resolve_model(name: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """The folder of a model: `name` itself when it is a local folder, else the snapshot folder of the hub
    repo `name` at `revision`, with only config.json, generation_config.json, the safetensors weights
    (and their index) and the tokenizer files fetched; never *.bin / *.pt unless allow_pickle. The hub
    folder must hold config.json and weights castlora may read."""
    local = _local_folder(name, "model")
    if local is not None:
        return local
    patterns = list(MODEL_PATTERNS) + (list(MODEL_PICKLE_PATTERNS) if allow_pickle else [])
    folder = _snapshot("model", name, revision, patterns)
    if not (folder / "config.json").is_file():
        raise CastloraError(f"model '{name}'{_at(revision)} has no config.json on the hub (snapshot {folder}): "
                            "it is not a transformers model")
    if not any(folder.glob("*.safetensors")):
        if not allow_pickle:
            raise CastloraError(
                f"model '{name}'{_at(revision)} has no safetensors weights (snapshot {folder}): its weights are "
                "pickles, which can run code when loaded; pass --allow-pickle if you trust it")
        if not any(p for pat in MODEL_PICKLE_PATTERNS for p in folder.glob(pat)):
            raise CastloraError(f"model '{name}'{_at(revision)} has no weights file (snapshot {folder})")
    return folder


def _at(revision: str | None) -> str:
    return f" (revision '{revision}')" if revision else ""


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _local_folder(name: str, what: str) -> Path | None:
    """Path(name) when it is a local folder; None when `name` can be a hub id; an error otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CastloraError(f"{what} {name} is a file: pass the folder that holds it")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CastloraError(f"{what} {name}: no such local folder, and not a hub id (org/name) either") from None
    return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    import os

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def _snapshot(what: str, repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download with its failures turned into one-line CastloraErrors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    head = f"{what} '{repo_id}'{_at(revision)}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if hub_offline():
            raise CastloraError(
                f"{head} is not in the local cache and HF_HUB_OFFLINE is set: run once online or pass a "
                f"local folder (hub cache: {constants.HF_HUB_CACHE})") from None
        raise CastloraError(
            f"{head} could not be fetched from the hub and is not (completely) in the local cache "
            f"({_one_line(e, 160)}): check the connection and run again, or pass a local folder") from None
    except GatedRepoError:
        raise CastloraError(f"{head} is a gated repo: accept its terms on the hub and log in "
                            "(`hf auth login`), or pass a local folder") from None
    except RevisionNotFoundError:
        raise CastloraError(f"{head}: the hub repo has no such revision: give an existing branch, tag "
                            "or commit") from None
    except RepositoryNotFoundError:
        raise CastloraError(f"{head} is neither a local folder nor a hub repo you can read (a typo? a private "
                            "repo needs `hf auth login`): pass a local folder or an existing hub id") from None
    except HfHubHTTPError as e:
        raise CastloraError(f"{head} could not be fetched from the hub: {_one_line(e)}") from None
    except OSError as e:
        raise CastloraError(f"{head} could not be fetched: {_one_line(e)}") from None
    except Exception as e:  # httpx's own errors (a proxy error, say) are not OSErrors
        if not type(e).__module__.startswith(("httpx", "huggingface_hub")):
            raise
        raise CastloraError(f"{head} could not be fetched from the hub ({type(e).__name__}: {_one_line(e)}): "
                            "check the connection, or pass a local folder") from None


def push_folder(folder: Path, repo_id: str, api=None) -> str:
    """Upload a finished output folder to `repo_id` (a model repo, created if missing) in one commit; returns
    the commit's URL. `api`: an HfApi (or a stand-in with the same two methods)."""
    if api is None:
        if hub_offline():
            raise CastloraError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload, or upload "
                                f"{folder} later with `hf upload {repo_id} {folder}`")
        from huggingface_hub import HfApi
        api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="castlora port")
    except Exception as e:  # the hub's errors (auth, network, permissions): the port itself is written
        raise CastloraError(f"--push-to-hub {repo_id}: the upload failed ({_one_line(e)}); the port is complete in "
                            f"{folder}: upload it later with `hf upload {repo_id} {folder}`") from None
    return str(getattr(info, "commit_url", info))
