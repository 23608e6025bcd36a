"""``pbp-fast demo`` in its quick mode (seconds): every arm, the table, the figure."""
import csv
import json

import pytest

from pbp_fast import cli
from pbp_fast.core import History
from pbp_fast.recipe import demo


pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for word in ("baseline-ES", "PB", "restarts", "params", "val acc %", "test acc %", "time s",
                 "PB vs baseline-ES:", "PB vs restarts:"):
        assert word in text
    assert (out / "demo.png").stat().st_size > 0
    assert (out / "PB" / "pb_history.png").exists()
    summary = json.loads((out / "demo.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows) == list(demo.ARMS)
    assert rows["baseline-ES"]["num_dendrites"] == rows["restarts"]["num_dendrites"] == 0
    assert rows["PB"]["params"] >= rows["baseline-ES"]["params"] == rows["restarts"]["params"]
    assert rows["baseline-ES"]["epochs"] <= min(rows["PB"]["epochs"], rows["restarts"]["epochs"])
    stages = [History(csv.DictReader(open(out / arm / "pb_history.csv"))).stage_lengths()
              for arm in ("PB", "restarts")]
    assert stages[0] and stages[1] == stages[0]  # the restarts replay PB's stages


def test_the_arms_differ_only_in_their_pb_flags():
    for name, recipe in demo.RECIPES.items():
        configs = demo.demo_configs(None if name.startswith("digits") else "x.npz",
                                    quick=name.endswith("quick"))
        assert list(configs) == list(demo.ARMS)
        pb = vars(configs["PB"])
        assert pb["epochs"] == recipe.epochs and pb["pb_switch_mode"] == "patience"
        assert pb["pb_schedule"] == "phase" and pb["dendrites"]
        for arm, changes in demo.ARMS.items():
            differ = {k for k, v in vars(configs[arm]).items() if v != pb[k]}
            assert differ == set(changes) | ({"output_dir"} if arm != "PB" else set())
            assert all(getattr(configs[arm], k) == v for k, v in changes.items())


def test_demo_reports_missing_cifar(tmp_path):
    with pytest.raises(SystemExit, match="demo: error"):
        cli.main(["demo", "--quick", "--data", str(tmp_path / "missing_train.npz"),
                  "--out", str(tmp_path / "o")])
