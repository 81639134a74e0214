"""The bench's two runs that are not timed suites of points: ``--plan`` (fastbn.bench.plan)
and ``--suite host`` (fastbn.bench.host). Their output: a table on stdout and, with --out,
a JSON file like the suites' (command, date, device, versions, notes, rows)."""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

import torch

from fastbn.bench.host import NO_OP_NOTE, format_host, host_rows
from fastbn.bench.meta import run_meta
from fastbn.bench.plan import format_plan, plan_rows
from fastbn.bench.shapes import SUITES, grid, restyle


def _save(out: Path, meta: dict, rows: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", meta["device"]["name"].lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{meta['suite']}-{device}-{stamp}.json"
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return path


def run_extra(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
              device: torch.device) -> int:
    """--plan or --suite host; the exit status."""
    if args.suite == "host":
        notes = [] if device.type == "cuda" else [NO_OP_NOTE]
        meta = {**run_meta(argv, "host", device), "notes": notes}
        print("\n".join(f"note: {note}" for note in notes) + "\nfastbn bench: host cost per "
              f"call on {meta['device']['name']} ({device.type})\n", flush=True)
        rows = host_rows(device, repeats=args.reps)
        print(format_host(rows))
    else:
        if args.shape:
            points = restyle(grid(args.shape, dtypes=("bf16",)), args.dtypes, args.layouts,
                             args.fusion)
            suite = "custom"
        else:
            suite = args.suite or "quick"
            points = restyle(SUITES[suite].points, args.dtypes, args.layouts, args.fusion)
        meta = {**run_meta(argv, f"plan-{suite}", device),
                "notes": ["planned on meta tensors: nothing ran"]}
        rows = plan_rows(points)
        print(format_plan(rows))
    if args.out is not None:
        print(f"\nwrote {_save(args.out, meta, rows)}")
    return 0
