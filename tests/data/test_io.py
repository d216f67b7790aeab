import gzip
import io
import json
import tracemalloc

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.data.document import Document
from lmforge.data.io import (
    HtmlReader,
    JsonlReader,
    ParquetReader,
    Reject,
    TextReader,
    WarcReader,
    Writer,
    make_reader,
    read_documents,
    write_jsonl,
)


def read_all(reader):
    return list(reader.read(reader.files()))


def reasons(items):
    return [(i.where.rsplit(":", 1)[-1], i.reason.split(":")[0]) for i in items if isinstance(i, Reject)]


DOCS = [Document("a", "first doc", {"lang": "en"}), Document("b", "zweites Dokument ü", {})]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_writer_round_trips_and_is_byte_deterministic(tmp_path, fmt):
    outputs = []
    for name in ("one", "two"):
        writer = Writer(str(tmp_path / name), fmt)
        out = writer.open(3)
        for doc in DOCS:
            out.write(doc.to_record())
        out.commit()
        assert out.count == 2
        outputs.append((tmp_path / name / f"00003.{fmt}").read_bytes())
    assert outputs[0] == outputs[1]
    assert list(read_documents(tmp_path / "one")) == DOCS
    assert not list((tmp_path / "one").glob("*.tmp"))


def test_compressed_jsonl_is_standard_gzip_and_zstd(tmp_path):
    write_jsonl(tmp_path / "d.jsonl.gz", DOCS)
    write_jsonl(tmp_path / "d.jsonl.zst", DOCS)
    plain = gzip.decompress((tmp_path / "d.jsonl.gz").read_bytes())
    assert (
        plain
        == zstandard.ZstdDecompressor()
        .stream_reader(io.BytesIO((tmp_path / "d.jsonl.zst").read_bytes()))
        .read()
    )
    assert [json.loads(line)["id"] for line in plain.splitlines()] == ["a", "b"]
    assert (tmp_path / "d.jsonl.gz").read_bytes()[4:8] == b"\0\0\0\0"  # no timestamp in the gzip header


def test_aborted_output_leaves_nothing(tmp_path):
    out = Writer(str(tmp_path), "jsonl.gz").open(0)
    out.write(DOCS[0].to_record())
    out.abort()
    assert list(tmp_path.iterdir()) == []


def test_jsonl_reader_ids_meta_and_extra_fields(tmp_path):
    (tmp_path / "x.jsonl").write_text(
        '{"text": "hello", "id": 7, "meta": {"a": 1}, "url": "u"}\n\n{"content": "no id here"}\n'
    )
    docs = read_all(JsonlReader(str(tmp_path / "x.jsonl"), source="web"))
    assert docs[0] == Document("7", "hello", {"a": 1, "url": "u", "source": "web"})
    assert isinstance(docs[1], Reject) and docs[1].reason == "missing_text"
    other = read_all(JsonlReader(str(tmp_path), text_key="content", source="web"))
    assert other[1] == Document("web/x.jsonl:3", "no id here", {"source": "web"})


