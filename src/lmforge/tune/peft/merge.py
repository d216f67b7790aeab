"""``lmforge peft merge``: an adapter folder + its base model -> a plain Hugging Face model folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.tune.peft.adapter import load_adapter, merge_adapter
from lmforge.tune.peft.config import ADAPTER_CONFIG_FILE, AdapterConfigError, read_adapter_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _saved_dtype(folder: Path) -> torch.dtype:
    """The dtype the base folder's config.json declares (fp32 if none): the merged model keeps it."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return _DTYPES.get(config.get("torch_dtype") or config.get("dtype"), torch.float32)


def merge_adapter_folder(
    adapter_dir: str | Path, out: str | Path, base: str | Path | None = None, quantize: str = ""
) -> Path:
    """Load the base (``base``, else the adapter's ``base_model_name_or_path``), apply the adapter, fold it
    into the weights in fp32 and write the result, with the tokenizer of the adapter or base folder, to ``out``.

    quantize="nf4": the adapter was trained on NF4 base weights (QLoRA), so it is merged into the dequantized
    NF4 weights it was trained with (fp32 compute dtype)."""
    adapter_dir = Path(adapter_dir)
    cfg, recorded_base = read_adapter_config(adapter_dir)
    cfg.quantize = quantize
    base_dir = Path(base or recorded_base or "")
    if base is not None and not (base_dir / "config.json").is_file():
        raise AdapterConfigError(f"--base {base}: not a model folder (no config.json)")
    if not (base_dir / "config.json").is_file():
        raise AdapterConfigError(
            f"{adapter_dir / ADAPTER_CONFIG_FILE}: base_model_name_or_path {recorded_base!r} is not a model "
            "folder here; pass the base model folder with --base"
        )
    model = load_adapter(load_pretrained(base_dir), adapter_dir, cfg)
    out = Path(out)
    save_pretrained(merge_adapter(model), out, dtype=_saved_dtype(base_dir))
    for folder in (adapter_dir, base_dir):
        if (folder / "tokenizer.json").is_file():
            from lmforge.tokenizer import load_tokenizer

            load_tokenizer(folder).save(out)
            break
    return out
