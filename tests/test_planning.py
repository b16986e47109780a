"""Capacity planner: the seeds' numbers, through the CLI's JSON."""

import json

import pytest

from runtime.errors import UsageError
from runtime.planning import plan
from tests.conftest import run_cli


def _plan(*args):
    r = run_cli("plan", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_7b_fp16_is_about_14_gb():
    d = _plan("--params", "7e9", "--dtype", "fp16")
    assert d["weights_gb_si"] == pytest.approx(14.0)
    assert d["weights_gb"] == pytest.approx(13.04, abs=0.01)  # GiB, as GPUs report memory
    assert d["fits"] is True  # on the default H100-80GB


def test_70b_fp16_is_130_gib_and_at_least_26s_to_load():
    d = _plan("--params", "70e9", "--dtype", "fp16", "--load-gbps", "5", "--gpu", "H100-80GB")
    assert d["weights_gb"] == pytest.approx(130.4, abs=0.1)
    assert d["load_seconds"] >= 26
    assert d["fits"] is False and d["min_gpus"] == 2


@pytest.mark.parametrize("per_replica,expected", [(4, 125), (5, 100)])
def test_500_streams_need_100_to_125_replicas(per_replica, expected):
    d = _plan("--params", "7e9", "--concurrent-streams", "500", "--streams-per-replica", str(per_replica),
              "--peak-to-average", "10", "--headroom", "1.5")
    assert d["peak_replicas"] == expected
    assert d["steady_replicas"] == -(-expected * 15 // 100)  # ceil(peak / 10 * 1.5)


def test_bytes_per_param_and_kv_cache():
    assert plan(1e9, "fp32").weights_gb_si == 4.0
    assert plan(1e9, "int8").weights_gb_si == 1.0
    assert plan(1e9, "fp8").weights_gb_si == 1.0
    assert plan(1e9, "int4").weights_gb_si == 0.5
    # Llama-2-7B: 32 layers x 32 KV heads x 128 dim, 4096 ctx, fp16 -> 2 GiB per sequence
    p = plan(7e9, "fp16", layers=32, kv_heads=32, head_dim=128, context=4096, batch=1)
    assert p.kv_cache_gb == pytest.approx(2.0)
    big = plan(7e9, "fp16", layers=32, kv_heads=32, head_dim=128, context=4096, batch=8, gpu="L4")
    assert big.kv_cache_gb == pytest.approx(16.0) and big.fits is False


@pytest.mark.parametrize("gpu,mem", [("L4", 24), ("A10G", 24), ("A100-40GB", 40), ("A100-80GB", 80),
                                     ("H100-80GB", 80), ("H200-141GB", 141), ("h100", 80)])
def test_gpu_skus(gpu, mem):
    assert plan(1e9, gpu=gpu).gpu_memory_gb == mem


def test_bad_input_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown dtype"):
        plan(7e9, "fp12")
    r = run_cli("plan", "--json", "--params", "7e9", "--gpu", "V100")
    assert r.returncode == 2 and "unknown GPU" in r.stderr and "Traceback" not in r.stderr
