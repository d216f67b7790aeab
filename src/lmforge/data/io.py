"""Readers and writers of documents: JSONL (plain, .gz, .zst), Parquet, folders of .txt, HTML files, WARC.

Paths go through fsspec, so ``s3://bucket/raw/*.jsonl.gz`` works wherever the backend is installed.
A reader turns every record it cannot make a :class:`Document` from into a :class:`Reject` with a reason
(invalid UTF-8, malformed JSON, missing or non-string text, empty, too large, binary, unreadable file)
instead of raising, so the pipeline counts it, writes it to the rejects file and goes on.

Writers put one file per task (``00007.jsonl.gz``) and commit it atomically (written under a temporary
name, renamed when the task finishes). Output bytes depend only on the documents: gzip headers carry no
timestamp and Parquet metadata no write time.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import fsspec
from fsspec.core import url_to_fs

from lmforge.data import code
from lmforge.data.document import Document

DEFAULT_MAX_DOC_BYTES = 10_000_000
PREVIEW_CHARS = 200
# Control characters that do not occur in text, even old terminal text: backspace (overstrike: "_\bw"),
# bell and escape (ANSI colours) do, and the cleaning step ``control_chars`` handles them.
_BINARY_CONTROL_CHARS = re.compile(r"[\x00-\x06\x0e-\x1a\x1c-\x1f\x7f]")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


@dataclass(frozen=True)
class Reject:
    """A record the reader could not turn into a document; ``reason`` starts with a snake_case kind."""

    where: str  # file and line/record number
    reason: str
    preview: str = ""
    id: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {"where": self.where, "id": self.id, "reason": self.reason, "preview": self.preview}


def preview(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
    return raw[:PREVIEW_CHARS]


def looks_binary(text: str) -> bool:
    """NUL bytes or many control characters in the first 4 KiB (tab, newline, CR, form feed, backspace,
    bell and escape are text: terminal output and nroff pages use them)."""
    head = text[:4096]
    return "\x00" in head or len(_BINARY_CONTROL_CHARS.findall(head)) > 0.05 * max(len(head), 1)


def _decode_html(raw: bytes) -> str:
    """UTF-8 first; else the charset the page declares in a <meta> tag."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        declared = _META_CHARSET.search(raw[:4096])
        if declared is None:
            raise
        return raw.decode(declared.group(1).decode("ascii"))


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a .zst file (all its frames); a file cut inside a frame raises ``EOFError``
    at the cut, as ``gzip`` does (zstandard's stream reader just stops there)."""

    chunk_bytes = 1 << 17

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self._raw = raw
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new_frame()
        self._frame_started = False
        self._buffer = b""
        self._offset = 0  # of the first byte in _buffer not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while self._offset == len(self._buffer):
            compressed = self._raw.read(self.chunk_bytes)
            if not compressed:
                if self._frame_started:
                    raise EOFError("zstd file ended before the end of its last frame")
                return 0
            self._buffer, self._offset = self._decompress(compressed), 0
        size = min(len(target), len(self._buffer) - self._offset)
        target[:size] = self._buffer[self._offset : self._offset + size]
        self._offset += size
        return size

    def _decompress(self, compressed: bytes) -> bytes:
        out = []
        while compressed:
            self._frame_started = True
            out.append(self._frame.decompress(compressed))
            if not self._frame.eof:
                break
            compressed = self._frame.unused_data  # the next frame starts here
            self._frame, self._frame_started = self._new_frame(), False
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


class Reader:
    """Lists the files of one input (globs, folders, single files) and reads documents from them.

    ``source`` (when given) is written to ``meta["source"]``; ``validate=False`` skips the size, empty and
    binary checks (used for the pipeline's own intermediate files).
    """

    format: ClassVar[str] = ""
    extensions: ClassVar[tuple[str, ...]] = ()
    default_files_per_task: ClassVar[int] = 1

    def __init__(
        self,
        paths: str | Sequence[str],
        *,
        source: str | None = None,
        files_per_task: int | None = None,
        max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
        validate: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self.source = source
        self.files_per_task = files_per_task or self.default_files_per_task
        self.max_doc_bytes = max_doc_bytes
        self.validate = validate
        self.storage_options = storage_options or {}
        self.fs: fsspec.AbstractFileSystem = url_to_fs(self.paths[0], **self.storage_options)[0]
        self._files: list[str] | None = None
        self._root = ""

    def files(self) -> list[str]:
        """Every matching file, sorted (the order fixes task numbering and thus the output)."""
        if self._files is None:
            found: set[str] = set()
            for pattern in self.paths:
                _, stripped = url_to_fs(pattern, **self.storage_options)
                if any(c in stripped for c in "*?["):
                    matches = self.fs.glob(stripped)
                elif self.fs.isdir(stripped):
                    matches = self.fs.find(stripped)
                elif self.fs.exists(stripped):
                    matches = [stripped]
                else:
                    raise FileNotFoundError(f"{self.format} input not found: {pattern}")
                found.update(m for m in matches if not self.fs.isdir(m))
            files = sorted(p for p in found if not self.extensions or p.endswith(self.extensions))
            if not files:
                raise FileNotFoundError(f"no {self.format} files match {self.paths}")
            self._files = files
            self._root = posixpath.commonpath([posixpath.dirname(f) for f in files])
        return self._files

    def tasks(self) -> list[list[str]]:
        files = self.files()
        return [files[i : i + self.files_per_task] for i in range(0, len(files), self.files_per_task)]

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self._root) if self._root else path

    def read(self, files: Iterable[str]) -> Iterator[Document | Reject]:
        return self._guarded(files, self.read_file)

    def _guarded(self, files: Iterable[str], read_one: Callable[[str], Iterator[Any]]) -> Iterator[Any]:
        for path in files:
            if not self.validate:  # the pipeline's own files: a failure is a bug to surface, not bad input
                yield from read_one(path)
                continue
            records = 0
            try:
                for item in read_one(path):
                    records += 1
                    yield item
            except Exception as err:  # a truncated archive or unreadable file ends that file, not the run
                yield Reject(path, f"unreadable_file: {type(err).__name__}: {err} (after {records} records)")

    def read_file(self, path: str) -> Iterator[Document | Reject]:
        raise NotImplementedError

    def open_binary(self, path: str) -> IO[bytes]:
        """The file's bytes, decompressed by extension (.gz, .zst), readable line by line."""
        if path.endswith(".zst"):
            return io.BufferedReader(_ZstdFrames(self.fs.open(path, "rb")), buffer_size=1 << 16)
        return self.fs.open(path, "rb", compression="infer")

    def document(self, doc_id: str, text: Any, meta: dict[str, Any], where: str) -> Document | Reject:
        """Check a candidate record and build the document (or say why not)."""
        if text is None:
            return Reject(where, "missing_text", preview(json.dumps(meta)[:PREVIEW_CHARS]), doc_id)
        if not isinstance(text, str):
            return Reject(where, f"text_not_string: {type(text).__name__}", preview(repr(text)), doc_id)
        if self.validate:
            if not text.strip():
                return Reject(where, "empty", "", doc_id)
            if len(text) > self.max_doc_bytes:  # decided without encoding a giant string
                return Reject(where, f"too_large: > {self.max_doc_bytes} bytes", preview(text), doc_id)
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                return Reject(where, "invalid_unicode: lone surrogate", preview(repr(text)), doc_id)
            if size > self.max_doc_bytes:
                return Reject(where, f"too_large: > {self.max_doc_bytes} bytes", preview(text), doc_id)
            if looks_binary(text):
                return Reject(where, "binary", preview(repr(text)), doc_id)
            if self.source is not None:
                meta["source"] = self.source
        return Document(doc_id, text, meta)

    def _id_prefix(self, path: str) -> str:
        return f"{self.source}/{self.relative(path)}" if self.source else self.relative(path)


class JsonlReader(Reader):
    """One JSON object per line with ``text`` (and optionally ``id`` and ``meta``; other keys go to meta)."""

    format = "jsonl"
    extensions = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".json.gz", ".json.zst")

    def __init__(self, paths: str | Sequence[str], *, text_key: str = "text", id_key: str = "id", **kw: Any):
        super().__init__(paths, **kw)
        self.text_key, self.id_key = text_key, id_key

    def read_file(self, path: str) -> Iterator[Document | Reject]:
        for item in self.records(path):
            yield item if isinstance(item, Reject) else self._from_record(*item)

    def read_records(self, files: Iterable[str], located: bool = False) -> Iterator[Any]:
        """The JSON objects of ``files`` as they are (no text field needed), bad lines and files as rejects;
        ``located=True`` gives ``(where, record)`` pairs (``file:line``), for rejects of a later stage."""
        for item in self._guarded(files, self.records):
            if isinstance(item, Reject):
                yield item
            else:
                yield (item[1], item[0]) if located else item[0]

    def records(self, path: str) -> Iterator[tuple[dict[str, Any], str, str] | Reject]:
        """``(record, where, default id)`` for each JSON object of one file; a line that is not one is a reject."""
        limit = self.max_doc_bytes + 1 if self.validate else -1
        with self.open_binary(path) as f:
            lineno = 0
            while line := f.readline(limit):  # a giant line is never held whole in memory
                lineno += 1
                where = f"{path}:{lineno}"
                if self.validate and len(line) > self.max_doc_bytes:
                    yield Reject(where, f"too_large: > {self.max_doc_bytes} bytes", preview(line))
                    while line and not line.endswith(b"\n"):  # skip the rest of it
                        line = f.readline(1 << 20)
                    continue
                if not line.strip():
                    continue
                try:
                    decoded = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield Reject(where, f"invalid_utf8: {err.reason} at byte {err.start}", preview(line))
                    continue
                try:
                    record = json.loads(decoded)
                except json.JSONDecodeError as err:
                    yield Reject(where, f"malformed_json: {err.msg}", preview(decoded))
                    continue
                if not isinstance(record, dict):
                    yield Reject(where, f"not_an_object: {type(record).__name__}", preview(decoded))
                    continue
                yield record, where, f"{self._id_prefix(path)}:{lineno}"

    def _from_record(self, record: dict[str, Any], where: str, default_id: str) -> Document | Reject:
        text = record.pop(self.text_key, None)
        raw_id = record.pop(self.id_key, None)
        meta = record.pop("meta", None)
        meta = dict(meta) if isinstance(meta, dict) else ({} if meta is None else {"meta": meta})
        meta.update(record)
        return self.document(default_id if raw_id is None else str(raw_id), text, meta, where)


