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
