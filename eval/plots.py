"""The two plots of `calm eval` (matplotlib's object API on Agg: no pyplot, no global state): ROUGE-L
against average depth, and against the decode speedup over full depth. Adaptive exits (the full model
and each threshold), static exits and the lossless point are separate series, and every point is
labelled where its label overlaps no other label, marker or the legend."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from calm.eval.report import EvalReport, PointMetrics

# (kind of point, legend, matplotlib style); "full" opens the adaptive series (λ above every confidence)
SERIES = (
    (("full", "adaptive"), "adaptive exits (CALM)", {"marker": "o", "linestyle": "-"}),
    (("speculative",), "speculative (lossless, per draft λ)", {"marker": "D", "linestyle": "-"}),
    (("static",), "static exit", {"marker": "s", "linestyle": "--"}),
    (("lossless",), "lossless (exact)", {"marker": "*", "linestyle": "none", "markersize": 12}),
)
_RADII = (6, 14, 24, 36, 50, 66, 84, 104, 126)  # label offsets tried, in points, nearest first
_DIRECTIONS = (
    (1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0),
    (1, 0.5), (1, -0.5), (-1, 0.5), (-1, -0.5), (0.5, 1), (-0.5, 1), (0.5, -1), (-0.5, -1),
)  # fmt: skip
FONT_SIZE = 7


def plot_rouge_vs_layers(report: EvalReport) -> bytes:
    """ROUGE-L F1 against average layers per token, one series per kind of point (PNG bytes)."""
    fig, ax = _figure()
    labels = _series(ax, report, lambda p: p.avg_layers)
    ax.set_xlabel(f"average layers per token (of {report.num_layers}; the first token at full depth)")
    ax.set_ylabel("ROUGE-L F1 × 100")
    ax.set_title(f"ROUGE-L vs depth ({report.config['measure']}, n={report.n})")
    return _png(fig, ax, labels)


def plot_rouge_vs_speedup(report: EvalReport) -> bytes:
    """ROUGE-L F1 against the decode speedup over full depth (the prefill, the same for every point,
    left out; the wall-clock speedup where decode was not timed apart) (PNG bytes)."""
    fig, ax = _figure()
    labels = _series(ax, report, _speedup)
    ax.axhline(100 * report.point("full").rougeL, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("decode speedup over full depth (×, prefill excluded)")
    ax.set_ylabel("ROUGE-L F1 × 100")
    ax.set_title(f"ROUGE-L vs speedup ({report.config['measure']}, n={report.n})")
    return _png(fig, ax, labels)


def point_label(p: PointMetrics) -> str:
    if p.kind == "full":
        return "full"
    if p.kind == "static":
        return p.label.replace("static exit at layer ", "layer ")
    if p.kind == "lossless":
        return "lossless"
    return f"λ={p.threshold:g}" if p.threshold is not None else p.label


def place_labels(ax: Any, items: Sequence[tuple[float, float, str]], avoid: Sequence[Any] = ()) -> list[Any]:
    """Annotate each (x, y, text) at the nearest offset where its text overlaps no label placed before,
    no data point and nothing in `avoid` (display-space bboxes, e.g. the legend's), inside the axes; a
    label moved away from its point gets a thin leader line. Returns the annotations."""
    from matplotlib.transforms import Bbox

    ax.set_xlim(ax.get_xlim())  # the limits settle here (autoscaled from the data), then stay
    ax.set_ylim(ax.get_ylim())
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = list(avoid)
    for x, y in ((x, y) for x, y, _ in items):
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - 3, py - 3, px + 3, py + 3))
    placed = []
    for x, y, text in items:
        best, best_score = None, math.inf
        for dx, dy in _offsets():
            ann = _annotation(ax, x, y, text, dx, dy)
            box = ann.get_window_extent(renderer)
            score = sum(box.overlaps(t) for t in taken) + (0 if _inside(box, frame) else 100)
            if score < best_score:
                if best is not None:
                    best.remove()
                best, best_score = ann, score
            else:
                ann.remove()
            if score == 0:
                break
        if best is None:
            raise AssertionError("_offsets yields at least one offset, so each label is placed")
        taken.append(best.get_window_extent(renderer))
        placed.append(best)
    return placed


def _offsets():
    for radius in _RADII:
        for ux, uy in _DIRECTIONS:
            yield ux * radius, uy * radius


def _annotation(ax: Any, x: float, y: float, text: str, dx: float, dy: float) -> Any:
    far = max(abs(dx), abs(dy)) > _RADII[0]
    return ax.annotate(
        text,
        (x, y),
        textcoords="offset points",
        xytext=(dx, dy),
        fontsize=FONT_SIZE,
        ha="left" if dx > 0 else "right" if dx < 0 else "center",
        va="bottom" if dy > 0 else "top" if dy < 0 else "center",
        annotation_clip=False,
        arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "grey"} if far else None,
    )


def _inside(box: Any, frame: Any) -> bool:
    return box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def _speedup(p: PointMetrics) -> float:
    return p.speedup_vs_full if math.isnan(p.decode_speedup_vs_full) else p.decode_speedup_vs_full


def _series(ax: Any, report: EvalReport, x_of) -> list[tuple[float, float, str]]:
    """One line per kind of point, sorted along x; the (x, y, label) of every point plotted."""
    labels = []
    for kinds, name, style in SERIES:
        points = [p for p in report.points if p.kind in kinds and math.isfinite(x_of(p))]
        if not points:
            continue
        points.sort(key=x_of)
        ax.plot([x_of(p) for p in points], [100 * p.rougeL for p in points], label=name, **style)
        labels += [(x_of(p), 100 * p.rougeL, point_label(p)) for p in points]
    return labels


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Any, ax: Any, labels: Sequence[tuple[float, float, str]]) -> bytes:
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.18)  # room for the labels inside the axes
    ax.autoscale_view()
    legend = ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    place_labels(ax, labels, [legend.get_window_extent(renderer)])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
