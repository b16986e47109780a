"""The KubeRay v1 CRD schemas, and the checks a real API server would make against them.

>>> from cluster.crds import check_manifest
>>> check_manifest(manifest)                    # [] when the manifest is valid  # doctest: +SKIP

Two checks: the manifest validates against the CRD's ``v1`` openAPIV3Schema (jsonschema), and every
key raylane renders is declared by that schema -- an API server silently prunes unknown keys, so a
misspelt field would otherwise vanish without an error.

The CRDs are KubeRay v1.7.0's, vendored unchanged as package data in ``cluster/kuberay_crds/``
(Apache-2.0; NOTICE and LICENSE beside them), so every install checks against the same schemas.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}


def crd_dir() -> Path:
    """The folder of the vendored KubeRay CRD YAMLs (package data, in every kind of install)."""
    folder = Path(__file__).resolve().parent / "kuberay_crds"
    missing = [f for f in CRD_FILES.values() if not (folder / f).is_file()]
    if missing:
        # Only a broken install gets here (package data left out of a wheel or a copied tree).
        raise FileNotFoundError(
            f"KubeRay CRDs missing from {folder}: {', '.join(missing)}; reinstall raylane "
            "(pip install .) so its package data cluster/kuberay_crds/ comes along"
        )
    return folder


@functools.cache
def schema_for(kind: str) -> dict[str, Any]:
    """The ``v1`` openAPIV3Schema of a KubeRay kind."""
    import yaml

    folder = crd_dir()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~1 s per CRD instead of ~20 s
    crd = yaml.load((folder / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """jsonschema errors of a KubeRay manifest against its CRD, as 'path: message' lines."""
    import jsonschema

    validator = jsonschema.Draft7Validator(_jsonschema(manifest["kind"]))
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{_dotted(e.absolute_path)}: {e.message}" for e in errors]


def unknown_keys(manifest: dict[str, Any]) -> list[str]:
    """Paths of keys the CRD does not declare (an API server would drop them silently)."""
    found: list[str] = []
    _walk_unknown(manifest, schema_for(manifest["kind"]), "", found)
    return found


def check_manifest(manifest: dict[str, Any]) -> list[str]:
    """Every schema problem of a KubeRay manifest; [] when an API server would accept it as is."""
    problems = schema_errors(manifest)
    problems += [
        f"{p}: not declared by the {manifest['kind']} CRD (an API server would drop it)"
        for p in unknown_keys(manifest)
    ]
    return problems


@functools.cache
def _jsonschema(kind: str) -> dict[str, Any]:
    # The k8s extensions (int-or-string, embedded resources) are not JSON Schema: relax them.
    return _relax(schema_for(kind))


def _relax(node: Any) -> Any:
    if isinstance(node, list):
        return [_relax(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _relax(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _walk_unknown(value: Any, schema: dict[str, Any], path: str, found: list[str]) -> None:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                _walk_unknown(sub, props[key], where, found)
            elif isinstance(extra, dict):
                _walk_unknown(sub, extra, where, found)
            elif props is not None or extra is False:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _walk_unknown(item, schema["items"], f"{path}[{i}]", found)


def _dotted(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"
