"""Loss recovery on Korean after a vocabulary extension: extended tokenizer + resized model vs the base tokenizer.

    PYTHONPATH=src nice -n 5 .venv/bin/python benchmarks/vocab_continual.py --corpus /tmp/lmforge-corpora

1. A small Llama-shaped model is trained on English (Python docs and English man pages, as in
   ``benchmarks/vocab_extension.py``) with a byte-level BPE trained on the same text.
2. The tokenizer is extended with Korean pieces learned on half of the Korean Debian FAQ pages
   (``extend_tokenizer``) and the model grown to it (``resize_token_embeddings``, subtoken init).
3. The extended model is continued on the Korean training pages in two stages: (a) LoRA (small rank) with
   ``trainable_token_indices`` set to the new ids, so only the new embedding/head rows and the adapters train,
   then merged; (b) all weights. The control keeps the base tokenizer and trains all weights for the same
   number of steps (a+b) on the same pages; each step sees the same number of tokens, so the extended model
   sees more characters per step.
4. Held-out loss is reported in bits per character (sum of token NLL / ln 2 / characters), which is comparable
   across tokenizers, on the other Korean pages and on held-out English (forgetting).

Everything runs through lmforge's trainer on one thread; the run folders go under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.io import read_documents
from lmforge.model.config import ModelConfig
from lmforge.model.flops import count_parameters
from lmforge.model.resize import resize_token_embeddings
from lmforge.model.transformer import Transformer
from lmforge.shards.loader import DataConfig
from lmforge.shards.tokenize import TokenizeConfig, tokenize_to_shards
from lmforge.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from lmforge.tokenizer.extend import extend_tokenizer, tokens_per_char
from lmforge.train.config import (
    BatchConfig,
    CheckpointConfig,
    LogConfig,
    OptimConfig,
    ScheduleConfig,
    StabilityConfig,
    TrainConfig,
)
from lmforge.train.trainer import train
from lmforge.tune.peft import PeftConfig, apply_peft, merge_adapter


def texts(path: Path, fmt: str = "auto", limit: int | None = None) -> list[str]:
    out = [d.text for d in read_documents(str(path), fmt)]
    return out[:limit] if limit else out


def capped(docs: list[str], chars: int) -> list[str]:
    """The first documents of ``docs`` up to about ``chars`` characters (the last one cut)."""
    out, total = [], 0
    for doc in docs:
        if total >= chars:
            break
        out.append(doc[: chars - total])
        total += len(out[-1])
    return out


def shards(docs: list[str], tok_dir: Path, folder: Path) -> Path:
    """``docs`` tokenized with the tokenizer in ``tok_dir`` to a shards folder."""
    source = folder.with_suffix(".jsonl")
    with source.open("w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    tokenize_to_shards(
        TokenizeConfig(inputs=[str(source)], tokenizer=str(tok_dir), output=str(folder)), progress=False
    )
    return folder


@torch.no_grad()
def bits_per_char(model: Transformer, tok: Tokenizer, docs: list[str], seq_len: int) -> float:
    """Held-out bits per character: every token of every document predicted (the first from the EOS token,
    the rest from up to ``seq_len`` tokens of context in non-overlapping windows)."""
    model.eval()
    eos = tok.token_to_id(tok.eos_token)
    nats, chars = 0.0, 0
    for text in docs:
        ids = [eos, *tok.encode(text)]
        for start in range(0, len(ids) - 1, seq_len):
            x = torch.tensor([ids[start : start + seq_len]])
            y = torch.tensor([ids[start + 1 : start + seq_len + 1]])
            logits = model(x[:, : y.shape[1]]).logits
            nats += F.cross_entropy(logits[0].float(), y[0], reduction="sum").item()
        chars += len(text)
    model.train()
    return nats / math.log(2) / chars


def config(args: argparse.Namespace, run_dir: Path, model: ModelConfig, data: Path, tok_dir: Path,
           steps: int, lr: float) -> TrainConfig:  # fmt: skip
    return TrainConfig(
        run_dir=str(run_dir),
        seed=args.seed,
        model=model,
        data=DataConfig(shards=[str(data)], seq_len=args.seq_len, seed=args.seed),
        tokenizer=str(tok_dir),
        max_steps=steps,
        threads=args.threads,
        optim=OptimConfig(lr=lr),
        schedule=ScheduleConfig(name="cosine", warmup_fraction=0.05),
        batch=BatchConfig(micro_batch_size=args.batch),
        checkpoint=CheckpointConfig(every_steps=0, export=False),
        stability=StabilityConfig(spike_detection=False),
        log=LogConfig(every_steps=max(1, steps // 4), progress=False, plots=False),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/lmforge-corpora"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/vocab-continual"))
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--add", type=int, default=1000)
    parser.add_argument("--d-model", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--rows-steps", type=int, default=100, help="stage (a): new rows + LoRA")
    parser.add_argument("--full-steps", type=int, default=100, help="stage (b): all weights")
    parser.add_argument("--lora-r", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="base training and stage (a)")
    parser.add_argument("--continue-lr", type=float, default=1e-3, help="stage (b) and the control")
    parser.add_argument("--english-eval-chars", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    english = texts(args.corpus / "pydocs.jsonl.gz", limit=300) + texts(
        args.corpus / "man-en.jsonl.gz", limit=300
    )
    korean = texts(args.corpus / "web" / "debian-faq-en-ko" / "ko", "html")
    train_ko, held_ko = korean[::2], korean[1::2]
    held_en = capped(english[1::10], args.english_eval_chars)
    train_en = [d for i, d in enumerate(english) if i % 10 != 1]
    base_tok = train_tokenizer(english, TokenizerTrainConfig(vocab_size=args.vocab))
    ext_tok, added = extend_tokenizer(base_tok, train_ko, args.add)
    base_dir, ext_dir = base_tok.save(args.work / "tok-base"), ext_tok.save(args.work / "tok-ext")
    en_shards = shards(train_en, base_dir, args.work / "shards-en")
    ko_base_shards = shards(train_ko, base_dir, args.work / "shards-ko-base")
    ko_ext_shards = shards(train_ko, ext_dir, args.work / "shards-ko-ext")
    new_ids = list(range(base_tok.vocab_size, ext_tok.vocab_size))
    print(
        f"English: {len(train_en)} training documents, {sum(map(len, held_en)):,} held-out characters; Korean: "
        f"{len(train_ko)} training pages ({sum(map(len, train_ko)):,} chars), {len(held_ko)} held out "
        f"({sum(map(len, held_ko)):,} chars); tokenizer {base_tok.vocab_size} + {len(added)} Korean pieces"
    )
    print(
        f"Korean tokens/char (held out): base {tokens_per_char(base_tok, held_ko):.3f}, "
        f"extended {tokens_per_char(ext_tok, held_ko):.3f}"
    )

    model_cfg = ModelConfig(
        vocab_size=base_tok.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        d_ff=16 * -(-8 * args.d_model // (3 * 16)),
        max_seq_len=args.seq_len,
    )
    count = count_parameters(model_cfg)
    print(f"model: {count.total:,} parameters ({count.total - count.embedding:,} non-embedding)")
    seq, rows = args.seq_len, []

    def measure(name: str, model: Transformer, tok: Tokenizer, tokens: int) -> None:
        ko = bits_per_char(model, tok, held_ko, seq)
        en = bits_per_char(model, tok, held_en, seq)
        rows.append((name, tok.vocab_size, tokens, ko, en))
        print(
            f"  {name}: Korean {ko:.3f} bits/char, English {en:.3f} bits/char ({time.perf_counter() - t0:.0f} s)"
        )

    torch.manual_seed(args.seed)
    base = Transformer(model_cfg)
    t = time.perf_counter()
    train(
        config(args, args.work / "base", model_cfg, en_shards, base_dir, args.base_steps, args.lr), model=base
    )
    print(f"base: {args.base_steps} steps in {time.perf_counter() - t:.0f} s")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    measure("base (English only)", base, base_tok, 0)

    # extended: resize, (a) LoRA + new rows, merge, (b) all weights
    step_tokens = args.batch * seq
    ext = resize_token_embeddings(base, base_tok, ext_tok, init="subtoken")
    measure("extended, resized (subtoken init)", ext, ext_tok, 0)
    peft = PeftConfig(
        method="lora", r=args.lora_r, lora_alpha=2.0 * args.lora_r, trainable_token_indices=new_ids
    )
    apply_peft(ext, peft)
    trainable = sum(p.numel() for p in ext.parameters() if p.requires_grad)
    t = time.perf_counter()
    train(
        config(args, args.work / "ext-a", ext.cfg, ko_ext_shards, ext_dir, args.rows_steps, args.lr),
        model=ext,
    )
    merge_adapter(ext)
    print(
        f"stage (a): {trainable:,} trainable parameters, {args.rows_steps} steps in {time.perf_counter() - t:.0f} s"
    )
    measure("extended, (a) LoRA + new rows", ext, ext_tok, args.rows_steps * step_tokens)
    train(
        config(args, args.work / "ext-b", ext.cfg, ko_ext_shards, ext_dir, args.full_steps, args.continue_lr),
        model=ext,
    )
    measure(
        "extended, (a) + (b) all weights", ext, ext_tok, (args.rows_steps + args.full_steps) * step_tokens
    )

    # control: base tokenizer, all weights, same steps and tokens per step
    control = Transformer(model_cfg)
    control.load_state_dict(base_state)
    steps = args.rows_steps + args.full_steps
    train(
        config(args, args.work / "control", model_cfg, ko_base_shards, base_dir, steps, args.continue_lr),
        model=control,
    )
    measure("control (base tokenizer), all weights", control, base_tok, steps * step_tokens)

    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    print("| model | vocabulary | Korean tokens trained | Korean bits/char (held out) | English bits/char |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, vocab, tokens, ko, en in rows:
        print(f"| {name} | {vocab} | {tokens:,} | {ko:.3f} | {en:.3f} |")


if __name__ == "__main__":
    main()
