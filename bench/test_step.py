"""Step level: one training step (forward, cross-entropy, backward, SGD with momentum) of the CIFAR
MobileNetV3-Small (32x32 inputs, 10 classes, channels_last), with its peak memory.

Cases: the plain model (no conversion, path "plain"); the converted model before any dendrite
(neuron D=0: what converting a model costs in its first stage); with 1 and 3 dendrites per unit
in the neuron phase (main weights and the newest alphas train, the dendrites are
frozen); the dendrite phase with 0 and 1 trained dendrites (everything frozen but one candidate
per unit, trained by the correlation objective from the backward pass).  Paths: the fused
backend ("cpp" on the CPU, "triton" on CUDA), "reference" (every unit's ``backend``), and the
perforatedai library where it imports (its open-source dendrites, neuron phase only, see
``perforatedai_model``).  Every dendritic step is also given as a multiple of the plain step,
beside its FLOP floor (the convs and matmuls the case's math needs, counted on the reference
path, over the plain step's) and its added time over its added FLOPs.

CUDA: batch 256 under bf16 autocast, eager, torch.compile and CUDA graphs (the whole step
captured).  CPU: batch 32 in float32, eager; with ``--cpu-compile`` also torch.compile of the
plain and fused paths.  The plain and fused models compile with ``fullgraph=True`` (in both
phases: a graph break fails the benchmark); the reference and perforatedai models compile
with whatever graph breaks they need.

    pytest bench/test_step.py --benchmark-only --ratios-json bench/results/step_cpu.json
"""
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import pbp_fast as pbp

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH = 256 if CUDA else 32
FUSED = "triton" if CUDA else "cpp"
ROUNDS = 30 if CUDA else 15
CASES = [("plain", "plain"), ("neuron D=0", FUSED)] + [
    (case, path) for case in ("neuron D=1", "neuron D=3", "dendrite D=0", "dendrite D=1")
    for path in ("reference", FUSED) + (("perforatedai",) if case.startswith("neuron") else ())]


def sync():
    if CUDA:
        torch.cuda.synchronize()


def dendritic_model(model, d, phase, backend):
    """``pbp.convert`` the model, give every unit ``d`` dendrites and set the phase (the
    controller's own transition into the dendrite phase creates the candidates)."""
    for unit in pbp.convert(model).values():
        unit.backend = backend
        for _ in range(d):
            unit.add_dendrite()
    if phase == "dendrite":
        pb = pbp.PerforatedBackprop(model, switch_mode="fixed", n_epochs=1, p_epochs=10 ** 6)
        assert pb.add_validation_score(0.0).phase == "dendrite"
    return model


def import_perforatedai():
    """perforatedai 3.2.9 declares torchvision and imports it for two ResNet block classes
    only (``torchvision.models.resnet.BasicBlock`` / ``Bottleneck``, compared against module
    types).  Where torchvision is not installed at all, two placeholder classes stand in for
    them; where it is installed, the library imports it as usual."""
    if importlib.util.find_spec("perforatedai") is None:
        pytest.skip("perforatedai is not installed (pip install .[compare])")
    if importlib.util.find_spec("torchvision") is None:
        names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
        for name in names:
            mod = sys.modules.setdefault(name, types.ModuleType(name))
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        resnet = sys.modules[names[-1]]
        resnet.BasicBlock = type("BasicBlock", (torch.nn.Module,), {})
        resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
    gpa = pytest.importorskip("perforatedai.globals_perforatedai")
    upa = pytest.importorskip("perforatedai.utils_perforatedai")
    return gpa, upa


def perforatedai_model(model, d, x, y):
    """The model with ``d`` dendrites per layer added by perforatedai 3.2.9 (every Conv2d and
    Linear is wrapped).  Its open-source dendrites are copies of the layer (without the
    BatchNorm), take the layer's input without a detach and train by gradient descent together
    with the network: there is no separate dendrite phase to time (Perforated Backpropagation's
    candidate training is in its separate perforatedbp package).  Adding a set of dendrites is
    what its tracker does at a switch, without the checkpoint files: the layers into dendrite
    mode (which needs one backward pass first, to learn the output shapes) and back."""
    gpa, upa = import_perforatedai()
    gpa.pc.set_configuration_confirmed(True)   # no interactive configuration screen
    gpa.pc.set_testing_dendrite_capacity(False)
    gpa.pc.set_unwrapped_modules_confirmed(True)
    gpa.pc.set_silent(True)
    model = upa.perforate_model(model, save_name="pai_bench", making_graphs=False)
    F.cross_entropy(model(x), y).backward()
    for _ in range(d):
        gpa.pai_tracker.set_dendrite_training()
        gpa.pai_tracker.set_neuron_training()
    return model


