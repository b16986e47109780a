"""KubeRay's rules the CRD schema cannot express: each violation is a clear error before anything is sent."""

from __future__ import annotations

import copy

import pytest

from cluster.render import render
from cluster.rules import violations
from runtime.errors import ManifestInvalid
from runtime.specs import parse_spec

BATCH = {
    "kind": "BatchInference",
    "name": "batch",
    "model": "tiny",
    "input": {"path": "s3://b/in.jsonl"},
    "output": {"path": "s3://b/out"},
}
SERVE = {"kind": "OnlineInference", "name": "chat", "model": "tiny"}


def spec(base, **k8s):
    return parse_spec({**base, "kubernetes": k8s} if k8s else base)


def rendered_job():
    return copy.deepcopy(render(spec(BATCH))[-1])


@pytest.mark.parametrize(
    "base,kind,limit",
    [
        (BATCH, "RayJob", 47),
        (SERVE, "RayService", 47),
        ({**BATCH, "schedule": "0 2 * * *"}, "RayCronJob", 41),
    ],
)
def test_name_length_limit(base, kind, limit):
    ok = parse_spec({**base, "name": "a" * limit})
    assert render(ok)[-1]["kind"] == kind
    with pytest.raises(ManifestInvalid) as e:
        render(parse_spec({**base, "name": "a" * (limit + 1)}))
    msg = str(e.value)
    assert f"{kind} name" in msg and f"at most {limit}" in msg and "set name in the spec" in msg


def test_name_must_start_with_a_letter():
    with pytest.raises(ManifestInvalid, match="DNS-1035"):
        render(parse_spec({**BATCH, "name": "7b-batch"}))


def test_exactly_one_of_cluster_spec_and_selector():
    both = rendered_job()
    both["spec"]["clusterSelector"] = {"ray.io/cluster": "shared"}
    neither = rendered_job()
    del neither["spec"]["rayClusterSpec"]
    for m in (both, neither):
        (v,) = [v for v in violations(m) if "exactly one" in v.message]
        assert v.field == "spec.rayClusterSpec" and v.spec_field == "kubernetes.cluster_selector"
    assert violations(rendered_job()) == []


def test_suspend_requires_shutdown_after_job_finishes():
    # Kueue suspends the RayJob until admitted; KubeRay refuses that without shutdownAfterJobFinishes.
    s = parse_spec(
        {
            **BATCH,
            "queue": {"system": "kueue", "name": "q"},
            "kubernetes": {"shutdown_after_job_finishes": False, "ttl_seconds_after_finished": 0},
        }
    )
    with pytest.raises(ManifestInvalid) as e:
        render(s)
    assert "spec.suspend" in str(e.value) and "kubernetes.shutdown_after_job_finishes" in str(
        e.value
    )


def test_ttl_requires_shutdown_after_job_finishes():
    with pytest.raises(ManifestInvalid) as e:
        render(spec(BATCH, shutdown_after_job_finishes=False, ttl_seconds_after_finished=300))
    assert "spec.ttlSecondsAfterFinished" in str(e.value) and "shutdownAfterJobFinishes" in str(
        e.value
    )
    # without the TTL, keeping the cluster is fine
    assert (
        render(spec(BATCH, shutdown_after_job_finishes=False, ttl_seconds_after_finished=0))[-1][
            "kind"
        ]
        == "RayJob"
    )


RULES = [
    {"job_status": "SUCCEEDED", "policy": "DeleteCluster", "ttl_seconds": 60},
    {"job_status": "FAILED", "policy": "DeleteCluster", "ttl_seconds": 3600},
]


def test_deletion_rules_exclude_shutdown_and_ttl():
    with pytest.raises(ManifestInvalid) as e:  # the defaults turn shutdown (and a TTL) on
        render(spec(BATCH, deletion_rules=RULES))
    text = str(e.value)
    assert "deletionRules and shutdownAfterJobFinishes are mutually exclusive" in text
    with pytest.raises(ManifestInvalid, match="ttlSecondsAfterFinished"):
        render(spec(BATCH, deletion_rules=RULES, shutdown_after_job_finishes=False))
    job = render(
        spec(
            BATCH,
            deletion_rules=RULES,
            shutdown_after_job_finishes=False,
            ttl_seconds_after_finished=0,
        )
    )[-1]["spec"]
    assert job["deletionStrategy"]["deletionRules"][0] == {
        "policy": "DeleteCluster",
        "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60},
    }


def test_deletion_rule_consistency():
    rules = [
        {"job_status": "FAILED", "policy": "DeleteSelf", "ttl_seconds": 10},
        {"job_status": "FAILED", "policy": "DeleteCluster", "ttl_seconds": 60},
        {"job_status": "FAILED", "policy": "DeleteWorkers", "ttl_seconds": 0},
    ]
    with pytest.raises(ManifestInvalid) as e:
        render(
            spec(
                BATCH,
                deletion_rules=rules,
                shutdown_after_job_finishes=False,
                ttl_seconds_after_finished=0,
            )
        )
    text = str(e.value)
    assert "DeleteSelf TTL (10) must be >= DeleteCluster TTL (60)" in text
    assert "DeleteWorkers does not work with autoscaling" in text


def test_scheduled_run_cannot_use_a_queue():
    with pytest.raises(ManifestInvalid, match="RayCronJob copies only its jobTemplate"):
        render(
            parse_spec(
                {**BATCH, "schedule": "0 2 * * *", "queue": {"system": "kueue", "name": "q"}}
            )
        )


def test_invalid_cron_schedule():
    with pytest.raises(ManifestInvalid, match="not a valid cron schedule"):
        render(parse_spec({**BATCH, "schedule": "61 2 * * *"}))


def test_interactive_mode_forbids_retries_and_sidecar_needs_new_cluster():
    with pytest.raises(ManifestInvalid, match="InteractiveMode does not allow retries"):
        render(spec(BATCH, submission_mode="InteractiveMode", backoff_limit=2))
    with pytest.raises(ManifestInvalid, match="SidecarMode cannot run on an existing cluster"):
        render(
            spec(
                BATCH,
                submission_mode="SidecarMode",
                cluster_selector="shared",
                shutdown_after_job_finishes=False,
                ttl_seconds_after_finished=0,
            )
        )


def test_incremental_upgrade_needs_gateway_options():
    with pytest.raises(ManifestInvalid, match="gatewayClassName"):
        render(spec(SERVE, upgrade_strategy="NewClusterWithIncrementalUpgrade"))


def test_every_problem_is_reported_at_once():
    s = parse_spec(
        {
            **BATCH,
            "name": "x" * 50,
            "queue": {"system": "kueue", "name": "q"},
            "kubernetes": {"shutdown_after_job_finishes": False},
        }
    )
    with pytest.raises(ManifestInvalid) as e:
        render(s)
    assert len(e.value.problems) >= 3  # name, suspend, TTL
