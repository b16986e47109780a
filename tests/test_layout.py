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


OWN = {"runtime", "jobs", "serve_apps", "cluster", "raylane"}


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _own_imports(path: Path) -> set[str]:
    """raylane's own modules that ``path`` imports anywhere (module top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in OWN}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in OWN:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def _walk(start: str) -> set[str]:
    """Every own module a static import walk reaches from ``start`` (no importlib strings)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            f = _module_file(mod)
            if mod not in seen and f is not None:
                seen.add(mod)
                todo.extend(_own_imports(f))
    return seen


def test_no_arrow_runs_back_up():
    assert not {m for m in _own_imports(ROOT / "runtime/ray_env.py") if m.startswith("runtime.serving")}
    assert not {m for m in _own_imports(ROOT / "cluster/render.py") if m.startswith("runtime.submit")}
    drift = ROOT / "runtime/training/drift.py"
    tree = ast.parse(drift.read_text())
    sources = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("runtime.training.runner", "run_train_spec") in sources
    assert not any(mod == "runtime.training" for mod, _ in sources)  # not from its own package __init__
    assert "_storage_root" not in drift.read_text()
    # Nothing outside a module reaches for its private names.
    private = {}
    for p in ROOT.glob("*/**/*.py"):
        if p.parts[len(ROOT.parts)] not in OWN:
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in OWN:
                bad = [a.name for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
                if bad and not n.module.endswith("._common"):
                    private[str(p.relative_to(ROOT))] = bad
    assert private == {}


def test_every_target_a_spec_class_declares_imports():
    import importlib

    from runtime.imports import load_callable
    from runtime.specs import KINDS, SPEC_CLASSES, load_spec

    assert {cls.model_fields["kind"].default for cls in SPEC_CLASSES} == set(KINDS)
    slugs = [cls.shape.slug for cls in SPEC_CLASSES]
    assert len(set(slugs)) == len(slugs)
    for cls in SPEC_CLASSES:
        shape = cls.shape
        assert callable(shape.runner)
        assert (ROOT / "examples" / f"{shape.slug}.yaml").is_file(), shape.slug
        if shape.job_module:
            assert callable(importlib.import_module(shape.job_module).main)
            assert shape.job_module == f"jobs.{shape.slug}"
        else:
            assert shape.serve_app.startswith(f"serve_apps.{shape.slug}:")
            assert callable(load_callable(shape.serve_app, field="shape.serve_app"))
            spec = load_spec(ROOT / "examples" / f"{shape.slug}.yaml")
            apps = shape.serve_config(spec)["applications"]
            assert apps[-1]["import_path"] == shape.serve_app
            for app in apps:
                assert callable(load_callable(app["import_path"], field="import_path"))
        if shape.model_field:
            obj = cls.model_fields
            head, *rest = shape.model_field.split(".")
            assert head in obj, (cls, shape.model_field)


def test_commands_reach_every_runner_and_builder_by_static_imports():
    reached = _walk("raylane.commands.run")
    for runner in ("runtime.training.runner", "runtime.batch.runner", "runtime.serving.runner",
                   "runtime.agents.runner"):
        assert runner in reached, runner
    reached = _walk("raylane.commands.render")
    for builder in ("cluster.render", "runtime.serving.config", "runtime.agents.config"):
        assert builder in reached, builder
    for f in ("runtime/run.py", "runtime/submit.py", "cluster/render.py", "cluster/shape.py", "cluster/weights.py"):
        assert "importlib" not in (ROOT / f).read_text(), f
