"""The CIFAR-10 table: MobileNetV3-Small without and with Perforated Backpropagation, and narrower
models with PB against the w = 1.0 baseline, each trained with the recipe and with plain SGD.

    python bench/cifar_table.py --list                       # the rows and their commands
    python bench/cifar_table.py --row recipe-w1.0-pb --seeds 0 1 2 --data ../shared/data
    python bench/cifar_table.py --row all --seeds 0 1 2 --jobs 8   # 24 runs, 8 at a time
    python bench/cifar_table.py --row recipe-w1.0-pb --smoke # CPU check: a subset, 3 epochs
    python bench/cifar_table.py --report                     # the results into docs/cifar10.md

Each row is one ``pbp-fast train`` command, run in this process (:func:`pbp_fast.recipe.train`)
once per seed into ``<out>/<row>/seed<k>``; a folder holding a ``last.pt`` is resumed.  With
``--jobs N`` every (row, seed) runs in a process of its own, N at a time, sharing the GPUs: the
step of one batch-256 CIFAR run is bound by kernel launches and leaves most of a large GPU idle,
so several side by side should finish the table in a fraction of the time (not yet measured).
Their records say how many ran at once, since each run's time then depends on it.  Each finished
run puts its record into the results file (``bench/results/cifar10.json``), replacing an earlier
record of the same row, seed and mode (full or smoke).

Budget: every row trains for at most ``EPOCHS`` epochs.  A PB row has fixed phases of
``N_EPOCHS`` neuron and ``P_EPOCHS`` dendrite epochs up to ``DENDRITES`` dendrites per unit,
which fills the budget exactly when every dendrite set is accepted; its neuron phases follow the
baseline's learning-rate schedule (``--pb-schedule global``).  The model reported is the best by
validation accuracy on 5,000 training images held out (stratified, seeded); the test split is only
evaluated, never used to choose.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: runs side by side (--jobs) need a POSIX system
    fcntl = None

from pbp_fast import cli
from pbp_fast.distributed import resolve_device
from pbp_fast.recipe import data as data_mod
from pbp_fast.recipe.flags import config_from_args
from pbp_fast.recipe.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cifar10.json"
README = ROOT / "docs" / "cifar10.md"
BEGIN, END = "<!-- cifar10-table:begin -->", "<!-- cifar10-table:end -->"
SCRIPT = "python bench/cifar_table.py"


def pb_budget(n_epochs: int, p_epochs: int, dendrites: int) -> int:
    """Epochs of a fixed-phase PB run in which every dendrite set is accepted."""
    return n_epochs * (dendrites + 1) + p_epochs * dendrites


N_EPOCHS, P_EPOCHS, DENDRITES = 30, 5, 2
EPOCHS = pb_budget(N_EPOCHS, P_EPOCHS, DENDRITES)      # 100: every row's budget

COMMON = ["--model", "mobilenet_v3_small", "--epochs", str(EPOCHS), "-b", "256", "--opt", "sgd",
          "--lr", "0.2", "--momentum", "0.9", "--wd", "5e-5", "--dropout", "0.2",
          "--val-size", "5000", "--random-crop-padding", "4", "--hflip", "0.5",
          "--amp", "--channels-last"]
# The recipe of the issue, and the same run without it: constant learning rate, hard labels,
# crop and flip only.
RECIPES = {
    "recipe": ["--sched", "cosine", "--lr-warmup-epochs", "5", "--label-smoothing", "0.1",
               "--auto-augment", "ta_wide", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"],
    "plain": ["--sched", "constant", "--lr-warmup-epochs", "0", "--label-smoothing", "0",
              "--auto-augment", "none", "--mixup-alpha", "0", "--cutmix-alpha", "0"],
}
PB = ["--dendrites", "--pb-switch-mode", "fixed", "--pb-schedule", "global",
      "--pb-n-epochs", str(N_EPOCHS), "--pb-p-epochs", str(P_EPOCHS),
      "--pb-max-dendrites", str(DENDRITES)]
VARIANTS = {"w1.0": (1.0, False), "w1.0-pb": (1.0, True), "w0.75-pb": (0.75, True),
            "w0.5-pb": (0.5, True)}
BASELINE, NARROW = "w1.0", ("w0.75-pb", "w0.5-pb")

# --smoke: the same rows on a small subset, on the CPU, with phases of one epoch.
SMOKE_PHASES = (1, 1, 1)
SMOKE = dict(epochs=pb_budget(*SMOKE_PHASES), pb_n_epochs=SMOKE_PHASES[0],
             pb_p_epochs=SMOKE_PHASES[1], pb_max_dendrites=SMOKE_PHASES[2], batch_size=64,
             amp=False, device="cpu")
SMOKE_IMAGES = 256                  # training images (a fifth for validation); half as many test


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str
    variant: str

    @property
    def width(self) -> float:
        return VARIANTS[self.variant][0]

    @property
    def dendrites(self) -> bool:
        return VARIANTS[self.variant][1]

    def args(self) -> list[str]:
        """The row's ``pbp-fast train`` flags (without data, seed and output folder)."""
        return [*COMMON, "--width-mult", f"{self.width:g}", *RECIPES[self.recipe],
                *(PB if self.dendrites else [])]

    def describe(self) -> str:
        pb = f"PB (up to {DENDRITES} dendrites)" if self.dendrites else "no dendrites"
        return f"MobileNetV3-Small w={self.width}, {pb}, {self.recipe}"


