import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.shards.format import (
    ShardsError,
    ShardStats,
    ShardWriter,
    TokenShards,
    build_manifest,
    check_tokenizer_hash,
    choose_dtype,
    read_manifest,
    read_shard_record,
    write_manifest,
    write_shard,
)

SHA = "a" * 64


def test_dtype_choice() -> None:
    assert choose_dtype(50_000) == np.uint16 and choose_dtype(65_536) == np.uint16
    assert choose_dtype(65_537) == np.uint32 and choose_dtype(100, "uint32") == np.uint32
    with pytest.raises(ShardsError, match="uint16 cannot hold"):
        choose_dtype(128_256, "uint16")
    with pytest.raises(ShardsError, match="dtype"):
        choose_dtype(100, "int8")


def test_writer_layout_and_completion_record(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "00000", np.dtype(np.uint16))
    writer.add(np.array([5, 6, 0]))
    writer.extend(np.array([7, 0, 8, 9, 0]), [2, 3])
    assert read_shard_record(tmp_path, "00000") is None  # not complete before close
    record = writer.close(ShardStats(docs=3, tokens=8), {"domain": "web"})
    assert np.fromfile(tmp_path / "00000.bin", dtype=np.uint16).tolist() == [5, 6, 0, 7, 0, 8, 9, 0]
    assert np.load(tmp_path / "00000.idx.npy").tolist() == [0, 3, 5, 8]
    assert read_shard_record(tmp_path, "00000") == record and record["domain"] == "web"
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_inconsistent_lengths_and_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "x", np.dtype(np.uint16))
    with pytest.raises(ValueError, match="sum to 3"):
        writer.extend(np.array([1, 2]), [1, 2])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def make_folder(folder: Path) -> None:
    folder.mkdir()
    records = [
        write_shard(
            folder,
            "a",
            [np.array([1, 2, 0]), np.array([3, 0])],
            np.dtype(np.uint16),
            ShardStats(2, 5),
            {"domain": "web"},
        ),
        write_shard(
            folder,
            "b",
            [np.array([4, 4, 4, 0])],
            np.dtype(np.uint16),
            ShardStats(1, 4, empty_docs=2),
            {"domain": "code"},
        ),
        write_shard(
            folder, "c", [np.array([5, 0])], np.dtype(np.uint16), ShardStats(1, 2), {"domain": "web"}
        ),
    ]
    write_manifest(folder, build_manifest(records, np.dtype(np.uint16), 10, 0, SHA))


def test_manifest_totals_and_reading_documents_across_shards(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    manifest = read_manifest(tmp_path / "s")
    assert manifest["totals"]["tokens"] == 11 and manifest["totals"]["empty_docs"] == 2
    assert manifest["domains"]["web"] == {
        "docs": 3,
        "tokens": 7,
        "empty_docs": 0,
        "non_round_trip_docs": 0,
        "bad_records": 0,
        "special_text_docs": 0,
    }
    shards = TokenShards(tmp_path / "s", tokenizer_sha256=SHA)
    assert shards.domains == ["code", "web"]
    assert shards.num_docs("web") == 3 and shards.num_tokens("web") == 7
    assert [shards.read("web", i).tolist() for i in range(3)] == [[1, 2, 0], [3, 0], [5, 0]]
    assert shards.read("code", 0, 1, 3).tolist() == [4, 4]


def test_bad_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardsError, match=r"no manifest\.json"):
        TokenShards(tmp_path)
    make_folder(tmp_path / "s")
    with pytest.raises(ShardsError, match="tokenizer sha256"):
        check_tokenizer_hash(read_manifest(tmp_path / "s"), "b" * 64)
    # a truncated .bin (e.g. copied half-way) is caught before any batch is read
    data = (tmp_path / "s" / "a.bin").read_bytes()
    (tmp_path / "s" / "a.bin").write_bytes(data[:-2])
    with pytest.raises(ShardsError, match="has 4 tokens but its index says 5"):
        TokenShards(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format"] = "other/9"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardsError, match="format"):
        read_manifest(tmp_path / "s")
