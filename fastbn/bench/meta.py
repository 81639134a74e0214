"""What every result file of the bench records first: the command, date, suite, device and
package versions (the suites', ``--plan``'s and ``--suite host``'s alike)."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
from pathlib import Path

import torch

import fastbn


def run_meta(argv: list[str], suite: str, device: torch.device) -> dict:
    """{command, date, suite, device, versions} of a run of ``python -m fastbn.bench argv``."""
    return {
        "command": shlex.join(["python", "-m", "fastbn.bench", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "suite": suite,
        "device": {"type": device.type, "name": device_name(device)},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "fastbn": fastbn.__version__,
            "cuda": torch.version.cuda,
        },
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name where the system says it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