class ParquetReader(JsonlReader):
    """Parquet files with a ``text`` column (``id``, ``meta`` as struct or JSON string, others to meta)."""

    format = "parquet"
    extensions = (".parquet",)
    batch_rows = 1024

    def records(self, path: str) -> Iterator[tuple[dict[str, Any], str, str] | Reject]:
        import pyarrow.parquet as pq

        with self.fs.open(path, "rb") as f:
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_rows):
                for record in batch.to_pylist():
                    meta = record.get("meta")
                    if isinstance(meta, str):
                        with contextlib.suppress(json.JSONDecodeError):  # else kept as meta["meta"]
                            record["meta"] = json.loads(meta)
                    yield record, f"{path}#{row}", f"{self._id_prefix(path)}#{row}"
                    row += 1


class TextReader(Reader):
    """Each file is one document (UTF-8)."""

    format = "txt"
    extensions = (".txt",)
    default_files_per_task = 256

    def read_file(self, path: str) -> Iterator[Document | Reject]:
        if self.validate and self.fs.size(path) > self.max_doc_bytes:
            yield Reject(path, f"too_large: > {self.max_doc_bytes} bytes")
            return
        with self.open_binary(path) as f:
            raw = f.read()
        try:
            text = self.decode(raw)
        except (UnicodeDecodeError, LookupError) as err:
            yield Reject(path, f"invalid_utf8: {err}", preview(raw))
            return
        yield self.document(self._id_prefix(path), text, self.file_meta(path), path)

    def decode(self, raw: bytes) -> str:
        return raw.decode("utf-8-sig")

    def file_meta(self, path: str) -> dict[str, Any]:
        return {"path": self.relative(path)}


