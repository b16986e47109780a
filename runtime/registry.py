"""The model registry: MLflow, embedded (SQLite under the storage root) or a server.

>>> from runtime.registry import Registry, resolve_registry_uri
>>> reg = Registry("~/.raylane")                       # MLFLOW_TRACKING_URI overrides
>>> reg.list("support-bot")                            # doctest: +SKIP
>>> resolve_registry_uri("models:/support-bot@champion", "~/.raylane")   # -> a local folder  # doctest: +SKIP

Aliases: a new version gets ``challenger``; the eval gate (or ``raylane registry promote``) moves
``champion`` to it and keeps the one it replaced as ``previous``, which ``rollback`` restores.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.defaults import DEFAULT_STORAGE_ROOT
from runtime.errors import RaylaneError

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
EXPERIMENT = "raylane"
REF_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def local_registry_dir(storage_root: str) -> Path:
    """The local folder of the embedded registry and its download cache: ``<root>/registry`` for a
    local storage root; for a remote (``s3://``) root ``$RAYLANE_REGISTRY_ROOT`` (else ~/.raylane),
    never a path made from the URI (``./s3:/bucket`` in the working directory)."""
    root = storage_root if "://" not in storage_root else os.environ.get("RAYLANE_REGISTRY_ROOT", DEFAULT_STORAGE_ROOT)
    return Path(root).expanduser().resolve() / "registry"


def tracking_uri(storage_root: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    d = local_registry_dir(storage_root)
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def existing_tracking_uri(storage_root: str) -> str | None:
    """The registry ``tracking_uri`` would use, or None when there is none yet (creates nothing)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = local_registry_dir(storage_root) / "mlflow.db"
    return f"sqlite:///{db}" if db.is_file() else None


@dataclass
class VersionInfo:
    name: str
    version: int
    source: str
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Registry:
    """A thin layer over ``MlflowClient`` with raylane's alias rules."""

    def __init__(self, storage_root: str = DEFAULT_STORAGE_ROOT):
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = tracking_uri(storage_root)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # --- writing -------------------------------------------------------------------------------
    def start_run(self, run_name: str, tags: dict) -> str:
        """An MLflow run in the ``raylane`` experiment, open while training logs its curves into it."""
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT)
        return self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def register(self, name: str, source: str, *, params: dict, metrics: dict, tags: dict,
                 run_id: str | None = None) -> VersionInfo:
        """Log params, final metrics and lineage tags to an MLflow run (``run_id``, the training run
        that holds the live curves, or a new one) and end it; register a new model version linked
        to that run, with alias challenger."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        if run_id is None:
            run_id = self.start_run(tags.get("raylane.run", name), tags)
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        self.end_run(run_id)
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        vtags = {**tags, **{f"metric.{k}": repr(float(v)) for k, v in metrics.items() if v is not None}}
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=vtags)
        self.client.set_registered_model_alias(name, CHALLENGER, mv.version)
        return self.get(name, int(mv.version))

    def find_source(self, name: str, source: str) -> VersionInfo | None:
        """The version already registered from ``source`` (a rerun of a finished run registers nothing new)."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name='{name}'")
        except MlflowException:
            return None
        found = [v for v in versions if v.source == source]
        return self.get(name, max(int(v.version) for v in found)) if found else None

    def promote(self, name: str, version: int) -> VersionInfo:
        """Make ``version`` the champion; the replaced champion becomes ``previous``."""
        self.get(name, version)  # a clear error for a missing version
        current = self.alias(name, CHAMPION)
        if current and current.version == int(version):
            return current
        if current:
            self.client.set_registered_model_alias(name, PREVIOUS, str(current.version))
        self.client.set_registered_model_alias(name, CHAMPION, str(version))
        challenger = self.alias(name, CHALLENGER)
        if challenger and challenger.version == int(version):
            self.client.delete_registered_model_alias(name, CHALLENGER)
        return self.get(name, version)

    def set_tags(self, name: str, version: int, tags: dict[str, str]) -> None:
        """Tags on one version (e.g. a rollout's outcome on its candidate)."""
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, str(v)[:5000])

    def rollback(self, name: str) -> VersionInfo:
        """Swap ``champion`` back to ``previous`` (the bad champion becomes ``previous``)."""
        prev, cur = self.alias(name, PREVIOUS), self.alias(name, CHAMPION)
        if prev is None:
            raise RaylaneError(f"model {name!r} has no 'previous' version to roll back to",
                               hint=f"`raylane registry promote {name} VERSION` picks a champion explicitly")
        self.client.set_registered_model_alias(name, CHAMPION, str(prev.version))
        if cur:
            self.client.set_registered_model_alias(name, PREVIOUS, str(cur.version))
        else:
            self.client.delete_registered_model_alias(name, PREVIOUS)
        return self.get(name, prev.version)

    # --- reading -------------------------------------------------------------------------------
    def _info(self, mv) -> VersionInfo:
        metrics = {k[len("metric."):]: float(v) for k, v in (mv.tags or {}).items() if k.startswith("metric.")}
        tags = {k: v for k, v in (mv.tags or {}).items() if not k.startswith("metric.")}
        return VersionInfo(mv.name, int(mv.version), mv.source, sorted(getattr(mv, "aliases", []) or []), metrics, tags)

    def get(self, name: str, version: int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version(name, str(version)))
        except MlflowException:
            raise RaylaneError(f"model {name!r} has no version {version} in the registry at {self.uri}",
                               hint=f"`raylane registry list {name}` shows its versions") from None

    def alias(self, name: str, alias: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version_by_alias(name, alias))
        except MlflowException:
            return None

    def list(self, name: str | None = None) -> list[VersionInfo]:
        names = [name] if name else [m.name for m in self.client.search_registered_models()]
        out: list[VersionInfo] = []
        for n in names:
            versions = self.client.search_model_versions(f"name='{n}'")
            if name and not versions:
                raise RaylaneError(f"no model named {name!r} in the registry at {self.uri}",
                                   hint="`raylane registry list` shows every model")
            aliases: dict[int, list[str]] = {}
            for a, v in (self.client.get_registered_model(n).aliases or {}).items() if versions else ():
                aliases.setdefault(int(v), []).append(a)
            for v in sorted((self._info(v) for v in versions), key=lambda v: v.version):
                v.aliases = sorted(aliases.get(v.version, []))
                out.append(v)
        return out


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    m = REF_RE.match(ref)
    if not m or m["name"] in (".", ".."):  # the name becomes a cache folder
        raise RaylaneError(f"bad registry reference {ref!r}", hint="use models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], int(m["version"]) if m["version"] else None


def pinned_ref(ref: str, storage_root: str = DEFAULT_STORAGE_ROOT) -> str:
    """``models:/NAME@ALIAS`` as the version it names now (``models:/NAME/VERSION``); a version ref as is."""
    name, alias, _ = parse_ref(ref)
    if alias is None:
        return ref
    info = Registry(storage_root).alias(name, alias)
    if info is None:
        raise RaylaneError(f"{ref}: model {name!r} has no version with alias {alias!r}",
                           hint=f"`raylane registry list {name}` shows versions and aliases")
    return f"models:/{name}/{info.version}"


def resolve_registry_uri(ref: str, storage_root: str = DEFAULT_STORAGE_ROOT) -> str:
    """A local folder for ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (copied here if remote)."""
    name, alias, version = parse_ref(ref)
    reg = Registry(storage_root)
    info = reg.alias(name, alias) if alias else reg.get(name, version)
    if info is None:
        raise RaylaneError(f"{ref}: model {name!r} has no version with alias {alias!r}",
                           hint=f"`raylane registry list {name}` shows versions and aliases")
    source = info.source
    if "://" not in source or source.startswith("file://"):
        path = source.removeprefix("file://")
        if not Path(path).is_dir():
            raise RaylaneError(f"{ref} points at {path}, which no longer exists")
        return path
    import pyarrow.fs as pafs

    from runtime import storage

    dest = local_registry_dir(storage_root) / "cache" / name / str(info.version)
    if not dest.is_dir():
        import shutil
        import uuid

        fs, path = storage.resolve(source)
        # A folder of our own: concurrent replicas never merge into one another's half copy.
        tmp = dest.with_name(f"{dest.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():  # not a lost race: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
