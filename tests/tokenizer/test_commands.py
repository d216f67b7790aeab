import gzip
import json
from pathlib import Path

from lmforge.cli import main
from lmforge.tokenizer import load_tokenizer


def write_corpus(root: Path) -> None:
    for lang, text in (
        ("en", "the cat sat on the mat and the dog ran"),
        ("ko", "한국어 문장 토큰 한국어 문장"),
    ):
        path = root / lang / "00000.jsonl.gz"
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for i in range(20):
                f.write(
                    json.dumps({"id": f"{lang}{i}", "text": f"{text} {i}", "meta": {"language": lang}}) + "\n"
                )
            f.write("{broken\n")


def test_train_encode_inspect_from_the_command_line(tmp_path: Path, capsys) -> None:
    write_corpus(tmp_path / "docs")
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "-i", str(tmp_path / "docs"), "-o", str(out), "-q"]
    assert main([*args, "kind=unigram", "vocab_size=120", "normalization=nfkc"]) == 0
    tok = load_tokenizer(out)
    assert tok.backend.normalizer is not None and tok.unk_token == "<|unk|>"
    assert "skipped 2 unreadable or empty records (malformed_json: 2)" in capsys.readouterr().err

    assert main(["tokenizer", "encode", str(out), "the cat"]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode("the cat")

    assert (
        main(
            [
                "tokenizer",
                "inspect",
                str(out),
                "-i",
                str(tmp_path / "docs"),
                "--group-by",
                "language",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"en", "ko"} and report["en"]["docs"] == 20
    assert report["ko"]["round_trip_rate"] == 1.0 and report["en"]["bytes_per_token"] > 1.0


def test_bad_train_option_is_a_config_error(tmp_path: Path, capsys) -> None:
    write_corpus(tmp_path / "docs")
    assert (
        main(["tokenizer", "train", "-i", str(tmp_path / "docs"), "-o", str(tmp_path / "t"), "kind=bpe2"])
        == 2
    )
    assert "kind" in capsys.readouterr().err