class CodeReader(TextReader):
    """Each source file is one document, with ``meta.language``, ``meta.path`` and ``meta.licence`` (the SPDX
    identifier its header names, or None); files of other extensions in the tree are not read."""

    format = "code"
    extensions = tuple(code.LANGUAGES)
    default_files_per_task = 256

    def file_meta(self, path: str) -> dict[str, Any]:
        return {"path": self.relative(path), "language": code.language_of(path)}

    def document(self, doc_id: str, text: Any, meta: dict[str, Any], where: str) -> Document | Reject:
        doc = super().document(doc_id, text, meta, where)
        if isinstance(doc, Document):
            doc.meta["licence"] = code.licence_of(doc.text)
        return doc


class HtmlReader(TextReader):
    """Each file is one HTML page, passed on raw with ``meta.format = "html"`` for the extraction step."""

    format = "html"
    extensions = (".html", ".htm")

    def decode(self, raw: bytes) -> str:
        return _decode_html(raw)

    def file_meta(self, path: str) -> dict[str, Any]:
        return {"path": self.relative(path), "format": "html"}


class WarcReader(Reader):
    """HTML ``response`` records of WARC files (warcio); other records (requests, images...) are skipped."""

    format = "warc"
    extensions = (".warc", ".warc.gz")

    def read_file(self, path: str) -> Iterator[Document | Reject]:
        from warcio.archiveiterator import ArchiveIterator

        with self.fs.open(path, "rb") as f:
            for record in ArchiveIterator(f):
                if record.rec_type != "response" or record.http_headers is None:
                    continue
                content_type = record.http_headers.get_header("Content-Type") or ""
                if not content_type.lower().startswith(("text/html", "application/xhtml")):
                    continue
                record_id = record.rec_headers.get_header("WARC-Record-ID") or ""
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                where = f"{path}@{record_id}"
                raw = record.content_stream().read(self.max_doc_bytes + 1 if self.validate else -1)
                if self.validate and len(raw) > self.max_doc_bytes:
                    yield Reject(where, f"too_large: > {self.max_doc_bytes} bytes", preview(raw), record_id)
                    continue
                try:
                    text = self._decode(raw, content_type)
                except (UnicodeDecodeError, LookupError) as err:
                    yield Reject(where, f"invalid_utf8: {err}", preview(raw), record_id)
                    continue
                meta = {
                    "url": url,
                    "date": record.rec_headers.get_header("WARC-Date"),
                    "format": "html",
                    "warc_file": self.relative(path),
                }
                yield self.document(record_id.strip("<>"), text, meta, where)

    @staticmethod
    def _decode(raw: bytes, content_type: str) -> str:
        match = re.search(r"charset=([A-Za-z0-9_.:-]+)", content_type)
        if match:
            return raw.decode(match.group(1))
        return _decode_html(raw)


