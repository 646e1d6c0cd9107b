"""What a comparison writes: ``dlrm.json``, ``dlrm.md`` (a table) and PNG plots."""

import os
from typing import Dict

from report_files import write_json_and_markdown  # bench/report_files.py

TABLE_HEADER = ("| run | AUC | Δ AUC vs dense | log loss | DP bytes/step | DP ring bytes/step | "
                "DP compression (whole run / steady) | MP bytes/step | MP dense bytes/step | "
                "MP compression | DP overflow freq. | step ms | train s | to target s |")


def _fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def kernel_backend_text(report: dict) -> str:
    """The report's kernel backend in words: the name, the ranks' names when they differ, or
    "not recorded" for a report from before the field."""
    kernels = report.get("kernel_backend")
    if kernels is None:
        return "not recorded"
    return kernels if isinstance(kernels, str) else "per rank " + ", ".join(kernels)


def table_rows(report: dict) -> list:
    """Markdown rows, one per run, of ``report``'s runs."""
    dense_auc = report["runs"].get("dense", {}).get("auc")
    rows = []
    for name, r in report["runs"].items():
        delta = f"{r['auc'] - dense_auc:+.4f}" if dense_auc is not None else "-"
        rows.append(
            f"| {name} | {r['auc']:.4f} | {delta} | {r['logloss']:.4f} | "
            f"{_fmt_bytes(r['dp_bytes_per_step'])} | {_fmt_bytes(r['dp_bytes_ring_per_step'])} | "
            f"{r['dp_compression']:.1f}x / {r['dp_compression_steady']:.1f}x | "
            f"{_fmt_bytes(r['mp_bytes_per_step'])} | {_fmt_bytes(r['mp_bytes_dense_per_step'])} | "
            f"{r['mp_compression']:.1f}x | {r['dp_overflow_frequency']:.3f} | "
            f"{r['step_ms']:.1f} | {_fmt_s(r.get('train_s'))} | "
            f"{_fmt_s(r.get('time_to_target_s'))} |")
    return rows


def _fmt_s(seconds) -> str:
    """Seconds for the table; "-" for none (a target never reached, or no dense run)."""
    return "-" if seconds is None else f"{seconds:.1f}"


def link_text(report: dict) -> str:
    """Where the ranks' bytes went, in words: loopback, or the emulated cluster's link."""
    link = report.get("link")
    if not link:
        return "loopback (one machine, no emulated link)"
    text = (f"emulated links of {link.get('rate') or str(link['rate_bit_s']) + 'bit'} per rank "
            f"(bench/cluster.py; measured " + (f"{link['measured_bit_s'] / 1e6:.0f} Mbit/s"
                                                if link.get("measured_bit_s") else "not measured"))
    if link.get("delay_ms"):
        text += f", one-way delay {link['delay_ms']:g} ms"
    if link.get("loss_pct"):
        text += f", loss {link['loss_pct']:g}%"
    return text + ")"


def _dp_exchange(runs: dict) -> str:
    """The DCT-DP exchange of the report's DCT runs ("-" when it has none)."""
    for name in ("dct_dp", "dct_dp_mp"):
        if "dp_exchange" in runs.get(name, {}):
            return runs[name]["dp_exchange"]
    return "-"


