"""What the benchmark shows and writes: progress, the table, geometric means, JSON, a plot."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TextIO

from fastbn.bench.modes import MODES
from fastbn.bench.runner import Row
from fastbn.bench.shapes import FUSIONS, shape_label

SCHEMA = "fastbn.bench/2"  # 2: rows have "fusion"; geomean_speedup is per fusion, then mode


class Progress:
    """A counter on stderr: one line rewritten in place on a terminal, else about 20 lines."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = 0

    def __call__(self, done: int, total: int, label: str) -> None:
        text = f"[{done}/{total}] {label}"
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            if done == total:
                self.stream.write("\r" + " " * self.width + "\r")
        elif done % max(1, total // 20) == 0 and done < total:
            self.stream.write(text + "\n")
        self.stream.flush()


def format_columns(header: list[str], lines: list[list[str]], left: int) -> str:
    """Aligned columns: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(cells) for cells in lines)])


def time_cell(row: Row | None) -> str:
    """A row's median in ms, or WRONG / ERROR / '-' (not run)."""
    if row is None:
        return "-"
    if row.status != "ok":
        return row.status.upper()
    return milliseconds(row.median_ms)


def milliseconds(value: float) -> str:
    return f"{value:.4f}" if value < 1 else f"{value:.3f}"


def eager_cell(row: Row | None) -> str:
    """A row's eager ms (back-to-back calls), '-' where there is none."""
    if row is None or row.status != "ok" or row.eager_ms is None:
        return "-"
    return milliseconds(row.eager_ms)


def rate(value: float) -> str:
    """A GB/s or percentage figure: whole numbers from 10 up, two decimals below."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def times(speedup: float) -> str:
    """A speedup as '1.52x' (two significant digits below 0.1)."""
    return f"{speedup:.2f}x" if speedup >= 0.1 else f"{speedup:.2g}x"


def table(rows: list[Row], providers: list[str], by_threads: bool = False) -> str:
    """One line per (point, mode) (and thread count, with ``by_threads``): each provider's
    median ms ('-' where it has no row, as apex on fused points), and beside it its eager
    ms where rows have one (CUDA); fastbn's GB/s on compulsory bytes and % of copy
    bandwidth; fastbn's speedup over each baseline (baseline time / fastbn time, > 1 when
    fastbn is faster)."""
    eager = any(row.eager_ms is not None for row in rows)
    by_key: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        key = (row.shape, row.dtype, row.layout, row.fusion, row.mode)
        if by_threads:
            key += (row.threads,)
        by_key.setdefault(key, {})[row.provider] = row
    baselines = [name for name in providers if name != "fastbn"]
    header = ["shape", "dtype", "layout", "fusion", "mode"] + (["threads"] if by_threads else [])
    for name in providers:
        header.append(f"{name} ms")
        if eager:
            header.append(f"{name} eager ms")
        if name == "fastbn":
            header += ["GB/s", "%copy"]
    header += [f"vs {name}" for name in baselines if "fastbn" in providers]
    lines = []
    for (shape, dtype, layout, fusion, mode, *threads), cells in by_key.items():
        line = [shape_label(shape), dtype, layout, fusion, mode, *map(str, threads)]
        for name in providers:
            line.append(time_cell(cells.get(name)))
            if eager:
                line.append(eager_cell(cells.get(name)))
            fastbn_row = cells.get(name) if name == "fastbn" else None
            if fastbn_row is not None and fastbn_row.status == "ok":
                line += [rate(fastbn_row.gbps), rate(fastbn_row.pct_copy) + "%"]
            elif name == "fastbn":
                line += ["-", "-"]
        if "fastbn" in providers:
            for name in baselines:
                speedup = cells[name].fastbn_speedup if name in cells else None
                line.append("-" if speedup is None else times(speedup))
        lines.append(line)
    return format_columns(header, lines, left=6 if by_threads else 5)


def problems(rows: list[Row]) -> list[str]:
    """One line per row that was not timed, saying why."""
    return [
        f"{row.provider} {row.mode} {shape_label(row.shape)} {row.dtype} {row.layout} "
        f"{row.fusion}: {row.status}: {row.message}"
        for row in rows
        if row.status != "ok"
    ]


Geomeans = dict[str, dict[str, dict[str, dict[str, float]]]]


def geomean_speedups(rows: list[Row]) -> Geomeans:
    """Per baseline, per fusion and over all fusions ("all"), per mode and over all modes
    ("all"): the geometric mean of fastbn's speedup and the number of rows it is taken over.
    Indexed ``[baseline][fusion][mode]``."""
    sums: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in rows:
        if row.fastbn_speedup is None:
            continue
        for fusion in (row.fusion, "all"):
            for mode in (row.mode, "all"):
                entry = sums.setdefault(row.provider, {}).setdefault(fusion, {}).setdefault(
                    mode, [0.0, 0]
                )
                entry[0] += math.log(row.fastbn_speedup)
                entry[1] += 1
    fusion_order, mode_order = (*FUSIONS, "all"), (*MODES, "all")
    return {
        baseline: {
            fusion: {
                mode: {"speedup": math.exp(log_sum / n), "n": int(n)}
                for mode, (log_sum, n) in sorted(
                    per_mode.items(), key=lambda item: mode_order.index(item[0])
                )
            }
            for fusion, per_mode in sorted(
                per_fusion.items(), key=lambda item: fusion_order.index(item[0])
            )
        }
        for baseline, per_fusion in sums.items()
    }


def summary(geomeans: Geomeans) -> str:
    """The geometric-mean speedups as a table: one line per baseline and fusion (and over all
    fusions when a baseline has several), one column per mode and over all modes."""
    keys = [
        key for key in (*MODES, "all")
        if any(key in g for per_fusion in geomeans.values() for g in per_fusion.values())
    ]
    lines = []
    for baseline, per_fusion in geomeans.items():
        fusions = [f for f in per_fusion if f != "all"]
        for fusion in fusions if len(fusions) == 1 else [*fusions, "all"]:
            g = per_fusion[fusion]
            lines.append(
                [f"fastbn vs {baseline}", fusion]
                + [f"{times(g[key]['speedup'])} (n={g[key]['n']})" if key in g else "-"
                   for key in keys]
            )
    return format_columns(["geometric mean", "fusion", *keys], lines, left=2)


BREAKDOWN_KEYS = ("threads", "dtype", "layout", "fusion")


def geomean_breakdown(rows: list[Row]) -> list[dict]:
    """Per baseline, thread count, dtype, layout and fusion, and per mode: the geometric
    mean of fastbn's speedup, the number of rows, and the worst row's speedup."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row.fastbn_speedup is None:
            continue
        key = (row.provider, *(getattr(row, name) for name in BREAKDOWN_KEYS), row.mode)
        groups.setdefault(key, []).append(row.fastbn_speedup)
    return [
        {
            "baseline": key[0], **dict(zip(BREAKDOWN_KEYS, key[1:-1], strict=True)),
            "mode": key[-1],
            "speedup": math.exp(sum(map(math.log, values)) / len(values)),
            "n": len(values),
            "worst": min(values),
        }
        for key, values in groups.items()
    ]