READERS: dict[str, type[Reader]] = {
    cls.format: cls for cls in (JsonlReader, ParquetReader, TextReader, HtmlReader, WarcReader, CodeReader)
}


def format_of(path: str) -> str:
    """The reader format for a file name, from its extension."""
    for name, cls in READERS.items():
        if path.endswith(cls.extensions):
            return name
    raise ValueError(f"cannot tell the format of {path!r}; say format: one of {', '.join(READERS)}")


def detect_format(paths: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> str:
    """The one reader format of every file matching ``paths`` (from their extensions)."""
    probe = JsonlReader(paths, storage_options=storage_options)
    probe.extensions = tuple(ext for cls in READERS.values() for ext in cls.extensions)
    kinds = {format_of(f) for f in probe.files()}
    if len(kinds) != 1:
        raise ValueError(f"{paths}: files of several formats ({', '.join(sorted(kinds))}); split the input")
    return kinds.pop()


def make_reader(paths: str | Sequence[str], format: str = "auto", **kwargs: Any) -> Reader:
    """A reader for ``paths``; ``format="auto"`` decides from the files' extensions."""
    if format == "auto":
        format = detect_format(paths, kwargs.get("storage_options"))
    if format not in READERS:
        raise ValueError(f"unknown input format {format!r}; one of {', '.join(READERS)}")
    return READERS[format](paths, **kwargs)


# --- writers -------------------------------------------------------------------------------------------


class _AtomicFile:
    """A file written under ``<path>.tmp`` and renamed onto ``path`` by :meth:`commit`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path, self.tmp = fs, path, path + ".tmp"
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.raw: IO[bytes] = fs.open(self.tmp, "wb")

    def commit(self) -> None:
        self.raw.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        self.raw.close()
        if self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)


class JsonlRecordFile:
    """JSON lines, optionally gzip (timestamp-free header) or zstd, committed atomically."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.file = _AtomicFile(fs, path)
        self.stream: IO[bytes]
        if path.endswith(".gz"):
            self.stream = gzip.GzipFile(
                filename="", mode="wb", fileobj=self.file.raw, mtime=0, compresslevel=6
            )
        elif path.endswith(".zst"):
            import zstandard

            self.stream = zstandard.ZstdCompressor(level=3).stream_writer(self.file.raw, closefd=False)
        else:
            self.stream = self.file.raw
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.count += 1

    def commit(self) -> None:
        if self.stream is not self.file.raw:
            self.stream.close()
        self.file.commit()

    def abort(self) -> None:
        if self.stream is not self.file.raw:
            self.stream.close()
        self.file.abort()


class ParquetRecordFile:
    """Documents as Parquet (``id``, ``text`` and ``meta`` as a JSON string), committed atomically."""

    rows_per_group = 8192

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("meta", pa.string())])
        self.file = _AtomicFile(fs, path)
        self.writer = pq.ParquetWriter(self.file.raw, self.schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self.rows.append({**record, "meta": json.dumps(record["meta"], ensure_ascii=False, sort_keys=True)})
        self.count += 1
        if len(self.rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        self.file.commit()

    def abort(self) -> None:
        self.writer.close()
        self.file.abort()


class Writer:
    """Writes each task's documents to ``<folder>/<task:05d><suffix>`` (jsonl, jsonl.gz, jsonl.zst, parquet)."""

    SUFFIXES: ClassVar[dict[str, str]] = {
        "jsonl": ".jsonl",
        "jsonl.gz": ".jsonl.gz",
        "jsonl.zst": ".jsonl.zst",
        "parquet": ".parquet",
    }

    def __init__(self, folder: str, format: str = "jsonl.gz", storage_options: dict[str, Any] | None = None):
        if format not in self.SUFFIXES:
            raise ValueError(f"unknown output format {format!r}; one of {', '.join(self.SUFFIXES)}")
        self.folder, self.format = folder, format
        self.fs, self.root = url_to_fs(folder, **(storage_options or {}))

    def path(self, task: int) -> str:
        return posixpath.join(self.root, f"{task:05d}{self.SUFFIXES[self.format]}")

    def open(self, task: int) -> JsonlRecordFile | ParquetRecordFile:
        if self.format == "parquet":
            return ParquetRecordFile(self.fs, self.path(task))
        return JsonlRecordFile(self.fs, self.path(task))

    def reader(self) -> Reader:
        """A reader of what this writer wrote, unchanged (no validation, no source rewrite)."""
        cls = ParquetReader if self.format == "parquet" else JsonlReader
        return cls(self.folder, validate=False)


def read_documents(
    path: str | os.PathLike[str], format: str = "auto", **reader_options: Any
) -> Iterator[Document]:
    """Every valid document under ``path`` (a file, folder or glob), in file order; rejects are skipped.
    ``reader_options`` go to the reader (``text_key="instruction"``...)."""
    reader = make_reader(str(path), format, **reader_options)
    for item in reader.read(reader.files()):
        if isinstance(item, Document):
            yield item


def read_records(
    path: str | os.PathLike[str] | Sequence[str],
    format: str = "auto",
    located: bool = False,
    **reader_options: Any,
) -> Iterator[Any]:
    """Every JSON object under ``path`` (JSONL, .gz/.zst, Parquet; local or fsspec; files, folders, globs), in
    file order, as it is; a line or file that cannot be read comes as a :class:`Reject` saying why, and the
    reading goes on (a cut-off last line, as a killed writer leaves, is one such reject). ``located=True``
    yields ``(where, record)`` pairs instead of records."""
    paths = [str(p) for p in path] if isinstance(path, list | tuple) else str(path)
    reader = make_reader(paths, format, **reader_options)
    if not isinstance(reader, JsonlReader):
        raise ValueError(f"{path}: records are read from JSONL or Parquet files, not {reader.format}")
    return reader.read_records(reader.files(), located)


def write_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write JSON records to one JSONL file (compressed by its extension, committed atomically); returns
    the count."""
    fs, root = url_to_fs(str(path))
    out = JsonlRecordFile(fs, root)
    for record in records:
        out.write(record)
    out.commit()
    return out.count


def write_jsonl(path: str | os.PathLike[str], docs: Iterable[Document]) -> int:
    """Write documents to one JSONL file (compressed by its extension); returns the count."""
    return write_records(path, (doc.to_record() for doc in docs))


__all__ = [
    "DEFAULT_MAX_DOC_BYTES",
    "READERS",
    "CodeReader",
    "HtmlReader",
    "JsonlReader",
    "ParquetReader",
    "Reader",
    "Reject",
    "TextReader",
    "WarcReader",
    "Writer",
    "detect_format",
    "format_of",
    "make_reader",
    "read_documents",
    "read_records",
    "write_jsonl",
    "write_records",
]
