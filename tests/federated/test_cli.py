"""``dptrain federated``: help, one-line errors, a tiny in-process run."""

import json

import pytest

import dptrain.cli as cli
from tests.helpers.cli import fails_with_one_line


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The command as dptrain/cli/__init__.py registers it."""
    monkeypatch.setitem(cli._COMMANDS, "federated", "federated")


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["federated", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--engine flower" in out and "no amplification" in out


@pytest.mark.parametrize("argv", [
    ["--clients", "0"],
    ["--method", "fedprox"],
    ["--lr", "-1"],
    ["--alpha", "0"],
    ["--clients", "50", "--records", "100"],  # a split cannot give 50 clients 32 records each
    ["--delta", "2"],
    ["--model", "/no/such/folder"],
])
def test_bad_input_is_one_line(capsys, argv):
    fails_with_one_line(capsys, "federated", *argv)


def test_tiny_run_json(capsys, tmp_path, one_torch_thread):
    status = cli.main(["federated", "--clients", "2", "--rounds", "2", "--local-steps", "1", "--batch-size", "4",
                       "--records", "40", "--max-length", "32", "--lora-r", "2", "--pretrain-steps", "0",
                       "--target-epsilon", "5", "--json", "--output-dir", str(tmp_path)])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "fedsvd" and len(report["clients"]) == 2
    assert all(c["epsilon"] == pytest.approx(5.0, rel=1e-2) and c["steps"] == 2 for c in report["clients"])
    assert sum(c["records"] for c in report["clients"]) == 40
    assert [h["svd"] for h in report["history"]] == [True, True]
    assert (tmp_path / "factors.pt").exists() and json.loads((tmp_path / "report.json").read_text()) == report
