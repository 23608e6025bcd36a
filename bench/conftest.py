"""pytest-benchmark helpers: every benchmark names its group and its path ("reference", "cpp",
...).  At the end of the run a table gives, measured in the same run, each path's speed-up over
the reference path of the same group and, for a benchmark whose ``extra_info["plain"]`` names the
group of a baseline benchmark (path "plain", e.g. the model without dendrites), its time as a
multiple of that baseline's (of the baseline's steps timed between its own rounds, when it ran
through :func:`interleave`: ``extra_info["plain_ms"]``); with ``extra_info["flop_floor"]`` (the
benchmark's FLOPs over the baseline's, ``flop_floor`` fixture) also its added time over its added
FLOPs, (time / baseline - 1) / (floor - 1): 1.0 is a path whose extra work runs exactly as fast
as the baseline's.  The ``extra_info`` values that ``report.COLUMNS`` names (peak memory from
the ``peak_memory`` fixture, achieved GB/s ...) go into the table too.  ``--ratios-json`` writes
the table as JSON for ``bench/report.py``."""
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import pytest
import torch

import report  # bench/report.py: the table, also for docs/benchmarks.md


def pytest_addoption(parser):
    parser.addoption("--ratios-json", default=None, help="write the speed-up table as JSON")
    parser.addoption("--cpu-compile", action="store_true",
                     help="bench/test_step.py: also time torch.compile on the CPU (the plain and "
                          "fused paths; Inductor takes minutes per model on a few cores)")
    parser.addoption("--glibc-malloc", action="store_true",
                     help="keep glibc's malloc settings (by default the run keeps freed memory "
                          "mapped, as a caching allocator does; see keep_freed_memory)")


MALLOC = "glibc defaults"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory mapped and reuse it (no trimming, no mmap for large
    blocks), as jemalloc or tcmalloc do.  With glibc's defaults every tensor of 32 MiB or more is
    a fresh mmap whose pages the kernel faults in and zeroes again at each step: on the block
    that took up to half of a step's time, moved single cases by up to 3x between consecutive
    runs, and charged a path for its tensors' sizes relative to glibc's threshold.  Returns
    whether the settings took (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    return bool(libc.mallopt(trim, 1 << 30) and libc.mallopt(mmap_threshold, 1 << 30))


def pytest_configure(config):
    global MALLOC
    if not config.getoption("--glibc-malloc", default=False) and keep_freed_memory():
        MALLOC = "malloc keeps freed memory"


def machine():
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {MALLOC}")


def step_peak_mb(fn) -> float:
    """Peak memory of one call of ``fn``: the most bytes allocated at any moment during it above
    what was allocated when it began (activations, gradients, temporaries), in MiB.  CUDA: the
    caching allocator's peak statistic; CPU: the allocations and frees of the CPU allocator
    recorded by the profiler (``profile_memory``), summed in time order."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2 ** 20
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak / 2 ** 20


@pytest.fixture
def peak_memory():
    return step_peak_mb


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding,
                         _dilation, transposed, _output_padding, _groups, output_mask,
                         out_shape=None, **kwargs) -> int:
    """A conv's gradients each cost what its forward costs. (torch's own formula counts the
    input and weight gradients of a grouped conv as if the conv were dense: 64x too many
    FLOPs for a depthwise 3x3 over 64 channels.)"""
    from torch.utils.flop_counter import conv_flop_count
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(fn) -> int:
    """The FLOPs of one call of ``fn``: the convs and matmuls, forward and backward, as
    ``torch.utils.flop_counter`` counts them (elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture
def flop_floor():
    """``flop_floor(step, plain_step)``: the FLOPs of ``step`` as a multiple of ``plain_step``'s,
    the least time a step can take as a multiple of the plain one when every FLOP costs the
    same. Count it on the reference path: it runs exactly the convs the math needs (the
    dendrites' forward, no gradient for frozen weights, none into x through a dendrite)."""
    return lambda step, plain: step_flops(step) / step_flops(plain)


def interleave(benchmark, step, plain_step, rounds, warmup_rounds=1):
    """Benchmark ``step`` with ``plain_step`` run before each of its rounds (untimed by
    pytest-benchmark, timed here); the median of those plain steps goes to
    ``extra_info["plain_ms"]``, which the ratio to the plain step then uses.  Both medians come
    from the same minutes, so what the machine does between two tests (another process, a
    frequency change) does not enter the ratio: measured in separate tests, the plain
    MobileNetV3 step moved by 10 % between runs of the same code."""
    times = []

    def before_round():
        start = time.perf_counter()
        plain_step()
        times.append(time.perf_counter() - start)

    benchmark.pedantic(step, setup=before_round, rounds=rounds, warmup_rounds=warmup_rounds)
    if len(times) > warmup_rounds:  # not with --benchmark-disable
        plain = times[warmup_rounds:]
        benchmark.extra_info["plain_ms"] = statistics.median(plain) * 1e3
        own = getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "data", [])
        if len(own) == len(plain):  # each round over the plain step just before it
            benchmark.extra_info["vs_plain_paired"] = statistics.median(
                t / p for t, p in zip(own, plain))


@pytest.fixture
def interleaved():
    """:func:`interleave`, for the benchmarks that compare against a plain step."""
    return interleave


def ratio_rows(benchmarks):
    """One row per benchmark with a path and something to compare: its median, the reference
    path's median and the speed-up over it, the baseline's median and the ratio to it, and its
    extra_info values that are report columns -- each where the run has it."""
    runs = {(b.group, b.extra_info["path"]): b for b in benchmarks
            if b.extra_info.get("path") and b.stats is not None}
    rows = []
    for (group, path), b in sorted(runs.items()):
        t = b.stats.median
        row = dict(group=group, path=path, median_ms=t * 1e3)
        ref = runs.get((group, "reference"))
        if ref is not None and path != "reference":
            row.update(reference_ms=ref.stats.median * 1e3, speedup=ref.stats.median / t)
        plain = runs.get((b.extra_info.get("plain"), "plain"))
        plain_ms = b.extra_info.get("plain_ms", plain and plain.stats.median * 1e3)
        if plain_ms:
            row.update(plain_ms=plain_ms, vs_plain=b.extra_info.get("vs_plain_paired",
                                                                    t * 1e3 / plain_ms))
            floor = b.extra_info.get("flop_floor")
            if floor is not None and floor > 1.001:  # the added time over the added FLOPs
                row.update(added_vs_floor=(row["vs_plain"] - 1) / (floor - 1))
        row.update((k, b.extra_info[k]) for _, k, _ in report.COLUMNS if k in b.extra_info)
        if len(row) > 3:
            rows.append(row)
    return rows


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = ratio_rows(session.benchmarks)
    if not rows:
        return
    data = dict(machine=machine(), rows=rows)
    terminalreporter.section("speed-up over the reference path, ratio to the plain step "
                             "(medians of the same run)")
    terminalreporter.write_line(report.table(data))
    out = config.getoption("--ratios-json")
    if out:
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
