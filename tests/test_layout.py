"""The architecture is visible in the imports: models never import pipelines, deepspeed or
torch.distributed; pipelines never import fastvit_pt; each heavy optional library has one home."""
import ast
import gc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse(source: str) -> ast.Module:
    """ast.parse with the garbage collector paused. A collection inside Python 3.11's AST builder can run a
    finalizer whose failure report formats a traceback, which parses source for its carets: the nested parse
    breaks the outer one ("AST constructor recursion depth mismatch", python/cpython#106905). numba's dispatchers
    left by FFCV's stock decoder are such finalizers (their KeyError is in the suite's warnings)."""
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        gc.enable()


def imports_of(path: Path, root: Path = REPO):
    tree = _parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # resolve relative imports against the file's package
                pkg = path.relative_to(root).with_suffix("").parts[: -node.level]
                mod = ".".join(pkg + ((mod,) if mod else ()))
            yield mod
            for a in node.names:
                yield f"{mod}.{a.name}"


def files(pkg, root: Path = REPO):
    return sorted((root / pkg).rglob("*.py"))


def offenders(pkg, banned, root: Path = REPO):
    return {
        (str(f.relative_to(root)), m)
        for f in files(pkg, root)
        for m in imports_of(f, root)
        if any(m == b or m.startswith(b + ".") for b in banned)
    }


def test_models_import_no_pipelines_deepspeed_or_distributed():
    assert files("fastvit_pt/models")
    assert offenders("fastvit_pt/models", ["pipelines", "deepspeed", "torch.distributed", "fastvit_pt.distributed"]) == set()


def test_pipelines_never_import_fastvit_pt():
    assert files("pipelines")
    assert offenders("pipelines", ["fastvit_pt"]) == set()


def test_heavy_libraries_live_in_one_file_each():
    homes = {
        "deepspeed": {"fastvit_pt/engines/deepspeed_engine.py"},
        "nvidia.dali": {"pipelines/dali_loader.py"},
        "ffcv": {"pipelines/ffcv_loader.py", "pipelines/beton.py"},
    }
    for lib, allowed in homes.items():
        found = {f for f, _ in offenders("fastvit_pt", [lib]) | offenders("pipelines", [lib])}
        assert found <= allowed, f"{lib} imported outside {allowed}: {found - allowed}"


def test_the_checker_catches_a_violation(tmp_path):
    """The rules above must be able to fail: a relative and an absolute offending import are both seen."""
    probe = tmp_path / "fastvit_pt" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ...pipelines import base\nimport deepspeed\n")
    found = offenders("fastvit_pt/models", ["pipelines", "deepspeed"], root=tmp_path)
    assert found == {
        ("fastvit_pt/models/probe.py", "pipelines"),
        ("fastvit_pt/models/probe.py", "pipelines.base"),
        ("fastvit_pt/models/probe.py", "deepspeed"),
    }
