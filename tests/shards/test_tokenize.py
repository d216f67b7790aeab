import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from lmforge.shards.format import ShardsError, TokenShards, choose_dtype, read_manifest
from lmforge.shards.loader import PackedLoader
from lmforge.shards.tokenize import TokenizeConfig, tokenize_to_shards
from lmforge.tokenizer import Tokenizer, TokenizerTrainConfig, load_tokenizer, train_tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "it",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
]


def write_jsonl_gz(path: Path, records: list[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            f.write("\n")


def random_docs(seed: int, n: int, source: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "id": f"{source}-{i}",
            "text": " ".join(rng.choice(WORDS, size=rng.integers(3, 40))),
            "meta": {"source": source},
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    texts = [" ".join(WORDS)] * 5 + ["Ｆｕｌｌ width"]
    train_tokenizer(texts, TokenizerTrainConfig(vocab_size=350, min_frequency=1)).save(folder)
    return folder


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "clean"
    write_jsonl_gz(root / "web" / "00000.jsonl.gz", [*random_docs(0, 30, "cc"), "{not json", {"text": "  "}])
    write_jsonl_gz(root / "web" / "00001.jsonl.gz", random_docs(1, 20, "cc"))
    write_jsonl_gz(root / "code" / "00000.jsonl.gz", [*random_docs(2, 25, "gh"), {"id": "x", "meta": {}}])
    return root


def test_shards_hold_each_document_then_eos_and_the_manifest_counts_them(
    tokenizer_dir, corpus, tmp_path
) -> None:
    out = tmp_path / "shards"
    manifest = tokenize_to_shards(TokenizeConfig([str(corpus)], str(tokenizer_dir), str(out)), progress=False)
    tok = load_tokenizer(tokenizer_dir)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer_sha256"] == tok.sha256()
    assert manifest["eos_id"] == tok.eos_id and manifest["vocab_size"] == tok.vocab_size
    # sorted by (domain, file): code/00000 -> shard 00000, web/00000 -> 00001, web/00001 -> 00002
    assert [(s["name"], s["domain"]) for s in manifest["shards"]] == [
        ("00000", "code"),
        ("00001", "web"),
        ("00002", "web"),
    ]
    expected = [d["text"] for d in random_docs(0, 30, "cc")]
    tokens = np.fromfile(out / "00001.bin", dtype=np.uint16)
    offsets = np.load(out / "00001.idx.npy")
    assert len(offsets) == 31 and offsets[-1] == len(tokens)
    for i, text in enumerate(expected):
        assert tokens[offsets[i] : offsets[i + 1]].tolist() == [*tok.encode(text), tok.eos_id]
    web = manifest["domains"]["web"]
    assert web["docs"] == 50 and web["empty_docs"] == 1 and web["bad_records"] == 1
    assert manifest["domains"]["code"]["bad_records"] == 1  # no text field
    assert manifest["totals"]["tokens"] == sum(s["tokens"] for s in manifest["shards"])
    assert manifest["sources"]["gh"] == manifest["domains"]["code"]["tokens"]
    assert manifest["totals"]["non_round_trip_docs"] == 0
    with gzip.open(out / "pipeline" / "rejects" / "0" / "00001.jsonl.gz", "rt") as f:
        reject = json.loads(f.readline())
    assert reject["reason"].startswith("malformed_json")
    assert manifest["rejects"] == "pipeline/rejects"
    # the loader reads what was written, checking the tokenizer hash
    loader = PackedLoader(out, seq_len=16, batch_size=2, tokenizer_sha256=tok.sha256())
    assert loader.domains == ["code", "web"]
    assert next(loader)["input_ids"].max() < tok.vocab_size


def test_named_domains_and_parquet_input(tokenizer_dir, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = random_docs(3, 12, "books")
    path = tmp_path / "books.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": d["id"], "text": d["text"]} for d in docs]), path)
    out = tmp_path / "shards"
    manifest = tokenize_to_shards(
        TokenizeConfig([f"books={path}"], str(tokenizer_dir), str(out)), progress=False
    )
    assert manifest["domains"]["books"]["docs"] == 12


