"""A third adapter (examples/point_flow.py) runs through the loop with no edit in raft_diffusion/core."""

import json

from raft_diffusion.core.config import load_config
from raft_diffusion.recipe import train


def test_point_flow_adapter_runs_through_the_loop(tmp_path):
    config = load_config("examples/point_flow.yaml", [f"run.output_dir={tmp_path}"])
    run_dir = train(config, quiet=True)
    records = run_dir.read_metrics()
    assert [r["stage"] for r in records] == list(range(7))
    first, last = records[0], records[-1]
    assert last["eval_reward"] > first["eval_reward"] + 0.5  # the points moved toward (2, 2)
    assert last["eval_reward_change"] > 5 * last["eval_reward_change_sem"]
    assert all("train_loss" in r for r in records[1:])
    assert (run_dir.final / "flow.pt").is_file()
    assert json.loads((run_dir.root / "outcome.json").read_text())["exported_stage"] == 6
