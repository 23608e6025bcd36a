"""Deployment (pbp_fast.deploy: fold, onnx, quantize, report; pbp_fast.recipe.checkpoint):
folding gives a plain model with the eval output of the trained one (units with 0, 1 and 3
dendrites, cascades, BatchNorm, every layer kind, whole MobileNets); the ONNX export matches
PyTorch in ONNX Runtime; float16 and int8 keep the accuracy of a small model trained on the
digits within stated bounds; ``pbp-fast export`` runs end to end."""
import argparse
import copy
import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import add_random_dendrites, randomise_bn
import pbp_fast as pbp
from pbp_fast import deploy
from pbp_fast.recipe.checkpoint import load_checkpoint
from pbp_fast.deploy import FoldedDendriticUnit
from pbp_fast.core import DendriticConv2d, DendriticLinear, DendriticUnit

LAYERS = {  # (layer, input shape)
    "dense3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
    "depthwise_s2": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),
                     (2, 6, 9, 9)),
    "pointwise": (lambda: nn.Conv2d(5, 3, 1, bias=False), (3, 5, 4, 4)),
    "dilated_grouped": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2),
                        (2, 4, 6, 6)),
    "linear": (lambda: nn.Linear(5, 7), (4, 5)),
}


def _unit(kind, d, bn=True, dtype=torch.float64):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    layer = make().to(dtype)
    if isinstance(layer, nn.Linear):
        norm = randomise_bn(nn.BatchNorm1d(layer.out_features)).to(dtype) if bn else None
        unit = DendriticLinear(layer, norm)
    else:
        norm = randomise_bn(nn.BatchNorm2d(layer.out_channels)).to(dtype) if bn else None
        unit = DendriticConv2d(layer, norm)
    return add_random_dendrites(unit, d), torch.randn(shape, dtype=dtype)


