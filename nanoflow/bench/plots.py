"""PNG plots of benchmark reports (matplotlib, imported only here)."""
from __future__ import annotations

import json


def throughput_bars(report_files: list[str], out: str) -> None:
    """Total tok/s per workload (one bar group per report), the cost model's optimum as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reports = [json.load(open(f)) for f in report_files]
    workloads = list(dict.fromkeys(r["workload"] for rep in reports for r in rep["results"]))
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(1.6 * len(workloads) + 2, 4.5))
    for i, rep in enumerate(reports):
        by_name = {r["workload"]: r for r in rep["results"]}
        xs = [j + i * width for j, w in enumerate(workloads) if w in by_name]
        ys = [by_name[w]["tokens_per_second"] for w in workloads if w in by_name]
        label = f"{rep.get('commit') or ''} {rep['device']}".strip()
        bars = ax.bar(xs, ys, width, label=label)
        for bar, w in zip(bars, [w for w in workloads if w in by_name]):
            top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(f"{by_name[w]['percent_of_optimal']:.0f}%", top, ha="center", va="bottom", fontsize=8)
        ax.axhline(rep["optimal_tokens_per_second"], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(workloads))], workloads, rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("total tokens / s (prompt + output)")
    ax.set_title(f"nanoflow offline throughput, {reports[0]['model']} ({reports[0]['dtype']}); dashed: optimal C/2P")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
