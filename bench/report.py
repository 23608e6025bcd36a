"""Turn the --ratios-json files of a benchmark run into the README's markdown tables (the same
table ends the pytest run).

    pytest bench/test_block.py --benchmark-only --ratios-json bench/results/block.json
    python bench/report.py bench/results/block.json
"""
import json
import sys

COLUMNS = [  # header, row key, format; a column appears when some row has its key
    ("ms", "median_ms", "{:.1f}"),
    ("reference ms", "reference_ms", "{:.1f}"),
    ("speed-up", "speedup", "**{:.2f}x**"),
    ("x plain step", "vs_plain", "{:.2f}x"),
    ("peak MiB", "peak_mb", "{:.0f}"),
]


def table(data: dict) -> str:
    rows = data["rows"]
    cols = [c for c in COLUMNS if any(c[1] in r for r in rows)]
    lines = [f"Machine: {data['machine']}.", "",
             "| case | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f.format(r[k]) if k in r else "-" for _, k, f in cols]
        lines.append(f"| {r['group']} ({r['path']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths):
    tables = []
    for path in paths:
        with open(path) as f:
            tables.append(table(json.load(f)))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main(sys.argv[1:])
