"""PNG plots of benchmark reports (matplotlib, imported only here)."""
from __future__ import annotations

import json
import os


def check_outputs(files: dict[str, str | None], plots: dict[str, str | None]) -> None:
    """Before a run, so that a bad path does not lose it: {flag: path} of files to write, whose directory must
    exist, and of plots, which also need a format matplotlib writes."""
    for flag, path in (files | plots).items():
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {path}: its directory does not exist (checked before the run, not after)")
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path}: a directory, not a file (checked before the run, not after)")
        if not os.access(path if os.path.exists(path) else folder, os.W_OK):
            raise ValueError(f"{flag} {path}: not writable (checked before the run, not after)")
    if any(plots.values()):
        from matplotlib.figure import Figure
        formats = Figure().canvas.get_supported_filetypes()
        for flag, path in plots.items():
            if path and os.path.splitext(path)[1].lstrip(".").lower() not in formats:
                raise ValueError(f"{flag} {path}: not a format matplotlib writes ({', '.join(sorted(formats))})")


def _throughput_report(path: str) -> dict:
    """A `bench throughput` report, or ValueError naming what the file is not."""
    try:
        with open(path) as f:
            rep = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    except OSError as e:  # (a directory, no permission, no such file)
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(rep, dict) or not all(isinstance(r, dict) and "tokens_per_second" in r
                                            for r in rep.get("results") or [None]):
        replayed = isinstance(rep, dict) and any(isinstance(r, dict) and "schedule_policy" in r
                                                 for r in rep.get("results") or [])
        hint = " (a `bench schedule` replay: its --plot draws it)" if replayed else ""
        raise ValueError(f"{path} is not a `bench throughput` report: no results with tokens_per_second{hint}")
    missing = sorted({"optimal_tokens_per_second", "dtype"} - rep.keys()) or sorted(
        {k for r in rep["results"] for k in {"workload", "percent_of_optimal"} - r.keys()})
    if missing:
        raise ValueError(f"{path} is not a whole `bench throughput` report: it has no {', '.join(missing)}")
    number = (int, float)
    for where, fields in ((rep, {"optimal_tokens_per_second": number}),
                          *((r, {"workload": str, "tokens_per_second": number, "percent_of_optimal": number})
                            for r in rep["results"])):
        for name, kind in fields.items():
            if not isinstance(where[name], kind) or isinstance(where[name], bool):
                raise ValueError(f"{path}: {name} is {where[name]!r}, not a {'number' if kind is number else 'string'}")
    return rep


def report_labels(reports: list[dict], files: list[str]) -> list[str]:
    """A bar group's label per report: what tells them apart (model, commit, device), else also the file's name."""
    labels = [" ".join(str(x) for x in (rep.get("model") or "default model",
                                        rep.get("num_layers") and f"{rep['num_layers']} layers", rep.get("commit"),
                                        rep.get("device")) if x) for rep in reports]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({os.path.basename(f)})" for label, f in zip(labels, files)]
    return labels


def _run_names(results: list[dict]) -> list[str]:
    """Each result's workload; a workload run again in one report as "NAME (2)", "NAME (3)", ... (a bar each)."""
    seen: dict[str, int] = {}
    names = []
    for r in results:
        seen[r["workload"]] = seen.get(r["workload"], 0) + 1
        names.append(r["workload"] + (f" ({seen[r['workload']]})" if seen[r["workload"]] > 1 else ""))
    return names


def throughput_bars(report_files: list[str], out: str) -> None:
    """Total tok/s per workload (one bar group per report), the cost model's optimum as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reports = [_throughput_report(f) for f in report_files]
    runs = [dict(zip(_run_names(rep["results"]), rep["results"])) for rep in reports]
    workloads = list(dict.fromkeys(w for by_name in runs for w in by_name))
    labels = report_labels(reports, report_files)
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(1.6 * len(workloads) + 2, 4.5))
    for i, (rep, by_name) in enumerate(zip(reports, runs)):
        xs = [j + i * width for j, w in enumerate(workloads) if w in by_name]
        ys = [by_name[w]["tokens_per_second"] for w in workloads if w in by_name]
        bars = ax.bar(xs, ys, width, label=labels[i])
        for bar, w in zip(bars, [w for w in workloads if w in by_name]):
            top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(f"{by_name[w]['percent_of_optimal']:.0f}%", top, ha="center", va="bottom", fontsize=8)
        ax.axhline(rep["optimal_tokens_per_second"], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(workloads))], workloads, rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("total tokens / s (prompt + output)")
    ax.set_title(f"nanoflow offline throughput ({reports[0]['dtype']}); dashed: optimal C/2P", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def timeline_chart(timeline: dict, out: str, title: str, layers: int = 3) -> None:
    """A Gantt chart of the first `layers` layers of one iteration: a lane per execution unit, a bar per
    nano-op (colored by op, labeled with its rows); as run (overlapped) above, each nano-op alone below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    units = list(timeline["units"])
    ops = list(dict.fromkeys(e["op"] for e in timeline["overlapped"]))
    colors = dict(zip(ops, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(2, 1, figsize=(14, 2.2 + 1.1 * len(units)), sharex=False)
    for ax, kind in zip(axes, ("overlapped", "alone")):
        events = [e for e in timeline[kind] if e["layer"] < layers]
        t0 = min(e["start_ms"] for e in events)
        for e in events:
            y = units.index(e["unit"])
            ax.barh(y, e["end_ms"] - e["start_ms"], left=e["start_ms"] - t0, color=colors[e["op"]],
                    edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(units)), [f"{u} ({timeline['units'][u] or 'all'} SMs)" for u in units])
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        ax.set_title(f"{kind}: {timeline['iteration_ms'][kind]:.2f} ms for the whole iteration "
                     f"({timeline['tokens']} tokens); layers 0-{layers - 1} shown", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[o]) for o in ops]
    fig.legend(handles, ops, loc="lower center", fontsize=7, ncol=min(len(ops), 10))  # below: clear of the title
    fig.suptitle(f"{title}: spec {timeline['spec']}", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.12 if len(ops) > 10 else 0.07, 1, 0.93))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def schedule_bars(rows: list[dict], out: str, title: str) -> None:
    """bench schedule's replay: iterations per (budget, policy), a bar group per workload, each bar labeled with its
    tokens per iteration (fewer iterations for the same tokens: a faster run where each iteration has a fixed cost)
    and marked at its lower bound."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    settings = list(dict.fromkeys((r["budget"], r["schedule_policy"]) for r in rows))
    width = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(max(8.0, 2.2 * len(workloads) + 2) + 3, 4.5))
    for i, (budget, policy) in enumerate(settings):
        mine = {r["workload"]: r for r in rows if (r["budget"], r["schedule_policy"]) == (budget, policy)}
        names = [w for w in workloads if w in mine]
        bars = ax.bar([workloads.index(w) + i * width for w in names], [mine[w]["iterations"] for w in names], width,
                      label=f"{budget} tokens, {policy}")
        for bar, w in zip(bars, names):
            ax.annotate(f"{mine[w]['tokens_per_iteration']:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
            ax.hlines(mine[w]["lower_bound"], bar.get_x(), bar.get_x() + bar.get_width(), colors="black", lw=1.5,
                      label="the fewest iterations any schedule could take" if (i, w) == (0, names[0]) else None)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(workloads))], workloads, fontsize=8)
    ax.set_ylabel("iterations (labels: tokens per iteration)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, clear of them
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
