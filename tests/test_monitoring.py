"""Unit tier for observability: the PodMonitor `raylane render --monitoring` emits, and the Grafana
dashboard's queries (the e2e modules check the same queries against real scrapes)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cluster.monitoring import DASHBOARD, load_dashboard, render_monitoring
from runtime.metrics import DEFINED, exported_names
from runtime.specs import parse_spec
from tests.conftest import EXAMPLES, run_cli
from tests.dashboard import metric_names, panels_by_row, queried_metrics

SERVE = {"kind": "OnlineInference", "name": "chat", "model": "tiny",
         "kubernetes": {"namespace": "ml", "labels": {"release": "prometheus"}}}


def test_pod_monitor_scrapes_the_ray_metrics_port_of_the_specs_pods():
    monitor, configmap = render_monitoring(parse_spec(SERVE))
    assert monitor == {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": "chat-ray-metrics",
            "namespace": "ml",
            # kubernetes.labels reach the monitor too: kube-prometheus-stack selects monitors by `release`.
            "labels": {"app.kubernetes.io/name": "raylane", "app.kubernetes.io/instance": "chat",
                       "raylane.dev/kind": "onlineinference", "release": "prometheus"},
        },
        "spec": {
            "jobLabel": "app.kubernetes.io/instance",
            "namespaceSelector": {"matchNames": ["ml"]},
            "selector": {"matchLabels": {"app.kubernetes.io/name": "raylane", "app.kubernetes.io/instance": "chat"}},
            "podMetricsEndpoints": [{
                "port": "metrics",
                "path": "/metrics",
                "interval": "15s",
                "relabelings": [
                    {"action": "replace", "targetLabel": "ray_io_cluster",
                     "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"]},
                    {"action": "replace", "targetLabel": "ray_io_node_type",
                     "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"]},
                    {"action": "replace", "targetLabel": "raylane_instance",
                     "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]},
                ],
            }],
        },
    }
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["namespace"] == "ml"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["raylane.json"]) == load_dashboard()


def test_the_monitor_selects_the_labels_the_ray_pods_carry_and_the_port_they_declare():
    from cluster.render import render

    spec = parse_spec({**SERVE, "kubernetes": {}})
    monitor = render_monitoring(spec)[0]
    service = render(spec)[-1]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    for pod in (head, worker):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # The head declares Ray's metrics port by this name; KubeRay adds the same port to workers.
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in head["spec"]["containers"][0]["ports"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_a_spec_on_a_shared_cluster_is_scraped_on_that_cluster():
    spec = parse_spec({**SERVE, "kind": "BatchInference", "name": "nightly", "input": {"path": "s3://b/in.jsonl"},
                       "output": {"path": "s3://b/out"}, "kubernetes": {"cluster_selector": "shared"}})
    assert render_monitoring(spec)[0]["spec"]["selector"] == {"matchLabels": {"ray.io/cluster": "shared"}}


def test_render_monitoring_cli(tmp_path):
    r = run_cli("render", str(EXAMPLES / "serve.yaml"), "--monitoring", timeout=120)
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout)]
    assert kinds == ["PodMonitor", "ConfigMap"]
    r = run_cli("render", str(EXAMPLES / "serve.yaml"), "--monitoring", "-o", str(tmp_path), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    (path,) = json.loads(r.stdout)["files"]
    assert [d["kind"] for d in yaml.safe_load_all(Path(path).read_text())] == kinds


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, model_name) (rate(ray_vllm_e2e_request_latency_seconds_bucket'
            '[$__rate_interval]))) / on (app) group_left(x) sum by (app) '
            '(rate(ray_raylane_agent_tool_calls_total{ok="false", tool=~"a|b"}[5m])) + max(up offset 5m)')
    assert metric_names(expr) == {"ray_vllm_e2e_request_latency_seconds_bucket",
                                  "ray_raylane_agent_tool_calls_total", "up"}


def test_dashboard_covers_each_shape_and_every_raylane_metric():
    d = load_dashboard()
    assert DASHBOARD.is_file() and d["uid"] == "raylane"
    assert set(panels_by_row()) == {"Serving (Ray Serve LLM / vLLM), per app and model", "Batch inference",
                                    "Training", "Agents"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for row in ("Serving", "Batch", "Training", "Agents"):
        panels = queried_metrics(row)
        assert all(panels.values()), panels  # every panel queries at least one metric
        used |= set().union(*panels.values())
    ours = {n for n in used if n.startswith("ray_raylane_")}
    defined = {e for name in DEFINED for e in exported_names(name)}
    assert ours <= defined, ours - defined  # no query for a name raylane never records
    # ...and every metric raylane records has a panel.
    assert {name for name in DEFINED if not set(exported_names(name)) & ours} == set()
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]


def test_agent_telemetry_records_the_names_the_registry_defines():
    import re

    from runtime.agents import telemetry

    source = Path(telemetry.__file__).read_text()
    recorded = set(re.findall(r'"(raylane_[a-z_]+)"', source))
    assert recorded == {n for n in DEFINED if n.startswith("raylane_agent_")}
