"""Hugging Face hub ids (`org/name`) to a local folder, downloading only what a conversion reads.

huggingface-hub does the work: the token comes from the environment (HF_TOKEN) or its login, files already in the
local cache are reused, and with HF_HUB_OFFLINE set nothing is fetched (read when called, not when imported).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SIDE_FILES = [
    "config.json",
    "params.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
# Tried in order: the first pattern group that yields weights wins, so a repo with both formats is fetched once.
WEIGHT_PATTERNS = (
    ["*.safetensors", "model.safetensors.index.json"],
    ["pytorch_model*.bin", "pytorch_model.bin.index.json"],
    ["consolidated.*.pth", "checklist.chk"],
)


def resolve(src: str | os.PathLike) -> Path:
    """A local path as is; otherwise an `org/name` hub id downloaded (or found in the cache)."""
    path = Path(src)
    if path.exists():
        return path
    if not HUB_ID.fullmatch(str(src)):
        raise Llama2MLXError(f"{src}: no such file or folder (and not a hub repo id like org/name)")
    return download(str(src))


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    for weights in WEIGHT_PATTERNS:
        try:
            folder = Path(
                snapshot_download(
                    repo_id,
                    allow_patterns=SIDE_FILES + weights,
                    local_files_only=offline,
                    cache_dir=cache_dir,
                )
            )
        except GatedRepoError:
            raise Llama2MLXError(
                f"{repo_id}: gated repository; accept its license on huggingface.co and set HF_TOKEN"
            ) from None
        except RepositoryNotFoundError:
            raise Llama2MLXError(
                f"{repo_id}: no such repository on the hub (or it is private: set HF_TOKEN)"
            ) from None
        except LocalEntryNotFoundError:
            where = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
            raise Llama2MLXError(
                f"{repo_id}: no such local folder, not in the local Hugging Face cache, and {where}"
            ) from None
        except HfHubHTTPError as error:
            raise Llama2MLXError(f"{repo_id}: download failed ({str(error).splitlines()[0]})") from None
        if any(folder.glob(weights[0])):
            return folder
    raise Llama2MLXError(
        f"{repo_id}: the repository has no *.safetensors, pytorch_model*.bin or consolidated.*.pth"
    )
