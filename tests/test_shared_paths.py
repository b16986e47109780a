"""A file-backed store is allowed on a multi-node cluster only where every node sees the same
file (runtime.shared_paths): the probe on a real 3-node cluster, and the refusal's wording."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.agents.store import check_shared
from runtime.errors import RaylaneError
from runtime.shared_paths import _peek_on_nodes, nodes_not_sharing, require_shared


def test_one_node_needs_no_check(tmp_path):
    assert nodes_not_sharing(str(tmp_path), nodes=["only"], peek=lambda *_: {}) == []


def test_a_node_that_reads_another_token_or_nothing_does_not_share(tmp_path):
    def peek(nodes, marker):
        token = Path(marker).read_text()  # the caller really wrote it under the folder
        assert Path(marker).parent == tmp_path / "s"
        return {"a": token, "b": None, "c": "someone else's marker"}

    assert nodes_not_sharing(str(tmp_path / "s"), nodes=["a", "b", "c"], peek=peek) == ["b", "c"]
    assert list((tmp_path / "s").iterdir()) == []  # the marker is cleaned up


def test_the_refusal_names_the_field_the_nodes_and_the_fix(tmp_path):
    with pytest.raises(RaylaneError) as e:
        require_shared(str(tmp_path), field="sessions", fix="use sessions.backend: redis",
                       nodes=["n" * 20, "m" * 20], peek=lambda nodes, marker: {nodes[0]: Path(marker).read_text()})
    assert "sessions:" in str(e.value) and "1 cannot see it: mmmmmmmmmmmm" in str(e.value)
    assert e.value.hint == "use sessions.backend: redis"


def test_redis_and_uri_stores_are_not_probed(tmp_path):
    check_shared("redis", "redis://h:6379/0", str(tmp_path))  # no Ray connection needed: nothing probed
    check_shared("sqlite", "s3://b/sessions.db", str(tmp_path))  # open_store refuses it with its own message


@pytest.mark.slow
@pytest.mark.multinode
def test_every_node_of_a_real_cluster_reads_the_marker(local_cluster, tmp_path):
    import ray

    ray.init(address=local_cluster.address, logging_level="ERROR")
    try:
        nodes = sorted(local_cluster.alive_node_ids())
        assert len(nodes) == 3  # head + 2 workers
        marker = tmp_path / "marker"
        marker.write_text("token-1")
        assert _peek_on_nodes(nodes, str(marker)) == dict.fromkeys(nodes, "token-1")  # one pinned task per node
        assert nodes_not_sharing(str(tmp_path / "sessions")) == []
        check_shared("sqlite", None, str(tmp_path / "run"))  # what the agent ingress runs at start: allowed
    finally:
        ray.shutdown()
