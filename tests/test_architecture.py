"""docs/architecture.md matches the code: every file and folder it names exists, and so does every name it puts in
backquotes next to a file of this repository (classes, functions, methods)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_every_path_named_exists():
    paths = set(re.findall(r"`((?:dptrain|accountants|kernels|benchmarks)/[\w/.]*)`", DOC))
    short = set(re.findall(r"`(\w+\.py)`", DOC))
    assert len(paths) >= 15 and len(short) >= 10
    for path in paths:
        assert (ROOT / path).exists(), path
    files = {p.name for p in ROOT.glob("dptrain/**/*.py")} | {p.name for p in (ROOT / "accountants").glob("*.py")}
    assert short <= files, short - files


def test_every_code_name_named_exists():
    import importlib

    source = "\n".join(p.read_text() for p in [*ROOT.glob("dptrain/**/*.py"), *(ROOT / "accountants").glob("*.py")])
    quoted = set(re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", DOC)) - {"dptrain", "q", "max_physical_batch_size"}
    modules = {n for n in quoted if n.startswith("dptrain.")}
    for module in modules:
        importlib.import_module(module)
    foreign = {n for n in quoted if n.split(".")[0] in ("os", "transformers", "torch")}
    names = {n.split(".")[-1] for n in quoted - modules - foreign if not n.endswith(".py")}
    missing = [n for n in sorted(names) if not re.search(rf"\b(def|class)\s+{n}\b|\b{n}\s*[:=]", source)]
    assert not missing, missing
