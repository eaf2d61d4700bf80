"""Where review texts come from: the built-in sample, the hub, or local files.

`data.source` is one of
- "sample": the built-in synthetic reviews (no network, no files);
- "hub:NAME": `datasets.load_dataset(NAME, split=...)` (needs network);
- a folder: `{split}.jsonl[.gz]`, `.parquet`, `.csv` or `.txt[.gz]` inside it, or an
  aclImdb-style tree (`train/pos/*.txt`, `train/neg/*.txt`, `train/unsup/*.txt`);
- a path pattern with "{split}", e.g. `data/{split}.jsonl`;
- a single file, which serves the train split only.

Each source also yields an identity string for the token cache key: file contents (or
names, sizes and times for large trees), so an edited file never reuses stale ids.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from lmcore.data.sample_corpus import SAMPLE_CORPUS_VERSION, sample_reviews
from lmcore.errors import DataError, first_line

SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".txt", ".txt.gz")
LOCAL_HINT = (
    "use a local copy instead: data.source=PATH with a folder holding train.jsonl.gz/test.jsonl.gz "
    "(or .parquet/.csv/.txt), an aclImdb folder, or a pattern like data/{split}.jsonl; "
    "or data.source=sample for the built-in corpus"
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(SPLIT_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def resolve_split(source: str, split: str) -> tuple[str, Path | str]:
    """Return (kind, location) for one split of a source; kind names the reader."""
    if source == "sample":
        if split not in ("train", "test"):
            raise DataError(f"the built-in sample corpus has splits train and test, not {split!r}")
        return "sample", split
    if source.startswith("hub:"):
        return "hub", source[4:]
    if "{split}" in source:
        path = Path(source.replace("{split}", split))
        if not path.is_file():
            raise DataError(f"data file {path} (from pattern {source!r}) does not exist")
        return _file_kind(path), path
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist; set data.source to an existing folder or file, "
            "or data.source=sample for the built-in corpus"
        )
    if path.is_file():
        if split != "train":
            raise DataError(
                f"data.source {path} is a single file, which serves only the train split; "
                f"give a folder or a '{{split}}' pattern to have a {split!r} split, "
                "or set data.val_split='' to train without validation"
            )
        return _file_kind(path), path
    acl = path / split
    if acl.is_dir() and any((acl / sub).is_dir() for sub in ("pos", "neg", "unsup")):
        return "aclimdb", acl
    found = [path / f"{split}{s}" for s in SPLIT_SUFFIXES if (path / f"{split}{s}").is_file()]
    if not found:
        raise DataError(
            f"no file for split {split!r} in {path}; expected one of "
            + ", ".join(f"{split}{s}" for s in SPLIT_SUFFIXES)
            + f" or an aclImdb-style folder {split}/pos"
        )
    if len(found) > 1:
        raise DataError(f"several files for split {split!r} in {path}: {', '.join(map(str, found))}")
    return _file_kind(found[0]), found[0]


def _file_kind(path: Path) -> str:
    s = _suffix(path)
    kinds = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".parquet": "parquet",
             ".csv": "csv", ".txt": "text", ".txt.gz": "text"}
    if s not in kinds:
        raise DataError(f"data file {path} has an unknown format; use one of {', '.join(SPLIT_SUFFIXES)}")
    return kinds[s]


class Split:
    """One split of a data source, read at most once per job: its identity (the token cache key:
    a file's sha256, a hub dataset's fingerprint) and its texts come from the same read."""

    def __init__(self, source: str, split: str, text_field: str = "text"):
        self.source, self.split, self.text_field = source, split, text_field
        self.kind, self.location = resolve_split(source, split)
        self._identity: str | None = None
        self._data: bytes | None = None  # a file's bytes: hashed, then parsed
        self._hub = None  # a datasets.Dataset

    @property
    def identity(self) -> str:
        """A string that changes whenever the split's content may have changed."""
        if self._identity is None:
            self._identity = self._make_identity()
        return self._identity

    def _make_identity(self) -> str:
        if self.kind == "sample":
            return f"sample:v{SAMPLE_CORPUS_VERSION}:{self.split}"
        if self.kind == "hub":  # a new revision on the hub is a new fingerprint
            return f"hub:{self.location}:{self.split}:{self._dataset()._fingerprint}"
        path = Path(self.location)
        h = hashlib.sha256()
        if self.kind == "aclimdb":  # 100k small files: names, sizes and times, not contents
            for f in sorted(path.glob("*/*.txt")):
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            return f"aclimdb:{path.resolve()}:{h.hexdigest()}"
        h.update(self._bytes())
        return f"{self.kind}:{h.hexdigest()}"

    def _bytes(self) -> bytes:
        if self._data is None:
            try:
                self._data = Path(self.location).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {self.location}: {first_line(e)}") from None
        return self._data

    def _dataset(self):
        if self._hub is None:
            self._hub = _load_hub(str(self.location), self.split)
        return self._hub

    def texts(self) -> list[str]:
        path = Path(str(self.location))
        if self.kind == "sample":
            texts = [r["text"] for r in sample_reviews(str(self.location))]
        elif self.kind == "hub":
            texts = _hub_texts(self._dataset(), str(self.location), self.text_field)
        elif self.kind == "aclimdb":
            texts = list(_read_aclimdb(path))
        elif self.kind == "jsonl":
            texts = list(_read_jsonl(path, self._bytes(), self.text_field))
        elif self.kind == "text":
            texts = list(_read_text_lines(path, self._bytes()))
        elif self.kind == "csv":
            texts = list(_read_csv(path, self._bytes(), self.text_field))
        else:
            texts = _read_parquet(path, self._bytes(), self.text_field)
        self._data = None  # parsed: the bytes are not needed again
        if not texts:
            raise DataError(f"split {self.split!r} of {self.source} holds no texts; check the path and split")
        return texts