def test_bad_records_are_rejected_with_reasons_and_reading_goes_on(tmp_path):
    lines = [
        b'{"text": "good one"}',
        b"{not json",
        b'{"text": "caf\xe9"}',  # latin-1 byte: invalid UTF-8
        b'{"id": 1}',
        b'{"text": 42}',
        b'{"text": "   "}',
        b"[1, 2]",
        b'{"text": "\\u0000\\u0001\\u0002\\u0003 binary"}',
        b'{"text": "\\ud83d alone"}',
        b"\x00\x01\xfe\xff\x13\x37" * 5,
        b'{"text": "' + b"x" * 2000 + b'"}',
        b'{"text": "good two"}',
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = read_all(JsonlReader(str(tmp_path / "bad.jsonl"), max_doc_bytes=1000))
    assert [d.text for d in items if isinstance(d, Document)] == ["good one", "good two"]
    assert reasons(items) == [
        ("2", "malformed_json"),
        ("3", "invalid_utf8"),
        ("4", "missing_text"),
        ("5", "text_not_string"),
        ("6", "empty"),
        ("7", "not_an_object"),
        ("8", "binary"),
        ("9", "invalid_unicode"),
        ("10", "invalid_utf8"),
        ("11", "too_large"),
    ]


def test_a_50_mb_document_is_rejected_without_parsing_it(tmp_path):
    path = tmp_path / "giant.jsonl"
    with path.open("wb") as f:
        f.write(b'{"text": "small"}\n{"text": "')
        f.write(b"word " * 10_000_000)
        f.write(b'"}\n{"text": "after"}\n')
    tracemalloc.start()
    items = read_all(JsonlReader(str(path)))  # default limit: 10 MB
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 25e6, "the 50 MB line should be skipped in pieces, not read whole"
    assert [i.text for i in items if isinstance(i, Document)] == ["small", "after"]
    assert reasons(items) == [("2", "too_large")]
    assert len(items[1].preview) == 200


def test_truncated_gzip_keeps_what_was_read_and_rejects_the_rest(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    items = read_all(JsonlReader(str(tmp_path / "cut.jsonl.gz")))
    assert isinstance(items[-1], Reject) and items[-1].reason.startswith("unreadable_file")
    assert all(isinstance(i, Document) for i in items[:-1]) and len(items) > 10


def test_parquet_reader_columns_to_meta(tmp_path):
    table = pa.table(
        {
            "text": ["one", None, "three"],
            "id": ["i1", "i2", "i3"],
            "meta": ['{"k": 1}', "{}", "not json"],
            "score": [0.5, 0.1, 0.9],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    items = read_all(ParquetReader(str(tmp_path / "p.parquet"), source="pq"))
    assert items[0] == Document("i1", "one", {"k": 1, "score": 0.5, "source": "pq"})
    assert isinstance(items[1], Reject) and items[1].reason == "missing_text"
    assert items[2].meta == {"meta": "not json", "score": 0.9, "source": "pq"}


def test_text_and_html_folders(tmp_path):
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "a.txt").write_text("plain text")
    (tmp_path / "t" / "sub" / "b.txt").write_bytes(b"\xef\xbb\xbfwith BOM")
    (tmp_path / "t" / "junk.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "t" / "big.txt").write_text("y" * 5000)
    (tmp_path / "t" / "ignored.md").write_text("not a .txt")
    reader = TextReader(str(tmp_path / "t"), source="books", max_doc_bytes=4096)
    items = read_all(reader)
    assert [(d.id, d.text) for d in items if isinstance(d, Document)] == [
        ("books/a.txt", "plain text"),
        ("books/sub/b.txt", "with BOM"),
    ]
    assert sorted(r.reason.split(":")[0] for r in items if isinstance(r, Reject)) == [
        "invalid_utf8",
        "too_large",
    ]
    assert reader.tasks() == [reader.files()]  # many small files per task

    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "p.html").write_text("<html><body><p>Hi</p></body></html>")
    (tmp_path / "h" / "q.htm").write_bytes(
        b'<html><head><meta charset="iso-8859-1"></head><p>caf\xe9</p></html>'
    )
    pages = read_all(HtmlReader(str(tmp_path / "h" / "*")))
    assert [p.meta["format"] for p in pages] == ["html", "html"]
    assert "café" in pages[1].text


def test_warc_reader_yields_html_responses_only(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    with path.open("wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, ctype, body in [
            ("http://a.example/", "text/html; charset=utf-8", "<html><p>page á</p></html>".encode()),
            ("http://a.example/x.png", "image/png", b"\x89PNG...."),
            ("http://b.example/", "text/html; charset=windows-1252", b"<p>caf\xe9</p>"),
        ]:
            headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.0")
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
            )
        writer.write_record(
            writer.create_warc_record("http://a.example/", "request", payload=io.BytesIO(b"GET /"))
        )
    docs = read_all(WarcReader(str(path), source="cc"))
    assert [(d.meta["url"], d.text) for d in docs] == [
        ("http://a.example/", "<html><p>page á</p></html>"),
        ("http://b.example/", "<p>café</p>"),
    ]
    assert docs[0].meta["format"] == "html" and docs[0].id.startswith("urn:uuid:")


def test_file_urls_auto_format_and_fsspec_filesystems(tmp_path):
    write_jsonl(tmp_path / "d.jsonl.zst", DOCS)
    reader = make_reader(f"file://{tmp_path}/*.zst")
    assert isinstance(reader, JsonlReader) and [d.text for d in read_all(reader)] == [d.text for d in DOCS]
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(ValueError, match="several formats"):
        make_reader(str(tmp_path))

    # any fsspec filesystem: the in-memory one stands in for s3:// and friends
    writer = Writer("memory://bucket/out", "jsonl.gz")
    out = writer.open(0)
    out.write(DOCS[0].to_record())
    out.commit()
    assert fsspec.filesystem("memory").exists("/bucket/out/00000.jsonl.gz")
    assert list(read_documents("memory://bucket/out/*.jsonl.gz")) == [DOCS[0]]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        JsonlReader(str(tmp_path / "nope.jsonl")).files()
    with pytest.raises(FileNotFoundError, match="no jsonl files match"):
        JsonlReader(str(tmp_path / "*.jsonl")).files()


def test_truncated_zstd_is_an_unreadable_file_after_the_records_read(tmp_path):
    data = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(20000)))
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    items = read_all(JsonlReader(str(tmp_path / "cut.jsonl.zst")))
    docs = [i for i in items if isinstance(i, Document)]
    assert isinstance(items[-1], Reject) and items[-1].reason.startswith("unreadable_file: EOFError")
    assert items[-1].reason.endswith(f"(after {len(docs)} records)") and len(items) == len(docs) + 1


def test_multi_frame_zstd_reads_every_frame(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(b'{"text": "frame %d"}\n' % i) for i in range(3)]
    (tmp_path / "multi.jsonl.zst").write_bytes(b"".join(frames))
    items = read_all(JsonlReader(str(tmp_path / "multi.jsonl.zst")))
    assert [i.text for i in items] == ["frame 0", "frame 1", "frame 2"]


def test_terminal_text_with_overstrikes_and_bells_is_not_binary(tmp_path):
    man_page = "N\bNA\bAM\bME\bE\n     ls - list _\bd_\bi_\br_\be_\bc_\bt_\bo_\br_\by contents\x07\n"
    colours = "\x1b[1;31merror:\x1b[0m build failed\x07\n" * 20
    rows = [
        {"text": man_page},
        {"text": colours},
        {"text": "\x01\x02\x03\x04\x05\x06\x0e\x0f" * 10 + " data"},
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    items = read_all(JsonlReader(str(tmp_path / "t.jsonl")))
    assert [i.text for i in items[:2]] == [man_page, colours]
    assert isinstance(items[2], Reject) and items[2].reason == "binary"
