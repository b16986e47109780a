"""The KubeRay v1.7 CRDs ship inside the package: unchanged, licensed, in every install."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from cluster import crds
from cluster.render import check, render
from runtime.errors import ManifestInvalid
from runtime.specs import load_spec

ROOT = Path(__file__).resolve().parents[2]
VENDORED = ROOT / "cluster" / "kuberay_crds"


def test_vendored_crds_are_the_recorded_files_with_their_license():
    assert crds.crd_dir() == VENDORED
    sums = dict(
        reversed(line.split()) for line in (VENDORED / "SHA256SUMS").read_text().splitlines()
    )
    assert set(sums) == set(crds.CRD_FILES.values())
    for name, digest in sums.items():
        assert hashlib.sha256((VENDORED / name).read_bytes()).hexdigest() == digest, name
    notice = (VENDORED / "NOTICE").read_text()
    assert "KubeRay v1.7.0" in notice and "Apache License, Version 2.0" in notice
    assert "Apache License" in (VENDORED / "LICENSE").read_text()[:200]


def test_each_file_is_the_v1_crd_of_its_kind():
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for kind, name in crds.CRD_FILES.items():
        crd = yaml.load((VENDORED / name).read_text(), Loader=loader)
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
        assert "v1" in [v["name"] for v in crd["spec"]["versions"]]


def test_render_always_checks_against_the_crds():
    job = render(load_spec(ROOT / "examples" / "batch.yaml"))[-1]
    check(job)  # what render returned passes
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscalling"] = True  # a key the CRD lacks
    with pytest.raises(ManifestInvalid) as e:
        check(job)
    assert any("enableInTreeAutoscalling" in p for p in e.value.problems)


def test_a_non_editable_install_finds_all_four(tmp_path):
    """Build the wheel, install it into a bare folder, and look the CRDs up from there."""
    src = tmp_path / "src"
    for part in ("runtime", "jobs", "serve_apps", "cluster", "raylane"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("raylane-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in [*crds.CRD_FILES.values(), "LICENSE", "NOTICE", "SHA256SUMS"]:
        assert f"cluster/kuberay_crds/{f}" in names, f
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); from cluster import crds; "
        "print(crds.crd_dir()); print(sorted(crds.schema_for(k)['type'] for k in crds.CRD_FILES))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    folder, types = r.stdout.splitlines()
    assert (
        Path(folder) == site / "cluster" / "kuberay_crds"
    )  # the installed copy, not this checkout
    assert types == str(["object"] * 4)


def test_nothing_reads_a_folder_beside_the_project():
    pattern = re.compile(r"\.\./shared|parents?\b[^\n]*/\s*[\"']shared[\"']|work/shared")
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for d in (
            "runtime",
            "jobs",
            "serve_apps",
            "cluster",
            "raylane",
            "tests",
            "bench",
            "scripts",
        )
        for p in (ROOT / d).rglob("*.py")
        if p != Path(__file__)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
