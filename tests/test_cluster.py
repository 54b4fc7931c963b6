"""Clusters and Hub ids (issue 14): joining an existing Ray cluster of several nodes, and the used-by
command on a Hugging Face Hub id resolved offline from a local Hugging Face cache."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.datasets import arith
from pipelines.launch import rundir, training

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--preset", "cpu-tiny"]


def _problems(path: Path, n=32) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in arith.problems(n, level=1, split="train", seed=0)))
    return path


def ngrpo(*args, env=None, timeout=1800):
    proc = subprocess.run([sys.executable, "-m", "ngrpo_cli.main", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"ngrpo {' '.join(map(str, args))}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def _launch_logs(run: Path) -> str:
    return "".join(p.read_text() for p in sorted((run / rundir.LOGS).glob("launch-*.log")))


def test_a_run_starts_a_private_ray_unless_told_to_join(monkeypatch, layout_args):
    """Without RAY_ADDRESS Ray gets "local" (a new instance, never a cluster some `ray start` left on the
    machine) and logical resources; with RAY_ADDRESS it joins and passes no resources, which Ray refuses."""
    from openrlhf_patch.config import PatchConfig

    args = layout_args
    config = PatchConfig(device="cpu", run_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "ngrpo-ray-kwargs"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = training.ray_init_kwargs(config, args)
    assert local["address"] == "local" and local["num_gpus"] == 2
    # no idle workers prestarted beside the actors' own (Ray refuses _system_config for a cluster it joins)
    assert local["_system_config"] == {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    joined = training.ray_init_kwargs(config, args)
    assert joined["address"] == "10.1.2.3:6379" and "num_gpus" not in joined and "num_cpus" not in joined
    assert "_system_config" not in joined
    # ngrpo's code travels with the job: its packages, and the reward entry in the working_dir
    assert sorted(Path(p).name for p in joined["runtime_env"]["py_modules"]) == ["openrlhf_patch", "pipelines"]
    assert (Path(joined["runtime_env"]["working_dir"]) / training.REWARD_ENTRY).is_file()


@pytest.mark.pipeline
def test_two_node_cluster_trains_with_the_patch_on_both_nodes(tmp_path, tiny_model_dir):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2})
    cluster.add_node(num_cpus=3, num_gpus=2)
    cluster.wait_for_nodes()
    try:
        node_ids = {node.node_id for node in cluster.list_all_nodes()}
        run = tmp_path / "run"
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        ngrpo("train", "--model", tiny_model_dir, "--data", _problems(tmp_path / "d.jsonl"), "--output", run, *CPU,
              "--max-steps", "1", "--nodes", "2", "--gpus-per-node", "1", env=env)
    finally:
        cluster.shutdown()
    assert len(node_ids) == 2
    log = _launch_logs(run)
    active = set(re.findall(r"\[ngrpo\] patch active in ray-worker pid \d+ on node (\w+)", log))
    assert active == node_ids, (active, node_ids)  # the patch ran on both nodes
    assert rundir.read_manifest(run)["status"] == "finished"
    assert [r["step"] for r in rundir.read_step_log(run / rundir.METRICS).rows] == [1]


@pytest.mark.pipeline
def test_the_used_by_command_on_a_hub_id_offline(tmp_path, hub_model):
    """`ngrpo train --model Qwen/Qwen2.5-Math-7B --algo ngrpo`, then eval and export-hf of the run,
    with HF_HUB_OFFLINE=1 and the model only in the local Hugging Face cache (a tiny stand-in)."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    run = tmp_path / "run"
    ngrpo("train", "--model", hub_model, "--algo", "ngrpo", "--data", _problems(tmp_path / "d.jsonl"),
          "--output", run, *CPU, "--max-steps", "1")
    manifest = rundir.read_manifest(run)
    assert (manifest["model"], manifest["model_kind"], manifest["status"]) == (hub_model, "hub", "finished")
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps(p) + "\n" for p in arith.problems(4, level=1, split="test", seed=0)))
    ngrpo("eval", "--model", run, "--benchmarks", bench, "--backend", "hf", "--n", "1", "--max-new-tokens", "8")
    assert json.loads((run / "eval" / "summary.json").read_text())["benchmarks"]["b"]["problems"] == 4
    out = ngrpo("export-hf", run, tmp_path / "export")
    assert "exported DeepSpeed checkpoint" in out.stdout
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"base_model: {hub_model}" in card  # named by its Hub id, not a cache path