def test_documents_that_do_not_round_trip_are_counted(tmp_path) -> None:
    tok = train_tokenizer([" ".join(WORDS)] * 3, TokenizerTrainConfig(vocab_size=300, normalization="nfkc"))
    tok.save(tmp_path / "tok")
    write_jsonl_gz(tmp_path / "in.jsonl.gz", [{"text": "the ＡＢＣ"}, {"text": "the abc"}])
    manifest = tokenize_to_shards(
        TokenizeConfig([str(tmp_path / "in.jsonl.gz")], str(tmp_path / "tok"), str(tmp_path / "out")),
        progress=False,
    )
    assert manifest["totals"]["docs"] == 2 and manifest["totals"]["non_round_trip_docs"] == 1
    assert manifest["round_trip_check"] == "checked"  # NFKC is not lossless: every document was decoded


def test_special_token_text_in_a_document_is_plain_text_and_counted(tokenizer_dir, tmp_path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    text = "the end <|end_of_text|> is not the end <|im_start|>"
    write_jsonl_gz(tmp_path / "in.jsonl.gz", [{"text": text}, {"text": "the of"}])
    cfg = TokenizeConfig([str(tmp_path / "in.jsonl.gz")], str(tokenizer_dir), str(tmp_path / "out"))
    manifest = tokenize_to_shards(cfg, progress=False)
    assert manifest["totals"]["special_text_docs"] == 1
    assert manifest["round_trip_check"] == "lossless" and manifest["totals"]["non_round_trip_docs"] == 0
    doc = TokenShards(tmp_path / "out").read("default", 0).tolist()
    assert doc.count(tok.eos_id) == 1 and doc[-1] == tok.eos_id  # only the separator
    assert tok.token_to_id("<|im_start|>") not in doc
    assert tok.decode(doc[:-1]) == text
    # opting in parses them as special tokens (pre-rendered chat text)
    cfg.output, cfg.allow_special_tokens, cfg.round_trip_check = str(tmp_path / "chat"), True, "always"
    manifest = tokenize_to_shards(cfg, progress=False)
    assert manifest["round_trip_check"] == "checked" and manifest["totals"]["non_round_trip_docs"] == 0
    assert TokenShards(tmp_path / "chat").read("default", 0).tolist().count(tok.eos_id) == 2


def big_vocab_tokenizer(folder: Path) -> Tokenizer:
    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "<eos>": 70_001}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(backend, eos_token="<eos>", unk_token="<unk>")
    tok.save(folder)
    return tok


def test_uint16_request_with_a_larger_vocabulary_is_an_error(tmp_path) -> None:
    big_vocab_tokenizer(tmp_path / "tok")
    write_jsonl_gz(tmp_path / "in" / "a.jsonl.gz", [{"text": "w1 w69999 w65536"}])
    cfg = TokenizeConfig([str(tmp_path / "in")], str(tmp_path / "tok"), str(tmp_path / "out"), dtype="uint16")
    with pytest.raises(ShardsError, match="uint16 cannot hold"):
        tokenize_to_shards(cfg, progress=False)
    cfg.dtype, cfg.output = "auto", str(tmp_path / "out32")
    assert tokenize_to_shards(cfg, progress=False)["dtype"] == "uint32"
    shards = TokenShards(tmp_path / "out32")
    assert shards.read("default", 0).tolist() == [1, 69999, 65536, 70001]
    assert choose_dtype(65536) == np.uint16 and choose_dtype(65537) == np.uint32