ROWS = {f"{r}-{v}": Row(f"{r}-{v}", r, v) for r in RECIPES for v in VARIANTS}


def train_args(row: Row, data: str, seed: int, out: Path) -> list[str]:
    return [*row.args(), "--data", str(data), "--seed", str(seed), "--output-dir", str(out)]


def default_data() -> str:
    return os.environ.get("PBP_FAST_DATA", "../shared/data")


# ---------------------------------------------------------------------------------- running

def smoke_data(data: str, out: Path, n_train: int) -> tuple[str, str, int]:
    """A packed-JPEG pair of ``n_train`` training and ``n_train // 2`` test images in a folder of
    ``out``: a stratified subset of the CIFAR-10 pair in ``data`` (a folder, or one of its files),
    or random images when it is not there.  The pair depends only on its source and ``n_train``,
    so it is written once (atomically) and reused, also by runs started at the same time.
    Returns (train file, description, validation size)."""
    folder = Path(data).parent if Path(data).suffix == ".npz" else Path(data)
    real = all((folder / f"cifar10_jpeg_{s}.npz").exists() for s in ("train", "test"))
    out = out / f"{'cifar10' if real else 'random'}-{n_train}"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_train // 2)):
        path = out / f"smoke_{split}.npz"
        if path.exists():
            continue
        if real:
            with np.load(folder / f"cifar10_jpeg_{split}.npz") as z:
                jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
            idx = np.sort(data_mod.stratified_order(labels, 0)[:n])
            blobs, labels = [jpeg[offsets[i]:offsets[i + 1]] for i in idx], labels[idx]
        else:
            rng = np.random.default_rng(split == "test")
            images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            blobs, labels = data_mod.encode_jpegs(images), np.arange(n) % 10
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        data_mod.save_packed_jpeg(tmp, blobs, labels)
        os.replace(tmp, path)
    val = n_train // 5
    what = f"CIFAR-10 from {folder}" if real else "random images (no CIFAR-10 found)"
    return (str(out / "smoke_train.npz"),
            f"{n_train - val} train / {val} val / {n_train // 2} test images: {what}", val)


