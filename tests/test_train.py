"""The training loop and ``pbp-fast train``: configuration checks, the schedule, end-to-end runs on
the CPU (digits and a synthetic CIFAR-format file), and exact resumption."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pbp_fast import cli
from pbp_fast.recipe.data import encode_jpegs, save_packed_jpeg
from pbp_fast.recipe import (PB_LR, TrainConfig, build_optimizer, build_scheduler,
                             format_table, train)
from pbp_fast.recipe.lr_search import kept_epochs

# A tiny, fast recipe: MobileNetV2 x0.25 on 8x8 digits.
FAST = ["--data", "digits", "--image-size", "8", "--model", "mobilenet_v2", "--width-mult",
        "0.25", "-b", "128", "--lr", "0.05", "--lr-warmup-epochs", "1",
        "--random-crop-padding", "1", "--hflip", "0", "--no-progress"]
PB = ["--dendrites", "--pb-switch-mode", "fixed", "--pb-n-epochs", "1", "--pb-p-epochs", "1",
      "--pb-max-dendrites", "3"]


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Interrupt(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize("kwargs, word", [({"epochs": 0}, "epochs"), ({"model": "vgg"}, "model"),
                                          ({"opt": "lamb"}, "opt"), ({"lr": -1.0}, "lr"),
                                          ({"label_smoothing": 1.0}, "label_smoothing"),
                                          ({"auto_augment": "aa"}, "auto_augment"),
                                          ({"hflip": 2.0}, "hflip"),
                                          ({"sched": "step"}, "sched"),
                                          ({"dendrites": True, "pb_switch_mode": "fixed",
                                            "pb_n_epochs": None}, "pb_n_epochs"),
                                          ({"pb_n_patience": 0}, "pb_n_patience"),
                                          ({"pb_switch_mode": "plateau"}, "pb_switch_mode"),
                                          ({"device": "tpu:x"}, "device"),
                                          ({"pb_opt": "lamb"}, "pb_opt"),
                                          ({"pb_lr_search": -1}, "pb_lr_search"),
                                          ({"pb_lr_search_factor": 1.0}, "pb_lr_search_factor"),
                                          ({"pb_lr_search": 2, "pb_schedule": "global"},
                                           "pb_lr_search")])
def test_config_errors_name_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(data="digits", **kwargs)


def test_cli_reports_bad_values_without_a_traceback(capsys):
    with pytest.raises(SystemExit, match="epochs must be an int >= 1"):
        cli.main(["train", "--data", "digits", "--epochs", "0"])


def test_cli_reports_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="none_train.npz does not exist"):
        cli.main(["train", "--data", str(tmp_path / "none_train.npz"), "--output-dir",
                  str(tmp_path / "out")])


def _lrs(opt, sched, steps):
    """The learning rate of each of ``steps`` optimizer steps under ``sched``."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_cosine_schedule_and_weight_decay_groups():
    cfg = TrainConfig(data="digits", lr=0.1, lr_warmup_epochs=2, lr_warmup_decay=0.1,
                      lr_min=0.001, weight_decay=1e-4)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model.parameters(), cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1          # only the conv weight decays
    sched = build_scheduler(opt, cfg, steps_per_epoch=10, epochs=10)
    lrs = _lrs(opt, sched, 100)
    assert lrs[0] == pytest.approx(0.01) and lrs[20] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21]))          # warmup rises
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))          # cosine falls
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    # A rebuilt optimizer joins the schedule where the run is (global PB schedule).
    opt2 = build_optimizer(model.parameters(), cfg)
    build_scheduler(opt2, cfg, steps_per_epoch=10, epochs=10, start_epoch=3)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[30])


def test_constant_schedule_keeps_the_peak_rate_after_the_warmup():
    cfg = TrainConfig(data="digits", lr=0.1, sched="constant", lr_warmup_epochs=1,
                      lr_warmup_decay=0.5)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, epochs=5)
    lrs = _lrs(opt, sched, 20)
    assert lrs[0] == pytest.approx(0.05)
    assert lrs[4:] == pytest.approx([0.1] * 16)