def _no_training_modules(model):
    kinds = (DendriticUnit, nn.BatchNorm1d, nn.BatchNorm2d)
    return not any(isinstance(m, kinds) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# fold
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("d", [0, 1, 3])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fold_unit_matches_its_eval_output(kind, d, bn):
    unit, x = _unit(kind, d, bn)
    unit.train()
    with torch.no_grad():
        expected = copy.deepcopy(unit).eval()(x)
    folded = deploy.fold(unit)
    assert unit.training and unit.num_dendrites == d  # the original is untouched
    assert _no_training_modules(folded) and not folded.training
    if d == 0:
        assert type(folded) is (nn.Linear if kind == "linear" else nn.Conv2d)
    else:
        assert isinstance(folded, FoldedDendriticUnit) and folded.num_dendrites == d
        plain = (nn.Linear if kind == "linear" else nn.Conv2d)
        assert all(type(m) is plain for m in [folded.main, *folded.dendrites])
    with torch.no_grad():
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fold_keeps_the_cascade_and_drops_what_does_not_reach_the_output():
    unit, x = _unit("dense3x3", 3)
    with torch.no_grad():
        unit.dendrite_alpha[1].zero_()        # dendrite 1 feeds dendrite 2: kept
        unit.dendrite_cascade[2, 0].zero_()   # one cascade term of dendrite 2 gone
        expected = unit.eval()(x)
    folded = deploy.fold(unit)
    assert folded.num_dendrites == 3 and folded.terms == [[], [0], [1]]
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        unit.dendrite_cascade[2, 1].zero_()   # now dendrite 1 reaches nothing: dropped
        expected = unit(x)
    folded = deploy.fold(unit)
    assert folded.num_dendrites == 2 and folded.terms == [[], []]
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        for a in unit.dendrite_alpha:
            a.zero_()
    assert type(deploy.fold(unit)) is nn.Conv2d  # alpha = 0 everywhere: the plain layer


def test_fold_drops_candidates():
    unit, x = _unit("pointwise", 1)
    unit.start_candidate()
    with torch.no_grad():
        expected = unit.eval()(x)
    folded = deploy.fold(unit)
    assert unit.has_candidate
    assert not any("candidate" in name for name, _ in folded.named_parameters())
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


def _dendritic(model, seed=0):
    """Randomised BatchNorms; units with 0, 1 or 2 dendrites in turn; one unit with a candidate."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomise_bn(m)
    units = list(pbp.convert(model).values())
    for i, unit in enumerate(units):
        add_random_dendrites(unit, i % 3)
        with torch.no_grad():
            for a in unit.dendrite_alpha:
                a.mul_(0.3)
    units[1].start_candidate()
    return model


@pytest.mark.parametrize("name", ["mobilenet_tiny", "mobilenet_v2", "mobilenet_v3_small"])
def test_fold_converted_mobilenet_matches_eval(name):
    model = _dendritic(pbp.models.create_model(name, width_mult=0.25, num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 16, 16)
    folded = deploy.fold(model)
    assert model.training  # untouched: mode, structure and weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _no_training_modules(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_fold_plain_model_folds_its_batchnorms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                          randomise_bn(nn.BatchNorm2d(8)), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 25, 4))
    x = torch.randn(2, 3, 5, 5)
    folded = deploy.fold(model)
    assert _no_training_modules(folded) and isinstance(model[1], nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_fold_errors_name_the_problem():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        deploy.fold("model")
    conv = nn.Conv2d(2, 2, 1)
    bn = nn.BatchNorm2d(2, track_running_stats=False)
    unit = add_random_dendrites(DendriticConv2d(conv, bn), 1)
    with pytest.raises(ValueError, match="no running statistics"):
        deploy.fold(nn.Sequential(unit))
    # without dendrites such a BatchNorm simply stays
    plain = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    folded = deploy.fold(plain)
    x = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(folded(x), plain.eval()(x))


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------

def _onnx():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx
    return onnx


def test_onnx_export_matches_pytorch(tmp_path):
    onnx = _onnx()
    model = _dendritic(pbp.models.mobilenet_tiny(width_mult=0.5, num_classes=10)).eval()
    x = torch.randn(5, 3, 16, 16)
    path = deploy.export_onnx(model, tmp_path / "m.onnx", x[:1], metadata={"mean": "[0.5]"})
    err = deploy.verify_onnx(path, model, x)              # batch 5 through a batch-1 export
    assert err < 1e-4
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert {n.op_type for n in proto.graph.node} <= {
        "Conv", "Sigmoid", "Mul", "Add", "Relu", "HardSwish", "HardSigmoid",
        "GlobalAveragePool", "Flatten", "Gemm", "Identity"}
    assert {p.key: p.value for p in proto.metadata_props}["mean"] == "[0.5]"
    assert not list(tmp_path.glob("*.data"))              # one self-contained file


def test_verify_onnx_fails_when_the_model_differs(tmp_path):
    _onnx()
    model = _dendritic(pbp.models.mobilenet_tiny(width_mult=0.5, num_classes=10)).eval()
    x = torch.randn(2, 3, 16, 16)
    path = deploy.export_onnx(model, tmp_path / "m.onnx", x)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier[-1].linear.bias.add_(0.1)
    with pytest.raises(AssertionError, match="differ by up to"):
        deploy.verify_onnx(path, other, x)


def _digits_model_and_data():
    """A small CNN trained for a few seconds on 8x8 digits (about 95 % test accuracy), then
    converted and trained on with one dendrite per unit (neuron phase: the new alphas train)."""
    from pbp_fast.recipe import data as data_mod
    splits = data_mod.digits(size=8, seed=0)
    loaders = {k: data_mod.BatchLoader(getattr(splits, k), 64 if k == "train" else 512,
                                       shuffle=k == "train", seed=0)
               for k in ("train", "test")}
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
        nn.ReLU(), nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def fit(epochs, lr):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for epoch in range(epochs):
            loaders["train"].set_epoch(epoch)
            for x, y in loaders["train"]:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (and noise)
    try:
        fit(12, 0.02)
        for unit in pbp.convert(model).values():
            unit.add_dendrite()
        fit(2, 0.005)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), loaders


def test_quantized_variants_keep_the_accuracy(tmp_path):
    onnx = _onnx()
    pytest.importorskip("sklearn")
    from pbp_fast.deploy import quantize
    from pbp_fast.deploy import report as export
    model, loaders = _digits_model_and_data()
    assert all(u.num_dendrites == 1 and bool(u.dendrite_alpha[0].ne(0).any())
               for u in model.modules() if isinstance(u, DendriticUnit))
    x = next(iter(loaders["test"]))[0]
    calib = [b for b, _ in zip(loaders["train"], range(4))]           # 256 training images
    paths = export.export_variants(model, tmp_path, x[:1], calibration=calib, check_inputs=x,
                                   variants=("fp32", "fp16", "int8-dynamic", "int8"))
    acc = {k: export.evaluate_onnx(p, loaders["test"]) for k, p in paths.items()}
    assert acc["fp32"] > 90.0, acc
    assert abs(acc["fp16"] - acc["fp32"]) <= 0.5, acc         # 0.5 % = 2 of 359 images
    assert abs(acc["int8-dynamic"] - acc["fp32"]) <= 1.0, acc
    assert acc["int8"] >= acc["fp32"] - 2.0, acc
    half = onnx.load(str(paths["fp16"]))
    assert {i.data_type for i in half.graph.initializer} <= {onnx.TensorProto.FLOAT16,
                                                            onnx.TensorProto.INT64}
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ops = {n.op_type for n in onnx.load(str(paths["int8"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    assert sizes["fp16"] < sizes["fp32"]
    with pytest.raises(TypeError, match="calibration must be an iterable"):
        quantize.quantize_static_int8(paths["fp32"], tmp_path / "q.onnx", None)
    with pytest.raises(ValueError, match="dtypes must be one of"):
        quantize.quantize_static_int8(paths["fp32"], tmp_path / "q.onnx", calib, dtypes="u4")
    with pytest.raises(ValueError, match="out_path must differ"):
        quantize.convert_float16(paths["fp32"], paths["fp32"])


# ----------------------------------------------------------------------------------------------
# checkpoint and the export command
# ----------------------------------------------------------------------------------------------

def _checkpoint(path, dendrites=True):
    """A checkpoint in pbp-fast train's format: mobilenet_tiny on 8x8 digits."""
    from pbp_fast.recipe import TrainConfig
    cfg = TrainConfig(model="mobilenet_tiny", width_mult=0.25, dropout=0.0, data="digits",
                      image_size=8, dendrites=dendrites)
    model = pbp.models.mobilenet_tiny(width_mult=0.25, num_classes=10, in_channels=1)
    if dendrites:
        _dendritic(model)
    torch.save({"model": model.state_dict(), "config": asdict(cfg)}, path)
    return model.eval()


def test_load_checkpoint_rebuilds_dendrites(tmp_path):
    original = _checkpoint(tmp_path / "best.pt")
    model, config = load_checkpoint(tmp_path)                   # the run folder works too
    assert config["model"] == "mobilenet_tiny" and not model.training
    assert [u.num_dendrites for u in model.modules() if isinstance(u, DendriticUnit)] == \
        [u.num_dendrites for u in original.modules() if isinstance(u, DendriticUnit)]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a pbp-fast train checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def _export_cli(argv):
    from pbp_fast.cli import export
    parser = argparse.ArgumentParser(prog="pbp-fast")
    export.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    return args.run(args)


def test_export_command_end_to_end(tmp_path, capsys):
    _onnx()
    pytest.importorskip("sklearn")
    from pbp_fast.deploy import report as export
    _checkpoint(tmp_path / "best.pt")
    out = tmp_path / "deploy"
    assert _export_cli([tmp_path / "best.pt", "--fp16", "--int8", "--int8-dynamic",
                        "--output-dir", out, "--runs", 3, "--warmup", 1, "--threads", "1,2",
                        "--calibration-images", 64, "--eval-images", 60]) == 0
    printed = capsys.readouterr().out
    for name in export.FILES.values():
        assert (out / name).is_file() and name in printed
    report = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"eager", *export.FILES}
    assert report["test_images"] == 60 and report["calibration_images"] == 64
    assert all(set(r["latency_ms"]) == {"1", "2"} and r["accuracy"] is not None
               for r in rows.values())
    # the same model on the same images (up to an argmax tie broken differently)
    assert abs(rows["fp32"]["accuracy"] - rows["eager"]["accuracy"]) <= 100 / 60


def test_export_command_errors(tmp_path):
    with pytest.raises(SystemExit, match="no file at"):
        _export_cli([tmp_path / "missing.pt"])
    _checkpoint(tmp_path / "best.pt", dendrites=False)
    with pytest.raises(SystemExit, match="--runs must be"):
        _export_cli([tmp_path / "best.pt", "--runs", 0])
    with pytest.raises(SystemExit, match="--threads must be"):
        _export_cli([tmp_path / "best.pt", "--threads", "one"])


def test_missing_onnx_packages_say_how_to_install_them():
    from pbp_fast.deploy.onnx import require
    with pytest.raises(ImportError, match=r"quantization needs onnx and no_such_module_pbp: "
                                          r"pip install 'pbp_fast\[deploy\]'"):
        require("onnx", "no_such_module_pbp", purpose="quantization")
