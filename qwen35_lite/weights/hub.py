"""Resolve --model: an existing local directory (never touches the network) or a Hugging Face hub id."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError

# Only what the runner reads: weights, index, configs, tokenizer, chat template, image preprocessor.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.txt"]
# `info` plans from config.json alone: a 397B checkpoint is not downloaded to print its memory plan.
CONFIG_PATTERNS = ["*.json"]


def is_offline(flag: bool) -> bool:
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep in model.replace("/", "", 1)


def resolve_model(model: str, offline: bool = False, configs_only: bool = False) -> Path:
    """Return the local directory holding the checkpoint, downloading it (resumably) if needed.

    configs_only: from the hub, fetch only the JSON files (config, index, generation and preprocessor configs).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{model} is a file, not a checkpoint directory", "pass the directory that holds config.json"
            )
        return path
    if _looks_like_path(model):
        raise ModelNotFoundError(
            f"no such directory: {model}", "check the path, or pass a hub id like Qwen/Qwen3.5-0.8B"
        )
    return _from_hub(model, is_offline(offline), CONFIG_PATTERNS if configs_only else ALLOW_PATTERNS)


def _from_hub(repo_id: str, offline: bool, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except HFValidationError as e:
        raise ModelNotFoundError(
            f"{repo_id} is neither a directory nor a valid hub id",
            "pass a local directory or an id like Qwen/Qwen3.5-0.8B",
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id} was not found on the Hugging Face hub",
            "check the spelling, e.g. Qwen/Qwen3.5-397B-A17B",
        ) from e
    except LocalEntryNotFoundError as e:
        if offline:
            raise ModelNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache and offline mode is on",
                "run once without --offline / HF_HUB_OFFLINE=1, or pass a local directory",
            ) from e
        raise ModelNotFoundError(
            f"could not download {repo_id}: the hub is unreachable",
            "check the network, or pass a local directory",
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(
            f"could not download {repo_id}: {e.__class__.__name__}",
            "check the network and try again; downloads resume",
        ) from e
