"""pytest-benchmark helpers: every benchmark names its group and its path ("reference", "cpp",
...); at the end of the run a table gives each fused path's speed-up over the reference path of
the same group, measured in the same run (and writes it as JSON with --ratios-json)."""
import json
import os
import platform

import torch


def pytest_addoption(parser):
    parser.addoption("--ratios-json", default=None, help="write the speed-up table as JSON")


def machine():
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def ratio_rows(benchmarks):
    by_group = {}
    for b in benchmarks:
        path = b.extra_info.get("path")
        if path and b.stats is not None:
            by_group.setdefault(b.group, {})[path] = b.stats.median
    rows = []
    for group, paths in sorted(by_group.items()):
        ref = paths.get("reference")
        for path, t in sorted(paths.items()):
            if path != "reference" and ref:
                rows.append(dict(group=group, path=path, median_ms=t * 1e3,
                                 reference_ms=ref * 1e3, speedup=ref / t))
    return rows


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = ratio_rows(session.benchmarks)
    if not rows:
        return
    tr = terminalreporter
    tr.section("speed-up over the reference path (median, same run)")
    tr.write_line(machine())
    tr.write_line(f"{'group':<44} {'path':<8} {'ms':>9} {'ref ms':>9} {'speed-up':>9}")
    for r in rows:
        tr.write_line(f"{r['group']:<44} {r['path']:<8} {r['median_ms']:>9.2f} "
                      f"{r['reference_ms']:>9.2f} {r['speedup']:>8.2f}x")
    out = config.getoption("--ratios-json")
    if out:
        with open(out, "w") as f:
            json.dump(dict(machine=machine(), rows=rows), f, indent=1)
