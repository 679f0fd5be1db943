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


def _method_names():
    from fvfunc.losses import METHODS

    return set(METHODS)


def test_no_method_name_branches_outside_its_module():
    # the layers above the losses read specs: no `== "dmd2"`, `in ("kd", ...)` or match on a method name
    names = _method_names()
    for f in sources():
        if not f.exists() or (ROOT / "fvfunc" / "losses") in f.parents:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
                assert not consts, f"{f}:{node.lineno} compares with the method name {consts[0].value!r}"


def test_family_modules_know_no_speed_or_parallelism_plumbing():
    # remat, compile, attention backends and gathering are fvfunc/runner.py's, for every family
    for f in (ROOT / "fvfunc" / "models").glob("*.py"):
        tree_ = ast.parse(f.read_text())
        names = {n.id for n in ast.walk(tree_) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree_) if isinstance(n, ast.Attribute)}
        names |= {a.arg for n in ast.walk(tree_) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
        bad = names & {"remat", "remat_fraction", "checkpoint", "compile", "gather", "DTensor", "backend"}
        assert not bad, f"{f.name} uses {sorted(bad)}"
        assert "torch.utils.checkpoint" not in imports(f) and "fvfunc.distributed" not in imports(f), f.name