def device_name(device: str) -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def run_row(row: Row, seeds, data: str, out: Path, results: Path, smoke: int | None = None,
            log=print, concurrent: int = 1) -> list[dict]:
    """Train ``row`` once per seed and record each run in ``results``; ``smoke``: that many
    training images on the CPU with :data:`SMOKE` settings instead of the full run.
    ``concurrent``: how many runs shared the device with this one (recorded with its time)."""
    overrides, described = {}, str(data)
    if smoke:
        data, described, val = smoke_data(data, out / "data", smoke)
        overrides = dict(SMOKE, val_size=val, cache_dir=str(out / "data" / "cache"))
    parser = cli.build_parser()
    records = []
    for seed in seeds:
        run_dir = out / row.name / f"seed{seed}"
        args = train_args(row, data, seed, run_dir)
        cfg = config_from_args(parser.parse_args(["train", *args]))
        cfg = replace(cfg, **overrides, resume=str(run_dir) if (run_dir / "last.pt").exists()
                      else None)
        log(f"== {row.name} seed {seed}: {row.describe()}{' (smoke)' if smoke else ''}")
        result = train(cfg)
        rec = {"row": row.name, "seed": seed, "smoke": bool(smoke), "data": described,
               "device": device_name(cfg.device), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "concurrent_runs": concurrent,
               "command": shlex.join(["pbp-fast", "train", *args]),
               "params_without_dendrites": result.params - result.params_dendrites,
               "seconds": sum(r["seconds"] for r in result.history),   # resumed runs too
               **{k: getattr(result, k) for k in ("test_acc", "val_acc", "params",
                                                  "num_dendrites", "best_epoch", "epochs")}}
        if smoke:
            rec["command"] = f"{SCRIPT} --row {row.name} --seeds {seed} --smoke {smoke}"
        save_record(results, rec)
        records.append(rec)
        log(f"   test {rec['test_acc']:.2f} %, val {rec['val_acc']:.2f} %, "
            f"{rec['params']:,} parameters, {rec['seconds']:.0f} s -> {results}")
    return records


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["records"] if path.exists() else []


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``.lock while the body runs (runs started together by
    ``--jobs`` update one results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def save_record(path: Path, rec: dict, key=("row", "seed", "smoke"), order=None) -> None:
    """Put ``rec`` into the results file ``path``, replacing the record with the same ``key``
    fields; records sorted by ``order`` (a function of a record; default: the rows' order)."""
    if order is None:
        rows = list(ROWS)
        order = lambda r: (r["smoke"], rows.index(r["row"]) if r["row"] in rows  # noqa: E731
                           else len(rows), r["seed"])
    with _locked(path):
        records = [r for r in load_records(path)
                   if tuple(r.get(k) for k in key) != tuple(rec[k] for k in key)]
        records.append(rec)
        records.sort(key=order)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"records": records}, indent=1) + "\n")
        os.replace(tmp, path)


def prepare_data(data: str, out: Path, smoke: int | None) -> None:
    """Write the smoke subset, or decode the full data into the decoded-image cache, once,
    before runs are started side by side (each would otherwise decode it itself)."""
    if smoke:
        smoke_data(data, out / "data", smoke)
        return
    for train_split in (True, False):
        data_mod.cifar10(data, train_split)


def gpus() -> list[str]:
    """The GPUs that runs side by side are spread over: the entries of CUDA_VISIBLE_DEVICES
    when it is set, else every GPU torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def run_jobs(runs: list[tuple[Row, int]], jobs: int, argv: list[str], out: Path,
             log=print) -> int:
    """Run each (row, seed) in a process of its own, ``jobs`` at a time (:func:`run_processes`),
    and return how many failed.  A child is this script with ``--row ROW --seeds SEED`` and the
    shared ``argv``; its output goes to ``<out>/<row>/seed<k>.log``.  The longest runs (PB,
    wider) start first."""
    queue = sorted(runs, key=lambda rs: (not rs[0].dendrites, -rs[0].width))
    specs = [(f"{row.name} seed {seed}",
              [sys.executable, str(Path(__file__).resolve()), "--row", row.name, "--seeds",
               str(seed), *argv, "--concurrent", str(min(jobs, len(runs)))],
              out / row.name / f"seed{seed}.log") for row, seed in queue]
    return run_processes(specs, jobs, log)


def run_processes(specs: list[tuple[str, list[str], Path]], jobs: int, log=print,
                  after: dict[str, str] | None = None) -> int:
    """Run each ``(label, command, log file)`` in a process of its own, ``jobs`` at a time, in
    order, and return how many failed.  ``after`` maps a label to the label of a run that has
    to finish first: the first run in order whose run to wait for has finished starts next
    (one whose run to wait for failed fails too).  Each child gets cpu_count // jobs threads
    (unless OMP_NUM_THREADS is set) and, with several GPUs (:func:`gpus`), the one running the
    fewest children.  A child's lines starting with "   test " are its result."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    devices = gpus()
    after = after or {}
    queue = list(specs)
    running, failed, done = {}, [], set()
    while queue or running:
        for spec in [sp for sp in queue if after.get(sp[0]) in failed]:
            queue.remove(spec)
            failed.append(spec[0])
            log(f"!! {spec[0]} not run: {after[spec[0]]} failed")
        while len(running) < jobs:
            ready = [sp for sp in queue if after.get(sp[0]) in (None, *done)]
            if not ready:
                break
            queue.remove(ready[0])
            label, cmd, logfile = ready[0]
            logfile.parent.mkdir(parents=True, exist_ok=True)
            gpu, where = None, ""
            if len(devices) > 1:
                gpu = min(devices, key=lambda d: sum(r[2] == d for r in running.values()))
                env["CUDA_VISIBLE_DEVICES"], where = gpu, f" on GPU {gpu}"
            with open(logfile, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            running[proc] = (label, logfile, gpu)
            log(f"== started {label}{where} (log {logfile})")
        if not running:  # what is left waits for runs that are not in the queue
            for label, _, _ in queue:
                failed.append(label)
                log(f"!! {label} not run: {after[label]} is not among the runs")
            break
        proc = _wait_any(running)
        label, logfile, _ = running.pop(proc)
        if proc.returncode:
            failed.append(label)
            tail = logfile.read_text().splitlines()[-15:]
            log(f"!! {label} failed (exit {proc.returncode}):\n   " + "\n   ".join(tail))
        else:
            done.add(label)
            last = [ln for ln in logfile.read_text().splitlines() if ln.startswith("   test ")]
            log(f"== finished {label}:{last[-1][2:] if last else ''}")
    if failed:
        log(f"{len(failed)} of {len(specs)} runs failed: " + ", ".join(failed))
    return len(failed)


def _wait_any(running: dict) -> subprocess.Popen:
    while True:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(0.5)


# ---------------------------------------------------------------------------------- report

@dataclass
class Stats:
    """One row's runs: means over seeds."""

    runs: list

    def mean(self, key: str) -> float:
        return statistics.fmean(r[key] for r in self.runs)

    def acc(self, key: str) -> str:
        values = [r[key] for r in self.runs]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.2f}{spread}"

    def span(self, key: str, fmt: str = ",") -> str:
        lo, hi = min(r[key] for r in self.runs), max(r[key] for r in self.runs)
        return format(lo, fmt) if lo == hi else f"{lo:{fmt}}–{hi:{fmt}}"

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.runs)