def test_rerun_with_another_tokenizer_into_the_same_folder_is_refused(
    tokenizer_dir, corpus, tmp_path
) -> None:
    out = tmp_path / "shards"
    tokenize_to_shards(TokenizeConfig([str(corpus)], str(tokenizer_dir), str(out)), progress=False)
    other = tmp_path / "other_tok"
    train_tokenizer([" ".join(WORDS)], TokenizerTrainConfig(vocab_size=280, min_frequency=1)).save(other)
    with pytest.raises(ShardsError, match="tokenizer sha256 differs"):
        tokenize_to_shards(TokenizeConfig([str(corpus)], str(other), str(out)), progress=False)
    with pytest.raises(ShardsError, match="tokenizer sha256"):
        PackedLoader(out, seq_len=8, batch_size=1, tokenizer_sha256=load_tokenizer(other).sha256())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """The shards and their manifest (the executor's bookkeeping under pipeline/ holds timings)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()}


@pytest.mark.multiprocess
def test_output_is_identical_with_one_or_two_workers(tokenizer_dir, corpus, tmp_path) -> None:
    one = tokenize_to_shards(
        TokenizeConfig([str(corpus)], str(tokenizer_dir), str(tmp_path / "a")), progress=False
    )
    two = tokenize_to_shards(
        TokenizeConfig([str(corpus)], str(tokenizer_dir), str(tmp_path / "b"), workers=2), progress=False
    )
    assert one == two
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


@pytest.mark.multiprocess
def test_on_ray_the_shards_are_those_of_the_local_executor(tokenizer_dir, corpus, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    local = tokenize_to_shards(
        TokenizeConfig([str(corpus)], str(tokenizer_dir), str(tmp_path / "a")), progress=False
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = TokenizeConfig(
            [str(corpus)], str(tokenizer_dir), str(tmp_path / "b"), workers=2, executor="ray"
        )
        on_ray = tokenize_to_shards(cfg, progress=False)
    finally:
        ray.shutdown()
    assert on_ray == local
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


@pytest.mark.multiprocess
def test_resume_after_sigkill_skips_finished_shards_and_gives_the_same_bytes(tokenizer_dir, tmp_path) -> None:
    root = tmp_path / "in"
    n_files = 24
    for f in range(n_files):
        write_jsonl_gz(root / f"{f:05d}.jsonl.gz", random_docs(100 + f, 300, "cc"))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmforge.cli", "shards", "tokenize", str(root), "-t", str(tokenizer_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([*cmd, "-o", str(out), "-q"], env=env, start_new_session=True)
    deadline = time.time() + 60
    markers = out / "pipeline" / "stages" / "0" / "done"
    while len(list(markers.glob("*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(markers.glob("*.json"))
    assert 3 <= len(done_before) < n_files, "the job must be killed midway"
    # only tasks whose executor marker (written last) exists are finished; a shard without one may be redone
    stamps = {f"{p.stem}.bin": (out / f"{p.stem}.bin").stat().st_mtime_ns for p in done_before}
    tokenize_to_shards(TokenizeConfig([str(root)], str(tokenizer_dir), str(out)), progress=False)
    for name, stamp in stamps.items():
        assert (out / name).stat().st_mtime_ns == stamp  # finished shards were skipped, not rewritten
    assert not list(out.glob("*.tmp"))
    tokenize_to_shards(
        TokenizeConfig([str(root)], str(tokenizer_dir), str(tmp_path / "clean")), progress=False
    )
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")
    assert read_manifest(out)["totals"]["docs"] == n_files * 300


def test_cli_from_documents_to_shards_and_a_curriculum_config(
    tokenizer_dir, corpus, tmp_path, capsys
) -> None:
    from lmforge.cli import main
    from lmforge.config import load_config
    from lmforge.shards.loader import DataConfig

    out = tmp_path / "shards"
    assert main(["shards", "tokenize", str(corpus), "-t", str(tokenizer_dir), "-o", str(out), "-q"]) == 0
    assert "from 75 documents in 3 shards (uint16)" in capsys.readouterr().out
    recipe = tmp_path / "data.yaml"
    recipe.write_text(
        f"shards: [{out}]\n"
        "seq_len: 16\n"
        "curriculum:\n"
        "  - {name: general, tokens: 4096, mixture: {strategy: temperature, temperature: 2.0}}\n"
        "  - {name: code-heavy, seq_len: 32, mixture: {strategy: fixed, weights: {code: 0.8, web: 0.2}}}\n"
    )
    written = tmp_path / "resolved.yaml"
    args = ["shards", "mixture", "--config", str(recipe), "--sequences", "4000", "--write", str(written)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "general: seq_len 16, 4,096 tokens" in printed and "code-heavy: seq_len 32" in printed
    cfg = load_config(DataConfig, written)
    assert cfg.curriculum[1].mixture.weights == {"code": 0.8, "web": 0.2}
    assert (
        main(["data", "mixture", f"shards=[{out}]", "mixture.strategy=fixed", "mixture.weights={books: 1}"])
        == 1
    )
    captured = capsys.readouterr()
    assert "unknown domain" in captured.out
    assert "'data mixture' is now 'lmforge shards mixture'" in captured.err
