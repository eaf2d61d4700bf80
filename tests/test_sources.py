"""Where the reviews come from: every kind of `data.source`, and the token cache behind it.

A user points `data.source` at a file, a folder, a '{split}' pattern, an aclImdb tree, the
hub or the built-in sample, and gets the same list of review texts in the same order; the
tokenized splits are cached so the second run never reads the source again.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmcore.data.sources
from lmcore.config import DataConfig
from lmcore.data.cache import fit_tokenizer, load_split
from lmcore.data.sources import read_texts, source_identity
from lmcore.data.tokenizer import SPECIALS, WordTokenizer
from lmcore.errors import DataError, LmcoreError
from tests.conftest import IMDB
from tests.test_bad_inputs import one_error_line

REVIEWS = [
    "A quiet film, and a good one.",
    "Terrible acting; I left after an hour.",
    'She said "wow" twice, then nothing.',
]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: t, "label": i % 2}) + "\n" for i, t in enumerate(texts))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def data_cfg(source: Path | str, tmp_path: Path, **kw) -> DataConfig:
    """A data config with its own token cache, so every test starts from an empty one."""
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "token-cache"), **kw)


def cache_entries(tmp_path: Path, kind: str) -> list[str]:
    root = tmp_path / "token-cache" / kind
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# -- each source kind gives the texts, in file order ----------------------------------------
def test_jsonl_file_in_a_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    assert read_texts(str(tmp_path), "train") == REVIEWS


def test_gzipped_jsonl_and_a_single_file_source(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl.gz", REVIEWS)
    assert read_texts(str(tmp_path), "train") == REVIEWS
    assert read_texts(str(path), "train") == REVIEWS  # a single file serves the train split
    with pytest.raises(DataError, match="single file"):
        read_texts(str(path), "test")


def test_folder_with_one_file_per_split_in_different_formats(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    write_jsonl(tmp_path / "test.jsonl.gz", ["held out review"])
    assert read_texts(str(tmp_path), "train") == REVIEWS
    assert read_texts(str(tmp_path), "test") == ["held out review"]


def test_parquet(tmp_path):
    table = pa.table({"label": [1, 0, 1, 0], "text": [*REVIEWS, None]})
    pq.write_table(table, tmp_path / "train.parquet")
    assert read_texts(str(tmp_path), "train") == [*REVIEWS, ""]  # a null text is an empty review


def test_csv_with_quotes_commas_and_newlines_inside_a_field(tmp_path):
    (tmp_path / "train.csv").write_text(
        'id,text,label\n'
        '1,"A quiet film, and a good one.",1\n'
        '2,"Two lines:\nfirst, then second.",0\n'
        '3,"She said ""wow"" twice, then nothing.",1\n',
        encoding="utf-8",
    )
    assert read_texts(str(tmp_path), "train") == [
        "A quiet film, and a good one.",
        "Two lines:\nfirst, then second.",
        'She said "wow" twice, then nothing.',
    ]


def test_plain_text_one_review_per_line_blank_lines_skipped(tmp_path):
    (tmp_path / "train.txt").write_text("first review here\n\n  \nsecond review, café\n", encoding="utf-8")
    assert read_texts(str(tmp_path), "train") == ["first review here", "second review, café"]
    with gzip.open(tmp_path / "test.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped review\n")
    assert read_texts(str(tmp_path), "test") == ["gzipped review"]


def test_aclimdb_folder_neg_then_pos_by_numeric_id(tmp_path):
    files = {
        "pos/10_7.txt": "pos ten", "pos/2_8.txt": "pos two", "pos/0_9.txt": "pos zero",
        "neg/11_1.txt": "neg eleven", "neg/1_2.txt": "neg one",
    }
    for name, text in files.items():
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / name).write_text(text, encoding="utf-8")
    # Numeric, not alphabetical: 2 before 10, and all of neg before pos, as the hub orders them.
    assert read_texts(str(tmp_path), "train") == ["neg one", "neg eleven", "pos zero", "pos two", "pos ten"]
    before = source_identity(str(tmp_path), "train")
    assert before.startswith("aclimdb:")
    (tmp_path / "train" / "neg" / "3_1.txt").write_text("neg three", encoding="utf-8")
    assert source_identity(str(tmp_path), "train") != before  # a new review is a new identity


def test_split_pattern(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "imdb-train.jsonl", REVIEWS)
    write_jsonl(tmp_path / "data" / "imdb-test.jsonl", ["only test"])
    pattern = str(tmp_path / "data" / "imdb-{split}.jsonl")
    assert read_texts(pattern, "train") == REVIEWS
    assert read_texts(pattern, "test") == ["only test"]
    with pytest.raises(DataError, match="imdb-validation.jsonl"):
        read_texts(pattern, "validation")


def test_configurable_text_field_for_jsonl_csv_and_parquet(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", REVIEWS, field="review")
    assert read_texts(str(tmp_path), "train", text_field="review") == REVIEWS
    (tmp_path / "test.csv").write_text("body,label\nfine film,1\n", encoding="utf-8")
    assert read_texts(str(tmp_path), "test", text_field="body") == ["fine film"]
    pq.write_table(pa.table({"content": ["from parquet"]}), tmp_path / "extra.parquet")
    assert read_texts(str(tmp_path / "extra.parquet"), "train", text_field="content") == ["from parquet"]

    # The same field name reaches the tokenizer through data.text_field.
    tok = fit_tokenizer(data_cfg(tmp_path, tmp_path, text_field="review", min_count=1))
    assert {"quiet", "terrible", "acting;", "\"wow\""} <= set(tok.itos)  # whitespace split only
    csv_tok = fit_tokenizer(data_cfg(tmp_path / "test.csv", tmp_path, text_field="body", min_count=1))
    assert csv_tok.itos == [*SPECIALS, "fine", "film"]


def test_builtin_sample_corpus_is_deterministic(tmp_path):
    train = read_texts("sample", "train")
    assert len(train) == 2000 and len(read_texts("sample", "test")) == 200
    assert read_texts("sample", "train") == train
    assert read_texts("sample", "test") != train[:200]
    assert source_identity("sample", "train") == source_identity("sample", "train")
    assert source_identity("sample", "train") != source_identity("sample", "test")
    # Two fresh caches fit the very same vocabulary.
    a = fit_tokenizer(DataConfig(source="sample", cache_dir=str(tmp_path / "a")))
    b = fit_tokenizer(DataConfig(source="sample", cache_dir=str(tmp_path / "b")))
    assert a.itos == b.itos and a.fingerprint == b.fingerprint
    assert len(a) > 100


def test_file_identity_follows_the_content_not_the_time(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    first = source_identity(str(path), "train")
    assert source_identity(str(path), "train") == first
    path.write_text(path.read_text().replace("good", "dull"))  # same size, other bytes
    assert source_identity(str(path), "train") != first


# -- the token cache ----------------------------------------------------------------------
def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", REVIEWS * 3)
    cfg = data_cfg(tmp_path, tmp_path, min_count=1)
    tok = fit_tokenizer(cfg)
    first = load_split(cfg, "train", tok)
    assert len(first) == 9
    assert first.doc(1).tolist() == tok.encode(REVIEWS[1])
    assert len(cache_entries(tmp_path, "splits")) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the source was read again instead of the cache")

    monkeypatch.setattr(lmcore.data.sources.Split, "texts", refuse)
    again = load_split(cfg, "train", tok)
    np.testing.assert_array_equal(np.asarray(again.tokens), first.tokens)
    np.testing.assert_array_equal(np.asarray(again.offsets), first.offsets)
    assert fit_tokenizer(cfg).itos == tok.itos  # the tokenizer comes from the cache too
    assert not list((tmp_path / "token-cache").rglob(".tmp-*"))


def test_a_cold_cache_reads_the_training_file_once_and_a_warm_one_only_hashes_it(tmp_path, monkeypatch):
    """Fitting the tokenizer and encoding share one read; the cache key is that read's sha256."""
    from lmcore.data.cache import load_corpus

    path = write_jsonl(tmp_path / "train.jsonl", REVIEWS * 3)
    write_jsonl(tmp_path / "test.jsonl", REVIEWS)
    reads: list[str] = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: reads.append(p.name) or real(p))
    parsed: list[str] = []
    real_texts = lmcore.data.sources.Split.texts
    monkeypatch.setattr(lmcore.data.sources.Split, "texts", lambda s: parsed.append(s.split) or real_texts(s))
    cfg = data_cfg(tmp_path, tmp_path, min_count=1)
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 9 and len(corpus.val) == 1  # every 10th of the 3 test reviews
    assert reads == ["train.jsonl", "test.jsonl"] and parsed == ["train", "test"]
    reads.clear(), parsed.clear()
    again = load_corpus(cfg)  # warm: each file read once for its checksum, parsed never
    assert reads == ["train.jsonl", "test.jsonl"] and parsed == []
    assert again.tokenizer.itos == corpus.tokenizer.itos
    assert path.is_file()