def row_stats(records: list[dict]) -> dict[str, Stats]:
    stats: dict[str, Stats] = {}
    for r in records:
        stats.setdefault(r["row"], Stats([])).runs.append(r)
    return stats


def _row_command(name: str, stats: Stats | None, smoke: bool) -> str:
    if smoke:
        return f"`{SCRIPT} --row {name} --smoke`"
    seeds = " ".join(map(str, stats.seeds if stats else (0, 1, 2)))
    return f"`{SCRIPT} --row {name} --seeds {seeds}`"


def _device(rec: dict) -> str:
    n = rec.get("concurrent_runs", 1)
    return rec["device"] + (f" ({n} runs at once)" if n > 1 else "")


def table(records: list[dict], smoke: bool = False) -> str:
    stats = row_stats(records)
    names = list(ROWS) if not smoke else [n for n in ROWS if n in stats]
    lines = ["| row | seeds | test acc % | val acc % | params (with dendrites) | params "
             "(without) | dendrites | epochs | time per run | device | command |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name in names:
        s = stats.get(name)
        if s is None:
            cells = ["—", "not yet run", *["—"] * 7]
        else:
            cells = [" ".join(map(str, s.seeds)), s.acc("test_acc"), s.acc("val_acc"),
                     s.span("params"), s.span("params_without_dendrites"),
                     s.span("num_dendrites", "d"), s.span("epochs", "d"),
                     f"{s.mean('seconds') / 60:.1f} min",
                     ", ".join(sorted({_device(r) for r in s.runs}))]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_row_command(name, s, smoke)} |")
    return "\n".join(lines)


def targets(records: list[dict]) -> list[str]:
    """The issue's two targets per recipe, computed from the means over seeds."""
    stats = row_stats(records)
    lines = []
    for recipe in RECIPES:
        base = stats.get(f"{recipe}-{BASELINE}")
        pb = stats.get(f"{recipe}-w1.0-pb")
        if base is None or pb is None:
            verdict = "not run"
        else:
            e0, e1 = 100 - base.mean("test_acc"), 100 - pb.mean("test_acc")
            change = (e1 - e0) / e0 if e0 else 0.0
            verdict = (f"{'reached' if change <= -0.06 else 'not reached'} (test error "
                       f"{e0:.2f} % -> {e1:.2f} %, {change:+.1%} relative)")
        lines.append(f"- {recipe}: PB lowers the test error of w=1.0 by at least 6 % relative: "
                     f"{verdict}")
        for variant in NARROW:
            narrow = stats.get(f"{recipe}-{variant}")
            if base is None or narrow is None:
                verdict = "not run"
            else:
                acc, acc0 = narrow.mean("test_acc"), base.mean("test_acc")
                params, params0 = max(r["params"] for r in narrow.runs), base.mean("params")
                misses = [m for m, bad in (("lower accuracy", acc < acc0),
                                           ("more parameters", params >= params0)) if bad]
                verdict = (f"{'not reached: ' + ' and '.join(misses) if misses else 'reached'} "
                           f"(test {acc:.2f} % vs {acc0:.2f} %, {params:,} vs {params0:,.0f} "
                           f"parameters with dendrites)")
            lines.append(f"- {recipe}: {variant} matches or beats the w=1.0 baseline with fewer "
                         f"parameters in total: {verdict}")
    return lines


