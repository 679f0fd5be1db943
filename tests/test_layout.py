"""The house rules of the layout (DESIGN.md section 1), checked on the source."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INFRA = {"fvfunc.trainer", "fvfunc.data", "fvfunc.tracking", "fvfunc.checkpoint", "fvfunc.validation",
         "fvfunc.distributed"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def sources():
    yield from (ROOT / "fvfunc").rglob("*.py")
    yield ROOT / "configs.py"
    yield ROOT / "train.py"


def test_ops_import_nothing_of_fvfunc():
    for f in (ROOT / "fvfunc" / "ops").glob("*.py"):
        bad = {n for n in imports(f) if n.startswith("fvfunc") and not n.startswith("fvfunc.ops")}
        assert not bad, f"{f.name} imports {bad}"


def test_losses_and_samplers_never_import_infra():
    for sub in ("losses", "samplers"):
        for f in (ROOT / "fvfunc" / sub).glob("*.py"):
            bad = {n for n in imports(f) if any(n == m or n.startswith(m + ".") for m in INFRA)}
            assert not bad, f"{sub}/{f.name} imports {bad}"


def test_no_pickle_anywhere():
    for f in sources():
        if not f.exists():
            continue
        text = f.read_text()
        assert "pickle" not in imports(f), f"{f} imports pickle"
        assert "torch.load(" not in text and "torch.save(" not in text, f"{f} uses pickle-based torch.save/load"


def test_no_global_statements():
    # module-level mutable state shows up as `global` rebinding; there is none
    for f in sources():
        if f.exists():
            assert not any(isinstance(n, ast.Global) for n in ast.walk(ast.parse(f.read_text()))), f