@pytest.mark.parametrize("extra", [[], PB], ids=["baseline", "pb"])
def test_the_model_is_chosen_on_validation_and_tested_once(tmp_path, monkeypatch, extra):
    """The reported model is the best epoch by validation accuracy (a split of the training
    data); the test split is evaluated once, after training, on that model."""
    from pbp_fast.recipe import trainer as train_mod
    loaders, evaluate = [], train_mod.evaluate

    def spy(model, loader, amp=False):
        loaders.append(loader)
        return evaluate(model, loader, amp)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, *extra, "--epochs", "3", "--lr", "0.5", "--sched",
                     "constant", "--output-dir", str(out)]) == 0
    val_set, test_set = loaders[0].dataset, loaders[-1].dataset
    assert len(loaders) == 3 + 2 and test_set is not val_set
    assert all(loader.dataset is val_set for loader in loaders[:-1])
    results = json.loads((out / "results.json").read_text())
    val = [float(r["val_acc"]) for r in _rows(out / "metrics.csv")]
    assert results["val_acc"] == pytest.approx(val[results["best_epoch"] - 1])
    assert results["val_acc"] == pytest.approx(max(val), abs=1e-3 * max(val))


def test_format_table():
    text = format_table([{"a": "x", "b": 1234.5}], [("name", "a", ""), ("value", "b", ",.1f")])
    assert text.splitlines()[0].split() == ["name", "value"]
    assert "1,234.5" in text


# ------------------------------------------------------------------------------ end to end

def test_cli_train_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--epochs", "2", "--output-dir", str(out)]) == 0
    for name in ("args.json", "metrics.csv", "last.pt", "best.pt", "results.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "args.json").read_text())["model"] == "mobilenet_v2"
    rows = _rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    results = json.loads((out / "results.json").read_text())
    assert results["params"] > 0 and 0 <= results["test_acc"] <= 100
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "pb", "epoch", "rng"} <= ckpt.keys()
    table = capsys.readouterr().out
    assert "test acc %" in table and "mobilenet_v2 x0.25" in table


