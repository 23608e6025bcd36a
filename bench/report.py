"""Turn the --ratios-json files of a benchmark run into markdown tables (the same
table ends the pytest run).  With --readme, each file's table replaces what stands between
``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->`` in that file (NAME: the JSON
file's name without .json); otherwise the tables are printed.

    pytest bench/test_block.py --benchmark-only --ratios-json bench/results/block.json
    python bench/report.py bench/results/block.json --readme docs/benchmarks.md
    python bench/report.py bench/results/cpu.json --rows "forward_backward.*(cpp|plain)" \
        --readme README.md       # only the rows whose "case (path)" matches
"""
import argparse
import json
import re
from pathlib import Path

COLUMNS = [  # header, row key, format; a column appears when some row has its key
    ("ms", "median_ms", "{:.1f}"),
    ("reference ms", "reference_ms", "{:.1f}"),
    ("speed-up", "speedup", "**{:.2f}x**"),
    ("x plain step", "vs_plain", "{:.2f}x"),
    ("FLOP floor", "flop_floor", "{:.2f}x"),
    ("added time / added FLOPs", "added_vs_floor", "{:.2f}"),
    ("peak MiB", "peak_mb", "{:.0f}"),
    ("GB/s", "gbps", "{:.0f}"),
    ("of copy GB/s", "copy_fraction", "{:.0%}"),
]


def table(data: dict, rows_like: str | None = None) -> str:
    rows = [r for r in data["rows"]
            if rows_like is None or re.search(rows_like, f"{r['group']} ({r['path']})")]
    cols = [c for c in COLUMNS if any(c[1] in r for r in rows)]
    lines = [f"Machine: {data['machine']}.", "",
             "| case | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f.format(r[k]) if k in r else "-" for _, k, f in cols]
        lines.append(f"| {r['group']} ({r['path']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_between_markers(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"no {begin} ... {end} markers in the file")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="--ratios-json files")
    p.add_argument("--readme", type=Path, help="write the tables into this file's markers")
    p.add_argument("--rows", help="only the rows whose 'case (path)' matches this regex")
    args = p.parse_args(argv)
    tables = {path.stem: table(json.loads(path.read_text()), args.rows) for path in args.results}
    if args.readme is None:
        print("\n\n".join(tables.values()))
        return
    text = args.readme.read_text()
    for name, body in tables.items():
        text = write_between_markers(text, name, body)
    args.readme.write_text(text)


if __name__ == "__main__":
    main()
