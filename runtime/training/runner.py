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
from runtime.training.data import fingerprint, load_documents, pack, split, steps_per_epoch
from runtime.training.evaluate import evaluate_model, gate_decision
from runtime.training.loop import STATE_FILE, load_state, train_loop_per_worker
from runtime.training.recipes import recipe_for


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
    ok: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


_log = logger("train")


@dataclass
class Prepared:
    cfg: dict
    train_blocks: Any
    eval_blocks: Any
    eval_texts: list[str]
    fingerprint: str
    base_model: str | None


def prepare(spec) -> Prepared:
    """Tokenizer, data split and packing, and the worker config; no Ray needed."""
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
    docs = load_documents(spec.data, tok)
    train_docs, eval_docs = split(docs, spec.data.eval_fraction)
    train_blocks = pack(tok, train_docs, spec.data.max_seq_len)
    eval_blocks = pack(tok, eval_docs, spec.data.max_seq_len)
    world, bs = spec.resources.num_workers, spec.train.batch_size
    spe = steps_per_epoch(len(train_blocks), bs, world)
    if spe == 0:
        raise RaylaneError(
            f"{spec.data.path}: {len(train_blocks)} training sequences of {spec.data.max_seq_len} tokens; one step "
            f"needs {bs * world} (train.batch_size {bs} x {world} workers)",
            hint="add data, or lower train.batch_size / data.max_seq_len / resources.num_workers",
        )
    cfg["total_steps"] = spec.train.steps or spe * spec.train.epochs
    return Prepared(cfg, train_blocks, eval_blocks, eval_docs, fingerprint(docs), recipe.base_model)


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


def _fit(spec, prep: Prepared):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = spec.resources
    check_gang(res, spec.placement.strategy, spec.placement.timeout_s)
    cfg = dict(prep.cfg, blocks_ref=ray.put(prep.train_blocks))
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


def _evaluate(spec, prep: Prepared, model_dir: str, champion_dir: str | None) -> tuple[dict, dict | None]:
    """Evaluate the new model, and the champion on the same held-out data, in one Ray task."""
    import ray

    if len(prep.eval_blocks) == 0:
        return {}, None

    def both(new_dir, old_dir, blocks, metric, texts):
        new = evaluate_model(new_dir, blocks, metric=metric, texts=texts)
        old = evaluate_model(old_dir, blocks, metric=metric, texts=texts) if old_dir else None
        return new, old

    task = ray.remote(both).options(num_cpus=min(1.0, spec.resources.cpus_per_worker), max_retries=1)
    return ray.get(task.remote(model_dir, champion_dir, prep.eval_blocks, spec.eval.metric, prep.eval_texts))


def _local_dir(uri: str) -> str | None:
    return None if storage.is_remote(uri) else storage.resolve(uri)[1]


def run_train_spec(spec, *, address: str | None = None, **_: Any) -> TrainResult:
    t_start = time.time()
    prep = prepare(spec)
    run_dir = prep.cfg["run_dir"]
    total = prep.cfg["total_steps"]
    _log(f"{spec.kind} {spec.name}: {len(prep.train_blocks)} train / {len(prep.eval_blocks)} eval sequences, "
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
        return _train_register(spec, prep, address, t_start, reg, run_id)
    except BaseException:
        if run_id:
            try:
                reg.end_run(run_id, "FAILED")
            except Exception:  # noqa: BLE001, S110 - the training error is the one to report
                pass
        raise


def _train_register(spec, prep: Prepared, address, t_start: float, reg, run_id: str | None) -> TrainResult:
    run_dir = prep.cfg["run_dir"]
    guard_uri = storage.join(run_dir, "guard.json")
    total = prep.cfg["total_steps"]
    with ray_session(address):
        result = _fit(spec, prep)
        attempts = _attempts_since(run_dir, t_start)
        guard = _read_json(guard_uri)
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
        final_step = state["step"]
        model_uri = storage.join(run_dir, f"model-step-{final_step:06d}")
        _copy_dir(ckpt.filesystem, storage.join(ckpt.path, "model"), model_uri)
        model_dir = _local_dir(model_uri) or model_uri

        name = spec.registered_name()
        champion = reg.alias(name, CHAMPION) if reg else None
        _log(f"{spec.name}: evaluating step {final_step}" + (f" and champion v{champion.version}" if champion else ""))
        new_metrics, champ_metrics = _evaluate(spec, prep, model_dir, champion.source if champion else None)

        registry_info = gate = None
        if reg:
            lineage = {
                "raylane.kind": spec.kind, "raylane.run": spec.name, "raylane.run_dir": run_dir,
                "raylane.checkpoint": ckpt.path, "raylane.dataset": spec.data.path,
                "raylane.dataset_fingerprint": prep.fingerprint, "raylane.final_step": str(final_step),
                "raylane.base_model": getattr(spec, "base_model", "") or "",
                "raylane.base_model_path": prep.base_model or "",
            }
            params = {**{f"train.{k}": v for k, v in spec.train.model_dump().items()},
                      "num_workers": spec.resources.num_workers}
            params.update(prep.cfg["recipe"].params())
            metrics = {**new_metrics, "train_loss": state["losses"][-1] if state["losses"] else None}
            existing = reg.find_source(name, model_dir)
            if existing:
                reg.end_run(run_id)  # nothing trained; the version keeps linking to its own run
                version = existing
                alias = CHAMPION if CHAMPION in existing.aliases else "challenger"
                gate = {"promote": False, "reason": f"already registered as v{existing.version} (a rerun of a "
                        "finished run); not evaluated again by the gate", "metric": spec.eval.gate_metric}
            else:
                version = reg.register(name, model_dir, params=params, metrics=metrics, tags=lineage, run_id=run_id)
                decision = gate_decision(new_metrics, champ_metrics, spec.eval.gate_metric,
                                         margin=spec.eval.margin, higher_is_better=spec.eval.higher_is_better)
                if decision.promote:
                    version = reg.promote(name, version.version)
                gate = decision.to_dict()
                if champion:
                    gate["champion_version"] = champion.version
                alias = CHAMPION if decision.promote else "challenger"
            registry_info = {"name": name, "version": version.version, "alias": alias, "uri": reg.uri,
                             "model_uri": f"models:/{name}/{version.version}"}
            _log(f"{spec.name}: registered {name} v{version.version} as {alias}: {gate['reason']}")

    last = attempts[-1] if attempts else {}
    return TrainResult(
        kind=spec.kind, name=spec.name, final_step=final_step, total_steps=total,
        resumed_from_step=last.get("resumed_from_step"),
        restarts=max(0, len(attempts) - 1), train_loss=state["losses"][-1] if state["losses"] else None,
        eval=new_metrics, checkpoint=ckpt.path, model_dir=model_dir, registry=registry_info, gate=gate,
        steps_per_second=(result.metrics or {}).get("steps_per_second"),
        checkpoint_seconds=(result.metrics or {}).get("checkpoint_seconds"),
        seconds=round(time.time() - t_start, 2), dataset_fingerprint=prep.fingerprint,
        loss_history=[round(x, 5) for x in state["losses"]],
    )


def _read_state(ckpt) -> dict:
    with ckpt.as_directory() as d:
        return load_state(f"{d}/{STATE_FILE}")
