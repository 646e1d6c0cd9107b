"""Draw benchmark results files (bench/results/<card>/results.csv): time against n, one panel
per op and configuration, one line per provider (backend or torch baseline), at one kept ratio.

    python bench/plot.py                                  # every card's file, 1% kept
    python bench/plot.py bench/results/NVIDIA_H100_80GB_HBM3/results.csv --ratio 0.001
    python bench/plot.py FILE --metric pct_floor --out floor.png

Writes ``time_vs_n.png`` (or ``--out``) next to each results file. Needs matplotlib (the
``bench`` extra).
"""

import argparse
import glob
import os
import sys

import results_table

METRICS = {"p50_ms": "median ms", "pct_floor": "% of the bandwidth floor", "gbps": "GB/s"}


def plot(rows, path, ratio=0.01, metric="p50_ms"):
    """One PNG of ``rows`` (results_table rows, any number of cards) at kept ratio ``ratio``:
    ``metric`` against n on log-log axes. Returns False (and says why) when matplotlib is
    missing or no row has that ratio."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    rows = [r for r in rows if r["ratio"] == ratio]
    panels = sorted({results_table.describe(r) for r in rows})
    if not panels:
        print(f"no rows at ratio {ratio}: no plot")
        return False
    cards = sorted({r["card"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in rows if results_table.describe(r) == panel]
        for card in cards:
            for provider in sorted({r["provider"] for r in mine}):
                pts = sorted((r["n"], r[metric]) for r in mine
                             if r["provider"] == provider and r["card"] == card)
                if pts:
                    label = provider if len(cards) == 1 else f"{provider}, {card}"
                    ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o",
                              label=label)
        ax.set_title(f"{panel}, {ratio * 100:g}% kept", fontsize=9)
        ax.set_xlabel("n (elements)")
        ax.set_ylabel(METRICS[metric])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(", ".join(cards), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*",
                        help="results files (default: bench/results/*/results.csv)")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--metric", choices=sorted(METRICS), default="p50_ms")
    parser.add_argument("--out", default=None,
                        help="one PNG of all the files together, instead of one per file")
    args = parser.parse_args()
    files = args.files or sorted(glob.glob(os.path.join(results_table.RESULTS_DIR, "*",
                                                        "results.csv")))
    if not files:
        sys.exit("no results files")
    if args.out:
        rows = [r for f in files for r in results_table.read(f)]
        if plot(rows, args.out, args.ratio, args.metric):
            print(f"wrote {args.out}")
        return
    for f in files:
        path = os.path.join(os.path.dirname(f), "time_vs_n.png")
        if plot(results_table.read(f), path, args.ratio, args.metric):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
