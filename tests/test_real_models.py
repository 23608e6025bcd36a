"""The models users bring: torchvision's classification models and timm's mobile families through
PB's whole life cycle.  For each: ``convert`` leaves the outputs bit for bit; a neuron-phase step;
the controller's switch to the dendrite phase (best model restored); a dendrite-phase step that
trains every candidate that ran; adoption; then ``fold`` and an ONNX export, each checked against
the converted model with its dendrites in use (alphas set nonzero).

Skipped where torchvision or timm does not import (scripts/test_torch.sh newest runs them).
"""
import pytest
import torch

import pbp_fast as pbp

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHVISION = ["mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5",
               "squeezenet1_1", "resnet18", "resnext50_32x4d", "efficientnet_b0",
               "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
               "swin_t", "googlenet", "densenet121"]
TIMM = ["mobilenetv3_small_050", "mobilenetv4_conv_small", "efficientnet_b0", "ghostnet_100",
        "lcnet_050", "mobilevit_xxs", "convnext_atto", "repvgg_a0", "regnetx_002", "resnet18",
        "mnasnet_small", "tinynet_e"]
INPUT = (4, 3, 64, 64)


def _torchvision(name):
    tv = pytest.importorskip("torchvision")
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return tv.models.get_model(name, num_classes=10, **kwargs)


def _timm(name):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def _step(model, optimizer, x):
    loss = _logits(model(x)).float().square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _life_cycle(model, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(INPUT)
    model.eval()
    with torch.no_grad():
        before = _logits(model(x))
    units = pbp.convert(model)
    assert units
    with torch.no_grad():
        assert torch.equal(_logits(model(x)), before), "convert changed the outputs"

    pb = pbp.PerforatedBackprop(model, switch_mode="fixed", n_epochs=1, p_epochs=1,
                                max_dendrites=1)
    model.train()
    _step(model, torch.optim.SGD(pb.parameters(), lr=1e-3), x)
    decision = pb.add_validation_score(0.5)
    assert decision.phase == "dendrite" and decision.restored

    _step(model, torch.optim.AdamW(pb.parameters(), lr=1e-2), x)
    ran = [u for u in units.values() if u.candidate.batches.item() > 0]
    assert len(ran) >= 0.9 * len(units), f"{len(ran)} of {len(units)} candidates trained"
    assert all(u.candidate.weight.grad is not None for u in ran)
    decision = pb.add_validation_score(0.5)
    assert decision.event == "add_dendrites" and pb.num_dendrites == 1
    _step(model, torch.optim.SGD(pb.parameters(), lr=1e-3), x)

    with torch.no_grad():  # dendrites that count in the outputs
        for u in units.values():
            u.dendrite_alpha[0].uniform_(-0.1, 0.1)
    model.eval()
    with torch.no_grad():
        expected = _logits(model(x))
        folded = pbp.deploy.fold(model)
        torch.testing.assert_close(_logits(folded(x)), expected, rtol=1e-4, atol=1e-4)
    path = pbp.deploy.export_onnx(model, tmp_path / "model.onnx", x[:1])
    pbp.deploy.verify_onnx(path, model, x, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_model_through_pb(name, tmp_path):
    _life_cycle(_torchvision(name), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM)
def test_timm_model_through_pb(name, tmp_path):
    _life_cycle(_timm(name), tmp_path)
