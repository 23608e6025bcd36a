"""bench/cifar_table.py: the rows share one budget and differ only where they should; a smoke row
runs end to end on random images and --report renders its record; the targets are computed; runs
side by side (--jobs) each record their result, and failed ones are reported."""
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pbp_fast import cli
from pbp_fast.recipe import config_from_args

spec = importlib.util.spec_from_file_location(
    "cifar_table", Path(__file__).resolve().parents[1] / "bench" / "cifar_table.py")
table = sys.modules["cifar_table"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE_FIELDS = {"sched", "lr_warmup_epochs", "label_smoothing", "auto_augment", "mixup_alpha",
                 "cutmix_alpha"}


def _config(name):
    args = table.train_args(table.ROWS[name], "data", 0, Path("out"))
    return dataclasses.asdict(config_from_args(cli.build_parser().parse_args(["train", *args])))


def _differ(a, b):
    return {k for k in a if a[k] != b[k]}


def test_rows_share_one_budget_and_differ_only_where_they_should():
    assert len(table.ROWS) == 8
    configs = {name: _config(name) for name in table.ROWS}
    for name, cfg in configs.items():
        assert cfg["epochs"] == table.EPOCHS
        if cfg["dendrites"]:
            assert table.pb_budget(cfg["pb_n_epochs"], cfg["pb_p_epochs"],
                                   cfg["pb_max_dendrites"]) == cfg["epochs"]
    for recipe in table.RECIPES:
        base = configs[f"{recipe}-w1.0"]
        for variant in table.VARIANTS:
            diff = _differ(base, configs[f"{recipe}-{variant}"])
            assert all(k.startswith(("pb_", "dendrites", "width_mult")) for k in diff), diff
    for variant in table.VARIANTS:
        assert _differ(configs[f"recipe-{variant}"], configs[f"plain-{variant}"]) == RECIPE_FIELDS
    assert configs["plain-w1.0"]["sched"] == "constant"
    assert configs["plain-w1.0"]["mixup_alpha"] == configs["plain-w1.0"]["cutmix_alpha"] == 0
    assert configs["recipe-w1.0"]["val_size"] == 5000


def test_smoke_row_records_and_reports(tmp_path, capsys):
    results, readme = tmp_path / "results.json", tmp_path / "README.md"
    assert table.main(["--row", "plain-w0.5-pb", "--smoke", "60", "--seeds", "0",
                       "--data", str(tmp_path / "no-cifar"), "--out", str(tmp_path / "runs"),
                       "--results", str(results)]) == 0
    [rec] = json.loads(results.read_text())["records"]
    assert rec["row"] == "plain-w0.5-pb" and rec["smoke"] and rec["seed"] == 0
    assert "random images" in rec["data"] and rec["device"].startswith("CPU")
    assert rec["epochs"] == table.SMOKE["epochs"]
    assert rec["params"] - rec["params_without_dendrites"] >= 0
    assert 0 <= rec["test_acc"] <= 100 and rec["seconds"] > 0
    assert (tmp_path / "runs" / "plain-w0.5-pb" / "seed0" / "results.json").exists()

    readme.write_text(f"# title\n\n{table.BEGIN}\nold\n{table.END}\n\nafter\n")
    assert table.main(["--report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{table.END}\n\nafter\n")
    main_table, smoke_table = text.split("Smoke runs")
    assert main_table.count("not yet run") == 8 and main_table.count(": not run") == 6
    assert f"| plain-w0.5-pb | 0 | {rec['test_acc']:.2f} |" in smoke_table
    assert "--row plain-w0.5-pb --smoke" in smoke_table


def _record(row, acc, params, seed=0):
    return {"row": row, "seed": seed, "smoke": False, "test_acc": acc, "val_acc": acc,
            "params": params, "params_without_dendrites": params, "num_dendrites": 0,
            "epochs": 100, "seconds": 60.0, "device": "GPU"}


def test_targets_are_computed_from_the_means_over_seeds():
    records = [_record("recipe-w1.0", 90.0, 1_500_000), _record("recipe-w1.0", 92.0, 1_500_000, 1),
               _record("recipe-w1.0-pb", 91.6, 3_000_000),       # error 9 -> 8.4: -6.7 %
               _record("recipe-w0.5-pb", 90.5, 1_200_000),       # fewer params, lower accuracy
               _record("recipe-w0.75-pb", 91.5, 2_600_000)]
    lines = table.targets(records)
    assert lines[0].endswith("reached (test error 9.00 % -> 8.40 %, -6.7% relative)")
    assert "not reached: more parameters" in lines[1]
    assert "not reached: lower accuracy (" in lines[2]
    assert all(line.endswith("not run") for line in lines[3:])
    assert "| recipe-w1.0 | 0 1 | 91.00 ± 1.41 |" in table.table(records)
    records.append(_record("recipe-w0.5-pb", 92.0, 1_200_000, 1))
    assert table.targets(records)[2].split(": ")[2].startswith("reached")


def test_jobs_run_side_by_side_and_report_failures(tmp_path, capsys, monkeypatch):
    results, out = tmp_path / "results.json", tmp_path / "runs"
    assert table.main(["--row", "plain-w0.5-pb", "recipe-w0.5-pb", "--smoke", "40", "--seeds",
                       "3", "--jobs", "2", "--data", str(tmp_path / "no-cifar"), "--out",
                       str(out), "--results", str(results)]) == 0
    records = json.loads(results.read_text())["records"]
    assert sorted(r["row"] for r in records) == ["plain-w0.5-pb", "recipe-w0.5-pb"]
    assert all(r["seed"] == 3 and r["smoke"] and r["concurrent_runs"] == 2 for r in records)
    for r in records:
        log = (out / r["row"] / "seed3.log").read_text()
        assert f"test {r['test_acc']:.2f} %" in log
    assert "(2 runs at once)" in table.table(records, smoke=True)
    printed = capsys.readouterr().out
    assert printed.count("== finished") == 2 and "failed" not in printed

    broken = table.Row("no-such-row", "plain", "w0.5-pb")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")   # runs spread over the GPUs given
    runs = [(broken, 0), (table.ROWS["plain-w1.0"], 0), (table.ROWS["plain-w1.0"], 1)]
    assert table.run_jobs(runs, 2, ["--list"], out) == 3
    printed = capsys.readouterr().out
    assert "!! no-such-row seed 0 failed (exit 2)" in printed and "invalid choice" in printed
    assert "3 of 3 runs failed" in printed
    started = [line.split(" on GPU ")[1].split()[0] for line in printed.splitlines()
               if line.startswith("== started")]
    assert sorted(started[:2]) == ["3", "5"] and started[2] in ("3", "5")


def test_a_run_waits_for_the_run_it_needs_and_fails_with_it(tmp_path, capsys):
    """``after``: a run starts only once the run it needs has finished (others go first), and
    is not run when that one failed or is not among the runs."""
    stamps = tmp_path / "order.txt"

    def spec(label, code=0, sleep=0.0):
        script = (f"import time; time.sleep({sleep}); "
                  f"open({str(stamps)!r}, 'a').write({label!r} + '\\n'); raise SystemExit({code})")
        return label, [sys.executable, "-c", script], tmp_path / f"{label}.log"

    specs = [spec("pb0", sleep=0.5), spec("restarts0"), spec("base0"), spec("pb1", code=1),
             spec("restarts1"), spec("orphan")]
    after = {"restarts0": "pb0", "restarts1": "pb1", "orphan": "pb9"}
    assert table.run_processes(specs, 2, after=after) == 3
    order = stamps.read_text().split()
    assert order.index("restarts0") > order.index("pb0")   # waited for its pb run ...
    assert order.index("base0") < order.index("pb0")       # ... while another ran
    assert "restarts1" not in order and "orphan" not in order
    printed = capsys.readouterr().out
    assert "!! restarts1 not run: pb1 failed" in printed
    assert "!! orphan not run: pb9 is not among the runs" in printed
