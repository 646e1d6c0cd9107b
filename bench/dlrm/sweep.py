"""A small sweep of the DCT settings on the ``--quick`` data: DP ratio, MP k, capacity.

One dense run, then ``dct_dp_mp`` runs that each move one setting away from the quick
configuration: DP ratio 0.001 / 0.003 / 0.01, MP k (below), and
capacity factor 3 (does cutting an overflowing DP payload in index order cost quality?).
MP k: 16 / 32 / 51 of 512 (3.1% / 6.25% / 10%).
Writes ``dlrm_sweep.json``, ``dlrm_sweep.md`` and ``dlrm_sweep.png`` into the output folder.
"""

import dataclasses
import os
import time
from typing import List, Tuple

import torch.distributed as dist

from report_files import write_json_and_markdown  # bench/report_files.py

from .config import Config
from .context import device_name, kernel_backends, load_data, rank_device, teacher_auc
from .report import kernel_backend_text
from .runner import RankRunner

SETTINGS: List[Tuple[str, dict]] = [
    ("dp_ratio", {"dp_ratio": 0.001}),
    ("dp_ratio", {"dp_ratio": 0.003}),
    ("dp_ratio", {"dp_ratio": 0.01}),
    ("mp_k", {"mp_k": 16}),
    ("mp_k", {"mp_k": 51}),
    ("capacity_factor", {"capacity_factor": 3.0}),
]
KEYS = ("auc", "logloss", "dp_compression", "dp_compression_steady", "mp_compression",
        "dp_overflow_frequency", "step_ms")


def run_sweep(cfg: Config, out_dir: str, started: float) -> dict:
    """Run the sweep on this rank (collective); rank 0 writes the files. Returns the rows."""
    data = load_data(cfg)
    device = rank_device()
    kernels = kernel_backends(device, cfg.backend)
    rows = []
    points = [("dense", {}, ["dense"])] + [(axis, change, ["dct_dp_mp"])
                                            for axis, change in SETTINGS]
    for axis, change, runs in points:
        point = dataclasses.replace(cfg, runs=runs, **change)
        point.validate()
        t0 = time.time()
        result = RankRunner(point, data, device).run()[runs[0]]
        row = {"axis": axis, "run": runs[0], "dp_ratio": point.dp_ratio, "mp_k": point.mp_k,
               "capacity_factor": point.capacity_factor, "wall_s": time.time() - t0}
        row.update({k: result[k] for k in KEYS})
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"sweep {len(rows)}/{len(points)}: {row}", flush=True)
    report = {"device": device_name(), "world_size": dist.get_world_size(),
              "kernel_backend": kernels,
              "teacher_auc": teacher_auc(data), "config": cfg.as_dict(), "rows": rows,
              "wall_s": time.time() - started}
    if dist.get_rank() == 0:
        write(report, out_dir)
    return report


def _auc_text(auc) -> str:
    """A teacher's AUC, or n/a (a Criteo file has no teacher)."""
    return "n/a" if auc is None else f"{auc:.4f}"


def markdown(report: dict) -> str:
    dense = next(r for r in report["rows"] if r["run"] == "dense")
    cfg = report["config"]
    lines = [f"# DCT settings sweep ({report['device']}, {report['world_size']} ranks)", "",
             f"dct_kernels backend {kernel_backend_text(report)}; "
             f"{cfg['steps']} steps of {cfg['batch_size']}, seed {cfg['seed']}, teacher AUC "
             f"{_auc_text(report['teacher_auc'])}. Each dct_dp_mp row changes one setting of "
             f"the quick configuration (DP ratio {cfg['dp_ratio']}, MP k {cfg['mp_k']} of "
             f"{cfg['tower_width']}, capacity factor {cfg['capacity_factor']}).", "",
             "| run | DP ratio | MP k | capacity | AUC | Δ AUC | log loss | DP compression "
             "(whole / steady) | MP compression | DP overflow freq. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['run']} | {r['dp_ratio'] if r['run'] != 'dense' else '-'} | "
                     f"{r['mp_k'] if r['run'] != 'dense' else '-'} | "
                     f"{r['capacity_factor'] if r['run'] != 'dense' else '-'} | "
                     f"{r['auc']:.4f} | {r['auc'] - dense['auc']:+.4f} | {r['logloss']:.4f} | "
                     f"{r['dp_compression']:.0f}x / {r['dp_compression_steady']:.0f}x | "
                     f"{r['mp_compression']:.1f}x | {r['dp_overflow_frequency']:.3f} |")
    lines += ["", "![sweep](dlrm_sweep.png)", ""]
    return "\n".join(lines)


def write(report: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json_and_markdown(out_dir, "dlrm_sweep", report, markdown(report))
    rows = report["rows"]
    dense = next(r for r in rows if r["run"] == "dense")
    default = report["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, axis, key, label, compression in (
            (axes[0], "dp_ratio", "dp_ratio", "DP ratio (MP k fixed)", "dp_compression"),
            (axes[1], "mp_k", "mp_k",
             f"MP k of {report['config']['tower_width']} (DP ratio fixed)", "mp_compression")):
        pts = [r for r in rows if r["run"] != "dense" and (
            r["axis"] == axis or (r["axis"] == "dp_ratio" and r["dp_ratio"] ==
                                  default["dp_ratio"] and axis == "mp_k"))]
        pts = sorted({r[key]: r for r in pts}.values(), key=lambda r: r[key])
        xs = [r[key] for r in pts]
        ax.plot(xs, [r["auc"] - dense["auc"] for r in pts], marker="o")
        for r in pts:
            ax.annotate(f"{r[compression]:.0f}x", (r[key], r["auc"] - dense["auc"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0, color="grey", lw=1)
        ax.axhline(-0.002, color="red", ls="--", lw=1, label="dense - 0.002")
        ax.set(xlabel=label, ylabel="AUC - dense AUC", xscale="log" if axis == "dp_ratio"
               else "linear", title=f"dct_dp_mp vs dense ({compression.split('_')[0]} "
                                    f"compression marked)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "dlrm_sweep.png"), dpi=110)
    plt.close(fig)
