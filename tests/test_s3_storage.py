"""``s3://`` paths end to end against a real S3 API (moto's server, started here): batch input,
output, shard commits and verification in a bucket, and training data read from a bucket.

pyarrow's S3 filesystem finds the endpoint in ``AWS_ENDPOINT_URL``, as it does for MinIO or any
S3-compatible store on a cluster; nothing in raylane is specific to this server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from runtime.serving.deploy import free_port
from tests.conftest import EXAMPLES, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BUCKET = "raylane-test"




@pytest.fixture(scope="module")
def s3_env():
    """A local S3 API; its credentials and endpoint in this process's environment (and so in the
    local Ray cluster the module starts after this fixture)."""
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            mp.setenv(k, v)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.3)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=30)


def _put(uri: str, data: bytes) -> None:
    from runtime import storage

    storage.write_bytes_atomic(uri, data)


def _objects(prefix: str) -> list[str]:
    import boto3

    resp = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


@pytest.fixture(scope="module")
def ray_s3(s3_env, ray_local):
    return ray_local


@pytest.mark.timeout(900)
def test_batch_reads_writes_commits_and_verifies_in_a_bucket(s3_env, ray_s3, tiny_model, tmp_path):
    from runtime.batch import run_batch
    from runtime.batch.corpus import sample_corpus
    from runtime.specs import parse_spec

    rows = sample_corpus(300, seed=3)
    _put(f"s3://{BUCKET}/corpus/part-0.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = parse_spec({
        "kind": "BatchInference", "name": "s3-batch", "model": str(tiny_model),
        "input": {"path": f"s3://{BUCKET}/corpus/part-0.jsonl"},
        "output": {"path": f"s3://{BUCKET}/out", "format": "jsonl"},
        "sampling": {"max_tokens": 8, "ignore_eos": True},
        "rows_per_shard": 100, "max_model_len": 256, "storage": {"root": f"s3://{BUCKET}/store"},
    })
    r = run_batch(spec)
    assert r.ok, r.problems
    assert (r.rows_in, r.shards_total, r.shards_skipped) == (300, 3, 0)
    assert r.rows_out + r.rows_error == 300
    keys = _objects("out/")
    assert [k for k in keys if k.startswith("out/shard-")] == [f"out/shard-0000{i}.jsonl" for i in range(3)]
    assert len([k for k in keys if "/_commits/" in k or "commit" in k]) >= 3, keys
    assert not [k for k in keys if ".tmp" in k], keys  # nothing half-written left behind

    # A rerun sees the commit records in the bucket and runs nothing.
    again = run_batch(spec)
    assert (again.shards_skipped, again.shards_run, again.rows_run) == (3, 0, 0) and again.ok

    # `raylane batch verify` proves completeness from the bucket, and catches a deleted shard.
    ok = run_cli("batch", "verify", f"s3://{BUCKET}/out", "--json", timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["rows_out"] + report["rows_error"] == 300
    import boto3

    boto3.client("s3").delete_object(Bucket=BUCKET, Key="out/shard-00001.jsonl")
    bad = run_cli("batch", "verify", f"s3://{BUCKET}/out", "--json", timeout=300)
    assert bad.returncode != 0
    assert "shard-00001.jsonl" in bad.stdout + bad.stderr


@pytest.mark.timeout(600)
def test_training_data_from_a_bucket(s3_env, ray_s3, tmp_path):
    from runtime.specs import parse_spec
    from runtime.training import run_training

    _put(f"s3://{BUCKET}/data/train.jsonl", (EXAMPLES / "data" / "train.jsonl").read_bytes())
    d = yaml.safe_load((EXAMPLES / "train.yaml").read_text())
    d.update(name="s3-data", storage={"root": str(tmp_path)}, registry={"enabled": False})
    d["data"]["path"] = f"s3://{BUCKET}/data/train.jsonl"
    d["train"].update(steps=4, checkpoint_every_n_steps=2)
    r = run_training(parse_spec(d))
    assert r.final_step == 4 and len(r.loss_history) == 4
    assert r.dataset_fingerprint and os.path.isdir(r.checkpoint)


@pytest.mark.timeout(300)
def test_output_lease_in_a_bucket(s3_env, monkeypatch):
    """The object-store lease (check-then-put, then a read-back), taken through OutputLease directly."""
    from runtime.batch import lease as lease_mod
    from runtime.batch.lease import LEASE, LeaseHeld, OutputLease

    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.2)
    out = f"s3://{BUCKET}/leased"
    a = OutputLease(out, "run-a", ttl_s=1.5).acquire()
    assert f"leased/{LEASE}" in _objects("leased/")
    with pytest.raises(LeaseHeld, match="run run-a"):
        OutputLease(out, "run-b").acquire()
    a._stop.set()  # a's driver dies: no more heartbeats, the lease expires
    a._thread.join()
    time.sleep(1.7)
    b = OutputLease(out, "run-b").acquire()
    assert json.loads(_get(f"leased/{LEASE}"))["holder"] == "run-b"
    b.release()
    assert f"leased/{LEASE}" not in _objects("leased/")


def _get(key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