def test_a_changed_file_gets_a_new_cache_entry(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["the film was good", "the film was dull"] * 3)
    cfg = data_cfg(path, tmp_path, min_count=1)
    tok = fit_tokenizer(cfg)
    before = load_split(cfg, "train", tok)
    assert before.doc(0).tolist() == tok.encode("the film was good")

    write_jsonl(path, ["the film was dull", "the film was good"] * 3)  # same reviews, other order
    after = load_split(cfg, "train", tok)
    assert after.doc(0).tolist() == tok.encode("the film was dull")
    assert before.doc(0).tolist() != after.doc(0).tolist()
    assert len(cache_entries(tmp_path, "splits")) == 2


def test_another_tokenizer_gets_another_cache_entry(tmp_path):
    texts = ["rare words here", "common common common", "common again common"]
    write_jsonl(tmp_path / "train.jsonl", texts)
    every_word = fit_tokenizer(data_cfg(tmp_path, tmp_path, min_count=1))
    frequent = fit_tokenizer(data_cfg(tmp_path, tmp_path, min_count=2))
    assert len(cache_entries(tmp_path, "tokenizers")) == 2
    assert "rare" in every_word.stoi and "rare" not in frequent.stoi

    cfg = data_cfg(tmp_path, tmp_path)
    with_all = load_split(cfg, "train", every_word)
    with_frequent = load_split(cfg, "train", frequent)
    assert len(cache_entries(tmp_path, "splits")) == 2
    assert with_all.doc(0).tolist() == [every_word.stoi[w] for w in ("rare", "words", "here")]
    assert with_frequent.doc(0).tolist() == [frequent.unk_id] * 3
    # Asking again with the first tokenizer reads its own entry back.
    assert load_split(cfg, "train", every_word).doc(0).tolist() == with_all.doc(0).tolist()