def source_identity(source: str, split: str) -> str:
    return Split(source, split).identity


def read_texts(source: str, split: str, text_field: str = "text") -> list[str]:
    return Split(source, split, text_field).texts()


def _lines(path: Path, data: bytes) -> Iterator[tuple[int, str]]:
    """Numbered lines, decoded strictly: a bad byte names its file and line."""
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:  # a truncated or fake .gz
            raise DataError(f"cannot read {path}: {first_line(e)}") from None
    for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                            ) from None


def _read_jsonl(path: Path, data: bytes, text_field: str) -> Iterator[str]:
    for lineno, line in _lines(path, data):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{path}:{lineno}: no field {text_field!r} (found: {keys}); "
                "set data.text_field to the field holding the text"
            )
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
        yield text


def _read_text_lines(path: Path, data: bytes) -> Iterator[str]:
    for _, line in _lines(path, data):
        if line.strip():
            yield line.rstrip("\n")


def _read_csv(path: Path, data: bytes, text_field: str) -> Iterator[str]:
    text = "".join(line for _, line in _lines(path, data))
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or text_field not in reader.fieldnames:
        raise DataError(
            f"{path}: no column {text_field!r} (found: {', '.join(reader.fieldnames or [])}); "
            "set data.text_field"
        )
    for row in reader:
        yield row[text_field] or ""


def _read_parquet(path: Path, data: bytes, text_field: str) -> list[str]:
    pa, pq = _pyarrow()
    try:
        schema = pq.read_schema(pa.BufferReader(data))
        if text_field not in schema.names:
            raise DataError(
                f"{path}: no column {text_field!r} (found: {', '.join(schema.names)}); set data.text_field"
            )
        column = pq.read_table(pa.BufferReader(data), columns=[text_field]).column(0)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {first_line(e)}") from None
    return [t or "" for t in column.to_pylist()]


def _read_aclimdb(split_dir: Path) -> Iterator[str]:
    """neg, pos, unsup; files by the numeric id in their name (`123_4.txt`), as the hub does."""

    def file_id(p: Path) -> tuple[int, str]:
        head = p.stem.split("_")[0]
        return (int(head), p.name) if head.isdigit() else (1 << 62, p.name)

    for sub in ("neg", "pos", "unsup"):
        for f in sorted((split_dir / sub).glob("*.txt"), key=file_id):
            try:
                yield f.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not valid UTF-8 (byte {e.start}); re-encode the file") from None


def _pyarrow():
    """pyarrow, for Parquet files (deferred: an optional dependency, and slow to import)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet files needs pyarrow: pip install 'lmcore[hub]'") from None
    return pa, pq


def _load_hub(name: str, split: str):
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:  # deferred: an optional dependency, and a second to import
        import datasets
    except ImportError:
        raise DataError(f"data.source hub:{name} needs the datasets package: pip install 'lmcore[hub]'; "
                        f"{LOCAL_HINT}") from None
    try:
        return datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as e:  # no network, or the hub refused
        raise DataError(f"could not load {name!r} from the hub ({first_line(e)}); {LOCAL_HINT}") from None
    except ValueError as e:  # unknown split
        raise DataError(f"hub dataset {name!r}: {first_line(e)}") from None


def _hub_texts(ds, name: str, text_field: str) -> list[str]:
    if text_field not in ds.column_names:
        raise DataError(
            f"hub dataset {name!r} has no column {text_field!r} (found: {', '.join(ds.column_names)}); "
            "set data.text_field"
        )
    return list(ds[text_field])
