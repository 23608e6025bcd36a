"""Turn the --ratios-json files of a benchmark run into the README's markdown tables.

    pytest bench/test_block.py --benchmark-only --ratios-json bench/results/block.json
    python bench/report.py bench/results/block.json
"""
import json
import sys


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    lines = [f"Machine: {data['machine']}.", "",
             "| case | fused ms | reference ms | speed-up |", "|---|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['group']} ({r['path']}) | {r['median_ms']:.1f} | "
                     f"{r['reference_ms']:.1f} | **{r['speedup']:.2f}x** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
