"""The package as users and CI meet it: the README's commands, CI's script, the names."""

from __future__ import annotations

import re
from pathlib import Path

import fastbn

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The shell commands in the README's bash blocks."""
    text = (ROOT / "README.md").read_text()
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    test_commands = [c for c in readme_commands() if "pytest" in c]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0] in ci_lines


def test_readme_runs_the_benchmark():
    assert any("python -m fastbn.bench" in c and "pip install" in c for c in readme_commands())


def test_kernels_are_installed_as_fastbn_kernels():
    import fastbn.kernels.forward

    assert Path(fastbn.kernels.forward.__file__).parent.name == "kernels"


def test_package_ships_py_typed():
    assert (Path(fastbn.__file__).parent / "py.typed").exists()


def test_public_names_are_the_designed_ones():
    designed = {"BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm",
                "use_backend", "convert", "revert", "SyncBatchNorm"}
    assert set(fastbn.__all__) <= designed
    assert {"BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm",
            "use_backend"} <= set(fastbn.__all__)
    for name in fastbn.__all__:
        assert getattr(fastbn, name) is not None
