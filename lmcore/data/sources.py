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

import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from lmcore.data.sample_corpus import SAMPLE_CORPUS_VERSION, sample_reviews
from lmcore.errors import DataError, first_line
from lmcore.reading import DECOMPRESS_ERRORS, json_value, regular_file

SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".txt", ".txt.gz")
LOCAL_HINT = (
    "use a local copy instead: data.source=PATH with a folder holding train.jsonl.gz/test.jsonl.gz "
    "(or .parquet/.csv/.txt), an aclImdb folder, or a pattern like data/{split}.jsonl; "
    "or data.source=sample for the built-in corpus"
)
# Reviews can be long, and a CSV file is read whole anyway: the csv module's default limit on one
# field (128 Ki characters) would refuse a long review. A field longer than this is a quote left open.
CSV_FIELD_LIMIT = 1 << 26


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
        if not os.path.lexists(path):
            raise DataError(f"data file {path} (from pattern {source!r}) does not exist")
        return _file_kind(regular_file(path, "data file")), path
    path = Path(source)
    if not os.path.lexists(path):
        raise DataError(
            f"data path {path} does not exist; set data.source to an existing folder or file, "
            "or data.source=sample for the built-in corpus"
        )
    if not path.is_dir():  # a file, or a FIFO, a device, a dangling symlink: refused, never opened
        regular_file(path, "data.source")
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
    found = [path / f"{split}{s}" for s in SPLIT_SUFFIXES if os.path.lexists(path / f"{split}{s}")]
    if not found:
        raise DataError(
            f"no file for split {split!r} in {path}; expected one of "
            + ", ".join(f"{split}{s}" for s in SPLIT_SUFFIXES)
            + f" or an aclImdb-style folder {split}/pos"
        )
    if len(found) > 1:
        raise DataError(f"several files for split {split!r} in {path}: {', '.join(map(str, found))}")
    return _file_kind(regular_file(found[0], "data file")), found[0]


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
                st = _review_stat(f)
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            return f"aclimdb:{path.resolve()}:{h.hexdigest()}"
        h.update(self._bytes())
        return f"{self.kind}:{h.hexdigest()}"

    def _bytes(self) -> bytes:
        if self._data is None:
            try:
                self._data = regular_file(self.location, "data file").read_bytes()
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
            self.identity  # noqa: B018 -- checks every review is a regular file before one is opened
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
        except (OSError, *DECOMPRESS_ERRORS) as e:  # a truncated, corrupt or fake .gz
            raise DataError(f"cannot read {path}: {first_line(e)}; it is not intact gzip data: "
                            "restore the file or re-create it") from None
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
            row = json_value(line)
        except ValueError as e:  # bad syntax, too deep, a huge number, a lone surrogate
            reason = f"malformed JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            raise DataError(f"{path}:{lineno}: {reason}; fix or remove the line") from None
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
    reader = csv.DictReader(io.StringIO(text, newline=""))  # as csv wants: \r, \n and \r\n end a line
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide: put back when done
    try:
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise DataError(
                f"{path}: no column {text_field!r} (found: {', '.join(reader.fieldnames or [])}); "
                "set data.text_field"
            )
        for row in reader:
            yield row[text_field] or ""
    except csv.Error as e:  # a field over the limit: a quote left open swallows the lines after it
        why = first_line(e)
        hint = ": is a quote left open before it?" if "field limit" in why else ""
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({why}); fix the line{hint}") from None
    finally:
        csv.field_size_limit(limit)


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
            except OSError as e:  # gone, or turned into a folder, since the tree was listed
                raise DataError(f"cannot read review file {f}: {first_line(e)}; remove it or restore it, "
                                "then run again") from None


def _review_stat(f: Path) -> os.stat_result:
    """The stat of one file of an aclImdb tree, if it is a regular file (one call: 100k files)."""
    try:
        st = f.stat()
    except OSError as e:  # a dangling symlink, or no permission on a folder
        raise DataError(f"cannot read review file {f}: {first_line(e)}"
                        f"{' (a dangling symlink)' if f.is_symlink() else ''}; remove it or restore it"
                        ) from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                else "a device or socket")
        raise DataError(f"review file {f} is {kind}, not a regular file; remove or rename it")
    return st


def _pyarrow():
    """pyarrow, for Parquet files (deferred: an optional dependency, and slow to import)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet files needs pyarrow: pip install 'lmcore[hub]'") from None
    return pa, pq


HUB_PROBE_S = 5.0  # seconds the hub gets to accept a connection before lmcore takes it as unreachable
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _load_hub(name: str, split: str):
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # Without a network the hub client retries each request for half a minute, a warning a second:
    # ask first whether the hub answers at all, and if not, look only in the local datasets cache.
    offline = None if _hub_not_needed(name) else _hub_unreachable()
    try:  # deferred: an optional dependency, and a second to import
        import datasets
    except ImportError:
        raise DataError(f"data.source hub:{name} needs the datasets package: pip install 'lmcore[hub]'; "
                        f"{LOCAL_HINT}") from None
    try:
        with _quiet_hub(offline_mode=bool(offline)):
            return datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as e:  # no network, or the hub refused
        if offline:
            raise DataError(f"cannot reach the hub ({offline}) and {name!r} is not in the local datasets "
                            f"cache; {LOCAL_HINT}") from None
        raise DataError(f"could not load {name!r} from the hub ({first_line(e)}); {LOCAL_HINT}") from None
    except ValueError as e:  # unknown split
        raise DataError(f"hub dataset {name!r}: {first_line(e)}") from None


def _hub_not_needed(name: str) -> bool:
    """A local dataset folder, or offline mode asked for: the hub is never contacted."""
    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return os.path.isdir(name) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_unreachable() -> str | None:
    """Why the hub's host takes no connection (no DNS, refused, no answer), or None if it does.

    Behind a proxy the host is not reached directly, so there the hub client is left to find out."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a bad port in HF_ENDPOINT: the hub client says so
        return None
    outcome: list[str | None] = []

    def probe() -> None:  # in a thread: a resolver that hangs has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{host}: {first_line(e)}")

    thread = threading.Thread(target=probe, name="lmcore-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_S + 1)
    return outcome[0] if outcome else f"{host}: no answer in {HUB_PROBE_S:g} s"


@contextlib.contextmanager
def _quiet_hub(offline_mode: bool) -> Iterator[None]:
    """The hub's loggers held to errors (their retry warnings are no part of lmcore's one line), and
    offline mode on where the hub is unreachable (the flags both libraries read HF_HUB_OFFLINE into)."""
    import datasets.config
    import huggingface_hub.constants

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [getattr(m, a, None) for m, a in flags]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if offline_mode:
        for m, a in flags:
            if hasattr(m, a):
                setattr(m, a, True)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for (m, a), v in zip(flags, saved, strict=True):
            if v is not None:
                setattr(m, a, v)


def _hub_texts(ds, name: str, text_field: str) -> list[str]:
    if text_field not in ds.column_names:
        raise DataError(
            f"hub dataset {name!r} has no column {text_field!r} (found: {', '.join(ds.column_names)}); "
            "set data.text_field"
        )
    return list(ds[text_field])