# -- the hub, offline -----------------------------------------------------------------------
def test_hub_offline_names_the_local_alternatives():
    with pytest.raises(DataError) as info:
        read_texts("hub:imdb", "train")
    message = str(info.value)
    assert "\n" not in message
    assert "imdb" in message
    assert "data.source=PATH" in message and "data.source=sample" in message


def test_a_hub_dataset_is_cached_by_its_fingerprint_so_a_new_revision_is_encoded_afresh(tmp_path):
    """The hub code path (datasets.load_dataset) on a local dataset folder, which works offline."""
    from lmcore.data.sources import Split

    ds = tmp_path / "ds"
    ds.mkdir()
    write_jsonl(ds / "train.jsonl", REVIEWS)
    cfg = data_cfg(f"hub:{ds}", tmp_path, min_count=1, val_split="")
    first = Split(cfg.source, "train")
    assert first.identity.startswith(f"hub:{ds}:train:") and first.texts() == REVIEWS
    tok = fit_tokenizer(cfg)
    assert len(load_split(cfg, "train", tok)) == len(REVIEWS)
    write_jsonl(ds / "train.jsonl", [*REVIEWS, "a new review"])  # the dataset's next revision
    assert Split(cfg.source, "train").identity != first.identity
    assert len(load_split(cfg, "train", tok)) == len(REVIEWS) + 1  # not the stale ids of the old one


# -- the real IMDB vocabulary -----------------------------------------------------------------
def test_imdb_vocabulary_is_the_notebooks(tmp_path):
    train_file = IMDB / "train.jsonl.gz"
    if not train_file.is_file():
        pytest.skip(f"real IMDB train split not found at {train_file} (set LMCORE_SHARED)")
    tok = fit_tokenizer(data_cfg(IMDB, tmp_path))

    # The notebook's rule, computed here independently: count > 5 over lowercase whitespace words.
    counts: Counter[str] = Counter()
    with gzip.open(train_file, "rt", encoding="utf-8") as f:
        for line in f:
            counts.update(json.loads(line)["text"].lower().split())
    notebook_vocab = {w for w, c in counts.items() if c > 5} | set(SPECIALS)

    assert len(tok) == 40_135
    assert set(tok.itos) == notebook_vocab
    assert tok.itos[:4] == list(SPECIALS)
    (entry,) = (tmp_path / "token-cache" / "tokenizers").iterdir()
    assert WordTokenizer.load(entry / "tokenizer.json").fingerprint == tok.fingerprint


