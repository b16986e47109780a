"""pytest fixtures for multi-node tests on one machine (``runtime.testing``).

Load them in your ``conftest.py`` with ``pytest_plugins = ["runtime.testing_pytest"]``, then::

    import pytest
    from runtime.testing import NodeSpec

    pytestmark = pytest.mark.multinode

    @pytest.fixture(scope="module")
    def local_cluster_nodes():                  # optional: the default is 2 nodes of 1 CPU
        return [NodeSpec(cpus=1, gpus=1, accelerator_type="L4")] * 2

    def test_survives_a_lost_node(local_cluster):
        run_training(spec, address=local_cluster.address)    # doctest: +SKIP
        local_cluster.kill_node(local_cluster.workers[0])

Both fixtures are module-scoped: a module shares one cluster (starting one takes a few seconds per
node), so a test that removes nodes should add back what the next test needs.
"""

from __future__ import annotations

import pytest

from runtime.testing import LocalCluster, NodeSpec


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "multinode: runs on a multi-node Ray cluster on this machine "
                                       "(runtime.testing.LocalCluster)")


@pytest.fixture(scope="module")
def local_cluster_nodes() -> list[NodeSpec]:
    """The worker nodes of ``local_cluster``; override it in a module or conftest."""
    return [NodeSpec(cpus=1), NodeSpec(cpus=1)]


@pytest.fixture(scope="module")
def local_cluster(local_cluster_nodes):
    """A head with 0 CPUs plus ``local_cluster_nodes``, stopped after the module."""
    with LocalCluster(local_cluster_nodes) as cluster:
        yield cluster
