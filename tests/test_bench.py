"""python -m fastbn.bench: the bytes model, the suites, the check, arguments, the JSON file."""

import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastbn.bench.cli import main
from fastbn.bench.modes import MODES
from fastbn.bench.providers import ApexProvider, FunctionalProvider
from fastbn.bench.report import geomean_speedups, table
from fastbn.bench.runner import Row, Settings, run
from fastbn.bench.shapes import (
    SUITES,
    Point,
    parse_shape,
    r3d18_bn_inputs,
    resnet50_bn_inputs,
)
from fastbn.bench.timing import time_cpu
from fastbn.bench.traffic import PASSES_PER_ELEMENT, compulsory_bytes

TINY = Point((4, 3, 5, 5), "fp32", "nchw")
CPU_SETTINGS = Settings(torch.device("cpu"), time_cpu, warmup=0, reps=2, copy_gbps=10.0)


def torchvision_module(name: str):
    """A torchvision module, or a skip when torchvision is missing or built for another torch."""
    try:
        return importlib.import_module(name)
    except Exception as error:
        pytest.skip(f"torchvision is not usable here: {type(error).__name__}: {error}")


def bn_input_shapes(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The input shape of every BatchNorm layer of ``model`` on ``x``, in call order."""
    seen: list[tuple[int, ...]] = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.eval()(x)
    return seen


# --- bytes model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "passes"),
    [("forward-train", 2), ("forward-eval", 2), ("backward", 3), ("forward-backward", 5)],
)
def test_bytes_model_counts_compulsory_passes_over_x(mode, passes):
    for element_size in (2, 4):
        assert compulsory_bytes(mode, 1000, element_size) == passes * 1000 * element_size


def test_bytes_model_covers_exactly_the_modes():
    assert set(PASSES_PER_ELEMENT) == set(MODES)


# --- suites ---------------------------------------------------------------------------------


def test_resnet50_has_53_batchnorms_with_12_distinct_shapes():
    layers = resnet50_bn_inputs(32)
    assert len(layers) == 53
    assert len(set(layers)) == 12


def test_resnet50_suite_has_the_known_shapes_at_batch_32_and_256():
    shapes = {point.shape for point in SUITES["resnet50"].points}
    assert len(shapes) == 24
    for batch in (32, 256):
        assert (batch, 64, 112, 112) in shapes  # stem
        assert (batch, 128, 56, 56) in shapes  # layer2 block 0 bn1: stride is on conv2
        assert (batch, 2048, 7, 7) in shapes
    assert (32, 128, 14, 14) not in shapes


def test_resnet50_suite_has_every_dtype_and_layout():
    assert len(SUITES["resnet50"].points) == 24 * 3 * 2


def test_resnet50_shapes_match_torchvision():
    models = torchvision_module("torchvision.models")
    measured = bn_input_shapes(models.resnet50(), torch.zeros(1, 3, 224, 224))
    assert measured == resnet50_bn_inputs(1)


def test_r3d18_has_20_batchnorms_with_4_distinct_shapes():
    layers = r3d18_bn_inputs(8)
    assert len(layers) == 20
    assert list(dict.fromkeys(layers)) == [
        (8, 64, 16, 56, 56), (8, 128, 8, 28, 28), (8, 256, 4, 14, 14), (8, 512, 2, 7, 7),
    ]


def test_r3d18_shapes_match_torchvision():
    video = torchvision_module("torchvision.models.video")
    measured = bn_input_shapes(video.r3d_18(), torch.zeros(1, 3, 16, 112, 112))
    assert measured == r3d18_bn_inputs(1)


def test_bn1d_suite_spans_1024x256_to_65536x4096_in_one_layout():
    points = SUITES["bn1d"].points
    shapes = [point.shape for point in points]
    assert min(shapes) == (1024, 256) and max(shapes) == (65536, 4096)
    assert {point.layout for point in points} == {"nchw"}
    assert len(points) == len(set(shapes)) * 3


def test_quick_suite_is_a_dozen_points_covering_every_dtype_layout_and_rank():
    points = SUITES["quick"].points
    assert len(points) == 12
    assert {p.dtype for p in points} == {"fp32", "fp16", "bf16"}
    assert {p.layout for p in points} == {"nchw", "channels_last"}
    assert {len(p.shape) for p in points} == {2, 4, 5}


def test_only_the_cpu_suite_runs_without_a_gpu():
    assert [name for name, suite in SUITES.items() if not suite.for_gpu] == ["cpu"]


@pytest.mark.parametrize(
    ("text", "shape"),
    [("256,1024", (256, 1024)), ("8,64,16,56,56", (8, 64, 16, 56, 56)), ("32x64x56x56",
                                                                           (32, 64, 56, 56))],
)
def test_parse_shape_reads_ranks_2_to_5(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["32", "1,2,3,4,5,6", "32,a", "32,0,4", "", "1,64"])
def test_parse_shape_rejects_bad_shapes(text):
    with pytest.raises(ValueError, match="bad shape"):
        parse_shape(text)


# --- the check ------------------------------------------------------------------------------


def test_every_mode_of_a_correct_provider_is_checked_then_timed():
    rows = run([TINY], MODES, [FunctionalProvider("torch", F.batch_norm)], CPU_SETTINGS)
    assert [(row.mode, row.status) for row in rows] == [(mode, "ok") for mode in MODES]
    assert all(row.median_ms > 0 and row.reps == 2 for row in rows)


def test_provider_with_a_wrong_output_is_marked_wrong_and_not_timed():
    def halved(*args):
        return 0.5 * F.batch_norm(*args)

    rows = run([TINY], MODES, [FunctionalProvider("halved", halved)], CPU_SETTINGS)
    for row in rows:
        assert row.status == "wrong", row
        assert row.median_ms is None
        assert row.error > 0.1
        assert "float64 truth" in row.message


def test_provider_that_skips_the_running_stat_update_is_wrong_in_forward_train_only():
    def frozen_stats(x, running_mean, running_var, *rest):
        return F.batch_norm(x, running_mean.clone(), running_var.clone(), *rest)

    rows = run([TINY], ("forward-train", "forward-eval"),
               [FunctionalProvider("frozen", frozen_stats)], CPU_SETTINGS)
    assert [row.status for row in rows] == ["wrong", "ok"]


def test_provider_that_raises_is_marked_error_and_the_run_goes_on():
    def broken(*args):
        raise RuntimeError("no kernel for this")

    providers = [FunctionalProvider("broken", broken), FunctionalProvider("torch", F.batch_norm)]
    rows = run([TINY], ("forward-eval",), providers, CPU_SETTINGS)
    assert [row.status for row in rows] == ["error", "ok"]
    assert rows[0].message == "RuntimeError: no kernel for this"


def test_speedup_is_the_baseline_time_over_fastbns_and_geomean_multiplies():
    def row(provider, mode, ms, shape=(2, 3)):
        return Row(shape, "fp32", "nchw", mode, provider, "ok", 0, median_ms=ms,
                   fastbn_speedup=None if provider == "fastbn" else ms)

    rows = [row("torch", "backward", 2.0), row("torch", "backward", 8.0, (4, 3))]
    means = geomean_speedups(rows)
    assert means["torch"]["backward"] == {"speedup": pytest.approx(4.0), "n": 2}
    assert means["torch"]["all"]["n"] == 2


def test_table_marks_rows_that_were_not_timed():
    rows = run([TINY], ("forward-eval",), [
        FunctionalProvider("fastbn", lambda *args: 2 * F.batch_norm(*args)),
        FunctionalProvider("torch", F.batch_norm),
    ], CPU_SETTINGS)
    text = table(rows, ["fastbn", "torch"])
    assert "WRONG" in text and "vs torch" in text


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "nosuch"], "invalid choice"),
        (["--shape", "32,x,4"], "bad shape"),
        (["--shape", "5"], "bad shape"),
        (["--modes", "sideways"], "unknown mode"),
        (["--dtypes", "fp8"], "unknown dtype"),
        (["--providers", "fastbn,cudnn9"], "unknown provider"),
        (["--layouts", "nhwc"], "unknown layout"),
        (["--suite", "cpu", "--shape", "4,4"], "not allowed with"),
    ],
)
def test_argument_errors_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_sized_suite_is_refused_on_cpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "resnet50"])
    assert exit_info.value.code == 2
    assert "sized for a GPU" in capsys.readouterr().err


def test_json_file_has_the_run_metadata_and_long_format_rows(tmp_path, capsys):
    args = ["--shape", "4,3,5,5", "--shape", "6,5", "--dtypes", "fp32",
            "--providers", "fastbn,torch", "--reps", "2", "--warmup", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("custom-*.json")
    document = json.loads(path.read_text())
    assert document["schema"] == "fastbn.bench/1"
    assert document["command"] == "python -m fastbn.bench " + " ".join(args)
    assert {"date", "suite", "device", "versions", "copy_bandwidth", "notes", "rows"} <= set(
        document
    )
    assert {"python", "torch", "triton", "fastbn", "cuda"} <= set(document["versions"])
    assert document["device"]["name"]
    assert document["copy_bandwidth"]["gbps"] > 0
    rows = document["rows"]
    # 4-D: two layouts; 2-D: one. Each (point, mode, provider) is one flat row.
    assert len(rows) == 3 * len(MODES) * 2
    assert all(set(row) == {f.name for f in dataclasses.fields(Row)} for row in rows)
    keys = {(tuple(r["shape"]), r["layout"], r["mode"], r["provider"]) for r in rows}
    assert len(keys) == len(rows)
    assert all(row["status"] == "ok" for row in rows)
    assert all(row["fastbn_speedup"] > 0 for row in rows if row["provider"] == "torch")
    assert "vs torch" in capsys.readouterr().out


def test_plot_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    args = ["--shape", "4,3,5,5", "--dtypes", "fp32", "--modes", "forward-eval",
            "--providers", "fastbn,torch", "--reps", "2", "--warmup", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    assert len(list(tmp_path.glob("custom-*.png"))) == 1


def test_python_m_fastbn_bench_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastbn.bench", "--shape", "8,4,6,6", "--modes",
         "forward-train,backward", "--providers", "fastbn,torch", "--reps", "2", "--warmup",
         "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("custom-*.json"))) == 1
    if not torch.cuda.is_available():
        assert result.stdout.startswith("NO CUDA GPU")
    assert "geometric mean" in result.stdout


class ApexLikeBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """apex.parallel.SyncBatchNorm's interface: with channel_last, channels are the last dim."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, channel_last=False):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.channel_last = channel_last

    def forward(self, x):
        channel_last = self.channel_last or x.dim() == 2
        assert not channel_last or (x.is_contiguous() and x.shape[-1] == self.num_features)
        x = x.contiguous().movedim(-1, 1) if channel_last else x.contiguous()
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return y.movedim(1, -1) if channel_last else y


@pytest.mark.parametrize(
    "point",
    [TINY, Point((4, 3, 5, 5), "fp32", "channels_last"), Point((2, 3, 2, 4, 4), "fp32",
                                                              "channels_last"),
     Point((6, 5), "fp32", "nchw")],
)
def test_apex_provider_passes_channels_last_input_as_channels_innermost(point):
    rows = run([point], MODES, [ApexProvider(ApexLikeBatchNorm)], CPU_SETTINGS)
    assert [row.status for row in rows] == ["ok"] * len(MODES), rows
