"""Where DCT's saved bytes become saved time: the DLRM comparison over a sweep of link rates.

    python bench/link_sweep.py --quick                       # loopback, 10, 2.5, 1, 0.5 Gbit/s
    python bench/link_sweep.py --quick --ranks 4 --rates loopback,1gbit
    python bench/link_sweep.py --analyse-only                # redo tables and plots from the data
    python bench/link_sweep.py --tiny -- --steps 48          # arguments after -- go to the trainer

Runs ``bench/train_dlrm.py`` once per rate, with the same data, seeds and runs (default all
five: dense, bf16, powersgd, dct_dp, dct_dp_mp): on loopback (spawned ranks) and with ``--link
RATE`` on the emulated cluster (bench/cluster.py; needs root). Each point's dlrm.json stays in
its own folder; the sweep writes ``link_sweep.json``, ``link_sweep.md`` and three plots next to
them (default ``bench/results/<device>/link_sweep_w<W>/``):

- ``link_sweep_step.png``: median step time against the link rate, measured, with the fitted
  model's lines (modelled);
- ``link_sweep_time_to_auc.png``: held-out AUC against training time at every rate;
- ``link_sweep_model.png``: which run the model says is fastest for a cluster of a given
  compute speed (relative to this machine) and link rate (modelled).

The model (docs/time.md): per run, step time = a + b / rate, fitted (Theil-Sen: medians, robust
to a point slowed by other jobs) to the measured median step times, with the rate the link's
measured payload rate (loopback: b / rate = 0). ``a`` is the step without the network: the
compute plus the hook's own cost; ``b`` (bits) is what the step waits for on the wire: the bytes
not hidden behind the backward pass. Break-even rates of each DCT run against dense and against
the faster baseline are given as measured (the crossing of the measured step times, linear in
1 / rate between sweep points) and as modelled (the crossing of the fitted lines).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from report_files import write_json_and_markdown  # bench/report_files.py

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_DLRM = os.path.join(BENCH_DIR, "train_dlrm.py")
RATES = ("loopback", "10gbit", "2.5gbit", "1gbit", "500mbit")
RUNS = ("dense", "bf16", "powersgd", "dct_dp", "dct_dp_mp")
BASELINES = ("bf16", "powersgd")
DCT_RUNS = ("dct_dp", "dct_dp_mp")
# The compute speeds (relative to this machine) of the modelled table: this machine, and
# clusters whose steps compute 10 and 100 times faster (a GPU per rank is nearer the latter).
MODEL_SPEEDUPS = (1, 10, 100)
# The modelled plots and searches span these rates (bit/s).
MODEL_RATES = (1e7, 1e12)


# ------------------------------------------------------------------------------- running

def point_dir(out_dir: str, rate: str) -> str:
    """The folder of one sweep point's trainer output."""
    return os.path.join(out_dir, rate)


