"""bench/pb_probe.py: the ridge fits find a unit's error where it is a function of the patch a
candidate of the unit's shape sees (per group for grouped convs), the sigmoid features find
what a linear fit cannot, the floor stays at the level of no relation, and the probe runs end to
end on a checkpoint."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pbp_fast.core import convert

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # pb_probe imports cifar_table and pb_controls
spec = importlib.util.spec_from_file_location("pb_probe", BENCH / "pb_probe.py")
pb_probe = sys.modules["pb_probe"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pb_probe)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(cin, cout, k, groups, stride=1):
    net = nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                                  bias=False), nn.BatchNorm2d(cout))
    return next(iter(convert(net).values()))


def _probe(unit, error, batches=12, n=32, hw=8, features=64, seed=0):
    """Fit on ``batches`` batches and evaluate on as many more, the error ``error(x)`` (4-D)."""
    gen = torch.Generator().manual_seed(seed)
    probe = pb_probe.UnitProbe(unit, features, torch.Generator().manual_seed(1))
    cin = unit.main_weight_bias()[0].shape[1] * unit._conv_kw["groups"]
    for step in ("fit", "eval"):
        for _ in range(batches):
            x = torch.randn(n, cin, hw, hw, generator=gen)
            getattr(probe, step + "_batch")(x, error(x, gen))
        if step == "fit":
            probe.solve()
    return {k: torch.tensor(v) for k, v in probe.correlations().items()}


def test_a_linear_error_is_found_by_the_linear_fit_and_not_by_the_floor():
    unit = _unit(6, 4, 3, 1)
    w = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(2))

    def error(x, gen):  # half signal, half noise: r = 1 / sqrt(2)
        y = F.conv2d(x, w, padding=1)
        return y + y.std((0, 2, 3), keepdim=True) * torch.randn(y.shape, generator=gen)
    r = _probe(unit, error)
    assert torch.allclose(r["linear"], torch.full((4,), 2 ** -0.5), atol=0.03)
    assert torch.allclose(r["linear, fit images"], torch.full((4,), 2 ** -0.5), atol=0.03)
    assert (r["sigmoid"] > r["linear"] - 0.02).all()
    assert (r["floor"] < 0.05).all()


def test_grouped_units_fit_each_channel_on_its_own_group():
    # a depthwise unit whose channel c's error is channel c's own 3x3 patch summed: a fit over
    # the wrong group's inputs finds nothing
    unit = _unit(8, 8, 3, 8)
    ones = torch.ones(8, 1, 3, 3)

    def error(x, gen):
        return F.conv2d(x, ones, padding=1, groups=8)
    r = _probe(unit, error)
    assert (r["linear"] > 0.99).all()
    # a strided pointwise unit: positions of the output against the patches they see
    unit = _unit(4, 2, 1, 1, stride=2)
    pick = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1.0, 0]]).view(2, 4, 1, 1)
    r = _probe(unit, lambda x, gen: F.conv2d(x, pick, stride=2))
    assert (r["linear"] > 0.99).all()


def test_the_sigmoid_features_find_an_even_function_the_linear_fit_cannot():
    unit = _unit(3, 2, 1, 1)

    def error(x, gen):  # |x_0| and x_1 ** 2: no linear part
        return torch.stack([x[:, 0].abs(), x[:, 1] ** 2], 1)
    r = _probe(unit, error, features=128)
    assert (r["linear"] < 0.05).all()
    assert (r["sigmoid"] > 0.5).all()
    assert torch.allclose(r["beyond linear"], (r["sigmoid"] ** 2 - r["linear"] ** 2).sqrt())


def test_the_probe_runs_on_a_checkpoint_and_reports(tmp_path, monkeypatch):
    from pbp_fast.recipe import TrainConfig, train
    cfg = TrainConfig(model="mobilenet_tiny", data="digits", epochs=2, batch_size=32,
                      dendrites=True, output_dir=str(tmp_path / "run"), progress=False)
    train(cfg)
    results = tmp_path / "probe.json"
    assert pb_probe.main([str(tmp_path / "run"), "--fit-images", "64", "--features", "16",
                          "--results", str(results)]) == 0
    rec = json.loads(results.read_text())["records"][0]
    units = rec["units"]
    assert len(units) == len(convert(pb_probe.load_checkpoint(tmp_path / "run")[0]))
    for u in units.values():
        assert all(0 <= u[k] <= 1 for k in pb_probe.KINDS)
    # fresh candidates trained on the model first: their snapshots are measured too
    assert pb_probe.main([str(tmp_path / "run"), "--fit-images", "64", "--features", "16",
                          "--train-epochs", "1", "--train-lr", "0.01",
                          "--results", str(results)]) == 0
    trained = json.loads(results.read_text())["records"]
    assert len(trained) == 2 and trained[1]["train_epochs"] == 1   # a record of its own
    assert all(0 < u["candidate"] <= 1 and 0 <= u["candidate saturated"] <= 1
               for u in trained[1]["units"].values())
    doc = tmp_path / "doc.md"
    doc.write_text(f"a\n{pb_probe.BEGIN}\n{pb_probe.END}\nb\n")
    monkeypatch.setattr(pb_probe, "DOC", doc)
    assert pb_probe.main(["--report", "--results", str(results)]) == 0
    body = doc.read_text()
    assert "| all units (mean over their channels) |" in body and str(tmp_path / "run") in body
    assert "candidates trained 1 epochs at AdamW 0.01" in body
    summary = [line for line in body.splitlines() if line.startswith("| checkpoint |")][0]
    assert "| candidate | candidate saturated |" in summary
    with pytest.raises(SystemExit):  # a label per checkpoint
        pb_probe.main([str(tmp_path / "run"), "--label", "a", "b", "--results", str(results)])
