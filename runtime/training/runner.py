"""Driver side of the Ray Train shapes: prepare data, place the gang, fit, evaluate, register, gate.

>>> from runtime.specs import load_spec
>>> from runtime.training import run_finetune
>>> result = run_finetune(load_spec("examples/finetune.yaml"))     # doctest: +SKIP
>>> result.final_step, result.registry["alias"]                     # doctest: +SKIP

Resume is Ray Train's own: the same storage root and run name make ``TorchTrainer.fit()`` pick up
the latest committed checkpoint, after a killed worker (``train.max_failures``) or a restarted
driver alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime import storage
from runtime.errors import RaylaneError, TrainingDiverged
from runtime.log import logger
from runtime.placement import check_gang
from runtime.ray_env import ray_session
from runtime.registry import CHAMPION, Registry
from runtime.specs import dump_spec
from runtime.training.data import check_columns, steps_per_epoch
from runtime.training.evaluate import evaluate_model, gate_decision
from runtime.training.loop import STATE_FILE, load_state, train_loop_per_worker
from runtime.training.recipes import recipe_for
from runtime.training.shards import Shards, data_fingerprint, ensure_shards


@dataclass
class TrainResult:
    kind: str
    name: str
    final_step: int
    total_steps: int
    resumed_from_step: int | None
    restarts: int
    train_loss: float | None
    eval: dict[str, float]
    checkpoint: str
    model_dir: str
    registry: dict[str, Any] | None
    gate: dict[str, Any] | None
    steps_per_second: float | None
    checkpoint_seconds: float | None  # time the loop spent saving/reporting checkpoints (this attempt)
    seconds: float
    dataset_fingerprint: str
    loss_history: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # the token shards: key, directory, built (or reused), seconds
    ok: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


_log = logger("train")


@dataclass
class Prepared:
    cfg: dict
    shards: Shards
    eval_texts: list[str]
    fingerprint: str
    base_model: str | None

    @property
    def train_blocks(self):
        """The training sequences (``TokenShards``: indexed by an array of sequence numbers)."""
        return self.shards.train

    @property
    def eval_blocks(self):
        return self.shards.eval


def prepare(spec) -> Prepared:
    """Tokenizer, token shards and the worker config. The shards of ``spec.data`` are reused when an
    earlier run built them (``<root>/datasets/<key>/``), else built with Ray Data on the connected
    cluster (call it inside ``ray_session``)."""
    import yaml
    from transformers import AutoTokenizer

    root = spec.storage.resolved()
    cfg: dict[str, Any] = {
        "name": spec.name, "optim": spec.train.model_dump(), "run_dir": storage.join(root, "runs", spec.name),
        "spec_yaml": yaml.safe_dump(dump_spec(spec), sort_keys=False),
    }
    recipe = recipe_for(spec, root)
    tok = AutoTokenizer.from_pretrained(recipe.tokenizer_dir)
    recipe.adopt(tok)
    cfg["recipe"] = recipe
    check_columns(spec.data, tok)  # in the driver: a bad column is one clear line, not a Ray Data traceback
    fp = data_fingerprint(spec.data)
    shards = ensure_shards(spec.data, recipe.tokenizer_dir, root, vocab_size=len(tok), fingerprint=fp,
                           cpus=min(1.0, spec.resources.cpus_per_worker))
    cfg["train_shards"] = shards.train
    world, bs = spec.resources.num_workers, spec.train.batch_size
    spe = steps_per_epoch(len(shards.train), bs, world)
    if spe == 0:
        raise RaylaneError(
            f"{spec.data.path}: {len(shards.train)} training sequences of {spec.data.max_seq_len} tokens; one step "
            f"needs {bs * world} (train.batch_size {bs} x {world} workers)",
            hint="add data, or lower train.batch_size / data.max_seq_len / resources.num_workers",
        )
    cfg["total_steps"] = spec.train.steps or spe * spec.train.epochs
    eval_texts = shards.eval_texts() if spec.eval.metric else []
    return Prepared(cfg, shards, eval_texts, fp, recipe.base_model)


def run_train_spec(spec, *, address: str | None = None, **_: Any) -> TrainResult:
    """Run (or resume) a ``Training`` or ``FineTune`` spec; returns a ``TrainResult``.

    Steps: prepare (tokenizer; token shards, built once with Ray Data and reused) -> fit (Ray
    Train, resuming from the run's last committed checkpoint; the final model copied out) ->
    evaluate (the new model and the champion on the same held-out data) -> register (an MLflow
    model version with its lineage) -> gate (promote it to champion, or leave it challenger). With
    the registry on, the MLflow run is opened before fit and ends FAILED when any step raises.
    """
    t_start = time.time()
    with ray_session(address):
        prep = prepare(spec)
        run_dir = prep.cfg["run_dir"]
        total = prep.cfg["total_steps"]
        d = prep.shards
        how = f"tokenized in {d.seconds:.1f} s" if d.built else "reused"
        _log(f"{spec.kind} {spec.name}: {len(d.train)} train / {len(d.eval)} eval sequences ({how}: {d.directory}), "
             f"{total} steps, {spec.resources.num_workers} worker(s); run dir {run_dir}")
        reg = Registry(spec.storage.resolved()) if spec.registry.enabled else None
        run_id = None
        if reg:
            # Opened before training so rank 0 logs its live curves into it; the registered version links to it.
            run_id = reg.start_run(spec.name, {"raylane.kind": spec.kind, "raylane.run": spec.name,
                                               "raylane.run_dir": run_dir, "raylane.dataset": spec.data.path,
                                               "raylane.dataset_fingerprint": prep.fingerprint})
            prep.cfg["mlflow"] = {"tracking_uri": reg.uri, "run_id": run_id}
        try:
            fitted = _fit(spec, prep, t_start)
            champion = reg.alias(spec.registered_name(), CHAMPION) if reg else None
            metrics, champion_metrics = _evaluate(spec, prep, fitted, champion)
            registry = gate = None
            if reg:
                version, rerun = _register(spec, prep, fitted, metrics, reg, run_id)
                registry, gate = _gate(spec, reg, version, rerun, metrics, champion_metrics, champion)
        except BaseException:
            if run_id:
                try:
                    reg.end_run(run_id, "FAILED")
                except Exception:  # noqa: BLE001, S110 - the training error is the one to report
                    pass
            raise
    return _result(spec, prep, fitted, metrics, registry, gate, t_start)


@dataclass
class _Fitted:
    """What fit leaves for the later steps: Ray Train's result and the model copied out of it."""

    result: Any  # ray.train.Result
    attempts: list[dict]  # this run's attempts (resume points, restarts), oldest first
    state: dict  # the final checkpoint's training state: step, losses
    model_dir: str

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def train_loss(self) -> float | None:
        return self.state["losses"][-1] if self.state["losses"] else None


def _fit(spec, prep: Prepared, t_start: float) -> _Fitted:
    """Train on Ray Train, refuse a run the divergence guard stopped, and copy the final
    checkpoint's model to ``<run_dir>/model-step-NNNNNN``."""
    run_dir = prep.cfg["run_dir"]
    result = _train(spec, prep)
    attempts = _attempts_since(run_dir, t_start)
    guard = _read_json(storage.join(run_dir, "guard.json"))
    if guard and guard["time"] >= t_start:
        last = result.checkpoint.path if result.checkpoint else None
        raise TrainingDiverged(
            f"{spec.name}: training stopped: {guard['problem']}; last good checkpoint: {last or 'none'}",
            hint="lower train.learning_rate, set train.grad_clip, or add warmup_steps; rerunning resumes "
            "from the last good checkpoint",
        )
    if result.checkpoint is None:
        raise RaylaneError(f"{spec.name}: Ray Train finished without a checkpoint")
    ckpt = result.checkpoint
    state = _read_state(ckpt)
    model_uri = storage.join(run_dir, f"model-step-{state['step']:06d}")
    _copy_dir(ckpt.filesystem, storage.join(ckpt.path, "model"), model_uri)
    return _Fitted(result, attempts, state, _local_dir(model_uri) or model_uri)


def _evaluate(spec, prep: Prepared, fitted: _Fitted, champion) -> tuple[dict, dict | None]:
    """Evaluate the new model, and the champion on the same held-out data, in one Ray task."""
    import ray

    _log(f"{spec.name}: evaluating step {fitted.step}" + (f" and champion v{champion.version}" if champion else ""))
    if len(prep.eval_blocks) == 0:
        return {}, None

    def both(new_dir, old_dir, blocks, metric, texts):
        new = evaluate_model(new_dir, blocks, metric=metric, texts=texts)
        old = evaluate_model(old_dir, blocks, metric=metric, texts=texts) if old_dir else None
        return new, old

    task = ray.remote(both).options(num_cpus=min(1.0, spec.resources.cpus_per_worker), max_retries=1)
    return ray.get(task.remote(fitted.model_dir, champion.source if champion else None, prep.eval_blocks,
                               spec.eval.metric, prep.eval_texts))


def _register(spec, prep: Prepared, fitted: _Fitted, metrics: dict, reg: Registry, run_id: str):
    """A model version for the fitted model, linked to the MLflow run, with its lineage, params and
    metrics. A rerun of a finished run finds the version it registered then: ``(version, True)``."""
    name = spec.registered_name()
    existing = reg.find_source(name, fitted.model_dir)
    if existing:
        reg.end_run(run_id)  # nothing trained; the version keeps linking to its own run
        return existing, True
    lineage = {
        "raylane.kind": spec.kind, "raylane.run": spec.name, "raylane.run_dir": prep.cfg["run_dir"],
        "raylane.checkpoint": fitted.result.checkpoint.path, "raylane.dataset": spec.data.path,
        "raylane.dataset_fingerprint": prep.fingerprint, "raylane.final_step": str(fitted.step),
        "raylane.base_model": getattr(spec, "base_model", "") or "",
        "raylane.base_model_path": prep.base_model or "",
    }
    params = {**{f"train.{k}": v for k, v in spec.train.model_dump().items()},
              "num_workers": spec.resources.num_workers}
    params.update(prep.cfg["recipe"].params())
    version = reg.register(name, fitted.model_dir, params=params, tags=lineage, run_id=run_id,
                           metrics={**metrics, "train_loss": fitted.train_loss})
    return version, False


def _gate(spec, reg: Registry, version, rerun: bool, metrics: dict, champion_metrics: dict | None,
          champion) -> tuple[dict, dict]:
    """Promote ``version`` to champion when it beats the champion's gate metric by the margin, else
    leave it challenger (a rerun's version keeps its alias, not gated again); returns the result's
    ``registry`` and ``gate``."""
    name = spec.registered_name()
    if rerun:
        alias = CHAMPION if CHAMPION in version.aliases else "challenger"
        gate = {"promote": False, "reason": f"already registered as v{version.version} (a rerun of a "
                "finished run); not evaluated again by the gate", "metric": spec.eval.gate_metric}
    else:
        decision = gate_decision(metrics, champion_metrics, spec.eval.gate_metric,
                                 margin=spec.eval.margin, higher_is_better=spec.eval.higher_is_better)
        gate = decision.to_dict()
        released = None
        if decision.promote and getattr(spec, "release", None) is not None and champion is not None:
            released = gate["release"] = release_version(spec, version.version)
        elif decision.promote:
            version = reg.promote(name, version.version)
        if champion:
            gate["champion_version"] = champion.version
        alias = CHAMPION if decision.promote and released is None else "challenger"
    _log(f"{spec.name}: registered {name} v{version.version} as {alias}: {gate['reason']}")
    registry = {"name": name, "version": version.version, "alias": alias, "uri": reg.uri,
                "model_uri": f"models:/{name}/{version.version}"}
    return registry, gate


def release_version(spec, version: int) -> dict:
    """Start a rollout of ``models:/NAME/version`` on ``spec.release``'s serving app (the gate
    passed; ``champion`` stays where it is until the rollout promotes). A rollout that cannot start
    (one already progressing there, say) leaves the version challenger and says so here."""
    from runtime import release

    r = spec.release
    name = spec.registered_name()
    adapter, _ = r.target(name)
    app = r.serve.model_copy(update={"rollout": r.rollout_for(adapter)})
    candidate = f"models:/{name}/{version}"
    try:
        state = release.rollout_start(app, candidate=candidate)
    except RaylaneError as e:
        _log(f"{spec.name}: the rollout of {candidate} on {app.name!r} did not start: {e.message}")
        return {"started": False, "app": app.name, "candidate": candidate, "error": e.message,
                "hint": e.hint or f"`raylane rollout start SERVE.yaml --candidate {candidate}` starts it by hand"}
    how = ("its replicas start the controller" if app.rollout.controller == "cluster"
           else "controller: manual, nothing decides until rollout_evaluate is called")
    _log(f"{spec.name}: {candidate} passed the gate; rollout {state.rollout_id} on {app.name!r} "
         f"({state.model_id}) at {state.weight:g}% ({how}); `raylane rollout status {app.name}`")
    return {"started": True, "app": app.name, "rollout_id": state.rollout_id, "model_id": state.model_id,
            "champion": state.champion, "candidate": state.candidate, "steps": state.steps,
            "controller": app.rollout.controller}


def _result(spec, prep: Prepared, fitted: _Fitted, metrics: dict, registry: dict | None, gate: dict | None,
            t_start: float) -> TrainResult:
    last = fitted.attempts[-1] if fitted.attempts else {}
    run_metrics = fitted.result.metrics or {}
    return TrainResult(
        kind=spec.kind, name=spec.name, final_step=fitted.step, total_steps=prep.cfg["total_steps"],
        resumed_from_step=last.get("resumed_from_step"),
        restarts=max(0, len(fitted.attempts) - 1), train_loss=fitted.train_loss,
        eval=metrics, checkpoint=fitted.result.checkpoint.path, model_dir=fitted.model_dir,
        registry=registry, gate=gate,
        steps_per_second=run_metrics.get("steps_per_second"),
        checkpoint_seconds=run_metrics.get("checkpoint_seconds"),
        seconds=round(time.time() - t_start, 2), dataset_fingerprint=prep.fingerprint,
        loss_history=[round(x, 5) for x in fitted.state["losses"]], data=prep.shards.summary(),
    )


def _attempts_since(run_dir: str, t0: float) -> list[dict]:
    out = []
    for p in storage.list_files(storage.join(run_dir, "attempts"), ".json"):
        fs, _ = storage.resolve(run_dir)
        with fs.open_input_stream(p) as f:
            a = json.loads(f.read())
        if a["time"] >= t0:
            out.append(a)
    return sorted(out, key=lambda a: a["time"])


def _read_json(uri: str) -> dict | None:
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def _train(spec, prep: Prepared):
    """Ray Train's ``TorchTrainer.fit()`` on the gang; its error becomes a one-line ``RaylaneError``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = spec.resources
    check_gang(res, spec.placement.strategy, spec.placement.timeout_s)
    cfg = prep.cfg  # the shards travel as their location; each worker maps what its batches need
    per_worker = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if res.uses_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.uses_gpu, resources_per_worker=per_worker,
            placement_strategy=spec.placement.strategy, accelerator_type=res.accelerator_type,
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage.join(spec.storage.resolved(), "runs"),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        ),
    )
    try:
        return trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's traceback; keep its last line
        detail = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise RaylaneError(
            f"training {spec.name!r} failed after {spec.train.max_failures} restart(s): "
            f"{detail[-1] if detail else type(e).__name__}",
            hint="the worker logs above have the full traceback; rerun the same spec to resume from the last checkpoint",
        ) from e


def _copy_dir(src_fs, src: str, dest_uri: str) -> None:
    import pyarrow.fs as pafs

    dfs, dpath = storage.resolve(dest_uri)
    if dfs.get_file_info(dpath).type != pafs.FileType.NotFound:
        dfs.delete_dir(dpath)
    dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(src, dpath, source_filesystem=src_fs, destination_filesystem=dfs)


def _local_dir(uri: str) -> str | None:
    return None if storage.is_remote(uri) else storage.resolve(uri)[1]


def _read_state(ckpt) -> dict:
    with ckpt.as_directory() as d:
        return load_state(f"{d}/{STATE_FILE}")
