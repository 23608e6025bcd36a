"""Compile every Triton kernel configuration that MobileNetV3-Small (CIFAR) training launches, for
a GPU architecture (default sm_90, the H100), on a machine without a GPU, and report what the
compiler gave each: registers per thread, bytes spilled to local memory, shared memory, and the
share of global loads and stores that are vector accesses (2 or 4 registers at once).

A spill or a register count that caps occupancy is visible here before any GPU run; a kernel
that the interpreter accepts but the GPU compiler rejects fails here.

How: the model's steps (neuron phase with 0, 1 and 3 dendrites, dendrite phase with 0, 1 and 3
trained dendrites; channels_last, as on the GPU) run on the CPU with the C++ backend, under a
dispatch mode that records every ``pbp_fast::`` op call.  Each call is replayed, with its
floating tensors in the GPU's dtype (bfloat16 under autocast: every tensor of a unit shares one
dtype), through the Triton launchers (kernels/dendritic_conv2d.py, kernels/candidate.py) with
the launch itself replaced by a recorder, which gives the exact kernel, arguments and
meta-parameters of the GPU path.  Each distinct
specialisation is then compiled with ``triton.compile`` for the target and the cubin's resource
usage read with ``cuobjdump``.

    python bench/kernel_resources.py --json bench/results/sm90.json --readme docs/kernels.md

Must run without ``TRITON_INTERPRET`` (the interpreter has no compiler); exit status 1 when a
configuration fails to compile.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources: unset TRITON_INTERPRET (the interpreter does not compile)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import pbp_fast as pbp  # noqa: E402
from pbp_fast.kernels import candidate as kcand  # noqa: E402
from pbp_fast.kernels import common as kcommon  # noqa: E402
from pbp_fast.kernels import dendritic_conv2d as kconv  # noqa: E402

LAUNCHERS = {"dendritic_conv2d_fwd": kconv.dendritic_conv2d_fwd,
             "dendritic_conv2d_bwd": kconv.dendritic_conv2d_bwd,
             "candidate_pass": kcand.candidate_pass,
             "candidate_objective": kcand.candidate_objective,
             "candidate_update": kcand.candidate_update}

# the meta-parameters worth a column, in this order
META = ("MODE", "D", "DC", "KH", "BC", "BK", "NEED_GA", "SAVE_S", "HAS_DC", "PREC", "ACC")


class _Record(TorchDispatchMode):
    """Records (op name, args, kwargs) of every pbp_fast:: op call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pbp_fast":
            self.calls.append((func._opname, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _model(d, phase, batch):
    """The converted CIFAR MobileNetV3-Small with ``d`` trained dendrites per unit, in
    ``phase``."""
    torch.manual_seed(0)
    model = pbp.models.mobilenet_v3_small(num_classes=10).to(memory_format=torch.channels_last)
    for unit in pbp.convert(model).values():
        unit.backend = "cpp"
        for _ in range(d):
            unit.add_dendrite()
    if phase == "dendrite":
        pb = pbp.PerforatedBackprop(model, switch_mode="fixed", n_epochs=1, p_epochs=10 ** 6)
        assert pb.add_validation_score(0.0).phase == "dendrite"
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    return model, x, torch.randint(0, 10, (batch,))


def op_calls(cases, batch=8):
    """Every pbp_fast:: op call of one training step of each (d, phase) case."""
    calls = []
    for d, phase in cases:
        model, x, y = _model(d, phase, batch)
        with _Record() as rec:
            F.cross_entropy(model(x), y).backward()
        calls += rec.calls
    return calls


def _cast(a, dtype):
    """The recorded float32 tensors (and dtype arguments) in ``dtype``; float64 ones (a
    candidate's running statistics, float64 whatever the model's dtype) stay as they are."""
    if a is torch.float32:
        return dtype
    return a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a


def launches(calls, dtype=torch.bfloat16):
    """The Triton launches (kernel, args, meta) that the GPU path makes for these op calls with
    ``dtype`` tensors."""
    out = []
    real = kcommon.launch
    kcommon.launch = lambda kernel, grid, *args, **meta: out.append((kernel, args, meta))
    try:
        for name, args, kwargs in calls:
            LAUNCHERS[name](*(_cast(a, dtype) for a in args),
                                **{k: _cast(v, dtype) for k, v in kwargs.items()})
    finally:
        kcommon.launch = real
    return out


def _plain(v):
    return v if isinstance(v, (bool, int, str)) else str(v)


def _specialise(kernel, args, meta, backend):
    """triton.compile's inputs for one launch, as the JIT's own launch path computes them."""
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = bind(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, spec, opts)
    return ASTSource(kernel, signature, constexprs, attrs), options


def _resources(cubin):
    """(registers, spilled bytes, static shared bytes) from ``cuobjdump -res-usage``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":") for tok in line.split() if ":" in tok)
    return int(fields["REG"]), int(fields["STACK"]), int(fields["SHARED"])


def _vector_share(ptx):
    """Share of the global loads and stores in the PTX that move 2 or 4 registers at once."""
    ops = re.findall(r"\b(?:ld|st)\.global(?:\.[a-z0-9]+)*", ptx)
    vec = sum(".v2" in op or ".v4" in op for op in ops)
    return round(vec / max(1, len(ops)), 2)


def compile_all(launch_list, arch=90, by_meta=False):
    """Compile each distinct specialisation for ``sm_<arch>``; one row per configuration.
    ``by_meta``: one per distinct row of meta-parameters (the first launch's specialisation of
    its integer arguments, e.g. on their divisibility by 16)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    rows, seen = [], set()
    for kernel, args, meta in launch_list:
        src, options = _specialise(kernel, args, meta, backend)
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
        row = {"kernel": kernel.__name__, "dtype": str(dtype).replace("torch.", ""),
               **{k: _plain(meta[k]) for k in META if k in meta}, "num_warps": options.num_warps}
        key = str(row) if by_meta else (src.hash(), str(options))
        if key in seen:
            continue
        seen.add(key)
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(src, target=target, options=options.__dict__)
        except Exception as exc:  # noqa: BLE001  (reported per configuration)
            lines = [ln for ln in str(exc).splitlines() if ln.strip(" ^")]  # not the caret line
            row["error"] = f"{type(exc).__name__}: {(lines or [''])[-1].strip()[:300]}"
        else:
            row["regs"], row["spill_bytes"], shared = _resources(compiled.asm["cubin"])
            row["shared_bytes"] = max(shared, compiled.metadata.shared)
            row["vector_access"] = _vector_share(compiled.asm["ptx"])
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def cases(quick):
    if quick:
        return [(1, "neuron"), (1, "dendrite")]
    return [(d, phase) for phase in ("neuron", "dendrite") for d in (0, 1, 3)]


def table(rows):
    cols = ["kernel", "dtype", *META, "num_warps", "regs", "spill_bytes", "shared_bytes",
            "vector_access", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def summary(data):
    """One line per kernel, conv mode and dtype: how many configurations, and the ranges."""
    groups = {}
    for r in data["rows"]:
        groups.setdefault((r["kernel"], r.get("MODE", "-"), r["dtype"]), []).append(r)
    lines = [f"sm_{data['arch'][3:]}, Triton {data['triton']}: {len(data['rows'])} "
             f"configurations, {sum('error' in r for r in data['rows'])} failed to compile.", "",
             "| kernel | mode | dtype | configs | registers | spilled bytes | shared KiB "
             "| vector accesses |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (kernel, mode, dtype), rs in groups.items():
        ok = [r for r in rs if "error" not in r]

        def span(key, fmt="{}"):
            lo, hi = min(r[key] for r in ok), max(r[key] for r in ok)
            return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"
        lines.append(f"| {kernel} | {mode} | {dtype} | {len(rs)} | {span('regs')} | "
                     f"{max(r['spill_bytes'] for r in ok)} | "
                     f"{max(r['shared_bytes'] for r in ok) / 1024:.0f} | "
                     f"{span('vector_access', '{:.0%}')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    ap.add_argument("--quick", action="store_true",
                    help="only the D=1 cases, one specialisation per set of constexprs")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                    choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--readme", help="write the summary between this file's "
                    "<!-- bench:sm90:begin/end --> markers")
    a = ap.parse_args(argv)
    calls = op_calls(cases(a.quick))
    rows = compile_all([la for dt in a.dtypes for la in launches(calls, getattr(torch, dt))],
                       a.arch, by_meta=a.quick)
    print(table(rows))
    data = {"arch": f"sm_{a.arch}", "triton": triton.__version__, "torch": torch.__version__,
            "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(data, f, indent=1)
    if a.readme:
        from report import write_between_markers  # bench/report.py
        with open(a.readme) as f:
            text = write_between_markers(f.read(), "sm90", summary(data))
        with open(a.readme, "w") as f:
            f.write(text)
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows)} configurations, {len(failed)} failed to compile, "
          f"{sum(r.get('spill_bytes', 0) > 0 for r in rows)} spill")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
