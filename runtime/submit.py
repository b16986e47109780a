"""Submit a spec to any running Ray cluster through the Ray Jobs API, as ``ray job submit`` would.

>>> from runtime.submit import submit
>>> r = submit("examples/batch.yaml", "http://10.0.0.5:8265")    # follows the logs  # doctest: +SKIP
>>> r.status, r.ok                                                # ('SUCCEEDED', True)  # doctest: +SKIP

The project folder (the current directory when it has ``jobs/``, else raylane's own checkout) is
the job's ``working_dir``; ``.venv``, ``.git``, caches, gitignored files and files over
``max_file_mb`` stay behind (Ray refuses working dirs over its upload limit). The validated spec
travels beside the project as ``raylane-spec-<name>.yaml`` and the entrypoint is the documented
``python -m jobs.<shape> --spec ...``. Ray 2.60 clusters require a token: raylane sends
``$RAY_AUTH_TOKEN`` or the token file (``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from runtime.errors import ClusterUnreachable, RaylaneError, UsageError
from runtime.ray_env import check_reachable
from runtime.specs import KINDS, dump_spec, load_spec

ALWAYS_EXCLUDED = [
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".raylane",
    "mlruns",
    "node_modules",
    "*.egg-info",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never uploaded, gitignored or not: credentials the job does not need and the cluster must not hold.
SECRET_PATTERNS = [
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    ".pypirc",
    "kubeconfig*",
    "keys",
    "keys.*",
    "*-keys",
    "*-keys.*",
    "*_keys",
    "*_keys.*",
    "credentials",
    "credentials.*",
    ".aws",
    ".kube",
    ".ssh",
]


def job_module(spec) -> str:
    """The module a job-shaped spec runs as (``python -m <module> --spec S.yaml``): what its class
    declares (``shape.job_module``). ``spec`` is a spec, a spec class or a kind name."""
    cls = KINDS[spec] if isinstance(spec, str) else spec if isinstance(spec, type) else type(spec)
    module = cls.shape.job_module
    if module is None:
        kind = cls.model_fields["kind"].default
        raise RaylaneError(
            f"{kind} specs are long-running services, not Ray jobs",
            hint="deploy them with `raylane apply SPEC` (a RayService) or "
            "`raylane render SPEC --serve-config -o DIR` then `serve deploy DIR/<name>.serve.yaml`",
        )
    return module


@dataclass
class SubmitResult:
    job_id: str
    address: str
    status: str
    entrypoint: str
    working_dir: str
    excluded_large_files: list[str] = field(default_factory=list)
    message: str | None = None
    seconds: float = 0.0
    excluded_secret_files: list[str] = field(default_factory=list)
    excluded_gitignored: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def submit(
    spec: Any,
    address: str | None = None,
    *,
    follow: bool = True,
    project_dir: str | Path | None = None,
    max_file_mb: float = 10.0,
    timeout_s: float | None = None,
    log: TextIO | None = None,
    token: str | None = None,
) -> SubmitResult:
    """Submit ``spec`` (a path, dict or spec object) to the Ray cluster whose dashboard is ``address``.

    With ``follow`` it streams the job's logs to ``log`` (stderr) and returns once the job ends.
    ``token`` is the cluster's auth token (``raylane submit --cluster`` reads it from KubeRay's
    Secret); None = ``$RAY_AUTH_TOKEN`` or the token file.
    """
    import yaml

    spec = load_spec(spec)
    module = job_module(spec)
    url = dashboard_url(address)
    log = log or sys.stderr
    project = _project_dir(project_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raylane-submit-") as tmp:
        workdir = Path(tmp) / "project"
        secrets, ignored = left_behind(project)
        large = [f for f in _compose_working_dir(project, workdir, max_file_mb) if not _under(f, secrets + ignored)]
        spec_name = f"raylane-spec-{spec.name}.yaml"
        (workdir / spec_name).write_text(yaml.safe_dump(dump_spec(spec), sort_keys=False))
        for f in large:
            print(
                f"[submit] not uploading {f} (over {max_file_mb:g} MB; Ray caps working_dir uploads)",
                file=log,
                flush=True,
            )
        for f in secrets:
            print(f"[submit] not uploading {f} (looks like a credential)", file=log, flush=True)
        entrypoint = f"python -m {module} --spec {spec_name}"
        client = _client(url, token)
        job_id = f"raylane-{spec.name}-{uuid.uuid4().hex[:8]}"
        runtime_env = {
            "working_dir": str(workdir),
            "excludes": ALWAYS_EXCLUDED + [f"/{f}" for f in large + secrets + ignored],
        }
        try:
            client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=job_id,
                metadata={"raylane.kind": spec.kind, "raylane.name": spec.name},
            )
        except Exception as e:  # the SDK raises RuntimeError/ValueError with the server's text
            raise _translate(e, url) from None
    print(f"[submit] job {job_id} submitted to {url}: {entrypoint}", file=log, flush=True)
    result = SubmitResult(job_id, url, "PENDING", entrypoint, str(project), large)
    result.excluded_secret_files, result.excluded_gitignored = secrets, len(ignored)
    if not follow:
        result.status = str(client.get_job_status(job_id).value)
        return result
    try:
        _follow(client, job_id, log, timeout_s)
    except KeyboardInterrupt:
        print(
            f"[submit] stopped following; the job keeps running. Stop it with: "
            f"ray job stop --address {url} {job_id}",
            file=log,
            flush=True,
        )
        raise
    info = client.get_job_info(job_id)
    result.status = str(info.status.value)
    result.message = info.message
    result.seconds = round(time.perf_counter() - t0, 2)
    print(
        f"[submit] job {job_id} {result.status}" + (f": {info.message}" if info.message else ""),
        file=log,
        flush=True,
    )
    return result


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL: ``address``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS`` (http://HOST:8265)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address in ("local", "auto"):
        raise UsageError(
            "no Ray cluster to submit to",
            hint="pass --address http://HEAD:8265 (the head's dashboard) or set RAY_ADDRESS",
        )
    if address.startswith("ray://"):
        raise UsageError(
            f"{address} is a Ray Client address; the Jobs API is on the dashboard port",
            hint="use --address http://HEAD:8265",
        )
    return address if "://" in address else f"http://{address}"


def auth_headers(token: str | None = None) -> dict[str, str]:
    """The Authorization header for token-authenticated clusters (Ray >= 2.52), if a token is known."""
    token = (token or os.environ.get("RAY_AUTH_TOKEN", "")).strip()
    if not token:
        path = Path(
            os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
        ).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(url: str, token: str | None = None):
    from ray.job_submission import JobSubmissionClient

    check_reachable(url)
    try:
        return JobSubmissionClient(url, headers=auth_headers(token))
    except Exception as e:
        raise _translate(e, url) from None


def _translate(e: Exception, url: str) -> RaylaneError:
    text = str(e)
    if "401" in text or "403" in text or "uthentication" in text:
        return RaylaneError(
            f"the Ray cluster at {url} refused the token: {text.splitlines()[0]}",
            hint="export RAY_AUTH_TOKEN=<token> (`ray get-auth-token` on the head) or copy it "
            "to ~/.ray/auth_token",
        )
    if isinstance(e, ConnectionError) or "Failed to connect" in text:
        return ClusterUnreachable(
            f"cannot reach the Ray Jobs API at {url}: {text}",
            hint="check the dashboard address (port 8265 by default)",
        )
    return RaylaneError(f"the Ray cluster at {url} rejected the job: {text}")


def _follow(client, job_id: str, log: TextIO, timeout_s: float | None) -> None:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            log.write(chunk)
            log.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s) if timeout_s else tail())
    except TimeoutError:
        client.stop_job(job_id)
        raise RaylaneError(
            f"job {job_id} did not finish within {timeout_s:g} s; it was stopped"
        ) from None
    except Exception:  # the log stream can drop (proxy, restart): fall back to polling the status
        pass
    deadline = time.monotonic() + (timeout_s or float("inf"))
    while str(client.get_job_status(job_id).value) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise RaylaneError(
                f"job {job_id} did not finish within {timeout_s:g} s; it was stopped"
            )
        time.sleep(1.0)


def _project_dir(project_dir: str | Path | None) -> Path:
    if project_dir is not None:
        p = Path(project_dir).expanduser().resolve()
        if not p.is_dir():
            raise UsageError(f"project folder {p} does not exist")
        return p
    cwd = Path.cwd()
    if (cwd / "jobs").is_dir():
        return cwd
    return Path(__file__).resolve().parents[1]


def left_behind(project: Path) -> tuple[list[str], list[str]]:
    """Project paths (relative, '/'-separated) never uploaded: credential-looking files and folders
    (``SECRET_PATTERNS``, whatever .gitignore says), and what the project's .gitignore files
    (top level and nested, git's own matching rules) ignore. A matched folder is listed, not its files."""
    import fnmatch

    # The matcher Ray itself applies to .gitignore files (vendored by Ray), so both agree.
    from ray._private.thirdparty.pathspec import PathSpec

    secrets: list[str] = []
    ignored: list[str] = []

    def walk(folder: Path, specs: list[tuple[Path, Any]]) -> None:
        gi = folder / ".gitignore"
        if gi.is_file():
            specs = specs + [(folder, PathSpec.from_lines("gitwildmatch", gi.read_text().splitlines()))]
        for entry in sorted(folder.iterdir()):
            rel = entry.relative_to(project).as_posix()
            is_dir = entry.is_dir() and not entry.is_symlink()
            if any(fnmatch.fnmatch(entry.name, pat) for pat in ALWAYS_EXCLUDED):
                continue
            if any(fnmatch.fnmatch(entry.name, pat) for pat in SECRET_PATTERNS) and not entry.name.endswith(".py"):
                secrets.append(rel)
                continue
            if any(
                spec.match_file(entry.relative_to(base).as_posix() + ("/" if is_dir else ""))
                for base, spec in specs
            ):
                ignored.append(rel)
                continue
            if is_dir:
                walk(entry, specs)

    walk(project, [])
    return secrets, ignored


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _compose_working_dir(project: Path, workdir: Path, max_file_mb: float) -> list[str]:
    """Mirror the project's top level into ``workdir`` with symlinks (Ray follows them when it zips),
    leaving the always-excluded folders out; returns the project files too large to upload."""
    import fnmatch

    workdir.mkdir(parents=True)
    limit = max_file_mb * 1e6
    large: list[str] = []
    for entry in sorted(project.iterdir()):
        if any(fnmatch.fnmatch(entry.name, pat) for pat in ALWAYS_EXCLUDED):
            continue
        (workdir / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for root, dirs, files in os.walk(project):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, pat) for pat in ALWAYS_EXCLUDED)]
        for f in files:
            p = Path(root) / f
            try:
                if p.stat().st_size > limit:
                    large.append(p.relative_to(project).as_posix())
            except OSError:
                continue
    return sorted(large)
