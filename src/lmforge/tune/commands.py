"""``lmforge sft|rm|dpo --config recipe.yaml [key=value ...]``: fine-tuning stages in the one trainer (SFT full
or with an adapter, ``peft.method=lora``); ``lmforge peft merge ADAPTER_DIR --out DIR``: fold an adapter into its
base."""

from __future__ import annotations

import argparse
import json


def _sft(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.finetune import SFTConfig, run_sft

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(SFTConfig, args)
    result, stats = run_sft(cfg)
    summary = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "loss": result.metrics.get("loss"),
        "val_loss": result.val_loss,
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "data": stats.to_dict(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _peft_merge(args: argparse.Namespace) -> int:
    import sys

    from lmforge.model.hf import ModelLoadError
    from lmforge.tune.peft import AdapterConfigError, merge_adapter_folder

    try:
        out = merge_adapter_folder(args.adapter_dir, args.out, base=args.base, quantize=args.quantize)
    except (AdapterConfigError, ModelLoadError) as err:
        print(f"lmforge peft merge: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.reward import RewardConfig, run_rm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_rm(config_from_args(RewardConfig, args)), indent=2))
    return 0


def _dpo(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.dpo import DPOConfig, run_dpo

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_dpo(config_from_args(DPOConfig, args)), indent=2))
    return 0


def _embed_train(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.embed import EmbedConfig, run_embed

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_embed(config_from_args(EmbedConfig, args)), indent=2))
    return 0


def _embed_encode(args: argparse.Namespace) -> int:
    from lmforge.data.io import Document, make_reader, write_records
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tune.embed import encode, load_embedding_model

    model, tokenizer = load_embedding_model(args.model), load_tokenizer(args.model)
    reader = make_reader(args.input, text_key=args.text_key)
    docs = [item for item in reader.read(reader.files()) if isinstance(item, Document)]
    vectors = encode(model, tokenizer, [d.text for d in docs], args.max_len, args.batch_size)
    written = write_records(
        args.out,
        (
            {"id": d.id, "text": d.text, "meta": {**d.meta, args.meta_key: v}}
            for d, v in zip(docs, vectors.tolist(), strict=True)
        ),
    )
    print(json.dumps({"documents": written, "dim": int(vectors.shape[1]), "out": args.out}))
    return 0


def _embed_eval(args: argparse.Namespace) -> int:
    from lmforge.data.io import read_records
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tune.embed import encode, load_embedding_model, mrr_at_k

    model, tokenizer = load_embedding_model(args.model), load_tokenizer(args.model)
    pairs = [
        (r[args.query_key], r[args.doc_key])
        for r in read_records(args.pairs)
        if isinstance(r, dict)
        and isinstance(r.get(args.query_key), str)
        and isinstance(r.get(args.doc_key), str)
    ]
    queries = encode(model, tokenizer, [q for q, _ in pairs], args.max_len)
    documents = encode(model, tokenizer, [d for _, d in pairs], args.max_len)
    print(json.dumps({"pairs": len(pairs), f"mrr@{args.k}": mrr_at_k(queries, documents, args.k)}))
    return 0


def _register_embed(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subparsers.add_parser(
        "embed",
        help="contrastive text/code embeddings: train (InfoNCE, in-batch negatives), encode, eval (MRR@10)",
    )
    commands = parser.add_subparsers(dest="embed_command", metavar="SUBCOMMAND")
    train = commands.add_parser(
        "train",
        help="train an embedding model on text pairs with the trainer of 'lmforge train'",
        description="InfoNCE with in-batch negatives on JSONL pairs ({query_key, doc_key}), mean or last-token "
        "pooling, learned or fixed temperature. The recipe is a TrainConfig plus an 'embed' section (paths, "
        "val_paths, query_key, doc_key, pooling, temperature, learn_temperature, symmetric).",
    )
    add_config_arguments(train, example="embed.pooling=last embed.temperature=0.05")
    train.set_defaults(handler=_embed_train)
    enc = commands.add_parser("encode", help="embed the documents of a JSONL/Parquet file")
    enc.add_argument("model", help="embedding model folder (lmforge embed train's RUN/model)")
    enc.add_argument("input", help="documents (JSONL/Parquet)")
    enc.add_argument(
        "--out", required=True, help="the documents again, with the vector in meta (what 'semdedup' reads)"
    )
    enc.add_argument("--meta-key", default="embedding")
    enc.add_argument("--text-key", default="text")
    enc.add_argument("--max-len", type=int, default=512)
    enc.add_argument("--batch-size", type=int, default=32)
    enc.set_defaults(handler=_embed_encode)
    ev = commands.add_parser(
        "eval", help="retrieval MRR@k of each query against all documents of a pair file"
    )
    ev.add_argument("model")
    ev.add_argument("pairs", help="JSONL pairs")
    ev.add_argument("--query-key", default="query")
    ev.add_argument("--doc-key", default="document")
    ev.add_argument("--k", type=int, default=10)
    ev.add_argument("--max-len", type=int, default=512)
    ev.set_defaults(handler=_embed_eval)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on chat JSONL (loss on assistant tokens; packed; HF-layout export)",
        description="Fine-tune a model folder (lmforge or Hugging Face) on JSONL chats ('messages') or "
        "prompt/completion pairs, with the trainer of 'lmforge train'. The recipe is a TrainConfig plus an "
        "'sft' section (paths, val_paths, pack, group_by_length).",
    )
    add_config_arguments(parser, example="optim.lr=2e-5 sft.pack=false")
    parser.set_defaults(handler=_sft)

    peft = subparsers.add_parser(
        "peft", help="parameter-efficient fine-tuning adapters (peft library format)"
    )
    peft_commands = peft.add_subparsers(dest="peft_command", metavar="SUBCOMMAND")
    merge = peft_commands.add_parser(
        "merge",
        help="fold an adapter into its base model: a plain Hugging Face model folder",
        description="Load the base model (--base, else the adapter's base_model_name_or_path), apply the "
        "adapter (LoRA/DoRA/IA3, adapter_config.json + adapter_model.safetensors), merge it into the weights "
        "and write a Hugging Face model folder with the tokenizer.",
    )
    merge.add_argument("adapter_dir", help="adapter folder (written by lmforge sft or the peft library)")
    merge.add_argument("--out", required=True, help="folder for the merged model")
    merge.add_argument("--base", help="base model folder (default: base_model_name_or_path of the adapter)")
    merge.add_argument(
        "--quantize",
        choices=["nf4"],
        default="",
        help="the adapter was trained on NF4 base weights (QLoRA, peft.quantize=nf4): merge into those, dequantized",
    )
    merge.set_defaults(handler=_peft_merge)
    peft.set_defaults(handler=lambda args: peft.print_help() or 2)

    parser = subparsers.add_parser(
        "rm",
        help="train a reward model on preference pairs or rankings (Bradley-Terry; HF sequence-classification export)",
        description="Train a scalar-head reward model from a model folder on JSONL/Parquet preference pairs "
        "({'prompt', 'chosen', 'rejected'}) or rankings ({'prompt', 'responses', 'ranking'}), with the trainer "
        "of 'lmforge train'. The recipe is a TrainConfig plus an 'rm' section (paths, val_paths, "
        "center_rewards_coefficient).",
    )
    add_config_arguments(parser, example="rm.center_rewards_coefficient=0.01 max_steps=200")
    parser.set_defaults(handler=_rm)

    parser = subparsers.add_parser(
        "dpo",
        help="align a model on preference pairs with DPO (sigmoid/cDPO, robust, hinge, IPO)",
        description="Direct Preference Optimization of a model folder on JSONL/Parquet preference pairs or "
        "rankings, with the trainer of 'lmforge train'; the starting model is the reference (its log-probs "
        "computed once). The recipe is a TrainConfig plus a 'dpo' section (paths, val_paths, beta, loss_type, "
        "label_smoothing).",
    )
    add_config_arguments(parser, example="dpo.beta=0.1 dpo.loss_type=ipo")
    parser.set_defaults(handler=_dpo)

    _register_embed(subparsers)
