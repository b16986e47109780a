"""Prometheus and Grafana objects for a spec's Ray pods (``raylane render SPEC --monitoring``).

>>> from cluster.monitoring import render_monitoring
>>> [d["kind"] for d in render_monitoring(spec)]          # doctest: +SKIP
['PodMonitor', 'ConfigMap']

A PodMonitor (prometheus-operator's ``monitoring.coreos.com/v1``) scrapes Ray's metrics port on
every Ray pod of the spec, head and workers: KubeRay gives each Ray container a port named
``metrics`` (8080, Ray's ``--metrics-export-port``) when the pod template declares none. Each
node's Ray metrics agent serves Ray's, Ray Serve's, vLLM's (``ray_vllm_*``) and raylane's own
(``ray_raylane_*``, see ``runtime.metrics``) metrics there. The ConfigMap carries raylane's
Grafana dashboard with the label Grafana's dashboard sidecar (kube-prometheus-stack) loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.render import base_labels, namespace_of

DASHBOARD = Path(__file__).with_name("dashboards") / "raylane.json"
METRICS_PORT_NAME = "metrics"  # the head's declared port (cluster.shape.HEAD_PORTS); KubeRay adds it to workers


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def pod_selector(spec) -> dict[str, str]:
    """The Ray pods of this spec: raylane's own cluster, or the shared one it is submitted to."""
    if spec.kubernetes.cluster_selector:
        return {"ray.io/cluster": spec.kubernetes.cluster_selector}
    return {"app.kubernetes.io/name": "raylane", "app.kubernetes.io/instance": spec.name}


def pod_monitor(spec, interval: str = "15s") -> dict[str, Any]:
    ns = namespace_of(spec)
    keep = [("ray_io_cluster", "ray.io/cluster"), ("ray_io_node_type", "ray.io/node-type"),
            ("raylane_instance", "app.kubernetes.io/instance")]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{spec.name}-ray-metrics", "namespace": ns, "labels": base_labels(spec)},
        "spec": {
            "jobLabel": "app.kubernetes.io/instance",
            "namespaceSelector": {"matchNames": [ns]},
            "selector": {"matchLabels": pod_selector(spec)},
            "podMetricsEndpoints": [{
                "port": METRICS_PORT_NAME,
                "path": "/metrics",
                "interval": interval,
                # Pod labels Prometheus would otherwise drop: which cluster and node a series came from.
                "relabelings": [
                    {"action": "replace", "targetLabel": target,
                     "sourceLabels": ["__meta_kubernetes_pod_label_" + _sd_name(label)]}
                    for target, label in keep
                ],
            }],
        },
    }


def _sd_name(label: str) -> str:
    # Kubernetes service discovery turns every character outside [a-zA-Z0-9_] into '_'.
    return "".join(c if c.isalnum() or c == "_" else "_" for c in label)


def dashboard_configmap(spec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "raylane-grafana-dashboard",
            "namespace": namespace_of(spec),
            # kube-prometheus-stack's Grafana sidecar loads every ConfigMap with this label.
            "labels": {"app.kubernetes.io/name": "raylane", "grafana_dashboard": "1"},
        },
        "data": {"raylane.json": DASHBOARD.read_text()},
    }


def render_monitoring(spec) -> list[dict[str, Any]]:
    """The PodMonitor for the spec's Ray pods and the dashboard ConfigMap, in apply order."""
    return [pod_monitor(spec), dashboard_configmap(spec)]
