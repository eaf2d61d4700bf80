"""Prompt inputs for bulk generation, streamed: a file of a million prompts is never held in
memory, only the records of the chunk being worked on.

Formats (by name; a trailing .gz is read through gzip):
  *.jsonl, *.ndjson, *.json   one JSON object per line with an "id" (string or integer) and a
                              "prompt" (string); blank lines are skipped
  anything else               plain text, one prompt per line; the id is the line number
                              (1-based), an empty line is an empty prompt (generation from <bos>)
  no file                     `num_samples` unconditional prompts, ids 0 .. num_samples-1

Every record has an `index`: its 0-based line in the file (or its sample number), the
position that sharding, chunking and the merged output's order are based on.

`scan()` reads the whole file once before any work: it checks every line (a malformed one
is an error naming file and line, or with bad_lines="skip" a reject: malformed or unusable JSON,
a missing field, a prompt of more than max_words words), finds duplicate ids,
counts records per chunk and fingerprints the file. Every process of a job scans the same
file and reaches the same verdict, so a bad input stops all of them before any work.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from lmcore.errors import DataError, LmcoreError, first_line
from lmcore.fileio import sha256_file
from lmcore.reading import DECOMPRESS_ERRORS, json_value, regular_file

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class PromptRecord:
    index: int  # 0-based line of the file (unconditional: the sample number)
    id: int | str
    text: str


class BadLine(Exception):
    def __init__(self, lineno: int, why: str, raw: bytes):
        super().__init__(why)
        self.lineno, self.why, self.raw = lineno, why, raw


@dataclass
class ScanResult:
    kind: str  # "jsonl", "text" or "unconditional"
    lines: int  # positions (file lines, or unconditional samples): what chunks are cut from
    records: int  # valid prompts
    chunk_records: list[int]  # valid prompts per chunk of chunk_size lines
    rejected: int = 0
    blank_lines: int = 0
    sha256: str = ""
    bytes: int = 0
    skip: set[int] = field(default_factory=set)  # line indices rejected (bad_lines=skip)

    def describe(self) -> dict:
        return {"kind": self.kind, "lines": self.lines, "records": self.records, "rejected": self.rejected,
                "blank_lines": self.blank_lines, "sha256": self.sha256, "bytes": self.bytes}


def _id_key(value: int | str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _id_hash(value: int | str) -> int:
    """A cheap 64-bit hash for finding candidate duplicates within one process (Python's own,
    salted per process; candidates are then compared exactly)."""
    return hash((type(value) is int, value))


class PromptSource:
    """A prompts file, or num_samples unconditional prompts."""

    def __init__(self, path: str | Path | None = None, num_samples: int = 0, max_words: int = 0):
        self.path = Path(path) if path else None
        self.num_samples = num_samples
        self.max_words = max_words  # a prompt of more words is a bad line; 0 = no limit
        if self.path is None:
            self.kind = "unconditional"
        else:
            name = self.path.name.lower().removesuffix(".gz")
            self.kind = "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"

    def describe(self) -> str:
        return str(self.path) if self.path else f"{self.num_samples} unconditional samples"

    # -- reading lines --------------------------------------------------------------------------
    def check(self) -> None:
        """The prompts file exists and is a regular file (a FIFO would block open() for ever, a
        device such as /dev/zero never ends): checked before it is opened."""
        if self.path is None:
            return
        if not self.path.exists():
            raise DataError(f"prompts file {self.path} does not exist; set generate.prompts to a "
                            "JSONL file ({\"id\": ..., \"prompt\": ...} per line) or a text file")
        if self.path.is_dir():
            raise DataError(f"generate.prompts {self.path} is a folder; pass a JSONL or text file")
        try:
            regular_file(self.path, "generate.prompts")
        except LmcoreError as e:
            raise DataError(str(e)) from None

    def _open(self) -> IO[bytes]:
        assert self.path is not None
        self.check()
        try:
            return gzip.open(self.path, "rb") if self.path.name.endswith(".gz") else open(self.path, "rb")
        except OSError as e:
            raise DataError(f"cannot read prompts file {self.path}: {first_line(e)}") from None

    def _raw_lines(self) -> Iterator[tuple[int, bytes]]:
        """(0-based index, raw bytes) of every line, newline included."""
        f = self._open()
        try:
            with f:
                yield from enumerate(f)
        except DECOMPRESS_ERRORS as e:  # not gzip at all, truncated, or damaged compressed data
            raise DataError(f"cannot read prompts file {self.path}: damaged, truncated or not gzip data "
                            f"({first_line(e)}); compress it again from the original") from None
        except OSError as e:  # a read error
            raise DataError(f"cannot read prompts file {self.path}: {first_line(e)}") from None

    def parse(self, index: int, raw: bytes) -> PromptRecord | None:
        """The record on one line; None for a blank JSONL line; BadLine if malformed."""
        lineno = index + 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadLine(lineno, f"not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8",
                          raw) from None
        if self.kind == "text":
            return PromptRecord(index, lineno, self._checked_length(lineno, line.rstrip("\r\n"), raw))
        if not line.strip():
            return None
        try:
            obj = json_value(line)
        except json.JSONDecodeError as e:
            raise BadLine(lineno, f"malformed JSON ({e.msg}); fix or remove the line", raw) from None
        except ValueError as e:  # nested too deeply, an over-long integer, a lone surrogate
            raise BadLine(lineno, f"unusable JSON: {first_line(e)}; fix or remove the line", raw) from None
        if not isinstance(obj, dict):
            raise BadLine(lineno, "expected a JSON object with \"id\" and \"prompt\", got "
                                  f"{type(obj).__name__}", raw)
        missing = [k for k in ("id", "prompt") if k not in obj]
        if missing:
            found = ", ".join(obj)[:100] or "none"
            raise BadLine(lineno, f"missing field {' and '.join(repr(k) for k in missing)} (found: {found}); "
                                  "each line needs \"id\" and \"prompt\"", raw)
        pid, text = obj["id"], obj["prompt"]
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise BadLine(lineno, "field 'id' must be a string or an integer, got "
                                  f"{json.dumps(pid)[:40]}", raw)
        if not isinstance(text, str):
            raise BadLine(lineno, f"field 'prompt' must be a string, got {json.dumps(text)[:40]}", raw)
        return PromptRecord(index, pid, self._checked_length(lineno, text, raw))

    def _checked_length(self, lineno: int, text: str, raw: bytes) -> str:
        """The text, unless it has more than max_words words (the model reads every word of a
        prompt before it writes one: a prompt of millions would hold a job for hours)."""
        limit = self.max_words
        if limit and (len(text) + 1) // 2 > limit:  # else it cannot have more words than that
            words = len(text.split())
            if words > limit:
                raise BadLine(lineno, f"the prompt has {words} words, more than generate.max_prompt_words="
                                      f"{limit}; shorten it, or raise generate.max_prompt_words", raw)
        return text

    # -- the checking pass ---------------------------------------------------------------------
    def scan(self, chunk_size: int, bad_lines: str = "error",
             reject: Callable[[int, str, bytes], None] | None = None) -> ScanResult:
        """Check everything once (see the module docstring). reject(lineno, why, raw) gets each
        bad line when bad_lines="skip"."""
        if self.path is None:
            n = self.num_samples
            counts = [min(chunk_size, n - s) for s in range(0, n, chunk_size)]
            return ScanResult("unconditional", n, n, counts)
        counts: list[int] = []
        skip: set[int] = set()
        hashes = array("q")
        sha = hashlib.sha256()
        lines = records = blank = nbytes = 0
        raw_lines = self._raw_lines()
        for index, raw in raw_lines:
            lines = index + 1
            nbytes += len(raw)
            sha.update(raw)
            chunk = index // chunk_size
            if chunk == len(counts):
                counts.append(0)
            try:
                rec = self.parse(index, raw)
            except BadLine as bad:
                if bad_lines != "skip":
                    if self.path.name.endswith(".gz"):  # damaged data decodes to bad lines: say so
                        for _ in raw_lines:
                            pass
                    raise DataError(f"{self.path}:{bad.lineno}: {bad.why} "
                                    "(or set generate.bad_lines=skip to set bad lines aside)") from None
                skip.add(index)
                if reject is not None:
                    reject(bad.lineno, bad.why, raw)
                continue
            if rec is None:
                blank += 1
                continue
            counts[chunk] += 1
            records += 1
            if self.kind == "jsonl":
                hashes.append(_id_hash(rec.id))
        if self.path.name.endswith(".gz"):
            digest, nbytes = sha256_file(self.path), self.path.stat().st_size
        else:
            digest = sha.hexdigest()
        result = ScanResult(self.kind, lines, records, counts, len(skip), blank, digest, nbytes, skip)
        if hashes:
            self._duplicates(np.frombuffer(hashes, dtype=np.int64), result, chunk_size, bad_lines, reject)
        if result.records == 0:
            why = f" ({result.rejected} bad lines set aside in the rejects file)" if result.rejected else ""
            raise DataError(f"prompts file {self.path} holds no prompts{why}; one prompt per line (text) "
                            "or {\"id\": ..., \"prompt\": ...} per line (JSONL)")
        return result

    def _duplicates(self, hashes: np.ndarray, result: ScanResult, chunk_size: int, bad_lines: str,
                    reject: Callable[[int, str, bytes], None] | None) -> None:
        ordered = np.sort(hashes)
        dup = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not dup:
            return
        first_line: dict[str, int] = {}
        for index, raw in self._raw_lines():  # only the lines whose id hash repeats
            if index in result.skip:
                continue
            try:
                rec = self.parse(index, raw)
            except BadLine:
                continue
            if rec is None or _id_hash(rec.id) not in dup:
                continue
            key = _id_key(rec.id)
            if key not in first_line:
                first_line[key] = index + 1
                continue
            why = f"duplicate id {key} (first on line {first_line[key]}); ids must be unique"
            if bad_lines != "skip":
                raise DataError(f"{self.path}:{index + 1}: {why} "
                                "(or set generate.bad_lines=skip to set bad lines aside)")
            result.skip.add(index)
            result.rejected += 1
            result.records -= 1
            result.chunk_records[index // chunk_size] -= 1
            if reject is not None:
                reject(index + 1, why, raw)

    # -- streaming the records ------------------------------------------------------------------
    def records(self, wanted: Callable[[int], bool] = lambda i: True,
                skip: set[int] | frozenset[int] = frozenset()) -> Iterator[PromptRecord]:
        """Records in input order whose index passes wanted(index); only those are parsed.
        Lines in skip (rejected by scan) are left out; any other bad line is an error."""
        if self.path is None:
            for i in range(self.num_samples):
                if wanted(i):
                    yield PromptRecord(i, i, "")
            return
        for index, raw in self._raw_lines():
            if index in skip or not wanted(index):
                continue
            try:
                rec = self.parse(index, raw)
            except BadLine as bad:
                raise DataError(f"{self.path}:{bad.lineno}: {bad.why} (the file changed while in use?)"
                                ) from None
            if rec is not None:
                yield rec
