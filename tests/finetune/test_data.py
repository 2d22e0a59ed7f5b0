"""Synthetic corpora and data loading."""

import json

import pytest

from dptrain.finetune.data import (
    _PRIVATE_FIRST, _PUBLIC_NAMES, load_texts, synthetic_private_records, synthetic_public_corpus,
)


def test_private_records_are_deterministic_per_seed():
    a = synthetic_private_records(300, seed=7)
    b = synthetic_private_records(300, seed=7)
    c = synthetic_private_records(300, seed=8)
    assert a.records == b.records and a.canaries == b.canaries
    assert a.records != c.records
    assert synthetic_public_corpus(50, seed=3) == synthetic_public_corpus(50, seed=3)
    assert synthetic_public_corpus(50, seed=3) != synthetic_public_corpus(50, seed=4)


def test_canaries_appear_exactly_their_repeat_count():
    corpus = synthetic_private_records(500, seed=1, canary_repeats=(1, 3, 9))
    assert len(corpus.records) == 500
    for canary in corpus.canaries:
        assert canary.code.isdigit() and len(canary.code) == 6
        assert sum(r == canary.text for r in corpus.records) == canary.repeats
    assert [c.repeats for c in corpus.canaries] == [1, 3, 9]


def test_public_corpus_never_mentions_private_names():
    public = " ".join(synthetic_public_corpus(2000, seed=0))
    assert not any(name in public for name in _PRIVATE_FIRST)
    assert any(name.capitalize() in public or name in public for name in _PUBLIC_NAMES)
    private = synthetic_private_records(200).records
    assert any("Diagnosis" in r or "Assessment" in r or "presented with" in r for r in private)


def test_load_texts_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert load_texts(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.txt").write_text("first line\n\nsecond line\n")
    assert load_texts(tmp_path / "b.txt") == ["first line", "second line"]


def test_load_texts_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no records"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(ValueError, match="line 2 has no 'text'"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_texts(tmp_path / "broken.jsonl")


def test_csv_tsv_folder_and_text_column(tmp_path):
    (tmp_path / "notes.csv").write_text('id,note\n1,"Seen today, doing well"\n2,"two\nlines"\n3,\n')
    assert load_texts(tmp_path / "notes.csv", "note") == ["Seen today, doing well", "two\nlines"]  # commas kept
    with pytest.raises(ValueError, match=r"no column 'text' in its header row \(columns: id, note\); pass --text-col"):
        load_texts(tmp_path / "notes.csv")
    (tmp_path / "notes.tsv").write_text("text\tid\nfirst, with a comma\t1\n")
    assert load_texts(tmp_path / "notes.tsv") == ["first, with a comma"]
    (tmp_path / "n.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    assert load_texts(tmp_path / "n.jsonl", "body") == ["x"]
    with pytest.raises(ValueError, match=r"line 1 has no 'text' field \(fields: body, id\)"):
        load_texts(tmp_path / "n.jsonl")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second note\nwith two lines\n")
    (folder / "a.txt").write_text("first note")
    (folder / "skip.md").write_text("not a record")
    assert load_texts(folder) == ["first note", "second note\nwith two lines\n"]  # one record per file, by name


def test_other_formats_are_refused_naming_the_supported_ones(tmp_path):
    for name in ("notes.parquet", "notes.xlsx", "notes"):
        (tmp_path / name).write_bytes(b"PAR1\x00\x01")
        with pytest.raises(ValueError, match=r"unsupported data file .*expected \.jsonl.*\.csv/\.tsv.*\.txt.*folder"):
            load_texts(tmp_path / name)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match=r"binary.txt is not UTF-8 text \(byte 0xff at offset 0\)"):
        load_texts(tmp_path / "binary.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt files"):
        load_texts(tmp_path / "empty")