def markdown(report: dict) -> str:
    cfg = report["config"]
    target = report.get("target_auc")
    lines = [f"# Hybrid-parallel DLRM: {' vs '.join(report['runs'])} ({report['device']})", "",
             f"{report['world_size']} ranks ({report['backend']}; dct_kernels backend "
             f"{kernel_backend_text(report)}), {cfg['steps']} steps of "
             f"{cfg['batch_size']} samples (global), {report['num_heldout']} held-out samples, "
             f"seed {cfg['seed']}; DCT-DP ratio {cfg['dp_ratio']}, {cfg['dp_value_dtype']} "
             f"values, {cfg.get('dp_index_encoding', 'int32')} indices, exchange "
             f"{_dp_exchange(report['runs'])}, "
             f"warm-up {cfg['warmup_steps']} steps, min_numel {cfg['min_numel']}, min_k "
             f"{cfg.get('dp_min_k', 1)}; DCT-MP k = "
             f"{cfg['mp_k']} of {cfg['tower_width']}, {cfg['mp_value_dtype']} values. "
             f"Teacher AUC (the ceiling): "
             + (f"{report['teacher_auc']:.4f}" if report["teacher_auc"] is not None else "n/a")
             + f". Wall time {report['wall_s']:.0f} s.", "",
             f"Network: {link_text(report)}.", "",
             "Baselines: bf16 = torch's bf16_compress_hook on the MLPs' gradients and a bf16 "
             "all-to-all at the embedding boundary; powersgd = torch's powerSGD_hook (rank "
             f"{cfg.get('powersgd_rank', 2)}, plain all-reduces for its first steps) and the "
             "bf16 all-to-all.", "",
             "Time: step ms = median step (forward, backward, optimizer), train s = their sum "
             "(no evaluation), to target s = the training time at the first evaluation whose "
             "held-out AUC reaches the target, the dense run's final AUC − 0.002: "
             + (f"{target:.4f}" if target is not None else "none (no dense run)")
             + "; - where it was not reached. Times are rank 0's.", "",
             "Bytes are per step and rank: DP = sent + received in the gradient exchange, next "
             "to a ring all-reduce of the same gradients (docs/design.md#traffic-statistics); "
             "MP = sent in the embedding all-to-all, forward + backward, next to the dense "
             "exchange (docs/design.md#dct-mp-model-parallel). Steady = second half of the "
             "run.", "",
             TABLE_HEADER, "|---" * (TABLE_HEADER.count("|") - 1) + "|"]
    lines += table_rows(report)
    lines += ["", "![held-out AUC and training loss](dlrm_quality.png)", "",
              "![bytes per step](dlrm_bytes.png)", ""]
    return "\n".join(lines)


def plots(report: dict, out_dir: str) -> None:
    """dlrm_quality.png (held-out AUC against step and against training time, training loss
    against step) and dlrm_bytes.png (DP and MP bytes per step, logged-interval averages, log
    scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: Dict[str, dict] = report["runs"]
    fig, (ax_auc, ax_time, ax_loss) = plt.subplots(1, 3, figsize=(16, 4))
    for name, r in runs.items():
        ax_auc.plot(r["evals"]["step"], r["evals"]["auc"], marker="o", ms=3, label=name)
        if "train_s" in r["evals"]:
            ax_time.plot(r["evals"]["train_s"], r["evals"]["auc"], marker="o", ms=3,
                         label=name)
        ax_loss.plot(r["series"]["step"], r["series"]["train_loss"], lw=1, label=name)
    if report["teacher_auc"] is not None:
        ax_auc.axhline(report["teacher_auc"], color="grey", ls="--", lw=1, label="teacher")
    if report.get("target_auc") is not None:
        for ax in (ax_auc, ax_time):
            ax.axhline(report["target_auc"], color="black", ls=":", lw=1,
                       label="target (dense − 0.002)")
    ax_auc.set(xlabel="step", ylabel="held-out AUC", title="held-out AUC")
    ax_time.set(xlabel="training time (s, no evaluation)", ylabel="held-out AUC",
                title="time to accuracy" + ("" if not report.get("link") else
                                            f" ({report['link'].get('rate')} links)"))
    ax_loss.set(xlabel="step", ylabel="training log loss",
                title=f"training loss (mean over {report['config']['log_every']} steps)")
    for ax in (ax_auc, ax_time, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "dlrm_quality.png"), dpi=110)
    plt.close(fig)

    fig, (ax_dp, ax_mp) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        s = r["series"]
        steps = [0] + s["step"]
        for ax, key in ((ax_dp, "dp_bytes"), (ax_mp, "mp_bytes")):
            totals = [0] + s[key]
            per_step = [(totals[i + 1] - totals[i]) / (steps[i + 1] - steps[i])
                        for i in range(len(s["step"]))]
            ax.plot(s["step"], per_step, lw=1, label=name)
    ax_dp.set(xlabel="step", ylabel="bytes per step and rank", yscale="log",
              title="DP: gradient exchange (sent + received)")
    ax_mp.set(xlabel="step", ylabel="bytes per step and rank", yscale="log",
              title="MP: embedding all-to-all (sent, fwd + bwd)")
    for ax in (ax_dp, ax_mp):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "dlrm_bytes.png"), dpi=110)
    plt.close(fig)


def write(report: dict, out_dir: str, with_plots: bool = True) -> None:
    """dlrm.json, dlrm.md and (with_plots) the PNGs into out_dir (created)."""
    write_json_and_markdown(out_dir, "dlrm", report, markdown(report))
    if with_plots:
        plots(report, out_dir)
