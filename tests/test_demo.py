"""``pbp-fast demo`` in its quick mode (seconds): both runs, the table, the figure."""
import json

import pytest

from pbp_fast import cli
from pbp_fast.recipe import demo


pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for word in ("baseline", "PB", "params", "val acc %", "test acc %", "time s"):
        assert word in text
    assert (out / "demo.png").stat().st_size > 0
    assert (out / "pb" / "pb_history.png").exists()
    summary = json.loads((out / "demo.json").read_text())
    base, pb = summary["rows"]
    assert base["epochs"] == pb["epochs"] == demo.RECIPES["digits-quick"].epochs
    assert base["num_dendrites"] == 0 and base["dendrites"] is False
    assert pb["dendrites"] is True and pb["params"] >= base["params"]


def test_recipes_give_both_runs_the_same_budget():
    for name, recipe in demo.RECIPES.items():
        base, pb = demo.demo_configs(None if name.startswith("digits") else "x.npz",
                                     quick=name.endswith("quick"))
        assert base.epochs == pb.epochs == recipe.epochs
        assert not base.dendrites and pb.dendrites and pb.pb_switch_mode == "fixed"
        assert {k: v for k, v in vars(base).items() if not k.startswith(("pb_", "dendrites",
                                                                          "output_dir"))} == \
            {k: v for k, v in vars(pb).items() if not k.startswith(("pb_", "dendrites",
                                                                    "output_dir"))}


def test_demo_reports_missing_cifar(tmp_path):
    with pytest.raises(SystemExit, match="demo: error"):
        cli.main(["demo", "--quick", "--data", str(tmp_path / "missing_train.npz"),
                  "--out", str(tmp_path / "o")])
