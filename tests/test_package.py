import subprocess
import sys


def test_accountants_do_not_import_torch():
    code = "import sys, dptrain.accountants; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_without_command_exits_nonzero():
    result = subprocess.run([sys.executable, "-m", "dptrain"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stdout.lower()
