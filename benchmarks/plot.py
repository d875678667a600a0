"""Plot GB/s by world size and saver from the JSON lines bench_save.py writes (--json FILE).

    python benchmarks/plot.py results.jsonl --out save.png     (needs matplotlib)

One panel per layout; for each saver, its best GB/s at each world size found in the file.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="JSON lines files from bench_save.py --json")
    ap.add_argument("--out", default="save.png")
    args = ap.parse_args()
    plot(args.results, args.out)


def plot(results: list[str], out: str) -> None:
    """GB/s by world size and saver, one panel per layout, from bench_save's JSON lines files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # layout -> saver -> world -> best GB/s
    best: dict = defaultdict(lambda: defaultdict(dict))
    for path in results:
        with open(path) as f:
            for line in f:
                run = json.loads(line)
                if run.get("bench") != "save":
                    continue
                for saver, rounds in run["rows"].items():
                    gbs = max(run["model_bytes"] / r["seconds"] / 1e9 for r in rounds)
                    prev = best[run["layout"]][saver].get(run["world"], 0.0)
                    best[run["layout"]][saver][run["world"]] = max(prev, gbs)
    layouts = sorted(best)
    fig, axes = plt.subplots(1, len(layouts), figsize=(7 * len(layouts), 5), squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        savers = sorted(best[layout])
        worlds = sorted({w for s in savers for w in best[layout][s]})
        width = 0.8 / max(1, len(worlds))
        for k, world in enumerate(worlds):
            values = [best[layout][s].get(world, 0.0) for s in savers]
            ax.barh([i + k * width for i in range(len(savers))], values, height=width, label=f"{world} ranks")
        ax.set_yticks([i + width * (len(worlds) - 1) / 2 for i in range(len(savers))], savers, fontsize=8)
        ax.set_xlabel("GB/s of model bytes (best round)")
        ax.set_title(f"save, {layout} model")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
