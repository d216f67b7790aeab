"""``lmforge demo``: raw corpus -> cleaned data -> tokenizer -> shards -> pretraining -> SFT -> eval -> align
(reward model, DPO, GRPO) -> review -> serve.

Every stage is a call into the layer that owns it (``lmforge.data``, ``lmforge.tokenizer``,
``lmforge.train``, ``lmforge.tune.sft``, ``lmforge.eval``, ``lmforge.serve``); this module only wires their
inputs and outputs together inside one run folder and writes the report card::

    RUN/corpus/        stdlib documents (JSONL) and HTML pages, or nothing when the user brings a corpus
    RUN/instruct/      generated instruction set: train.jsonl, heldout.jsonl, heldout_mc.jsonl
    RUN/data/          pipeline run (stats, exclusions), clean/ output, train.jsonl and heldout.jsonl
    RUN/tokenizer/     tokenizer.json + tokenizer_config.json (chat template included)
    RUN/shards/        token shards of data/train.jsonl
    RUN/heldout_shards/  token shards of data/heldout.jsonl (validation loss during pretraining)
    RUN/pretrain/      trainer run folder; the base model in pretrain/model
    RUN/sft/           trainer run folder; the chat model in sft/model
    RUN/eval/base, RUN/eval/sft   results.json, results.md, samples/
    RUN/align/         preference rankings, rm/, dpo/, grpo/ run folders (models in */model), eval/
    RUN/stages/        completion markers (a rerun skips finished stages)
    RUN/report.md, RUN/report.html
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import shlex
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

from rich.console import Console

from lmforge.config import ConfigError, save_config, to_dict
from lmforge.data.io import read_records, write_jsonl, write_records
from lmforge.demo.config import DemoConfig, RunLayout
from lmforge.demo.report import StageCard, Table, format_seconds, plot_comparison, write_report
from lmforge.demo.stages import StageRunner

# Settings that do not change what the stages produce (a rerun may change them freely).
RUNTIME_ONLY = frozenset({"serve", "host", "port", "threads"})
MODEL_ID = "lmforge-demo"  # the model name clients send to the demo's server
STAGES = {
    "corpus": "Corpus",
    "data": "Data pipeline",
    "tokenizer": "Tokenizer",
    "shards": "Token shards",
    "pretrain": "Pretraining",
    "sft": "Supervised fine-tuning",
    "eval": "Evaluation: base vs SFT",
    "align": "Alignment: reward model, DPO, GRPO",
    "review": "Review: red team and LLM-as-judge",
}

# Stages whose folder (RUN/<stage>) holds trainer runs, which resume from their newest checkpoint when run
# again.
TRAINING_STAGES = ("pretrain", "sft", "align")

# Pipeline steps for the demo corpus. Code is part of the corpus, so the repetition filter is loosened
# (Gopher's prose thresholds would drop most source files); it still removes generated tables.
DATA_STEPS: list[dict[str, Any]] = [
    {"step": "html_extract"},
    {"step": "pii"},
    {"step": "exact_dedup"},
    {"step": "minhash_dedup"},
    {
        "step": "gopher_repetition",
        "dup_line_frac": 0.5,
        "dup_line_char_frac": 0.4,
        "top_ngrams": {2: 0.3, 3: 0.25, 4: 0.2},
        "dup_ngrams": {5: 0.5, 6: 0.45, 7: 0.4, 8: 0.35, 9: 0.3, 10: 0.3},
    },
]


class Demo(RunLayout):
    def __init__(self, cfg: DemoConfig, console: Console | None = None) -> None:
        super().__init__(cfg)
        self.console = console or Console()
        self.stages = StageRunner(self.run_dir, list(STAGES), self.console)

    # -- stages ---------------------------------------------------------------------------------------------
    def corpus(self) -> StageCard:
        from lmforge.demo.corpus import stdlib_documents
        from lmforge.demo.tasks import TASKS, generate_tasks, multiple_choice_records

        cfg = self.cfg
        numbers: dict[str, Any] = {}
        if cfg.corpus.paths:
            numbers["source"] = "your corpus: " + ", ".join(cfg.corpus.paths)
        else:
            corpus_dir = self.path("corpus")
            html_dir = corpus_dir / "html"
            html_dir.mkdir(parents=True, exist_ok=True)
            counts = {"prose": 0, "code": 0, "html": 0}
            size = 0
            with (corpus_dir / "stdlib.jsonl").open("w", encoding="utf-8") as f:
                for doc in stdlib_documents(cfg.corpus.max_bytes, cfg.corpus.html_every):
                    kind = doc["meta"]["kind"]
                    counts[kind] += 1
                    size += len(doc["text"].encode("utf-8"))
                    if kind == "html":
                        (html_dir / (doc["id"].replace("/", "_") + ".html")).write_text(
                            doc["text"], encoding="utf-8"
                        )
                    else:
                        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            numbers["source"] = "Python standard library (docstrings, source code, generated HTML pages)"
            numbers.update({f"{kind} documents": n for kind, n in counts.items()})
            numbers["megabytes"] = round(size / 1e6, 2)
        train, heldout = generate_tasks(
            cfg.instruct.train_counts, cfg.instruct.heldout_per_task, seed=cfg.instruct.seed
        )
        write_records(self.path("instruct", "train.jsonl"), train)
        write_records(self.path("instruct", "heldout.jsonl"), heldout)
        write_records(
            self.path("instruct", "heldout_mc.jsonl"),
            multiple_choice_records(heldout, seed=cfg.instruct.seed),
        )
        numbers["instruction tasks"] = ", ".join(TASKS)
        numbers["instruction examples (train / held-out)"] = f"{len(train)} / {len(heldout)}"
        return StageCard("corpus", STAGES["corpus"], numbers=numbers)

    def data(self) -> StageCard:
        from lmforge.data.recipe import run_recipe

        cfg = self.cfg
        if cfg.corpus.paths:
            inputs = [{"paths": list(cfg.corpus.paths), "source": "user"}]
        else:
            inputs = [
                {"paths": [str(self.path("corpus", "stdlib.jsonl"))], "source": "stdlib"},
                {"paths": [str(self.path("corpus", "html"))], "format": "html", "source": "stdlib-html"},
            ]
        recipe = {
            "inputs": inputs,
            "steps": DATA_STEPS,
            "output": {"path": str(self.path("data", "clean")), "format": "jsonl.gz"},
            "run_dir": str(self.path("data", "run")),
        }
        report = run_recipe(data=recipe, progress=True)
        stats = report.to_dict()
        train, heldout = self._split_heldout()
        numbers = {
            "documents in": report.docs_in,
            "kept": report.kept,
            "removed": report.removed,
            "rejected (unreadable)": report.rejected,
            "input megabytes": round(report.input_bytes / 1e6, 2),
            "pretraining documents": train,
            "held-out documents (perplexity)": heldout,
        }
        rows = []
        for step in stats["steps"]:
            removed = ", ".join(f"{reason}: {n}" for reason, n in step["removed"].items()) or "-"
            counters = ", ".join(f"{k}: {v}" for k, v in step["counters"].items()) or "-"
            rows.append([step["name"], step["in"], step["kept"], removed, counters])
        table = Table("Steps", ["step", "in", "kept", "removed by reason", "counters"], rows)
        return StageCard("data", STAGES["data"], numbers=numbers, tables=[table])

    def _split_heldout(self) -> tuple[int, int]:
        """Hold out a fixed share of cleaned documents (chosen by a hash of the id) for perplexity."""
        from lmforge.data.document import Document
        from lmforge.data.io import make_reader

        reader = make_reader(str(self.path("data", "clean")))
        docs = [item for group in reader.tasks() for item in reader.read(group) if isinstance(item, Document)]
        docs.sort(key=lambda d: (zlib.crc32(d.id.encode("utf-8")), d.id))
        n_heldout = min(self.cfg.corpus.heldout_documents, len(docs) // 10)
        heldout, train = docs[:n_heldout], docs[n_heldout:]
        write_jsonl(self.path("data", "train.jsonl"), train)
        write_jsonl(self.path("data", "heldout.jsonl"), heldout)
        return len(train), len(heldout)

    def _documents(self, name: str) -> list[str]:
        from lmforge.data.io import read_documents

        return [doc.text for doc in read_documents(self.path("data", name))]

    def tokenizer(self) -> StageCard:
        from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

        texts = self._documents("train.jsonl")
        # No BOS: shards separate documents with EOS only, so inference must not start with an unseen token.
        tok_cfg = TokenizerTrainConfig(kind="byte_bpe", vocab_size=self.cfg.vocab_size, add_bos_token=False)
        tokenizer = train_tokenizer(texts, tok_cfg, total=len(texts), progress=True)
        tokenizer.save(self.path("tokenizer"))
        heldout = self._documents("heldout.jsonl")
        n_bytes = sum(len(t.encode("utf-8")) for t in heldout)
        n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(heldout))
        example = "What is 37 + 48?"
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(example)]
        numbers = {
            "kind": tok_cfg.kind,
            "vocabulary": tokenizer.vocab_size,
            "bytes per token (held-out documents)": round(n_bytes / max(n_tokens, 1), 3),
            f"tokens of {example!r}": json.dumps(pieces, ensure_ascii=False),
        }
        return StageCard("tokenizer", STAGES["tokenizer"], numbers=numbers)

    def shards(self) -> StageCard:
        from lmforge.shards.tokenize import TokenizeConfig, tokenize_to_shards

        manifests = {
            documents: tokenize_to_shards(
                TokenizeConfig(
                    inputs=[str(self.path("data", f"{documents}.jsonl"))],
                    tokenizer=str(self.path("tokenizer")),
                    output=str(self.path(folder)),
                )
            )
            for documents, folder in (("train", "shards"), ("heldout", "heldout_shards"))
        }
        manifest = manifests["train"]
        totals = manifest["totals"]
        numbers = {
            "tokens (EOS separators included)": totals["tokens"],
            "documents": totals["docs"],
            "held-out tokens (validation during pretraining)": manifests["heldout"]["totals"]["tokens"],
            "tokens per source": ", ".join(f"{k}: {v}" for k, v in manifest["sources"].items()),
            "token dtype": manifest["dtype"],
        }
        return StageCard("shards", STAGES["shards"], numbers=numbers)

    def pretrain(self) -> StageCard:
        from lmforge.demo.training import pretrain

        return pretrain(self)

    def sft(self) -> StageCard:
        from lmforge.demo.training import finetune

        return finetune(self)

    def eval(self) -> StageCard:
        from lmforge.demo.tasks import TASKS, exam_tasks
        from lmforge.eval.runner import EvalConfig, PerplexityConfig, TaskConfig, evaluate, headline_metric

        heldout = str(self.path("instruct", "heldout.jsonl"))
        tasks = exam_tasks(heldout, TASKS)
        tasks.append(
            TaskConfig(name="addition-3shot", path=heldout, where={"task": "addition"}, num_fewshot=3)
        )
        tasks.append(
            TaskConfig(
                name="read_answer-mc",
                path=str(self.path("instruct", "heldout_mc.jsonl")),
                chat=True,
            )
        )
        results = {}
        for which, folder in (("base", self.path("pretrain", "model")), ("sft", self.path("sft", "model"))):
            cfg = EvalConfig(
                model=str(folder),
                run_dir=str(self.path("eval", which)),
                tasks=tasks,
                perplexity=PerplexityConfig(documents=[str(self.path("data", "heldout.jsonl"))]),
                threads=self.cfg.threads,
            )
            self.console.print(f"evaluating the {which} model")
            self.path("plots").mkdir(parents=True, exist_ok=True)
            results[which] = evaluate(cfg)
        task_rows = []
        for name in results["base"]["tasks"]:
            metric, base = headline_metric(results["base"]["tasks"][name])
            _, sft = headline_metric(results["sft"]["tasks"][name])
            task_rows.append([name, metric, round(base, 3), round(sft, 3)])
        text_rows = [
            [
                f"held-out documents: {key}",
                key,
                results["base"]["perplexity"][key],
                results["sft"]["perplexity"][key],
            ]
            for key in ("perplexity", "bits_per_byte")
        ]
        # Every task's bar is its headline metric (exact match, or acc_norm for multiple choice), named
        # under the task; both are fractions of the held-out examples.
        plot_comparison(
            {f"{name}\n({metric})": {"base": base, "SFT": sft} for name, metric, base, sft in task_rows},
            self.path("plots", "eval_base_vs_sft.png"),
            "held-out tasks: base vs SFT",
            ylabel="score (exact_match, or acc_norm: 0 to 1)",
        )
        tables = [
            Table("Held-out evaluation", ["task", "metric", "base", "SFT"], task_rows + text_rows),
            self._sample_replies(),
        ]
        n = results["sft"]["tasks"]["addition"]["n"]
        note = f"{n} held-out examples per task; operand pairs of held-out additions never occur in SFT data."
        if results["sft"]["perplexity"]["perplexity"] > results["base"]["perplexity"]["perplexity"]:
            note += (
                " Perplexity on held-out corpus documents rises after SFT: the fine-tuning data are short chats"
                " only, so the model forgets part of the corpus distribution (catastrophic forgetting)."
            )
        return StageCard(
            "eval", STAGES["eval"], tables=tables, images=["plots/eval_base_vs_sft.png"], note=note
        )

    def align(self) -> StageCard:
        from lmforge.demo.align import align_card

        return align_card(self, self.console, STAGES["align"])

    def review(self) -> StageCard:
        from lmforge.demo.review import review_card

        self.console.print(
            "red-teaming the SFT model and judging its held-out replies against the base model"
        )
        tasks = ["addition", "reverse_words", "count_letter", "read_answer"]
        return review_card("review", STAGES["review"], self.path("sft", "model"), self.path("eval"), tasks)

    def _sample_replies(self, per_task: int = 2) -> Table:
        """A few held-out questions with the base and SFT replies, read from the eval samples."""
        rows = []
        for task in ("addition", "reverse_words", "count_letter", "read_answer"):
            replies = {}
            for which in ("base", "sft"):
                samples = read_records(self.path("eval", which, "samples", f"{task}.jsonl"))
                replies[which] = [r for r in itertools.islice(samples, per_task) if isinstance(r, dict)]
            for base, sft in zip(replies["base"], replies["sft"]):
                rows.append([base["question"], base["answers"][0], base["prediction"], sft["prediction"]])
        return Table("Sample replies (greedy)", ["question", "answer", "base", "SFT"], rows)

    # -- driver ---------------------------------------------------------------------------------------------
    def restart_from(self, stage: str) -> None:
        """Redo ``stage`` and every later one; the current settings become the run's. Training folders of
        the redone stages are removed, since the trainer would otherwise resume their finished runs."""
        self.stages.restart_from(stage)
        for name in list(STAGES)[list(STAGES).index(stage) :]:
            if name in TRAINING_STAGES:
                shutil.rmtree(self.path(name), ignore_errors=True)
        (self.run_dir / "settings.json").unlink(missing_ok=True)

    def check_settings(self) -> None:
        """Refuse to reuse finished stages that were made with other settings (serving flags aside)."""
        saved = self.run_dir / "settings.json"
        current = {k: v for k, v in to_dict(self.cfg).items() if k not in RUNTIME_ONLY}
        if saved.is_file() and any(self.stages.done(name) for name in STAGES):
            before = json.loads(saved.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
            if changed:
                raise ConfigError(
                    f"{self.run_dir} holds stages made with other settings ({', '.join(changed)} differ); "
                    "use another --run-dir, or --restart-from the first stage they affect"
                )
        saved.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")

    def print_estimates(self, stages: list[str]) -> None:
        """Before anything runs: how long the training ``stages`` will take here, from a timing probe."""
        from lmforge.demo.training import estimate_training

        self.console.print("timing a few training steps to estimate the run's duration on this machine")
        for estimate in estimate_training(self, stages):
            self.console.print(
                f"  {STAGES[estimate.stage]}: {estimate.steps} steps x {estimate.batch_size} x "
                f"{estimate.seq_len} tokens at {estimate.tokens_per_s:,.0f} tokens/s: "
                f"about {format_seconds(estimate.seconds)}"
            )
        if self.cfg.size == "tiny" and not self.cfg.corpus.paths:
            # measured: docs/benchmarks.md, demo section (a corpus of one's own takes time with its size)
            self.console.print("  the other stages together: about 25 s on a 2-core CPU")

    def run(self) -> tuple[Path, Path]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.check_settings()
        save_config(self.cfg, self.run_dir / "config.yaml")
        training = [name for name in ("pretrain", "sft") if not self.stages.done(name)]
        if training:
            self.print_estimates(training)
        for name in STAGES:
            self.stages.run(name, STAGES[name], getattr(self, name))
        cards = [self.stages.cards[name] for name in STAGES]
        total = sum(c.seconds or 0.0 for c in cards)
        summary = {
            "size": self.cfg.size,
            "run folder": str(self.run_dir),
            "total stage time": format_seconds(total),
        }
        eval_rows = self.stages.cards["eval"].tables[0].rows
        addition = next(r for r in eval_rows if r[0] == "addition")
        summary["held-out 2-digit addition, exact match (base -> SFT)"] = f"{addition[2]} -> {addition[3]}"
        md_path, html_path = write_report(self.run_dir, "lmforge demo: report card", cards, summary)
        self.console.rule("[bold]Report card")
        self.console.print(f"{md_path}\n{html_path}")
        return md_path, html_path

    def serve_app(self) -> Any:
        """The OpenAI-compatible app (chat page at ``/``) over the fine-tuned model."""
        from lmforge.infer import LLMEngine
        from lmforge.serve.app import create_app

        model = self.path("sft", "model")
        return create_app(lambda: LLMEngine.from_pretrained(model), model_id=MODEL_ID)

    def serve(self) -> int:
        import uvicorn

        cfg = self.cfg
        self.console.rule("[bold]Serving the chat model")
        for line in usage_hint(f"http://{cfg.host}:{cfg.port}"):  # printed verbatim, never wrapped, to copy
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        uvicorn.run(self.serve_app(), host=cfg.host, port=cfg.port, log_level="warning")
        return 0


def usage_hint(url: str) -> list[str]:
    """How to talk to the demo's server at ``url``: the chat page, a curl command, and (when this
    interpreter has the ``openai`` package) a one-liner run by this very interpreter, since the system
    python usually lacks the package."""
    question = "What is 37 + 48?"
    messages = [{"role": "user", "content": question}]
    body = json.dumps({"model": MODEL_ID, "messages": messages})
    lines = [
        f"chat page: {url}/",
        f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}",
    ]
    if importlib.util.find_spec("openai") is not None:
        # Python strings in double quotes (JSON's are valid Python here), so the shell quoting stays plain.
        code = (
            f'from openai import OpenAI; c = OpenAI(base_url={json.dumps(url + "/v1")}, api_key="none"); '
            f"print(c.chat.completions.create(model={json.dumps(MODEL_ID)}, messages={json.dumps(messages)})"
            ".choices[0].message.content)"
        )
        lines.append(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}")
    lines.append("press Ctrl+C to stop")
    return lines
