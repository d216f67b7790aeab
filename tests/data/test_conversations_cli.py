"""``lmforge data conversations``: message records -> chat JSONL, preference pairs and rejects."""

from __future__ import annotations

import json

from lmforge.cli import main
from lmforge.tune.preference import prompt_messages, reply_messages
from lmforge.tune.sft import record_to_messages

from .test_conversations import TREE, oasst


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_oasst_to_dialogues_pairs_and_rejects(tmp_path, capsys) -> None:
    records = [
        *TREE,
        {"parent_id": "p1", "role": "assistant", "text": "no id"},  # no message_id
        oasst("a1", "p1", "assistant", "same id again", rank=3),
        oasst("z1", None, "robot", "unknown role"),
        oasst("z2", "z1", "assistant", "child of a rejected message", rank=0),
    ]
    src = tmp_path / "msgs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    out, pairs = tmp_path / "chat.jsonl", tmp_path / "pairs.jsonl"
    args = ["data", "conversations", str(src), "--out", str(out), "--pairs", str(pairs), "--lang", "en"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["records"] == len(records) + 1
    assert report["rejected"] == {"bad_value": 1, "duplicate_id": 1, "malformed_json": 1, "missing_key": 1}
    assert report["messages_dropped"]["missing_parent"] == 1  # z2 lost its (rejected) parent
    dialogues = read(out)
    assert report["dialogues"] == len(dialogues) == 3  # the same three paths as the library gives
    for record in dialogues:
        assert record_to_messages(record) == record["messages"]  # what SFT reads
        assert record["tree"] == "p1"
    got_pairs = read(pairs)
    assert report["pairs"] == len(got_pairs) == 2
    for pair in got_pairs:  # what the reward model and DPO read
        assert prompt_messages(pair)[-1]["role"] == "user"
        assert reply_messages(pair["chosen"], "chosen") != reply_messages(pair["rejected"], "rejected")
    assert {(p["chosen"], p["rejected"]) for p in got_pairs} == {("Use ls.", "Try dir."), ("ls -a", "ls")}
    best = tmp_path / "best.jsonl"
    assert (
        main(["data", "conversations", str(src), "--out", str(best), "--paths", "best", "--lang", "en"]) == 0
    )
    assert [[m["content"] for m in d["messages"]] for d in read(best)] == [
        ["How do I list files?", "Use ls.", "And hidden ones?", "ls -a"]
    ]
    rejects = read(tmp_path / "chat.jsonl.rejects.jsonl")
    assert sorted(r["reason"].split(":")[0] for r in rejects) == [
        "bad_value",
        "duplicate_id",
        "malformed_json",
        "missing_key",
    ]
    assert all(r["where"].startswith(str(src) + ":") for r in rejects)


def test_threads_around_a_speaker(tmp_path, capsys) -> None:
    thread = [
        {"id": 1, "parent": None, "author": "ann", "text": "My build fails."},
        {"id": 2, "parent": 1, "author": "bot", "text": "Which error?"},
        {"id": 3, "parent": 2, "author": "ann", "text": "E42."},
        {"id": 4, "parent": 3, "author": "carl", "text": "Same here."},
        {"id": 5, "parent": 4, "author": "bot", "text": "Upgrade."},
        {"id": 6, "parent": 1, "text": "no author"},
    ]
    src = tmp_path / "thread.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in thread))
    out = tmp_path / "chat.jsonl"
    assert main(["data", "conversations", str(src), "--out", str(out), "--format", "threads"]) == 2
    assert (
        main(
            ["data", "conversations", str(src), "--out", str(out), "--format", "threads", "--speaker", "bot"]
        )
        == 0
    )
    (dialogue,) = read(out)
    assert [(m["role"], m["content"]) for m in dialogue["messages"]] == [
        ("user", "My build fails."),
        ("assistant", "Which error?"),
        ("user", "E42.\n\nSame here."),
        ("assistant", "Upgrade."),
    ]
    assert [r["reason"] for r in read(tmp_path / "chat.jsonl.rejects.jsonl")] == ["missing_key: 'author'"]
