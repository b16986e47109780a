"""The quickstart: every workload shape, end to end, on one machine with nothing else installed.

>>> from runtime.quickstart import quickstart
>>> result = quickstart(workdir=".raylane/quickstart")   # doctest: +SKIP

Stages run in order on one local Ray cluster (or ``address``); each returns a dict of what it
did. A ``reporter`` hears each stage start and finish (the default prints a line per stage on
stderr; the CLI draws progress lines); ``key_figure`` sums up a stage's dict in a few words.
A failing stage stops the quickstart with its error.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

# Each stage module loads its engines only when its stage runs.
from runtime.agents.quickstart import stage_agent
from runtime.batch.quickstart import stage_batch
from runtime.log import logger
from runtime.ray_env import ray_logs_dir, ray_session
from runtime.registry import tracking_uri
from runtime.release.quickstart import stage_release
from runtime.serving.quickstart import stage_serve
from runtime.tiny_model import model_fingerprint, write_tiny_model
from runtime.training.quickstart import stage_train_finetune


@dataclass
class QuickstartContext:
    workdir: Path
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)
    serving: tuple[Any, str] | None = None  # (spec, url) of the app the serve stage leaves up for release
    api_keys: list[str] = field(default_factory=list)


@dataclass
class QuickstartResult:
    workdir: str
    ray_address: str
    stages: list[dict[str, Any]]
    seconds: float
    ok: bool = True
    dashboard_url: str | None = None
    ray_logs: str | None = None  # this Ray session's log folder (workers, Serve, HAProxy, raylet)
    tracking_uri: str | None = None  # the MLflow registry the train stage registered into

    def to_dict(self) -> dict:
        return asdict(self)


_log = logger("quickstart")


class Reporter(Protocol):
    def start(self, i: int, n: int, name: str, what: str) -> None: ...
    def done(self, i: int, n: int, name: str, seconds: float, details: dict) -> None: ...
    def failed(self, i: int, n: int, name: str, seconds: float, error: BaseException) -> None: ...


class LineReporter:
    """A line on stderr as each stage starts and finishes."""

    def start(self, i: int, n: int, name: str, what: str) -> None:
        _log(f"[{i}/{n}] {name}: {what} ...")

    def done(self, i: int, n: int, name: str, seconds: float, details: dict) -> None:
        figure = key_figure(name, details)
        _log(f"[{i}/{n}] {name}: done in {seconds:g} s" + (f"; {figure}" if figure else ""))

    def failed(self, i: int, n: int, name: str, seconds: float, error: BaseException) -> None:
        _log(f"[{i}/{n}] {name}: failed after {seconds:g} s: {type(error).__name__}: {error}")


def _train_figure(d: dict) -> str:
    t, f = d["training"], d["finetune"]
    reg = f.get("registry") or {}
    return (f"loss {t['first_loss']:.2f} → {t['last_loss']:.2f}; LoRA {f['first_loss']:.2f} → "
            f"{f['last_loss']:.2f}, {reg.get('name')} v{reg.get('version')} {reg.get('alias')}")


def _batch_figure(d: dict) -> str:
    rate = f"{d['rows_per_s']:g} rows/s, " if d.get("rows_per_s") else ""
    return (f"{d['rows_out']}/{d['rows_in']} rows ({d['rows_error']} error rows), {rate}"
            f"{d['tokens_per_s']:g} tok/s" + (", verified" if d.get("verified") else ""))


def _kuberay_figure(d: dict) -> str:
    kinds: dict[str, int] = {}
    for kind in d["rendered"].values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return f"{len(d['rendered'])} specs → " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


FIGURES: dict[str, Callable[[dict], str]] = {
    "tiny-model": lambda d: f"fingerprint {d['fingerprint']}",
    "train": _train_figure,
    "batch": _batch_figure,
    "serve": lambda d: f"TTFT {d['ttft_ms']:.0f} ms ({d['model']}), ready in {d['ready_seconds']:g} s",
    "release": lambda d: (f"{d['candidate']} promoted via {'→'.join(f'{w:g}' for w in d['steps'])} % in "
                          f"{d['rollout_seconds']:g} s, {d['requests']} requests, {d['failed']} failed"),
    "agent": lambda d: (f"{d['steps']} steps, tools {', '.join(d['tools_called']) or 'none'}, "
                        f"{d['tokens']} tokens" + ("" if d.get("answered") else ", no answer")),
    "kuberay": _kuberay_figure,
}


def key_figure(name: str, details: dict) -> str:
    """The few words that say how stage ``name`` went (loss, rows/s, tokens/s, TTFT)."""
    fn = FIGURES.get(name)
    if fn is None:
        return ""
    try:
        return fn(details)
    except (KeyError, TypeError, ValueError):  # a stage that returned less than usual
        return ""


def stage_tiny_model(ctx: QuickstartContext) -> dict:
    ctx.model_dir = write_tiny_model(ctx.workdir / "models" / "tiny-llama", seed=0)
    return {"model": str(ctx.model_dir), "fingerprint": model_fingerprint(ctx.model_dir)}


STAGES: list[tuple[str, str, Callable[[QuickstartContext], dict]]] = [
    ("tiny-model", "write the embedded tiny Llama", stage_tiny_model),
    ("train", "tiny training, a LoRA fine-tune, the eval gate and registration (Ray Train, MLflow)",
     stage_train_finetune),
    ("batch", "batch inference over a sample corpus, then verify the output",
     stage_batch),
    ("serve", "serve the model with the fine-tuned adapter on Ray Serve and stream one chat reply",
     stage_serve),
    ("release", "drift -> a new fine-tune -> the eval gate -> a canary rollout on the live app -> promoted",
     stage_release),
    ("agent", "an agent session with a calculator and retrieval over the sample corpus",
     stage_agent),
]


Stage = tuple[str, str, Callable[[QuickstartContext], dict]]


def quickstart(
    workdir: str | Path = ".raylane/quickstart",
    address: str | None = None,
    extra_stages: list[Stage] | None = None,
    reporter: Reporter | None = None,
    on_ray: Callable[[Any], None] | None = None,
) -> QuickstartResult:
    """Run every stage; ``extra_stages`` (e.g. the CLI's KubeRay render) run after the built-in ones.
    ``on_ray(info)`` is called once Ray is up (``runtime.ray_env.RayInfo``: address, dashboard)."""
    reporter = reporter or LineReporter()
    stages = STAGES + list(extra_stages or [])
    t0 = time.perf_counter()
    ctx = QuickstartContext(workdir=Path(workdir).expanduser().resolve())
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    with ray_session(address) as info:
        _log(f"Ray at {info.address} ({info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs); work dir {ctx.workdir}")
        if on_ray:
            on_ray(info)
        logs = ray_logs_dir()
        for i, (name, what, fn) in enumerate(stages, 1):
            reporter.start(i, len(stages), name, what)
            s = time.perf_counter()
            try:
                details = fn(ctx)
            except BaseException as e:
                reporter.failed(i, len(stages), name, round(time.perf_counter() - s, 2), e)
                raise
            secs = round(time.perf_counter() - s, 2)
            ctx.results[name] = details
            done.append({"stage": name, "seconds": secs, **details})
            reporter.done(i, len(stages), name, secs, details)
        address_used = info.address
    return QuickstartResult(str(ctx.workdir), address_used, done, round(time.perf_counter() - t0, 2),
                            dashboard_url=info.dashboard_url, ray_logs=logs,
                            tracking_uri=tracking_uri(str(ctx.workdir)))