def breakdown_table(entries: list[dict]) -> str:
    """``geomean_breakdown`` as a table: a line per baseline, threads, dtype, layout and
    fusion; per mode the geometric mean and, in brackets, the worst row."""
    modes = [mode for mode in MODES if any(e["mode"] == mode for e in entries)]
    lines: dict[tuple, dict[str, str]] = {}
    for entry in entries:
        key = (f"fastbn vs {entry['baseline']}",
               *(str(entry[name]) for name in BREAKDOWN_KEYS))
        lines.setdefault(key, {})[entry["mode"]] = (
            f"{times(entry['speedup'])} [{times(entry['worst'])}]"
        )
    return format_columns(
        ["geometric mean [worst]", *BREAKDOWN_KEYS, *modes],
        [[*key, *(cells.get(mode, "-") for mode in modes)] for key, cells in lines.items()],
        left=1 + len(BREAKDOWN_KEYS),
    )


def write_json(path: Path, meta: dict, rows: list[Row], geomeans: Geomeans) -> None:
    """The run as JSON: ``meta`` (device, versions, command, date, copy bandwidth, notes),
    ``geomean_speedup`` ([baseline][fusion or "all"][mode or "all"]), ``geomean_breakdown``
    (per baseline, threads, dtype, layout, fusion and mode), and ``rows`` in long format (one
    object per point, mode, provider and thread count; a point is shape, dtype, layout,
    fusion). ``meta`` may hold ``model_step`` (see fastbn.bench.model)."""
    document = {
        "schema": SCHEMA,
        **meta,
        "geomean_speedup": geomeans,
        "geomean_breakdown": geomean_breakdown(rows),
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


def write_plot(path: Path, rows: list[Row], title: str) -> bool:
    """A PNG of fastbn's speedup per point (log scale), one panel per mode, a bar per baseline.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    speedups: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row.fastbn_speedup is not None:
            label = f"{shape_label(row.shape)} {row.dtype} {row.layout}" + (
                "" if row.fusion == "none" else f" {row.fusion}"
            )
            speedups.setdefault(row.mode, {}).setdefault(row.provider, {})[label] = (
                row.fastbn_speedup
            )
    if not speedups:
        return False
    modes = [mode for mode in MODES if mode in speedups]
    labels = list(dict.fromkeys(
        label for mode in modes for per_point in speedups[mode].values() for label in per_point
    ))
    baselines = list(dict.fromkeys(b for mode in modes for b in speedups[mode]))
    width = 0.8 / len(baselines)
    figure, axes = plt.subplots(
        len(modes), 1, figsize=(min(40, max(8, 0.35 * len(labels) * len(baselines))),
                                3.2 * len(modes) + 1.5),
        squeeze=False, sharex=True,
    )
    for axis, mode in zip(axes[:, 0], modes, strict=True):
        for i, baseline in enumerate(baselines):
            values = speedups[mode].get(baseline, {})
            positions = [j + (i - (len(baselines) - 1) / 2) * width for j in range(len(labels))]
            axis.bar(positions, [values.get(label, math.nan) for label in labels], width,
                     label=f"vs {baseline}")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylabel("fastbn speedup (log)")
        axis.set_title(mode)
        axis.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xticks(range(len(labels)))
    axes[-1, 0].set_xticklabels(labels, rotation=60, ha="right", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
