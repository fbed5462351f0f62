"""A sweep on a Ray cluster of two nodes loses its worker node mid-sweep and still finishes,
with the results of an uninterrupted sweep: the lost node's trial is retried on the other
node and its run resumes from its last epoch.

Minutes long, so it runs only when asked (as root, with util-linux's unshare: the cluster
lives in a network namespace of its own, on 127.0.0.1 and nothing else):

    PEPITA_CLUSTER_TEST=1 python -m pytest -q tests/test_cluster.py
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

pytestmark = pytest.mark.skipif(
    os.environ.get("PEPITA_CLUSTER_TEST") != "1" or os.geteuid() != 0
    or not shutil.which("unshare"),
    reason="minutes long: PEPITA_CLUSTER_TEST=1, as root, with unshare (see the docstring)")


def sweep_argv(sweep_dir, data_dir):
    """Two numpy runs of 6 epochs on 4096 images, one core each: one trial per node."""
    return ["--script", "main.py", "--grid", "learn_type=ERIN,BP", "--epochs", "6",
            "--sweep_dir", str(sweep_dir), "--data_dir", str(data_dir), "--",
            "--n_hlayers", "1", "--start_size", "256", "--validation", "--n_samples", "4000"]


def finals(sweep_dir):
    return {p.parents[1].name: json.loads(p.read_text())["test"]
            for p in Path(sweep_dir).glob("runs/*/res_*/metrics.json")}


def two_node_sweep(work):
    """In the namespace: the cluster, the sweep against it with the worker node removed once a
    run has trained an epoch, then the same sweep embedded; writes work/result.json."""
    from ray.cluster_utils import Cluster

    from conftest import synthetic_images, write_idx
    import datasets
    data = work / "data"
    data.mkdir()
    x, y = synthetic_images(np.random.default_rng(7), 4096 + 256, (28, 28))
    for name, array in zip(datasets.MNIST_FILES, (x[:4096], y[:4096], x[4096:], y[4096:])):
        write_idx(data / f"{name}.gz", array)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    sweep = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "--address",
                              cluster.address, *sweep_argv(work / "cluster", data)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(len(curve[0]) >= 1 for curve in
                                             finals(work / "cluster").values()):
        time.sleep(0.5)
    cluster.remove_node(worker)  # its trial's process dies with it
    _, err = sweep.communicate(timeout=600)
    cluster.shutdown()
    embedded = subprocess.run([sys.executable, str(ROOT / "sweep.py"),
                               *sweep_argv(work / "straight", data)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    records = [json.loads(p.read_text()) for p in (work / "cluster").glob("runs/*/trial.json")]
    (work / "result.json").write_text(json.dumps({
        "returncode": sweep.returncode, "stderr": err[-3000:],
        "embedded_returncode": embedded.returncode, "records": records,
        "cluster": finals(work / "cluster"), "straight": finals(work / "straight")}))


def test_a_sweep_that_loses_a_node_finishes_with_the_uninterrupted_results(tmp_path):
    done = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && "
                           f"{sys.executable} {__file__} {tmp_path}"],
                          capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["returncode"] == 0, result["stderr"]
    assert result["embedded_returncode"] == 0
    assert any(record["earlier_ends"] for record in result["records"]), result["stderr"]
    assert result["cluster"] == result["straight"] and len(result["cluster"]) == 2


if __name__ == "__main__":
    two_node_sweep(Path(sys.argv[1]))
