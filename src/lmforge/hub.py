"""Model folders by Hugging Face Hub id: ``org/name`` or ``org/name@revision`` wherever a folder is taken.

A spec that names an existing local path is that path. Otherwise a spec shaped like a Hub id is resolved
through ``huggingface_hub`` into its cache (``HF_HOME`` / ``HF_HUB_CACHE``): only the files lmforge reads
(config, safetensors weights, tokenizer and generation files, never pickled ``.bin`` weights) are fetched,
with a progress bar. ``HF_HUB_OFFLINE=1`` is honoured: then only the cache is looked at, and a model not in
it is a clear error rather than a hang.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# org/name with an optional @revision (a branch, tag or commit); names as the Hub allows them
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "adapter_config.json",
]


class HubError(FileNotFoundError):
    """A model spec that is neither a local folder nor a Hub id that can be had."""


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``("org/name", revision or None)`` when ``spec`` looks like a Hub id, else None."""
    match = HUB_ID.match(spec)
    if match is None or spec.startswith((".", "/")) or "//" in spec:
        return None
    return match["repo"], match["revision"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_dir(spec: str | os.PathLike[str]) -> Path:
    """The local folder of ``spec``: the path itself when it exists, else the Hub id's cached snapshot
    (downloaded first unless offline)."""
    path = Path(spec)
    if path.exists():
        return path
    hub_id = parse_hub_id(str(spec))
    if hub_id is None:
        raise HubError(
            f"{spec}: model folder not found (no such path, nor a Hugging Face Hub id org/name[@revision])"
        )
    repo, revision = hub_id
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as err:
        raise HubError(
            f"{spec}: loading models by Hub id needs huggingface_hub (pip install huggingface_hub)"
        ) from err
    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=MODEL_FILES, local_files_only=offline()
        )
    except LocalEntryNotFoundError as err:
        where = "HF_HUB_OFFLINE is set and it is" if offline() else "it is"
        raise HubError(
            f"{spec}: not in the Hugging Face cache, and {where} not reachable to download"
        ) from err
    except RepositoryNotFoundError as err:
        raise HubError(f"{spec}: no such model on the Hub (or it is private: set HF_TOKEN)") from err
    except HfHubHTTPError as err:
        raise HubError(f"{spec}: the Hub refused the download: {err}") from err
    return Path(folder)
