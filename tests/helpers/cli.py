"""Shared checks of the command-line tests."""

from dptrain.cli import main


def fails_with_one_line(capsys, *argv):
    """Run ``dptrain *argv``: it must exit with status 2 and a one-line error; returns that line."""
    try:
        status = main(list(argv))
    except SystemExit as stop:  # argparse usage errors exit from inside the parser
        status = stop.code
    assert status == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("dptrain ") and "error" in err and len(err.splitlines()) == 1, err
    return err
