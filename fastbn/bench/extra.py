"""The bench's two runs that are not timed suites of points: ``--plan`` (fastbn.bench.plan)
and ``--suite host`` (fastbn.bench.host). Their output: a table on stdout and, with --out,
a JSON file like the suites' (command, date, device, versions, notes, rows)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
from pathlib import Path

import torch

import fastbn
from fastbn.bench.shapes import SUITES, grid, restyle


def _meta(argv: list[str], suite: str, device: torch.device, notes: list[str]) -> dict:
    from fastbn.bench.cli import device_name, package_version

    return {
        "command": shlex.join(["python", "-m", "fastbn.bench", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "suite": suite,
        "device": {"type": device.type, "name": device_name(device)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": package_version("triton"), "fastbn": fastbn.__version__,
                     "cuda": torch.version.cuda},
        "notes": notes,
    }


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
        from fastbn.bench.host import NO_OP_NOTE, format_host, host_rows

        notes = [] if device.type == "cuda" else [NO_OP_NOTE]
        meta = _meta(argv, "host", device, notes)
        print("\n".join(f"note: {note}" for note in notes) + "\nfastbn bench: host cost per "
              f"call on {meta['device']['name']} ({device.type})\n", flush=True)
        rows = host_rows(device, repeats=args.reps)
        print(format_host(rows))
    else:
        from fastbn.bench.plan import format_plan, plan_rows

        if args.shape:
            points = restyle(grid(args.shape, dtypes=("bf16",)), args.dtypes, args.layouts,
                             args.fusion)
            suite = "custom"
        else:
            suite = args.suite or "quick"
            points = restyle(SUITES[suite].points, args.dtypes, args.layouts, args.fusion)
        meta = _meta(argv, f"plan-{suite}", device, ["planned on meta tensors: nothing ran"])
        rows = plan_rows(points)
        print(format_plan(rows))
    if args.out is not None:
        print(f"\nwrote {_save(args.out, meta, rows)}")
    return 0
