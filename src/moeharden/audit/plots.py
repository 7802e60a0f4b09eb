"""Plots for reports, drawn with matplotlib's Agg backend and returned as PNG bytes.

Every function takes plain data (lists and dicts read from a report's JSON), never live models,
so any report can be re-drawn from its JSON alone.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {
    "frequency": "#1f77b4", "gate": "#ff7f0e", "reap": "#2ca02c", "ean": "#9467bd", "soft": "#8c564b",
    "contrastive": "#e377c2", "ablation": "#d62728", "random": "#7f7f7f",
}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def retained_curves(task: str, num_experts: int, rows: Sequence[Mapping], *, title: str | None = None,
                    ylabel: str = "retained fraction of full-model metric") -> bytes:
    """Retained metric vs keep-ratio, one line per method; the random control dashed.

    Args:
        rows: sweep rows ``{"method", "keep", "retained"}`` of one task.
    """
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m == "random", m))
    for m in methods:
        pts = sorted((r["keep"] / num_experts, r["retained"]) for r in rows if r["method"] == m)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=4, label=m, color=_COLORS.get(m),
                linestyle="--" if m == "random" else "-", linewidth=2 if m == "random" else 1.4)
    ax.axhline(0.9, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.set_xlabel("fraction of experts kept per layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.set_title(title or f"{task}: pruning sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def attribution_heatmaps(task: str, layers: Sequence[int], matrices: Mapping[str, Sequence[Sequence[float]]]) -> bytes:
    """One heatmap (layers × experts) per attribution method, each row-normalised for readability."""
    methods = list(matrices)
    n = len(methods)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 0.35 * len(layers) * rows + 1.9 * rows),
                             squeeze=False, layout="constrained")
    for i, m in enumerate(methods):
        ax = axes[i // cols][i % cols]
        data = [list(r) for r in matrices[m]]
        # row-normalise to [0, 1]: scales differ wildly between methods and layers
        norm = []
        for r in data:
            lo, hi = min(r), max(r)
            norm.append([(v - lo) / (hi - lo) if hi > lo else 0.0 for v in r])
        ax.imshow(norm, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(m, fontsize=9)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(x) for x in layers], fontsize=7)
        ax.set_xticks(range(len(data[0]) if data else 0))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("expert", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("layer", fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"{task}: expert attribution (row-normalised)", fontsize=10)
    return _png(fig)


def recovery_curves(task: str, keep: int, rows: Sequence[Mapping], *, target: float | None = None,
                    full: float | None = None) -> bytes:
    """Metric vs labels used, one line per strategy (mean over seeds), for one task and keep-count."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    strategies = sorted({r["strategy"] for r in rows})
    for s in strategies:
        by_labels: dict[int, list[float]] = {}
        for r in rows:
            if r["strategy"] == s:
                by_labels.setdefault(int(r["labels"]), []).append(float(r["metric"]))
        xs = sorted(by_labels)
        ys = [sum(by_labels[x]) / len(by_labels[x]) for x in xs]
        ax.plot(xs, ys, marker="o", ms=4, label=s, color=_COLORS.get(s),
                linestyle="--" if s == "random" else "-")
    if full is not None:
        ax.axhline(full, color="black", linewidth=0.8, label="full model")
    if target is not None:
        ax.axhline(target, color="#d62728", linewidth=0.8, linestyle=":", label="recovery target")
    ax.set_xlabel("labels used")
    ax.set_ylabel("metric")
    ax.set_title(f"{task}: re-alignment attack, keep {keep}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)



_REF_COLORS = {"pruned": "#d62728", "shared": "#1f77b4", "scratch": "#7f7f7f"}


def ladder_curves(task: str, attack: str, curves: Sequence[Mapping], *, target: float | None = None,
                  full: float | None = None, title: str | None = None) -> bytes:
    """The three starting points' learning curves on the ladder, with 95% interval bands.

    One line per (reference, strategy): the mean over seeds of the chosen state's metric at each
    rung; the band spans the lowest lower bound to the highest upper bound over the seeds.
    """
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for c in curves:
        if c["attack"] == attack:
            groups.setdefault((c["reference"], c["strategy"]), []).append(c)
    for (ref, strat), cs in sorted(groups.items()):
        by_x: dict[int, list[Mapping]] = {}
        for c in cs:
            for p in c["points"]:
                by_x.setdefault(int(p["x"]), []).append(p)
        xs = sorted(by_x)
        ys = [sum(float(p["metric"]) for p in by_x[x]) / len(by_x[x]) for x in xs]
        los = [min(float(p["lo"]) if p.get("lo") is not None else float(p["metric"]) for p in by_x[x]) for x in xs]
        his = [max(float(p["hi"]) if p.get("hi") is not None else float(p["metric"]) for p in by_x[x]) for x in xs]
        color = _REF_COLORS.get(ref)
        label = ref if ref != "pruned" or len({s for r, s in groups if r == "pruned"}) == 1 else f"pruned ({strat})"
        ax.plot(xs, ys, marker="o", ms=4, label=label, color=color, linestyle="-" if strat == "random" else "--")
        ax.fill_between(xs, los, his, color=color, alpha=0.15, linewidth=0)
    if full is not None:
        ax.axhline(full, color="black", linewidth=0.8, label="full model")
    if target is not None:
        ax.axhline(target, color="#2ca02c", linewidth=0.8, linestyle=":", label="recovery target")
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xlabel("labels bought" if attack == "labels" else "unlabelled prompts distilled (no labels)")
    ax.set_ylabel("metric")
    ax.set_title(title or f"{task}: adaptive {'re-alignment' if attack == 'labels' else 'distillation'} ladder")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)