def run_point(rate: str, out_dir: str, preset: List[str], ranks: int, runs: Sequence[str],
              extra: List[str]) -> float:
    """Run the trainer for one rate (``loopback`` or a tc rate); returns its wall time.
    Raises RuntimeError naming the rate if it fails."""
    argv = [sys.executable, TRAIN_DLRM, *preset, "--ranks", str(ranks), "--runs",
            ",".join(runs), "--out", point_dir(out_dir, rate), *extra]
    if rate != "loopback":
        argv += ["--link", rate]
    print(f"link sweep: {rate}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.time()
    done = subprocess.run(argv)
    if done.returncode != 0:
        raise RuntimeError(f"the trainer failed at {rate} (exit status {done.returncode})")
    return time.time() - started


def load_points(out_dir: str, rates: Sequence[str]) -> List[dict]:
    """The sweep's points: per rate its label, set and measured rates (None on loopback) and
    the trainer's report. Rates whose dlrm.json is missing are left out."""
    points = []
    for rate in rates:
        path = os.path.join(point_dir(out_dir, rate), "dlrm.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            report = json.load(f)
        link = report.get("link")
        points.append({"label": rate,
                       "rate_bit_s": link["rate_bit_s"] if link else None,
                       "measured_bit_s": link["measured_bit_s"] if link else None,
                       "report": report})
    return points


# ------------------------------------------------------------------------------ analysis

def seconds_per_bit(point: dict) -> float:
    """1 / the point's measured payload rate (the set rate if it was not measured); 0 on
    loopback, where the wire costs nothing in this model."""
    rate = point["measured_bit_s"] or point["rate_bit_s"]
    return 0.0 if rate is None else 1.0 / rate


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """y = a + b x by Theil-Sen: b the median of the slopes between every two points of
    distinct x, a the median of y - b x. Medians, not least squares, because the points are
    step times on a shared machine: one point slowed by another job would tilt a least-squares
    line, and moves these medians little (up to about a third of the points can be off).
    Returns {"a", "b", "rms"}, rms the root mean square of the residuals (all points); b and
    rms are None with fewer than two distinct x."""
    slopes = sorted((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(zip(xs, ys))
                    for x2, y2 in zip(xs[i + 1:], ys[i + 1:]) if x2 != x1)
    if not slopes:
        return {"a": sorted(ys)[len(ys) // 2], "b": None, "rms": None}
    b = _median(slopes)
    a = _median([y - b * x for x, y in zip(xs, ys)])
    rms = math.sqrt(sum((a + b * x - y) ** 2 for x, y in zip(xs, ys)) / len(xs))
    return {"a": a, "b": b, "rms": rms}


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def wire_bytes_one_way(run: dict) -> float:
    """Bytes a rank sends per step (as many arrive): half of the DP bytes (counted sent plus
    received) plus the MP bytes (counted sent, forward and backward)."""
    return run["dp_bytes_per_step"] / 2 + run["mp_bytes_per_step"]


def fit_runs(points: List[dict]) -> Dict[str, dict]:
    """Per run: the model step = a + b / rate fitted (``fit_line``) to the median step times,
    with a and the residual in ms, b as exposed bytes per step (b / 8), the bytes a rank sends
    per step, and the fraction of those the fit says the step waits for (``exposed_fraction``;
    1 - it is the part hidden behind the backward pass)."""
    fits = {}
    runs = [name for name in RUNS if all(name in p["report"]["runs"] for p in points)]
    for name in runs:
        xs = [seconds_per_bit(p) for p in points]
        ys = [p["report"]["runs"][name]["step_ms"] / 1e3 for p in points]
        line = fit_line(xs, ys)
        wire = sum(wire_bytes_one_way(p["report"]["runs"][name]) for p in points) / len(points)
        exposed = None if line["b"] is None else line["b"] / 8
        fits[name] = {
            "compute_ms": line["a"] * 1e3,
            "exposed_bytes": exposed,
            "rms_ms": None if line["rms"] is None else line["rms"] * 1e3,
            "wire_bytes_per_step": wire,
            "exposed_fraction": None if exposed is None or not wire else exposed / wire,
        }
    return fits


def modelled_step_s(fit: dict, rate_bit_s: Optional[float], speedup: float = 1.0) -> float:
    """The model's step time (s) at ``rate_bit_s`` (None: loopback) with the compute (and the
    hook's own cost) ``speedup`` times faster than measured."""
    step = fit["compute_ms"] / 1e3 / speedup
    if rate_bit_s is not None and fit["exposed_bytes"] is not None:
        step += fit["exposed_bytes"] * 8 / rate_bit_s
    return step


def break_even(xs: Sequence[float], candidate: Sequence[float],
               reference: Sequence[float]) -> dict:
    """Where a candidate's step times (at seconds per bit ``xs``, 0 for loopback) cross a
    reference's, linear in 1 / rate between the points: {"faster_at": "all" or "none" (no
    crossing: faster at every point, or at none), "below" or "above" (one crossing: faster
    below or above ``rate_bit_s``), or "mixed" (several crossings), "rate_bit_s"}."""
    pairs = sorted(zip(xs, (c - r for c, r in zip(candidate, reference))), reverse=True)
    crossings = []
    for (x1, d1), (x2, d2) in zip(pairs, pairs[1:]):  # from the slowest link to the fastest
        if (d1 < 0) != (d2 < 0):
            x = x1 + (x2 - x1) * (0 - d1) / (d2 - d1)
            crossings.append((x, "below" if d1 < 0 else "above"))
    if not crossings:
        return {"rate_bit_s": None, "faster_at": "all" if pairs[0][1] < 0 else "none"}
    if len(crossings) > 1 or crossings[0][0] <= 0:
        return {"rate_bit_s": None, "faster_at": "mixed"}
    x, side = crossings[0]
    return {"rate_bit_s": 1.0 / x, "faster_at": side}


def _model_grid(n: int = 400) -> List[Optional[float]]:
    """Rates spanning MODEL_RATES evenly in log, and loopback (None)."""
    lo, hi = (math.log10(r) for r in MODEL_RATES)
    return [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)] + [None]


def _xs(rates: Sequence[Optional[float]]) -> List[float]:
    return [0.0 if r is None else 1.0 / r for r in rates]


def break_evens(points: List[dict], fits: Dict[str, dict]) -> Dict[str, dict]:
    """Per DCT run, against dense and against the faster baseline at each rate: the measured
    break-even (from the sweep's step times) and the modelled one (from the fits, at this
    machine's compute speed and at the MODEL_SPEEDUPS)."""
    xs = [seconds_per_bit(p) for p in points]

    def measured(name):
        return [p["report"]["runs"][name]["step_ms"] for p in points]

    out = {}
    baselines = [b for b in BASELINES if b in fits]
    for name in [n for n in DCT_RUNS if n in fits]:
        entry = {}
        references = {}
        if "dense" in fits:
            references["dense"] = (measured("dense"), lambda r, s: modelled_step_s(
                fits["dense"], r, s))
        if baselines:
            references["best_baseline"] = (
                [min(v) for v in zip(*(measured(b) for b in baselines))],
                lambda r, s: min(modelled_step_s(fits[b], r, s) for b in baselines))
        for ref, (ref_measured, ref_model) in references.items():
            item = {"measured": break_even(xs, measured(name), ref_measured), "modelled": {}}
            for speedup in MODEL_SPEEDUPS:
                grid = _model_grid()
                item["modelled"][str(speedup)] = break_even(
                    _xs(grid), [modelled_step_s(fits[name], r, speedup) for r in grid],
                    [ref_model(r, speedup) for r in grid])
            entry[ref] = item
        out[name] = entry
    return out


def analyse(points: List[dict]) -> dict:
    """The sweep's summary: per point and run the times, bytes and AUCs; the fits; the
    break-even rates."""
    fits = fit_runs(points)
    rows = []
    for p in points:
        rep = p["report"]
        for name, r in rep["runs"].items():
            rows.append({"point": p["label"], "rate_bit_s": p["rate_bit_s"],
                         "measured_bit_s": p["measured_bit_s"], "run": name,
                         "step_ms": r["step_ms"], "train_s": r["train_s"],
                         "time_to_target_s": r.get("time_to_target_s"), "auc": r["auc"],
                         "target_auc": rep.get("target_auc"),
                         "wire_bytes_per_step": wire_bytes_one_way(r),
                         "dp_bytes_per_step": r["dp_bytes_per_step"],
                         "mp_bytes_per_step": r["mp_bytes_per_step"]})
    first = points[0]["report"]
    return {"device": first["device"], "world_size": first["world_size"],
            "config": first["config"], "points": [p["label"] for p in points],
            "wall_s": {p["label"]: p["report"]["wall_s"] for p in points},
            "rows": rows, "fits": fits, "break_even": break_evens(points, fits)}


# ------------------------------------------------------------------------------- writing

def _rate_text(bits: Optional[float]) -> str:
    if bits is None:
        return "-"
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def _be_text(item: dict) -> str:
    if item["faster_at"] == "all":
        return "faster at every rate"
    if item["faster_at"] == "none":
        return "slower at every rate"
    if item["faster_at"] == "mixed":
        return "crosses more than once"
    return f"faster {item['faster_at']} {_rate_text(item['rate_bit_s'])}"


def markdown(summary: dict) -> str:
    """link_sweep.md: step times per rate, time to target, the fits, the break-evens."""
    runs = [r for r in RUNS if any(row["run"] == r for row in summary["rows"])]
    cfg = summary["config"]
    by = {(row["point"], row["run"]): row for row in summary["rows"]}
    lines = [f"# DLRM over a sweep of link rates ({summary['device']})", "",
             f"{summary['world_size']} ranks, {cfg['steps']} steps of {cfg['batch_size']}, "
             f"runs {', '.join(runs)}; one trainer invocation per rate (bench/link_sweep.py), "
             "on loopback and on the emulated cluster (bench/cluster.py). Rates are the set "
             "ones; the model uses the measured payload rates (next to them). Times on a "
             "2-core machine shared by every rank, the kernel's shaping and anything else "
             "running: compare runs within one point. See docs/time.md.", "",
             "## Median step time (ms)", "",
             "| link | measured | " + " | ".join(runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for point in summary["points"]:
        any_row = next(row for row in summary["rows"] if row["point"] == point)
        cells = [f"{by[(point, r)]['step_ms']:.1f}" if (point, r) in by else "-" for r in runs]
        lines.append(f"| {point} | {_rate_text(any_row['measured_bit_s'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Training time (s) and time to the target AUC (s)", "",
              "Training time excludes evaluation; the target is the dense run's final AUC − "
              "0.002 at the same rate (the AUCs are the same at every rate); - = not reached.",
              "", "| link | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for point in summary["points"]:
        cells = []
        for r in runs:
            row = by.get((point, r))
            if row is None:
                cells.append("-")
                continue
            tt = row["time_to_target_s"]
            cells.append(f"{row['train_s']:.1f} / {'-' if tt is None else f'{tt:.1f}'}")
        lines.append(f"| {point} | " + " | ".join(cells) + " |")
    lines += ["", "Final held-out AUC: " + ", ".join(
        f"{r} {by[(summary['points'][0], r)]['auc']:.4f}" for r in runs
        if (summary["points"][0], r) in by) + ".", ""]
    lines += ["## The model (modelled)", "",
              "step = a + b / rate, fitted to the points above by Theil-Sen (the median of the "
              "pairwise slopes, robust to a point slowed by other jobs). a: the step without "
              "the network (compute and the hook's own cost); b / 8: the bytes per step the "
              "step waits for; sent/step: what a rank sends per step (as much arrives); "
              "exposed: their ratio (1 − exposed is hidden behind the computation).", "",
              "| run | a (ms) | a − dense's a (ms) | exposed bytes/step (b / 8) | sent/step | "
              "exposed | rms residual (ms) |", "|---|---|---|---|---|---|---|"]
    fits = summary["fits"]
    dense_a = fits.get("dense", {}).get("compute_ms")
    for r in runs:
        f = fits.get(r)
        if not f:
            continue
        rel = "-" if dense_a is None else f"{f['compute_ms'] - dense_a:+.1f}"
        exposed = "-" if f["exposed_bytes"] is None else f"{f['exposed_bytes'] / 1e3:.0f} kB"
        frac = "-" if f["exposed_fraction"] is None else f"{f['exposed_fraction']:.2f}"
        rms = "-" if f["rms_ms"] is None else f"{f['rms_ms']:.1f}"
        lines.append(f"| {r} | {f['compute_ms']:.1f} | {rel} | {exposed} | "
                     f"{f['wire_bytes_per_step'] / 1e3:.0f} kB | {frac} | {rms} |")
    lines += ["", "## Break-even rates", "",
              "Below the rate given the DCT run's step is faster. Measured: where the measured "
              "step times cross (linear in 1 / rate between points). Modelled: where the "
              "fitted lines cross, for this machine's compute and for compute 10x and 100x "
              "faster (the hook's cost scaled with it), the wire unchanged.", "",
              "| run | against | measured | modelled (1x) | modelled (10x) | modelled (100x) |",
              "|---|---|---|---|---|---|"]
    for name, entry in summary["break_even"].items():
        for ref, item in entry.items():
            lines.append(f"| {name} | {ref.replace('_', ' ')} | {_be_text(item['measured'])} | "
                         + " | ".join(_be_text(item["modelled"][str(s)])
                                      for s in MODEL_SPEEDUPS) + " |")
    lines += ["", "![step time against link rate](link_sweep_step.png)", "",
              "![held-out AUC against training time](link_sweep_time_to_auc.png)", "",
              "![fastest run by compute and link rate (modelled)](link_sweep_model.png)", ""]
    return "\n".join(lines)


def plots(summary: dict, points: List[dict], out_dir: str) -> None:
    """The three PNGs (see the module's docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    runs = [r for r in RUNS if r in summary["fits"]]
    fits = summary["fits"]
    colours = {r: f"C{i}" for i, r in enumerate(RUNS)}
    shaped = [p for p in points if p["rate_bit_s"] is not None]
    loop = [p for p in points if p["rate_bit_s"] is None]

    fig, (ax_rate, ax_inv) = plt.subplots(1, 2, figsize=(13, 4.5))
    measured_rates = [p["measured_bit_s"] or p["rate_bit_s"] for p in shaped] or [1e9]
    lo, hi = math.log10(min(measured_rates) / 2), math.log10(max(measured_rates) * 4)
    grid = [10 ** (lo + (hi - lo) * i / 199) for i in range(200)]
    for r in runs:
        c = colours[r]
        xs = [p["measured_bit_s"] or p["rate_bit_s"] for p in shaped]
        ys = [p["report"]["runs"][r]["step_ms"] for p in shaped]
        ax_rate.plot([x / 1e9 for x in xs], ys, "o-", color=c, label=f"{r} (measured)")
        for p in loop:
            ax_rate.axhline(p["report"]["runs"][r]["step_ms"], color=c, ls=":", lw=1)
        ax_rate.plot([g / 1e9 for g in grid], [modelled_step_s(fits[r], g) * 1e3 for g in grid],
                     "--", color=c, lw=1, alpha=0.7)
        inv = [seconds_per_bit(p) * 1e9 for p in points]
        ax_inv.plot(inv, [p["report"]["runs"][r]["step_ms"] for p in points], "o", color=c,
                    label=f"{r} (measured)")
        top = max(inv) * 1.05 if inv else 1
        ax_inv.plot([0, top], [modelled_step_s(fits[r], None) * 1e3,
                               modelled_step_s(fits[r], 1e9 / top) * 1e3 if top else 0],
                    "--", color=c, lw=1, label=f"{r} (modelled)")
    ax_rate.set(xscale="log", xlabel="link rate, measured payload (Gbit/s)",
                ylabel="median step (ms)",
                title="step time against link rate\n(dotted: loopback; dashed: modelled)")
    ax_inv.set(xlabel="1 / rate (ns per bit; loopback = 0)", ylabel="median step (ms)",
               title="the model: step = a + b / rate (dashed: modelled)")
    for ax in (ax_rate, ax_inv):
        ax.grid(alpha=0.3, which="both")
    ax_rate.legend(fontsize=7)
    ax_inv.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "link_sweep_step.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.6), sharey=True,
                             squeeze=False)
    for ax, p in zip(axes[0], points):
        rep = p["report"]
        for r in runs:
            ev = rep["runs"][r]["evals"]
            ax.plot(ev["train_s"], ev["auc"], "o-", ms=2.5, lw=1, color=colours[r], label=r)
        if rep.get("target_auc") is not None:
            ax.axhline(rep["target_auc"], color="black", ls=":", lw=1, label="target")
        ax.set(title=p["label"], xlabel="training time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out AUC")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("time to accuracy at each link rate (measured; evaluation time excluded)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "link_sweep_time_to_auc.png"), dpi=110)
    plt.close(fig)

    # Which run the model says is fastest, by compute speed-up and link rate.
    rates = [10 ** (7 + 5 * i / 299) for i in range(300)]
    speeds = [10 ** (3 * j / 149) for j in range(150)]
    best = [[runs.index(min(runs, key=lambda r: modelled_step_s(fits[r], rate, s)))
             for rate in rates] for s in speeds]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = ListedColormap([colours[r] for r in runs])
    ax.pcolormesh([r / 1e9 for r in rates], speeds, best, cmap=cmap, vmin=-0.5,
                  vmax=len(runs) - 0.5, shading="auto", alpha=0.6)
    for p in shaped:
        ax.plot((p["measured_bit_s"] or p["rate_bit_s"]) / 1e9, 1, "kx")
    handles = [matplotlib.patches.Patch(color=colours[r], alpha=0.6, label=r) for r in runs]
    ax.legend(handles=handles, fontsize=8, loc="upper left", title="fastest (modelled)")
    ax.set(xscale="log", yscale="log", xlabel="link rate (Gbit/s)",
           ylabel="compute speed relative to this machine",
           title="modelled: the fastest run for a cluster of given compute and link rate\n"
                 "(x: the measured points; step = a / speed + b / rate)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "link_sweep_model.png"), dpi=110)
    plt.close(fig)


def write(summary: dict, points: List[dict], out_dir: str, with_plots: bool = True) -> None:
    """link_sweep.json, link_sweep.md and (with_plots) the PNGs into out_dir."""
    write_json_and_markdown(out_dir, "link_sweep", summary, markdown(summary))
    if with_plots:
        plots(summary, points, out_dir)


# ------------------------------------------------------------------------------ command

def main(argv=None) -> int:
    """The command; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the trainer's --quick (default)")
    size.add_argument("--tiny", action="store_true", help="the trainer's --tiny (a smoke run)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rates", default=",".join(RATES),
                   help="comma-separated: loopback and rates as tc writes them")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--out", help="default bench/results/<device>/link_sweep_w<ranks>")
    p.add_argument("--analyse-only", action="store_true",
                   help="only rebuild the tables and plots from the points' dlrm.json")
    args = p.parse_args(argv)
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}; expected some of {', '.join(RUNS)}")
    sys.path.insert(0, BENCH_DIR)
    from cluster import parse_rate  # bench/cluster.py

    for rate in rates:
        if rate != "loopback":
            try:
                parse_rate(rate, "--rates")
            except ValueError as exc:
                p.error(str(exc))
    out_dir = args.out
    if out_dir is None:
        from dlrm.cli import device_slug
        from dlrm.context import device_name

        out_dir = os.path.join(BENCH_DIR, "results", device_slug(device_name()),
                               f"link_sweep_w{args.ranks}")
    if not args.analyse_only:
        preset = ["--tiny"] if args.tiny else ["--quick"]
        for rate in rates:
            try:
                wall = run_point(rate, out_dir, preset, args.ranks, runs, extra)
            except RuntimeError as exc:
                print(f"link_sweep.py: {exc}", file=sys.stderr)
                return 1
            print(f"link sweep: {rate} took {wall:.0f} s", file=sys.stderr, flush=True)
    points = load_points(out_dir, rates)
    if not points:
        print(f"link_sweep.py: no points in {out_dir}", file=sys.stderr)
        return 1
    summary = analyse(points)
    write(summary, points, out_dir)
    print(markdown(summary))
    print(f"\nwritten to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