def build(case, path, x, y):
    """The CIFAR MobileNetV3-Small (seed 0, channels_last) of ``case`` on ``path``."""
    torch.manual_seed(0)
    model = pbp.models.mobilenet_v3_small(num_classes=10).to(DEVICE)
    model = model.to(memory_format=torch.channels_last)
    if case == "plain":
        return model
    phase, d = case.split(" D=")
    if path == "perforatedai":
        return perforatedai_model(model, int(d), x, y)
    return dendritic_model(model, int(d), phase, path)


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                           momentum=0.9)


def train_step(model, opt, x, y):
    with torch.autocast(DEVICE, torch.bfloat16, enabled=CUDA, cache_enabled=False):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def prepare(mode, model, opt, x, y, peak_memory, fullgraph):
    """Warm up (compile, capture) and return the step to time and the peak memory of one step
    (of the capture, for CUDA graphs)."""
    net = torch.compile(model, fullgraph=fullgraph) if mode == "compile" else model

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(net, opt, x, y)

    if mode == "cudagraphs":  # the whole step, as in PyTorch's CUDA-graphs notes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)

        def capture():
            with torch.cuda.graph(graph):
                train_step(net, opt, x, y)

        peak = peak_memory(capture)
        step = graph.replay
    else:
        for _ in range(2):
            step()
        opt.zero_grad(set_to_none=True)
        peak = peak_memory(lambda: train_step(net, opt, x, y))

    def timed():
        step()
        sync()

    return timed, peak


_PLAIN = {}  # mode -> the plain model's prepared step, shared by the cases of that mode


def plain_step(mode, x, y, peak_memory):
    """The plain model's step in ``mode`` (built, warmed up and, for compile, compiled once per
    mode), run between the rounds of every dendritic case: its "x plain step" is the ratio of
    two medians from the same minutes."""
    if mode not in _PLAIN:
        model = build("plain", "plain", x, y)
        _PLAIN[mode] = prepare(mode, model, sgd(model), x, y, peak_memory, fullgraph=True)[0]
    return _PLAIN[mode]


@pytest.mark.parametrize("mode", ["eager", "compile", "cudagraphs"])
@pytest.mark.parametrize("case,path", CASES)
def test_step(benchmark, peak_memory, flop_floor, interleaved, tmp_path, monkeypatch, request,
              case, path, mode):
    if mode == "cudagraphs" and not CUDA:
        pytest.skip("CUDA graphs need a GPU")
    if mode == "compile" and not CUDA:
        if not request.config.getoption("--cpu-compile"):
            pytest.skip("torch.compile on the CPU: pass --cpu-compile")
        if path not in ("plain", FUSED):
            pytest.skip("torch.compile on the CPU: the plain and fused paths only")
    if path == FUSED and FUSED not in pbp.backends():
        pytest.skip(f"the {FUSED} backend is not available here")
    monkeypatch.chdir(tmp_path)  # perforatedai writes its configuration files to the cwd
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), device=DEVICE)
    floor = 1.0
    if case != "plain":  # the FLOPs the case's math needs (the reference path) over the plain's
        ref, plain = build(case, "reference", x, y), build("plain", "plain", x, y)
        opts = sgd(ref), sgd(plain)
        floor = flop_floor(lambda: train_step(ref, opts[0], x, y),
                           lambda: train_step(plain, opts[1], x, y))
    model = build(case, path, x, y)
    opt = sgd(model)
    try:
        step, peak = prepare(mode, model, opt, x, y, peak_memory,
                             fullgraph=path in ("plain", FUSED))
    except Exception as err:  # the library's own limits under compile / graphs are a result
        if path != "perforatedai":
            raise
        pytest.skip(f"perforatedai under {mode}: {type(err).__name__}: {err}")
    benchmark.group = f"step {mode} {case}"
    benchmark.extra_info.update(path=path, plain=f"step {mode} plain", peak_mb=peak,
                                flop_floor=floor)
    if case == "plain":
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    else:
        interleaved(benchmark, step, plain_step(mode, x, y, peak_memory), rounds=ROUNDS)
