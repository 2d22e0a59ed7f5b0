import subprocess
import sys


def test_accountants_do_not_import_torch():
    code = "import sys, dptrain.accountants; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_without_command_exits_nonzero():
    result = subprocess.run([sys.executable, "-m", "dptrain"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stdout.lower()


def test_no_folder_at_the_repository_root_shadows_an_installed_package():
    """`python -m pytest` puts the repository root first on sys.path: a package folder there named like an
    installed distribution's package hides it (a root `kernels/` hid Hugging Face's `kernels`, which
    transformers >= 5.25 requires and imports: every transformers import in the tests failed)."""
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ours = {p.parent.name for p in root.glob("*/__init__.py")} - {"dptrain", "tests", "benchmarks"}
    installed = packages_distributions()
    shadowed = {name: installed[name] for name in ours if name in installed}
    assert not shadowed, shadowed
    assert "kernels" not in ours
