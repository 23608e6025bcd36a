"""The CIFAR MobileNets: torchvision-faithful architectures with CIFAR strides."""
import pytest
import torch
from torch import nn

from pbp_fast.recipe import models

NAMES = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]   # the torchvision ones

# torchvision's ImageNet models (1000 classes): strides do not change parameter counts, so the
# CIFAR variants must match these numbers exactly.
TORCHVISION_PARAMS = {"mobilenet_v2": 3_504_872, "mobilenet_v3_small": 2_542_856,
                      "mobilenet_v3_large": 5_483_032}


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_torchvision(name):
    assert n_params(models.create_model(name, num_classes=1000)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("width", [0.25, 1.0])
def test_forward_backward_shapes(name, width):
    torch.manual_seed(0)
    model = models.create_model(name, width_mult=width, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_cifar_strides_leave_a_4x4_map(name):
    model = models.create_model(name).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
        assert model.features(torch.zeros(1, 3, 16, 16)).shape[-2:] == (2, 2)


def test_registry():
    assert sorted(models.MODELS) == sorted(NAMES + ["mobilenet_tiny"])


def test_tiny_model():
    model = models.mobilenet_tiny(width_mult=0.25, in_channels=1).eval()
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    with torch.no_grad():
        assert model.features(torch.zeros(1, 1, 16, 16)).shape[-2:] == (4, 4)
    assert n_params(model) == 1450
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.momentum == 0.1
    assert sum(isinstance(m, models.InvertedResidualV3) for m in model.modules()) == 3


def test_grayscale_input():
    model = models.mobilenet_v3_small(width_mult=0.5, num_classes=10, in_channels=1).eval()
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 10)
    assert model.features[0][0].in_channels == 1


def test_public_constructors():
    assert isinstance(models.mobilenet_v2(), models.MobileNetV2)
    assert isinstance(models.mobilenet_v3_small(width_mult=1.0, num_classes=10),
                      models.MobileNetV3)
    assert isinstance(models.mobilenet_v3_large(), models.MobileNetV3)


def test_v3_building_blocks():
    small, large = models.mobilenet_v3_small(), models.mobilenet_v3_large()
    count = lambda m, t: sum(isinstance(x, t) for x in m.modules())  # noqa: E731
    assert count(small, models.SqueezeExcitation) == 9
    assert count(large, models.SqueezeExcitation) == 8
    assert count(small, models.InvertedResidualV3) == 11
    assert count(large, models.InvertedResidualV3) == 15
    assert count(small, nn.Hardswish) > 0 and count(small, nn.Hardsigmoid) == 9
    bn = next(m for m in small.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.eps, bn.momentum) == (0.001, 0.01)
    # Depthwise convolutions: groups == channels.
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
               for m in small.modules())


def test_v2_residuals_and_relu6():
    model = models.mobilenet_v2()
    blocks = [m for m in model.modules() if isinstance(m, models.InvertedResidualV2)]
    assert len(blocks) == 17
    assert sum(b.use_res_connect for b in blocks) == 10
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_width_mult_scales_channels():
    assert n_params(models.mobilenet_v2(width_mult=0.5)) < n_params(models.mobilenet_v2())
    # Channel counts are multiples of 8.
    for m in models.mobilenet_v3_large(width_mult=0.35).modules():
        if isinstance(m, nn.Conv2d) and m.in_channels > 3:
            assert m.out_channels % 8 == 0


def test_seeded_initialisation_is_deterministic():
    torch.manual_seed(3)
    a = models.mobilenet_v3_small(width_mult=0.5)
    torch.manual_seed(3)
    b = models.mobilenet_v3_small(width_mult=0.5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("kwargs, word", [({"width_mult": 0}, "width_mult"),
                                          ({"width_mult": -1.0}, "width_mult"),
                                          ({"num_classes": 0}, "num_classes"),
                                          ({"in_channels": 2.5}, "in_channels"),
                                          ({"dropout": 1.0}, "dropout")])
def test_argument_errors_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        models.mobilenet_v3_small(**kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model must be one of"):
        models.create_model("resnet50")


def test_make_divisible():
    assert models.make_divisible(16 * 0.25, 8) == 8
    assert models.make_divisible(37, 8) == 40
    assert models.make_divisible(100, 8) == 104   # never more than 10 % below
