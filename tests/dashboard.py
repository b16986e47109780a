"""The Grafana dashboard's queries against what Ray's metrics endpoint really exports.

The end-to-end modules (serving, batch, training, agents) call ``assert_rows_exported`` after a
real workload ran on their local cluster: every metric named by a PromQL query in those rows of
``cluster/dashboards/raylane.json`` must appear in a scrape of the node's metrics port.
"""

from __future__ import annotations

import re
import threading
import time

from cluster.monitoring import load_dashboard

_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, keywords, label names or values)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors ([$__rate_interval], [5m])
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in _NOT_METRICS:
            continue  # a function call or keyword
        names.add(m.group())
    return names


def panels_by_row(dashboard: dict | None = None) -> dict[str, list[dict]]:
    """Row title -> the panels under it (Grafana lists a row, then its panels)."""
    rows: dict[str, list[dict]] = {}
    current = ""
    for p in (dashboard or load_dashboard())["panels"]:
        if p["type"] == "row":
            current = p["title"]
            rows[current] = list(p.get("panels", []))
        else:
            rows.setdefault(current, []).append(p)
    return rows


def queried_metrics(row_prefix: str) -> dict[str, set[str]]:
    """Panel title -> metric names its queries use, for the rows whose title starts with ``row_prefix``."""
    out: dict[str, set[str]] = {}
    for title, panels in panels_by_row().items():
        if title.startswith(row_prefix):
            for p in panels:
                out[p["title"]] = set().union(*(metric_names(t["expr"]) for t in p["targets"]))
    assert out, f"no dashboard row starts with {row_prefix!r}"
    return out


def metrics_url() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape(url: str) -> set[str]:
    """Series names in one scrape of a Prometheus text endpoint."""
    import httpx

    text = httpx.get(url, timeout=10).text
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def label_values(url: str, name: str, label: str, **labels: str) -> set[str]:
    """Values of ``label`` over the series ``name`` whose labels include ``labels``."""
    import httpx

    out = set()
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            m = re.search(rf'[{{,]{label}="([^"]*)"', line)
            if m:
                out.add(m.group(1))
    return out


def sample_values(url: str, name: str, **labels: str) -> list[float]:
    """Values of the series ``name`` whose labels include ``labels`` (summed over the other labels by the caller)."""
    import httpx

    out = []
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


class Scraper:
    """Scrapes in the background while a workload runs: gauges of finished workers age out of Ray's
    metrics agent a few seconds after the worker stops reporting them."""

    def __init__(self, url: str, every_s: float = 0.5):
        self.url, self.every, self.seen = url, every_s, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen |= scrape(self.url)
            except Exception:  # noqa: BLE001, S110 - a missed scrape is retried
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)
        self.seen |= scrape(self.url)


def missing(row_prefix: str, names: set[str]) -> dict[str, list[str]]:
    return {panel: sorted(used - names) for panel, used in queried_metrics(row_prefix).items() if used - names}


def assert_rows_exported(row_prefix: str, *, seen: set[str] | None = None, timeout_s: float = 60) -> None:
    """Every metric the ``row_prefix`` rows query is in a real scrape (polled: Ray exports every few seconds)."""
    url = metrics_url()
    deadline, names = time.monotonic() + timeout_s, set(seen or ())
    while True:
        names |= scrape(url)
        gaps = missing(row_prefix, names)
        if not gaps or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert not gaps, f"dashboard panels query metrics the cluster does not export: {gaps}"
