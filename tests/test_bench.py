"""bench/conftest.py and bench/report.py: the FLOP floor counts a grouped conv's gradients at the
cost of its forward, the block's floors are the dendrites' share of its convs, and the ratio
table derives its columns from the medians of the same run."""
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # bench/conftest.py imports report


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench_conftest", "conftest.py")
block = _load("bench_block", "test_block.py")
report = _load("report", "report.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("x_grad", [False, True])
def test_a_conv_gradient_costs_what_its_forward_costs(groups, x_grad):
    n, c, hw, k = 2, 8, 6, 3
    x = torch.randn(n, c, hw, hw, requires_grad=x_grad)
    w = torch.randn(c, c // groups, k, k, requires_grad=True)
    forward = 2 * n * c * hw * hw * (c // groups) * k * k  # multiply-adds x 2, padding 1
    assert bench.step_flops(lambda: F.conv2d(x, w, padding=1, groups=groups)) == forward
    flops = bench.step_flops(lambda: F.conv2d(x, w, padding=1, groups=groups).sum().backward())
    assert flops == forward * (3 if x_grad else 2)


@pytest.mark.parametrize("d", [0, 1, 3])
def test_the_block_floor_is_the_dendrites_share_of_its_convs(d):
    """Forward: 1 + D convs per conv. Neuron-phase step: forward, dL/dx and dL/dW of the main
    convs (3 each) and the dendrites' forward only (frozen, perforated): (3 + D) / 3."""
    forward, params, grad_y = block.make_block(d, channels_last=True)

    def floor(mode):
        return (bench.step_flops(block.block_step(forward, params, grad_y, mode, "reference"))
                / bench.step_flops(block.block_step(forward, params, grad_y, mode, "plain")))

    assert floor("forward") == pytest.approx(1 + d, rel=1e-12)
    assert floor("forward_backward") == pytest.approx((3 + d) / 3, rel=1e-12)


def _bench(group, path, median, **extra):
    return SimpleNamespace(group=group, stats=SimpleNamespace(median=median),
                           extra_info={"path": path, **extra})


def test_the_table_gives_each_case_against_plain_and_its_floor():
    rows = bench.ratio_rows([
        _bench("plain", "plain", 0.100),
        _bench("D=1", "reference", 0.300, plain="plain", flop_floor=4 / 3),
        _bench("D=1", "cpp", 0.150, plain="plain", flop_floor=4 / 3),
        _bench("D=0", "cpp", 0.110, plain="plain", flop_floor=1.0),
    ])
    by = {(r["group"], r["path"]): r for r in rows}
    fused = by[("D=1", "cpp")]
    assert fused["vs_plain"] == pytest.approx(1.5)
    assert fused["speedup"] == pytest.approx(2.0)
    assert fused["added_vs_floor"] == pytest.approx(0.5 / (1 / 3))  # 1.5x the added FLOPs
    assert by[("D=1", "reference")]["added_vs_floor"] == pytest.approx(2.0 / (1 / 3))
    assert "added_vs_floor" not in by[("D=0", "cpp")]  # no added FLOPs to divide by
    text = report.table({"machine": "test", "rows": rows})
    assert "| FLOP floor | added time / added FLOPs |" in text
    assert "| D=1 (cpp) | 150.0 | 300.0 | **2.00x** | 1.50x | 1.33x | 1.50 |" in text
    only = report.table({"machine": "test", "rows": rows}, rows_like=r"D=\d \(cpp\)")
    assert "(cpp)" in only and "(reference)" not in only and "(plain)" not in only


def test_a_baseline_timed_between_the_rounds_is_the_one_compared_against():
    rows = bench.ratio_rows([
        _bench("plain", "plain", 0.100),
        _bench("D=1", "cpp", 0.150, plain="plain", flop_floor=4 / 3, plain_ms=125.0),
        _bench("D=3", "cpp", 0.200, plain="plain", flop_floor=2.0),
    ])
    by = {r["group"]: r for r in rows}
    assert by["D=1"]["plain_ms"] == 125.0 and by["D=1"]["vs_plain"] == pytest.approx(1.2)
    assert by["D=1"]["added_vs_floor"] == pytest.approx(0.2 / (1 / 3))
    assert by["D=3"]["vs_plain"] == pytest.approx(2.0)  # no interleaved one: the plain test's


def test_the_interleaved_fixture_times_the_baseline_before_every_round():
    calls = []

    class Benchmark:
        extra_info = {}

        def pedantic(self, target, setup, rounds, warmup_rounds):
            for _ in range(warmup_rounds + rounds):
                setup()
                target()

    def plain():
        calls.append("plain")
        time.sleep(0.002)

    b = Benchmark()
    bench.interleave(b, lambda: calls.append("case"), plain, rounds=3)
    assert calls == ["plain", "case"] * 4
    assert 2.0 <= b.extra_info["plain_ms"] < 50


def test_each_round_is_divided_by_the_plain_step_just_before_it():
    """The machine slows down halfway (every step takes twice as long): the ratio of the two
    medians is off, the median of the per-round ratios is not."""
    case_s, plain_s = [0.13, 0.13, 0.26, 0.26, 0.26], [0.10, 0.10, 0.10, 0.20, 0.20]

    class Benchmark:
        extra_info = {}

        class stats:
            class stats:
                data = []

        def pedantic(self, target, setup, rounds, warmup_rounds):
            for _ in range(warmup_rounds + rounds):
                setup()
            self.stats.stats.data = list(case_s)  # the rounds' own times

    b = Benchmark()
    with pytest.MonkeyPatch.context() as mp:  # the plain steps' clock: start 0, end its time
        clock = iter([t for p in plain_s for t in (0.0, p)])
        mp.setattr(bench.time, "perf_counter", lambda: next(clock))
        bench.interleave(b, lambda: None, lambda: None, rounds=5, warmup_rounds=0)
    assert b.extra_info["plain_ms"] == pytest.approx(100.0)
    assert b.extra_info["vs_plain_paired"] == pytest.approx(1.3)
    row = bench.ratio_rows([_bench("D=1", "cpp", 0.26, plain="plain", flop_floor=4 / 3,
                                   **b.extra_info)])[0]
    assert row["vs_plain"] == pytest.approx(1.3)  # not 0.26 / 0.10 = 2.6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_bench_keeps_freed_memory_mapped_and_says_so():
    """With glibc's defaults a freed block of 32 MiB or more goes back to the kernel and the next
    one is faulted in again; the benchmark run turns that off and its machine line says which
    setting the numbers were taken with."""
    import resource
    assert bench.keep_freed_memory()
    n, pages = 10, 2 ** 23 * 4 // 4096  # 32 MiB blocks, each freed at once
    for _ in range(2):
        torch.empty(2 ** 23).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(2 ** 23).fill_(1.0)
    # glibc's defaults fault all of a block's pages in at every allocation (n * pages); kept
    # memory only where small allocations split a freed block before the next large one
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < n * pages // 4
    config = SimpleNamespace(getoption=lambda name, default=None: False)
    bench.pytest_configure(config)
    assert bench.machine().endswith("malloc keeps freed memory")