def test_pb_run_resumes_exactly(tmp_path):
    """An interrupted PB run (with augmentation, mixup and dropout) resumed from last.pt ends
    with the same weights and metrics as an uninterrupted one; the interruptions fall inside a
    dendrite phase (candidates in the checkpoint) and after dendrites were added."""
    args = [*FAST, *PB, "--epochs", "4", "--auto-augment", "ta_wide", "--mixup-alpha", "0.2",
            "--cutmix-alpha", "1.0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["train", *args, "--output-dir", str(full)]) == 0

    parser = cli.build_parser()
    from pbp_fast.recipe import config_from_args
    cfg = config_from_args(parser.parse_args(["train", *args, "--output-dir", str(part)]))

    def stop_after(n):
        def hook(rec):
            if rec.epoch == n:
                raise Interrupt
        return hook

    with pytest.raises(Interrupt):
        train(cfg, log=lambda s: None, on_epoch_end=stop_after(1))
    phase = torch.load(part / "last.pt", weights_only=True)["pb"]["state"]
    assert phase == "dendrite"
    with pytest.raises(Interrupt):
        train(cfg.__class__(**{**cfg.__dict__, "resume": str(part)}), log=lambda s: None,
              on_epoch_end=stop_after(3))
    assert cli.main(["train", *args, "--resume", str(part / "last.pt")]) == 0

    _assert_same_state(_model_state(full / "last.pt"), _model_state(part / "last.pt"))
    assert _rows(full / "metrics.csv") == _rows(part / "metrics.csv")
    assert json.loads((full / "results.json").read_text())["test_acc"] == \
        json.loads((part / "results.json").read_text())["test_acc"]
    events = [r["event"] for r in _rows(full / "metrics.csv")]
    assert "add_dendrites" in events
    assert (full / "pb_history.csv").exists() and (full / "pb_history.png").exists()


@pytest.mark.parametrize("schedule", ["global", "phase"])
def test_pb_learning_rate_schedules(tmp_path, schedule):
    """global: neuron phases keep the baseline's learning rates; phase: each phase restarts the
    warmup.  Dendrite phases always start their own schedule."""
    base, pb = tmp_path / "base", tmp_path / "pb"
    common = [*FAST, "--epochs", "3", "--lr-warmup-epochs", "1"]
    assert cli.main(["train", *common, "--output-dir", str(base)]) == 0
    assert cli.main(["train", *common, *PB, "--pb-schedule", schedule,
                     "--output-dir", str(pb)]) == 0
    lr_base = [float(r["lr"]) for r in _rows(base / "metrics.csv")]
    rows = _rows(pb / "metrics.csv")
    assert [r["phase"] for r in rows] == ["neuron", "dendrite", "neuron"]
    lr_pb = [float(r["lr"]) for r in rows]
    assert lr_pb[0] == lr_base[0]                                 # fresh schedules start low
    assert lr_pb[1] == pytest.approx(lr_base[0] * PB_LR["adamw"] / 0.05)  # the candidates' lr
    assert lr_pb[2] == pytest.approx(lr_base[2] if schedule == "global" else lr_base[0])


def test_candidates_train_in_the_dendrite_phase(tmp_path, capsys):
    """The candidates' objective has the tiny scale of the loss's gradient at each unit, so with
    SGD at the network's learning rate their score (the best sum of |correlation|) hardly moves
    from epoch to epoch, while AdamW (the default --pb-opt) keeps raising it."""
    scores = {}
    for opt in ("adamw", "sgd"):
        out = tmp_path / opt
        assert cli.main(["train", *FAST, "--dendrites", "--pb-n-epochs", "1", "--pb-p-epochs",
                         "3", "--pb-max-dendrites", "1", "--epochs", "4", "--pb-opt", opt,
                         "--pb-warmup-batches", "10", "--pb-snapshot", "unit",
                         "--pb-candidate-scale", "none",
                         "--output-dir", str(out)]) == 0
        with open(out / "pb_history.csv", newline="") as f:
            scores[opt] = [float(r["candidate_score"]) for r in csv.DictReader(f)
                           if r["phase"] == "dendrite"]
    adamw, sgd = scores["adamw"], scores["sgd"]
    assert len(adamw) == len(sgd) == 3
    assert adamw[2] > 1.03 * adamw[1] > 0 and adamw[2] > 1.1 * sgd[2]
    assert sgd[2] < 1.01 * sgd[1]

    # bench/candidate_optimizer.py measures the same from a checkpoint (here one with a dendrite)
    spec = importlib.util.spec_from_file_location(
        "candidate_optimizer", Path(__file__).resolve().parents[1] / "bench" /
        "candidate_optimizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([str(tmp_path / "sgd" / "last.pt"), "--epochs", "2", "--opts", "sgd:0",
                       "adamw:0.01"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.split()[0] in ("sgd:0", "adamw:0.01")}
    assert float(rows["sgd:0"][1]) == 0 and float(rows["adamw:0.01"][1]) > 0.01
    assert float(rows["adamw:0.01"][0]) > 1.1 * float(rows["sgd:0"][0])


def test_resume_refuses_a_different_dendrites_setting_or_optimizer(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--epochs", "1", "--output-dir", str(out)]) == 0
    with pytest.raises(ValueError, match="dendrites"):
        cli.main(["train", *FAST, *PB, "--epochs", "2", "--resume", str(out)])
    with pytest.raises(ValueError, match="pass --opt sgd to resume"):
        cli.main(["train", *FAST, "--opt", "adamw", "--epochs", "2", "--resume", str(out)])
    pb = tmp_path / "pb"   # stopped at the start of a dendrite phase: its optimizer is --pb-opt's
    assert cli.main(["train", *FAST, *PB, "--epochs", "1", "--output-dir", str(pb)]) == 0
    assert torch.load(pb / "last.pt", weights_only=True)["pb"]["state"] == "dendrite"
    with pytest.raises(ValueError, match="pass --pb-opt adamw to resume"):
        cli.main(["train", *FAST, *PB, "--pb-opt", "sgd", "--epochs", "2", "--resume", str(pb)])
    with pytest.warns(UserWarning, match=r"differ from the saved run: \['epochs', 'opt'\]"):
        assert cli.main(["train", *FAST, *PB, "--opt", "adamw", "--epochs", "2", "--resume",
                         str(pb)]) == 0   # --opt is not the dendrite phase's optimizer


def _write_npz(path, n, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    save_packed_jpeg(path, encode_jpegs(images), np.arange(n) % 10)


def test_cli_train_on_cifar_format_data(tmp_path, capsys):
    _write_npz(tmp_path / "tiny_train.npz", 96, 0)
    _write_npz(tmp_path / "tiny_test.npz", 32, 1)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(tmp_path / "tiny_train.npz"), "--val-size", "16",
                     "--model", "mobilenet_v3_small", "--width-mult", "0.25", "--epochs", "1",
                     "-b", "32", "--auto-augment", "ra", "--channels-last", "--opt", "adamw",
                     "--lr", "0.001", "--cache-dir", str(tmp_path / "cache"),
                     "--output-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1
    assert "mobilenet_v3_small x0.25" in capsys.readouterr().out


def test_compiled_pb_run_compiles_every_structure(tmp_path, monkeypatch):
    """With --compile, each structure of a PB run (a switch after every epoch here) trains and
    evaluates compiled: the trainer starts Dynamo afresh at every restructure, so its
    per-function recompile limit (8; 2 here, to meet it in three epochs) never sends a later
    phase back to eager."""
    graphs = []

    def backend(gm, example_inputs):  # Dynamo's graphs, run as traced (no Inductor: fast)
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=backend))
    config = torch._dynamo.config  # (cache_size_limit in older torch)
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    from pbp_fast.recipe import config_from_args
    args = ["train", *FAST, *PB, "--model", "mobilenet_tiny", "--epochs", "3", "--compile",
            "--output-dir", str(tmp_path)]
    cfg = config_from_args(cli.build_parser().parse_args(args))
    per_epoch = []
    # config.patch, not monkeypatch: undoing a setattr deletes the entry from Dynamo's config
    with config.patch(**{limit: 2}):
        train(cfg, log=lambda s: None, on_epoch_end=lambda rec: per_epoch.append(
            (rec.phase, rec.event, len(graphs))))
    assert [p for p, _, _ in per_epoch] == ["neuron", "dendrite", "neuron"], per_epoch
    new = np.diff([0] + [n for _, _, n in per_epoch])
    assert (new >= 2).all(), per_epoch  # a train and an eval graph for every structure


def test_a_finished_run_that_restored_a_smaller_best_model_resumes(tmp_path):
    """A run that ends by restoring a best model with fewer dendrites than the last stage (its
    dendrite set failed) saves a last.pt whose optimizer matches that model, and resuming the
    finished run (as a re-run of an experiment does) reports the same result."""
    out = tmp_path / "run"
    args = [*FAST, *PB, "--epochs", "6", "--pb-max-tries", "1",
            "--pb-improvement-threshold", "10"]          # no dendrite set can count as better
    assert cli.main(["train", *args, "--output-dir", str(out)]) == 0
    events = [r["event"] for r in _rows(out / "metrics.csv")]
    assert "add_dendrites" in events and len(events) < 6
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["pb"]["state"] == "done"
    assert all(len(v) == 0 for k, v in ckpt["model"].items() if k.endswith("dendrite_weight"))
    first = json.loads((out / "results.json").read_text())
    assert cli.main(["train", *args, "--resume", str(out / "last.pt")]) == 0
    assert json.loads((out / "results.json").read_text())["test_acc"] == first["test_acc"]


def test_the_starting_rate_search_steps_down_while_it_helps():
    """StartRateSearch alone: each trial's end goes back to the stage's start at a lower rate
    while the trials get better, then to the end of the best one; at most MAX_LOWERINGS."""
    from pbp_fast.recipe.lr_search import MAX_LOWERINGS, StartRateSearch
    s = StartRateSearch(epochs=2, factor=0.5)
    s.begin("start")
    assert s.after_epoch(50.0, lambda: "end1") is None
    assert s.after_epoch(60.0, lambda: "end1") == ("start", 0.5)    # trial 1's best: 60
    assert s.after_epoch(61.0, lambda: "end2") is None
    assert s.after_epoch(55.0, lambda: "end2") == ("start", 0.25)   # 61 > 60: lower again
    s.after_epoch(61.0, lambda: "end3")
    assert s.after_epoch(40.0, lambda: "end3") == ("end2", 0.5)     # 61 <= 61: keep trial 2
    assert not s.active
    s.begin("start")
    for i in range(MAX_LOWERINGS):                                  # always better
        s.after_epoch(float(i), lambda: "x")
        assert s.after_epoch(float(i), lambda: "x") == ("start", 0.5 ** (i + 1))
    s.after_epoch(99.0, lambda: "x")
    assert s.after_epoch(99.0, lambda: "x") is None and not s.active


def test_kept_epochs_leave_out_the_discarded_trials():
    """kept_epochs: a trial sends the run back to its stage's start; "kept" to the end of the
    trial before it; the last trial, and epochs outside a search, stay."""
    events = ["", "add_dendrites",                  # 0, 1: the stage starts after epoch 1
              "", "lr_trial: x0.1",                 # 2, 3: trial 1, back to the start
              "", "lr_trial: x0.01",                # 4, 5: trial 2 (better), back again
              "", "lr_trial: x0.1 kept",            # 6, 7: trial 3 worse: to trial 2's end
              "", "start_dendrite_phase", ""]       # 8, 9, 10: the stage goes on from there
    assert kept_epochs(events) == [0, 1, 4, 5, 8, 9, 10]
    assert kept_epochs(["", "restart", "", "lr_trial: x0.1", "", ""]) == [0, 1, 4, 5]
    assert kept_epochs(["", "", "add_dendrites", ""]) == [0, 1, 2, 3]
    assert kept_epochs([]) == []


def test_pb_lr_search_retries_the_stage_at_lower_rates_and_resumes_exactly(tmp_path):
    """--pb-lr-search: after the dendrites are added, each trial epoch is followed by a new
    start of the stage at a tenth of the rate (same place in its schedule) until a trial does
    worse; the discarded epochs stay in metrics.csv, not in the controller's record; an
    interruption inside the search resumes exactly."""
    args = [*FAST, "--dendrites", "--pb-switch-mode", "fixed", "--pb-n-epochs", "3",
            "--pb-p-epochs", "1", "--pb-max-dendrites", "1", "--epochs", "10",
            "--pb-lr-search", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["train", *args, "--output-dir", str(full)]) == 0
    rows = _rows(full / "metrics.csv")
    events = [r["event"] for r in rows]
    first = events.index("add_dendrites")
    trials = [i for i, e in enumerate(events) if e.startswith("lr_trial")]
    assert trials and trials[0] == first + 1
    lrs = [float(r["lr"]) for r in rows]
    for i in trials:
        if not events[i].endswith("kept") and i + 1 < len(rows):
            assert lrs[i + 1] == pytest.approx(0.1 * lrs[i], rel=1e-6)
    with open(full / "pb_history.csv", newline="") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) < len(rows) and not any("lr_trial" in r["event"] for r in kept)
    # the kept path, read back from metrics.csv alone, is the controller's record
    path = [rows[i] for i in kept_epochs(events)]
    assert [(r["phase"], float(r["val_acc"])) for r in path] == \
        [(r["phase"], float(r["score"])) for r in kept]

    from pbp_fast.recipe import config_from_args
    cfg = config_from_args(cli.build_parser().parse_args(
        ["train", *args, "--output-dir", str(part)]))

    def stop_after(n):
        def hook(rec):
            if rec.epoch == n:
                raise Interrupt
        return hook

    with pytest.raises(Interrupt):
        train(cfg, log=lambda s: None, on_epoch_end=stop_after(trials[0] + 1))
    assert torch.load(part / "last.pt", weights_only=True)["lr_search"]["search"]["active"]
    assert cli.main(["train", *args, "--resume", str(part / "last.pt")]) == 0
    _assert_same_state(_model_state(full / "last.pt"), _model_state(part / "last.pt"))
    assert _rows(full / "metrics.csv") == _rows(part / "metrics.csv")
