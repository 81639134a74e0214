"""``python -m fastbn.bench --plan``: the launches fastbn's Triton path makes for each point
of a suite, planned without running anything (meta tensors: no memory, no GPU).

Per point and mode, each launch's kernel, grid (programs), tile (BLOCK_C x BLOCK_S, a
flat slice, or a channel block's whole slice), warps, the variant flags that matter (FLAT;
ROW:S, rows of a length the compiler knows; CHUNKED:chunks/chunks merged per tree step, of
each channel block's last program), and the bytes it reads and writes by fastbn.launch's
count, against the compulsory traffic of the mode (fastbn.bench.traffic).
"""

from __future__ import annotations

import torch

from fastbn.bench.shapes import Point, shape_label
from fastbn.bench.traffic import compulsory_bytes
from fastbn.conventions import BackwardInputs

PLAN_MODES = ("forward-train", "forward-eval", "backward")
DTYPE_OF = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _meta(point: Point) -> torch.Tensor:
    x = torch.empty(point.shape, dtype=DTYPE_OF[point.dtype], device="meta")
    if point.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d if len(point.shape) == 5
                 else torch.channels_last)
    return x


def point_launches(point: Point) -> dict[str, list]:
    """{mode: [KernelLaunch, ...]} for a module in training (affine, running statistics,
    momentum 0.1) with the point's fusion."""
    from fastbn import launch

    x = _meta(point)
    channels = x.shape[1]

    def vector():
        return torch.empty(channels, dtype=torch.float32, device="meta")

    weight, bias, running_mean, running_var = vector(), vector(), vector(), vector()
    steps = torch.empty((), dtype=torch.int64, device="meta")
    residual = torch.empty_like(x) if point.fusion == "add_relu" else None
    activation = "none" if point.fusion == "none" else "relu"
    save_mask = residual is not None
    plans: dict[str, list] = {}
    with launch.recording() as records:
        _, mean, var, mask = launch.batch_norm_train_(x, running_mean, running_var, steps, 0.1,
                                                      weight, bias, residual, 1e-5, activation,
                                                      0.0, save_mask)
    plans["forward-train"] = [planned for planned, _, _ in records]
    with launch.recording() as records:
        launch.normalize(x, running_mean, running_var, weight, bias, residual, 1e-5,
                         activation, 0.0, False)
    plans["forward-eval"] = [planned for planned, _, _ in records]
    with launch.recording() as records:
        inputs = BackwardInputs(torch.empty_like(x), x, mean, var, weight, bias, residual,
                                mask if save_mask else None, 1e-5, activation, 0.0)
        launch.normalize_backward(inputs, True, [True, True, True, save_mask])
    plans["backward"] = [planned for planned, _, _ in records]
    return plans


def plan_rows(points: list[Point]) -> list[dict]:
    """One row per point, mode and launch (long format, as in the suites' JSON)."""
    rows = []
    for point in points:
        numel = 1
        for size in point.shape:
            numel *= size
        element = torch.empty((), dtype=DTYPE_OF[point.dtype]).element_size()
        for mode, launches in point_launches(point).items():
            compulsory = compulsory_bytes(mode, point.fusion, numel, element)
            for index, planned in enumerate(launches):
                flags = ["FLAT"] if planned.constexprs.get("FLAT") else []
                if planned.constexprs.get("ROW"):  # rows of a length the compiler knows
                    flags.append(f"ROW:{planned.constexprs['ROW']}")
                if planned.constexprs.get("CHUNKED"):  # chunks / chunks per merge step
                    flags.append(f"CHUNKED:{planned.ints[-1]}/"
                                 f"{planned.constexprs['MERGE_CHUNKS']}")
                rows.append({
                    "shape": list(point.shape), "dtype": point.dtype, "layout": point.layout,
                    "fusion": point.fusion, "mode": mode, "launch": index,
                    "kernel": planned.kernel, "grid": list(planned.grid),
                    "tile": list(planned.tile), "num_warps": planned.constexprs["num_warps"],
                    "flags": flags, "bytes_read": planned.bytes_read,
                    "bytes_written": planned.bytes_written, "compulsory_bytes": compulsory,
                })
    return rows


def format_plan(rows: list[dict]) -> str:
    """The rows as a table; per mode, the total traffic over the compulsory traffic."""
    lines = [f"{'point':38s} {'mode':13s} {'kernel':24s} {'grid':>8s} {'tile':>9s} "
             f"{'warps':>5s} {'flags':16s} {'read MB':>9s} {'write MB':>9s} {'x compulsory':>12s}"]
    totals: dict[tuple, int] = {}
    for row in rows:
        key = (tuple(row["shape"]), row["dtype"], row["layout"], row["fusion"], row["mode"])
        totals[key] = totals.get(key, 0) + row["bytes_read"] + row["bytes_written"]
    for row in rows:
        key = (tuple(row["shape"]), row["dtype"], row["layout"], row["fusion"], row["mode"])
        point = f"{shape_label(tuple(row['shape']))} {row['dtype']} {row['layout']}" + (
            "" if row["fusion"] == "none" else f" {row['fusion']}")
        ratio = (f"{totals[key] / row['compulsory_bytes']:.2f}"
                 if row["launch"] == 0 and row["compulsory_bytes"] else "")
        tile = "x".join(str(v) for v in row["tile"])
        lines.append(
            f"{point:38s} {row['mode']:13s} {row['kernel']:24s} {row['grid'][0]:>8d} "
            f"{tile:>9s} {row['num_warps']:>5d} {','.join(row['flags']):16s} "
            f"{row['bytes_read'] / 1e6:>9.2f} {row['bytes_written'] / 1e6:>9.2f} {ratio:>12s}"
        )
    return "\n".join(lines)