# -- bad input that the catalogue (tests/test_bad_input_catalogue.py) cannot express --------------
def test_a_review_longer_than_the_csv_modules_field_limit_is_read_and_the_limit_put_back(tmp_path):
    import csv

    long_review = "a long review " * 20_000  # 280 KB: over csv's default 128 Ki characters
    (tmp_path / "train.csv").write_text(f'text,label\n"{long_review}",1\nshort one,0\n', encoding="utf-8")
    before = csv.field_size_limit()
    assert read_texts(str(tmp_path), "train") == [long_review, "short one"]
    assert csv.field_size_limit() == before


def test_a_csv_with_old_mac_line_endings_is_read(tmp_path):
    (tmp_path / "train.csv").write_bytes(b'text,label\r"two\rlines",1\rplain,0\r')
    assert read_texts(str(tmp_path), "train") == ["two\rlines", "plain"]


def test_a_csv_field_over_the_limit_names_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(lmcore.data.sources, "CSV_FIELD_LIMIT", 1000)
    (tmp_path / "train.csv").write_text('text\nfine\nalso fine\n"open quote\n' + "more words\n" * 200)
    with pytest.raises(DataError, match=r"train\.csv:\d+: not valid CSV .*quote left open"):
        read_texts(str(tmp_path), "train")


def test_a_min_count_above_every_word_names_the_most_frequent_word_and_its_count():
    with pytest.raises(DataError, match=r"min_count=50 .* 'film', occurs 3 times\); lower data.min_count to "
                                        r"at most 3"):
        WordTokenizer.fit(["film film", "a film"], min_count=50)
    with pytest.raises(DataError, match="no words"):
        WordTokenizer.fit(["  ", "\n"], min_count=1)
    assert WordTokenizer.fit(["film film", "a film"], min_count=3).itos == [*SPECIALS, "film"]


def test_no_data_path_opens_a_fifo_or_reads_a_device(tmp_path):
    """Each is refused from its stat: open() on a FIFO blocks forever, /dev/zero never ends."""
    os.mkfifo(tmp_path / "train.jsonl")
    for source in (tmp_path / "train.jsonl", tmp_path, tmp_path / "{split}.jsonl"):
        with pytest.raises(LmcoreError, match=r"train\.jsonl is a FIFO \(named pipe\), not a regular file"):
            read_texts(str(source), "train")
    with pytest.raises(LmcoreError, match="/dev/zero is a device"):
        read_texts("/dev/zero", "train")
    tree = tmp_path / "acl"
    (tree / "train" / "pos").mkdir(parents=True)
    (tree / "train" / "pos" / "1_1.txt").write_text("fine")
    (tree / "train" / "pos" / "2_1.txt").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"2_1\.txt is a device or socket"):
        read_texts(str(tree), "train")  # read_texts alone, without the cache asking the identity first
    (tree / "train" / "pos" / "2_1.txt").unlink()
    os.mkfifo(tree / "train" / "pos" / "2_1.txt")
    with pytest.raises(DataError, match=r"2_1\.txt is a FIFO"):
        read_texts(str(tree), "train")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_hub_probe_says_why_the_hub_is_unreachable(monkeypatch):
    from lmcore.data.sources import _hub_unreachable

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert "127.0.0.1: Connection refused" in _hub_unreachable()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert _hub_unreachable() is None  # it answers: the hub client does the rest
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert _hub_unreachable() is None  # behind a proxy the host is not reached directly


def test_the_hub_loggers_and_offline_flags_are_put_back_after_a_load():
    import datasets.config
    import huggingface_hub.constants

    from lmcore.data.sources import _quiet_hub

    hub = logging.getLogger("huggingface_hub")
    level, flag = hub.level, huggingface_hub.constants.HF_HUB_OFFLINE
    with _quiet_hub(offline_mode=True):
        assert hub.level == logging.ERROR
        assert datasets.config.HF_HUB_OFFLINE is True and huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert hub.level == level and huggingface_hub.constants.HF_HUB_OFFLINE is flag


def test_the_hub_without_a_network_is_one_line_without_retry_warnings(tmp_path):
    """Offline mode not asked for and the hub unreachable: no half minute of retries, warning each."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", LMCORE_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf"), WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "lmcore.cli", "train", "--no-progress",
                           f"run.dir={tmp_path / 'run'}", "data.source=hub:imdb", "data.val_split="],
                          env=env, capture_output=True, text=True, timeout=120)
    line = one_error_line(proc, "cannot reach the hub", "Connection refused", "'imdb'",
                          "not in the local datasets cache", "data.source=PATH")
    assert "Retrying" not in line and not (tmp_path / "run").exists()
