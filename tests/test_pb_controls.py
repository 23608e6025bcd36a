"""bench/pb_controls.py: the arms of a setup differ only in their PB flags; every arm runs end to
end on random images and is recorded; the parameter-matched arm gets PB's parameter count; the
report renders the table and the figures."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from pbp_fast import cli
from pbp_fast.recipe import config_from_args

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # pb_controls imports cifar_table
spec = importlib.util.spec_from_file_location("pb_controls", BENCH / "pb_controls.py")
controls = sys.modules["pb_controls"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(controls)

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(setup, arm, width=None):
    args = [*controls.arm_args(setup, arm, width), "--data", "d", "--seed", "0"]
    return dataclasses.asdict(config_from_args(cli.build_parser().parse_args(["train", *args])))


@pytest.mark.parametrize("setup", list(controls.SETUPS))
def test_arms_differ_only_in_their_pb_flags(setup):
    cfgs = {arm: _config(setup, arm) for arm in controls.ARMS}
    pb = cfgs["pb"]
    assert pb["dendrites"] and pb["pb_switch_mode"] == "patience" and pb["pb_schedule"] == "phase"
    want = {"baseline-es": {"pb_max_dendrites"}, "restarts": {"pb_control"},
            "untrained": {"pb_control"}, "matched": {"pb_max_dendrites"}}
    for arm, changed in want.items():
        assert {k for k in pb if pb[k] != cfgs[arm][k]} == changed, arm
    assert cfgs["baseline-es"]["pb_max_dendrites"] == 0
    assert cfgs["restarts"]["pb_control"] == "restarts"
    assert _config(setup, "matched", 1.37)["width_mult"] == 1.37


@pytest.mark.parametrize("setup", list(controls.SETUPS))
def test_each_ablation_changes_one_option_of_pb(setup):
    want = {"pb-fixed-switch": "pb_switch_mode", "pb-global-schedule": "pb_schedule",
            "pb-lr-search": "pb_lr_search", "pb-default-init": "pb_candidate_scale",
            "pb-candidate-bn": "pb_candidate_bn", "pb-pearson": "pb_score",
            "pb-warmup-10": "pb_warmup_batches", "pb-unit-snapshot": "pb_snapshot",
            "pb-newest-alpha": "pb_train_old_alphas", "pb-long-dendrite": "pb_p_epochs"}
    assert set(want) == set(controls.ABLATIONS)
    pb = _config(setup, "pb")
    for arm, field in want.items():
        cfg = _config(setup, arm)
        assert {k for k in pb if pb[k] != cfg[k]} == {field}, arm


def test_the_report_pairs_each_arm_with_pb_seed_by_seed():
    def rec(arm, seed, acc):
        return {"setup": "cpu16", "arm": arm, "seed": seed, "test_acc": acc, "epochs": 10,
                "params": 100, "seconds": 60.0}
    records = [rec("baseline-es", 0, 60.0), rec("baseline-es", 1, 62.0), rec("pb", 0, 70.0),
               rec("pb", 1, 66.0), rec("restarts", 0, 71.0), rec("restarts", 1, 68.0),
               rec("pb-pearson", 0, 69.0), rec("pb-pearson", 2, 99.0)]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in controls.table(records, "cpu16").splitlines()[2:]}
    assert rows["restarts"][2] == "69.50 ± 2.12"
    assert rows["restarts"][4] == "+1.50 ± 0.71"          # (71 - 70, 68 - 66)
    assert rows["pb"][3] == f"{((100 - 68) - (100 - 61)) / (100 - 61):+.1%}"
    assert "not yet run" in rows["untrained"][1]
    body = controls.render(records)
    assert "fidelity ablations" in body
    ablation = [line for line in body.splitlines() if line.startswith("| pb-pearson ")][0]
    assert ablation.split(" | ")[4] == "-1.00"             # seed 0 only: seed 2 has no pb
    # runs of another machine, or with another first epoch, are not paired
    for change in ({"machine": "another"}, {"curve": [[1, "n", 12.5, ""]]}):
        other = [{**r, **change} for r in records if r["arm"] == "pb-pearson"]
        row = controls.table(records[:-2] + other, "cpu16", {"pb": (), "pb-pearson": ()},
                             ref="pb").splitlines()[-1].split(" | ")
        assert row[4] == "— (other start)"
        assert controls.paired(other, [{**r, **change} for r in records
                                       if r["arm"] == "pb"]) == "-1.00"
    # a wider network (matched) starts elsewhere by construction: paired by seed and machine
    wider = [{**r, "width": 1.5, "curve": [[1, "n", 12.5, ""]]} for r in records
             if r["arm"] == "pb-pearson"]
    assert controls.paired(wider, [r for r in records if r["arm"] == "pb"]) == "-1.00"
    # the report has a table per machine, the earlier (unrecorded) one last
    here = [{**r, "machine": controls.machine_name()} for r in records]
    body = controls.render(records + here).splitlines()
    heads = [line for line in body if line.startswith("**cpu16** on ")]
    assert heads[0].startswith(f"**cpu16** on {controls.machine_name()}")
    assert heads[1].startswith(f"**cpu16** on {controls.EARLIER}") and len(heads) == 2


@pytest.mark.parametrize("setup", list(controls.SETUPS))
def test_an_ablations_replay_is_the_restarts_control_with_its_flags(setup):
    for arm, flags in controls.ABLATIONS.items():
        replay = f"restarts/{arm}"
        assert controls.source_arm(replay) == arm
        cfg, ablation = _config(setup, replay), _config(setup, arm)
        assert {k for k in cfg if cfg[k] != ablation[k]} == {"pb_control"}, arm
        assert cfg["pb_control"] == "restarts"
    assert controls.source_arm("restarts") == "pb" and controls.source_arm("pb-pearson") is None


def test_a_replay_takes_the_stages_of_the_kept_path():
    """A starting-rate search's discarded trials are not stages: the replay of pb-lr-search
    gets the lengths of the stages its run kept (the controller's record)."""
    def curve(spec):  # (phase, event) per epoch
        return [[i + 1, p, 50.0, e] for i, (p, e) in enumerate(spec)]
    stage = [("n", "")] * 3 + [("n", "start_dendrite_phase"), ("d", ""), ("d", "add_dendrites")]
    trials = [("n", ""), ("n", "lr_trial: x0.1"), ("n", ""), ("n", "lr_trial: x0.01"),
              ("n", ""), ("n", "lr_trial: x0.1 kept"), ("n", ""), ("n", "stop")]
    assert controls.stage_lengths(curve(stage + trials)) == (4, 4)  # 3 + end; trial 2 + 2
    assert controls.stage_lengths(curve(stage + [("n", "")] * 5)) == (4, 5)


def test_matched_width_is_the_nearest_count():
    target = controls.count("mobilenet_tiny", 1.0) + 3000
    w = controls.matched_width("mobilenet_tiny", 1.0, target)
    near = [abs(controls.count("mobilenet_tiny", v) - target) for v in (w - 0.01, w, w + 0.01)]
    assert w > 1.0 and near[1] == min(near)


def test_the_correlation_table_splits_dendrite_phases():
    """Each dendrite phase of a Pearson-scored run: its epochs, the summed score at its end
    over the units' channels, and the growth in its last epoch; other runs are left out."""
    scores = [[5, 1.0], [6, 2.0], [7, 2.5], [12, 3.0], [13, 3.3]]
    assert controls.dendrite_phases(scores) == [[(5, 1.0), (6, 2.0), (7, 2.5)],
                                                [(12, 3.0), (13, 3.3)]]
    rec = {"setup": "cpu16", "arm": "pb-pearson", "seed": 1, "channels": 100,
           "command": "pbp-fast train --pb-score pearson", "candidate_scores": scores}
    other = {**rec, "arm": "pb", "command": "pbp-fast train"}
    rows = controls.correlations([rec, other], "cpu16").splitlines()[4:]
    assert rows == ["| pb-pearson | 1 | 5-7 (3) | 0.0250 | +25.0% |",
                    "| pb-pearson | 1 | 12-13 (2) | 0.0330 | +10.0% |"]
    assert controls.correlations([other], "cpu16") == ""


def test_every_arm_runs_records_and_reports(tmp_path, monkeypatch):
    table = sys.modules["cifar_table"]
    data, _, val = table.smoke_data(str(tmp_path / "none"), tmp_path / "data", 60)
    tiny = controls.Setup(
        "mobilenet_tiny", 0.25,
        ("--resize", "8", "--epochs", "8", "-b", "16", "--val-size", str(val), "--device", "cpu",
         "--lr-warmup-epochs", "0", "--cache-dir", str(tmp_path / "cache")),
        (*controls._PROTOCOL, "--pb-n-patience", "1", "--pb-p-patience", "1", "--pb-p-epochs", "1",
         "--pb-max-dendrites", "1", "--pb-warmup-batches", "1"), "a test setup")
    monkeypatch.setitem(controls.SETUPS, "tiny", tiny)
    results = tmp_path / "results.json"
    for arm in controls.DEPENDENT:
        assert controls.run_arm("tiny", arm, 0, data, tmp_path / "runs", results) is None
    recs = {arm: controls.run_arm("tiny", arm, 0, data, tmp_path / "runs", results)
            for arm in controls.ARMS}
    # (on random images no dendrite set beats the best score: the runs end with what they had)
    assert "d" in {c[1] for c in recs["pb"]["curve"]}
    assert "restart" in {c[3] for c in recs["restarts"]["curve"]}
    assert "add_dendrites" in {c[3] for c in recs["untrained"]["curve"]}
    assert "d" not in {c[1] for c in recs["untrained"]["curve"] + recs["restarts"]["curve"]}
    for arm in ("baseline-es", "restarts", "matched"):
        assert recs[arm]["num_dendrites"] == 0 and recs[arm]["params_dendrites"] == 0
    assert recs["baseline-es"]["epochs"] < recs["restarts"]["epochs"]
    stages = controls.stage_lengths(recs["pb"]["curve"])
    assert len(stages) >= 2
    for arm in ("restarts", "untrained"):
        assert controls.stage_lengths(recs[arm]["curve"]) == stages, arm
    assert recs["matched"]["width"] == controls.matched_width("mobilenet_tiny", 0.25,
                                                              recs["pb"]["params"])
    assert controls.run_arm("tiny", "restarts/pb-pearson", 0, data, tmp_path / "runs",
                            results) is None                # the ablation has not run
    recs["pb-pearson"] = controls.run_arm("tiny", "pb-pearson", 0, data, tmp_path / "runs",
                                          results)
    pearson = recs["pb-pearson"]
    assert [e for e, _ in pearson["candidate_scores"]] == [c[0] for c in pearson["curve"]
                                                          if c[1] == "d"]
    assert pearson["channels"] == controls.unit_channels("mobilenet_tiny", 0.25) > 0
    replay = controls.run_arm("tiny", "restarts/pb-pearson", 0, data, tmp_path / "runs", results)
    assert controls.stage_lengths(replay["curve"]) == controls.stage_lengths(
        recs["pb-pearson"]["curve"])
    assert replay["num_dendrites"] == 0
    records = table.load_records(results)
    assert sorted(r["arm"] for r in records) == sorted(
        [*controls.ARMS, "pb-pearson", "restarts/pb-pearson"])
    assert "| restarts/pb-pearson | 0 |" in controls.render(records)
    gain = recs["pb-pearson"]["test_acc"] - replay["test_acc"]
    assert f"`pb-pearson` - `restarts/pb-pearson`, paired over seeds 0: {gain:+.2f} points" \
        in controls.render(records)
    assert "how far the candidates got" in controls.render(records)
    records = [r for r in records if r["arm"] in controls.ARMS]
    text = controls.table(records, "tiny")
    assert text.count("\n") == len(controls.ARMS) + 1 and "baseline-es" in text
    pytest.importorskip("matplotlib")
    figs = controls.plot(records, "tiny", tmp_path / "fig")
    assert [f.name for f in figs] == ["tiny_curves.png", "tiny_params.png"]
