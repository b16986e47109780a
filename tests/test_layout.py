"""The architecture rules: dependencies point inward, and light commands stay light."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTER = {"jobs", "serve_apps", "cluster", "raylane"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_never_imports_outer_layers():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & OUTER) for p in (ROOT / "runtime").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cluster_renders_without_engines():
    offenders = {}
    for p in (ROOT / "cluster").rglob("*.py"):
        bad = _imports(p) & {"torch", "vllm", "transformers", "peft"}
        if bad:
            offenders[str(p.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_light_commands_do_not_import_heavy_libraries():
    code = (
        "import sys; from raylane.cli import main;"
        "main(['classify','--json','--new-artifact','no']);"
        "main(['plan','--json','--params','7e9']);"
        "heavy=[m for m in ('torch','vllm','ray','transformers','kubernetes') if m in sys.modules];"
        "print('HEAVY', heavy, file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr


def test_fixed_layout_exists():
    for d in ("runtime", "jobs", "serve_apps", "cluster", "tests", "bench", "examples"):
        assert (ROOT / d).is_dir(), d
    for f in ("pyproject.toml", "README.md", "Makefile", ".ci/run"):
        assert (ROOT / f).is_file(), f
    assert "make test" in (ROOT / ".ci/run").read_text()