def render(records: list[dict]) -> str:
    full = [r for r in records if not r["smoke"]]
    smoke = [r for r in records if r["smoke"]]
    parts = [table(full), "", "Targets (means over seeds):", "", *targets(full)]
    if smoke:
        data = "; ".join(sorted({r["data"] for r in smoke}))
        parts += ["", f"Smoke runs (`--smoke`: {data}; {SMOKE['epochs']} epochs, phases of "
                      f"{SMOKE_PHASES[0]} neuron / {SMOKE_PHASES[1]} dendrite epoch(s)). They "
                      "check that every step runs; they are not results:", "",
                  table(smoke, smoke=True)]
    return "\n".join(parts)


def write_report(results: Path, readme: Path) -> str:
    """Replace the text between the table markers in ``readme`` with the rendered table."""
    body = render(load_records(results))
    replace_between(readme, BEGIN, END, body)
    return body


def replace_between(path: Path, begin: str, end: str, body: str) -> None:
    """Replace the text between the markers ``begin`` and ``end`` in ``path`` with ``body``."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}")


# ---------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--row", nargs="+", choices=[*ROWS, "all"], metavar="ROW",
                      help=f"train these rows ('all', or of: {', '.join(ROWS)})")
    what.add_argument("--list", action="store_true", help="list the rows and their commands")
    what.add_argument("--report", action="store_true", help="write the results into docs/cifar10.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1,
                   help="runs (row and seed) side by side, each in a process of its own sharing "
                   "the device; a run's time is then recorded with this count")
    p.add_argument("--concurrent", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", default=default_data(),
                   help="CIFAR-10: a folder with cifar10_jpeg_{train,test}.npz, or one of them")
    p.add_argument("--out", default=None,
                   help="run folders (default runs/cifar10, or runs/cifar10-smoke)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file")
    p.add_argument("--readme", type=Path, default=README, help="--report: the file to update")
    p.add_argument("--smoke", type=int, nargs="?", const=SMOKE_IMAGES, default=None,
                   metavar="IMAGES", help="a CPU check of the row: this many training images "
                   "(of the CIFAR-10 in --data, or random ones), phases of one epoch")
    args = p.parse_args(argv)
    if args.smoke is not None and args.smoke < 20:
        p.error("--smoke needs at least 20 images")
    if args.list:
        for row in ROWS.values():
            train_cmd = ["pbp-fast", "train", *train_args(row, args.data, 0,
                                                          Path("runs/cifar10", row.name, "seed0"))]
            print(f"{row.name}: {row.describe()}\n  {SCRIPT} --row {row.name} --seeds 0 1 2\n"
                  f"  = {shlex.join(train_cmd)}  (seed 0)\n")
        print(f"Budget: {EPOCHS} epochs per run (PB: {N_EPOCHS} neuron / {P_EPOCHS} dendrite "
              f"epochs per phase, up to {DENDRITES} dendrites).")
        return 0
    if args.report:
        print(write_report(args.results, args.readme))
        return 0
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    out = Path(args.out or ("runs/cifar10-smoke" if args.smoke else "runs/cifar10"))
    rows = list(ROWS.values()) if "all" in args.row else [ROWS[n] for n in dict.fromkeys(args.row)]
    seeds = list(dict.fromkeys(args.seeds))
    runs = [(row, seed) for row in rows for seed in seeds]
    if args.jobs > 1 and len(runs) > 1:
        prepare_data(args.data, out, args.smoke)
        shared = ["--data", args.data, "--out", str(out), "--results", str(args.results),
                  *(["--smoke", str(args.smoke)] if args.smoke else [])]
        return 1 if run_jobs(runs, args.jobs, shared, out) else 0
    for row in rows:
        run_row(row, seeds, args.data, out, args.results, args.smoke, concurrent=args.concurrent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
