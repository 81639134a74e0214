"""The package as users and CI meet it: the README's commands, CI's script, the names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def declared_minimum(requirement: str) -> str:
    """The version after ``>=`` in pyproject's dependency on ``requirement``."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{requirement}>=([0-9.]+)', text)
    assert match, f"pyproject.toml declares no minimum for {requirement}"
    return match.group(1)


def test_ci_second_leg_runs_the_oldest_triton_pyproject_declares():
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^OLDEST_TRITON=([0-9.]+)", ci, re.M)
    assert match, ".ci/run names no OLDEST_TRITON"
    assert match.group(1).startswith(declared_minimum("triton")), (
        f".ci/run tests triton {match.group(1)}, pyproject declares >= "
        f"{declared_minimum('triton')}"
    )


def test_readme_names_the_tested_versions():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Tested versions", 1)
    assert len(section) == 2, "README has no 'Tested versions' section"
    for requirement in ("torch", "triton"):
        assert f"{requirement} {declared_minimum(requirement)}" in section[1], requirement


def test_installed_versions_meet_the_declared_minimums():
    import torch
    import triton

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    assert release(torch.__version__) >= release(declared_minimum("torch"))
    assert release(triton.__version__) >= release(declared_minimum("triton"))


@pytest.mark.parametrize("triton_version,numpy_version,needed", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.5.2", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.5.2", False), ("3.9.0", "2.4.6", False), ("3.6.0rc1", "2.4.0", True),
])
def test_interpreter_shim_applies_to_triton_before_3_7_with_numpy_2_4_on(
    triton_version, numpy_version, needed
):
    from triton_compat import needs_index_shim

    assert needs_index_shim(triton_version, numpy_version) is needed


GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


def gpu_check_selection(name: str) -> list[str]:
    """The words of one pytest selection variable in bench/gpu_check.sh."""
    match = re.search(rf'^{name}="([^"]+)"', GPU_CHECK.read_text(), re.M)
    assert match, f"bench/gpu_check.sh defines no {name}"
    return match.group(1).split()


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("selection", ["KERNEL_TESTS", "REST_TESTS"])
def test_gpu_check_pytest_selections_collect_without_a_gpu(selection):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *gpu_check_selection(selection)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ tests? collected", result.stdout), result.stdout[-2000:]


def test_gpu_check_fallback_layout_imports_the_kernels(tmp_path):
    """Without an editable install the script runs fastbn from the working tree, with
    kernels/ linked in as fastbn/kernels."""
    shutil.copytree(ROOT / "fastbn", tmp_path / "fastbn")
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    script = GPU_CHECK.read_text()
    link = re.search(r"\[ -e fastbn/kernels \] \|\| (ln -s \S+ \S+)", script)
    assert link, "bench/gpu_check.sh has no fallback link for fastbn/kernels"
    subprocess.run(link.group(1).split(), cwd=tmp_path, check=True)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    code = ("import sys; sys.path.insert(0, ''); import fastbn, fastbn.kernels.forward, "
            "fastbn.launch; print(fastbn.__file__)")
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(tmp_path))

