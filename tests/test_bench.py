"""python -m fastbn.bench: the bytes model, the suites, the check, arguments, the JSON file."""

import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastbn
from fastbn.bench.cli import build_parser, choose_points, main
from fastbn.bench.model import (
    FUSE_LEVELS,
    SmallResNet,
    measure_model_step,
    model_json,
    model_table,
)
from fastbn.bench.modes import MODES, make_step
from fastbn.bench.problem import TOLERANCE, make_inputs, relative_error, truth
from fastbn.bench.providers import (
    ApexProvider,
    CompiledProvider,
    FunctionalProvider,
    unfused_batch_norm,
)
from fastbn.bench.report import geomean_speedups, summary, table
from fastbn.bench.runner import Row, Settings, run
from fastbn.bench.shapes import (
    FUSIONS,
    SUITES,
    Point,
    parse_shape,
    r3d18_bn_inputs,
    resnet50_bn_inputs,
    resnet50_bn_layers,
)
from fastbn.bench.timing import time_cpu
from fastbn.bench.traffic import PASSES_PER_ELEMENT, compulsory_bytes

TINY = Point((4, 3, 5, 5), "fp32", "nchw")
TORCH = FunctionalProvider("torch", F.batch_norm, unfused_batch_norm)
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
    ("fusion", "mode", "passes"),
    [
        ("none", "forward-train", 2), ("none", "forward-eval", 2), ("none", "backward", 3),
        ("none", "forward-backward", 5),
        ("relu", "forward-train", 2), ("relu", "forward-eval", 2), ("relu", "backward", 3),
        ("relu", "forward-backward", 5),
        ("add_relu", "forward-train", 3), ("add_relu", "forward-eval", 3),
        ("add_relu", "backward", 4), ("add_relu", "forward-backward", 7),
    ],
)
def test_bytes_model_counts_compulsory_passes_over_x(fusion, mode, passes):
    for element_size in (2, 4):
        assert compulsory_bytes(mode, fusion, 1000, element_size) == passes * 1000 * element_size


def test_bytes_model_covers_exactly_the_fusions_and_modes():
    assert set(PASSES_PER_ELEMENT) == set(FUSIONS)
    assert all(set(per_mode) == set(MODES) for per_mode in PASSES_PER_ELEMENT.values())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_bytes_model_forward_backward_is_forward_plus_backward(fusion):
    passes = PASSES_PER_ELEMENT[fusion]
    assert passes["forward-backward"] == passes["forward-train"] + passes["backward"]


# --- suites ---------------------------------------------------------------------------------


def test_resnet50_has_53_batchnorms_with_12_distinct_shapes():
    layers = resnet50_bn_inputs(32)
    assert len(layers) == 53
    assert len(set(layers)) == 12


def test_resnet50_suite_has_the_known_shapes_at_batch_32_and_256():
    shapes = {point.shape for point in SUITES["resnet50"].points if point.fusion == "none"}
    assert len(shapes) == 24
    for batch in (32, 256):
        assert (batch, 64, 112, 112) in shapes  # stem
        assert (batch, 128, 56, 56) in shapes  # layer2 block 0 bn1: stride is on conv2
        assert (batch, 2048, 7, 7) in shapes
    assert (32, 128, 14, 14) not in shapes


def test_resnet50_suite_has_its_plain_points_in_every_dtype_and_layout():
    plain = [point for point in SUITES["resnet50"].points if point.fusion == "none"]
    assert len(plain) == 24 * 3 * 2


def test_resnet50_layers_are_followed_by_relu_add_relu_or_nothing():
    fusions = [fusion for _, fusion in resnet50_bn_layers(32)]
    # the stem and 16 Bottlenecks' bn1 and bn2; 16 bn3; 4 downsample bns
    assert (fusions.count("relu"), fusions.count("add_relu"), fusions.count("none")) == (
        33, 16, 4
    )
    assert [shape for shape, _ in resnet50_bn_layers(32)] == resnet50_bn_inputs(32)


@pytest.mark.parametrize(
    ("fusion", "chw"),
    [
        ("relu", {(64, 112, 112), (64, 56, 56), (128, 56, 56), (128, 28, 28), (256, 28, 28),
                  (256, 14, 14), (512, 14, 14), (512, 7, 7)}),
        ("add_relu", {(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)}),
    ],
)
def test_resnet50_suite_has_fused_rows_where_resnet50_fuses(fusion, chw):
    points = [point for point in SUITES["resnet50"].points if point.fusion == fusion]
    assert {point.shape for point in points} == {
        (batch, *size) for batch in (32, 256) for size in chw
    }
    assert {(point.dtype, point.layout) for point in points} == {
        (dtype, layout) for dtype in ("fp16", "bf16") for layout in ("nchw", "channels_last")
    }
    assert len(points) == len(chw) * 2 * 2 * 2


def test_resnet50_suite_point_count():
    assert len(SUITES["resnet50"].points) == 24 * 3 * 2 + (8 + 4) * 2 * 2 * 2


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


def test_quick_suite_is_14_points_covering_every_dtype_layout_rank_and_fusion():
    points = SUITES["quick"].points
    assert len(points) == 14
    assert {p.dtype for p in points} == {"fp32", "fp16", "bf16"}
    assert {p.layout for p in points} == {"nchw", "channels_last"}
    assert {len(p.shape) for p in points} == {2, 4, 5}
    assert sorted(p.fusion for p in points if p.fusion != "none") == ["add_relu", "relu"]


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


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_mode_of_every_fusion_is_checked_then_timed(fusion, layout):
    fastbn_provider = FunctionalProvider("fastbn", fastbn.batch_norm, fastbn.batch_norm)
    rows = run([Point((4, 3, 5, 5), "fp32", layout, fusion)], MODES, [fastbn_provider, TORCH],
               CPU_SETTINGS)
    assert [(row.provider, row.mode, row.status) for row in rows] == [
        (name, mode, "ok") for name in ("fastbn", "torch") for mode in MODES
    ]
    assert all(row.fusion == fusion for row in rows)


@pytest.mark.parametrize(("fusion", "grads"), [
    ("none", {"grad_input", "grad_weight", "grad_bias"}),
    ("relu", {"grad_input", "grad_weight", "grad_bias"}),
    ("add_relu", {"grad_input", "grad_weight", "grad_bias", "grad_residual"}),
])
def test_gradient_modes_return_the_gradient_of_every_input(fusion, grads):
    inputs = make_inputs(Point((4, 3, 5, 5), "fp32", "nchw", fusion), torch.device("cpu"))
    assert set(make_step("backward", TORCH.bind, inputs)()) == grads
    assert set(make_step("forward-backward", TORCH.bind, inputs)()) == grads | {
        "y_train", "running_mean", "running_var"
    }
    assert grads <= set(truth(inputs, ("backward",)).values)


def test_provider_that_drops_the_residual_is_not_timed():
    def no_residual(*args, residual=None, activation=None):
        return unfused_batch_norm(*args, activation=activation)

    rows = run([Point((4, 3, 5, 5), "fp32", "nchw", "add_relu")], MODES,
               [FunctionalProvider("dropped", F.batch_norm, no_residual)], CPU_SETTINGS)
    # y is wrong; and z, unused, has no gradient to ask for
    assert [row.status for row in rows] == ["wrong", "wrong", "error", "error"]
    assert all(row.median_ms is None for row in rows)


def test_provider_whose_backward_skips_the_relu_is_wrong_in_the_gradient_modes_only():
    def straight_through(*args, residual=None, activation=None):
        u = unfused_batch_norm(*args, residual=residual)
        return u + (F.relu(u) - u).detach()

    rows = run([Point((4, 3, 5, 5), "fp32", "nchw", "relu")], MODES,
               [FunctionalProvider("straight", F.batch_norm, straight_through)], CPU_SETTINGS)
    assert [row.status for row in rows] == ["ok", "ok", "wrong", "wrong"]


def test_residual_gradient_is_checked():
    def half_residual_gradient(*args, residual=None, activation=None):
        half = 0.5 * residual
        return unfused_batch_norm(*args, residual=half + half.detach(), activation=activation)

    rows = run([Point((4, 3, 5, 5), "fp32", "nchw", "add_relu")], MODES,
               [FunctionalProvider("half", F.batch_norm, half_residual_gradient)], CPU_SETTINGS)
    assert [row.status for row in rows] == ["ok", "ok", "wrong", "wrong"]


def test_relu_kink_is_judged_on_the_providers_side():
    # torch eager rounds BN(x) to bf16 before adding z, so some u near 0 change sign, and
    # with them a whole dy in dx and dz: wrong against the truth's side, right on its own.
    inputs = make_inputs(Point((8, 32, 16, 16), "bf16", "channels_last", "add_relu"),
                         torch.device("cpu"))
    expected = truth(inputs, ("forward-backward",))
    outputs = make_step("forward-backward", TORCH.bind, inputs)()
    assert relative_error(outputs, expected.values) > TOLERANCE["bf16"]
    assert relative_error(outputs, expected.values_for(outputs)) <= TOLERANCE["bf16"]


def test_kink_leaves_a_wrong_relu_gradient_wrong():
    def leaky_gradient(*args, residual=None, activation=None):
        u = unfused_batch_norm(*args, residual=residual)
        return F.relu(u) + 0.5 * (u - u.detach()) * (u <= 0)

    inputs = make_inputs(Point((8, 32, 16, 16), "bf16", "channels_last", "add_relu"),
                         torch.device("cpu"))
    expected = truth(inputs, ("backward",))
    outputs = make_step("backward", FunctionalProvider("leaky", F.batch_norm, leaky_gradient)
                        .bind, inputs)()
    assert relative_error(outputs, expected.values_for(outputs)) > 0.1


def test_provider_without_fusions_gets_no_rows_on_fused_points():
    points = [TINY, Point((4, 3, 5, 5), "fp32", "nchw", "relu")]
    rows = run(points, ("forward-eval",),
               [TORCH, FunctionalProvider("plain", F.batch_norm)], CPU_SETTINGS)
    assert [(row.provider, row.fusion) for row in rows] == [
        ("torch", "none"), ("plain", "none"), ("torch", "relu")
    ]


def test_provider_that_raises_is_marked_error_and_the_run_goes_on():
    def broken(*args):
        raise RuntimeError("no kernel for this")

    providers = [FunctionalProvider("broken", broken), FunctionalProvider("torch", F.batch_norm)]
    rows = run([TINY], ("forward-eval",), providers, CPU_SETTINGS)
    assert [row.status for row in rows] == ["error", "ok"]
    assert rows[0].message == "RuntimeError: no kernel for this"


def speedup_row(provider, mode, speedup, shape=(2, 3), fusion="none"):
    return Row(shape, "fp32", "nchw", fusion, mode, provider, "ok", 0, median_ms=speedup,
               fastbn_speedup=speedup)


def test_speedup_is_the_baseline_time_over_fastbns_and_geomean_multiplies():
    rows = [speedup_row("torch", "backward", 2.0), speedup_row("torch", "backward", 8.0, (4, 3))]
    means = geomean_speedups(rows)
    assert means["torch"]["none"]["backward"] == {"speedup": pytest.approx(4.0), "n": 2}
    assert means["torch"]["all"]["all"]["n"] == 2


def test_geomean_is_taken_per_fusion_and_over_all_fusions():
    rows = [speedup_row("torch", "backward", 2.0), speedup_row("torch", "backward", 8.0),
            speedup_row("torch", "backward", 3.0, fusion="relu"),
            speedup_row("torch", "forward-train", 1.0, fusion="add_relu")]
    means = geomean_speedups(rows)["torch"]
    assert list(means) == ["none", "relu", "add_relu", "all"]
    assert means["none"]["backward"]["speedup"] == pytest.approx(4.0)
    assert means["relu"]["all"] == {"speedup": pytest.approx(3.0), "n": 1}
    assert means["all"]["backward"] == {"speedup": pytest.approx(48 ** (1 / 3)), "n": 3}
    lines = summary(geomean_speedups(rows)).splitlines()
    assert [line.split()[3] for line in lines[2:]] == ["none", "relu", "add_relu", "all"]


def test_summary_of_one_fusion_has_one_line_per_baseline():
    rows = [speedup_row("torch", "backward", 2.0, fusion="relu"),
            speedup_row("compile", "backward", 3.0, fusion="relu")]
    lines = summary(geomean_speedups(rows)).splitlines()
    assert len(lines) == 2 + 2
    assert all(" relu " in line for line in lines[2:])


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
        (["--fusion", "gelu"], "unknown fusion"),
        (["--fusion", "relu,add"], "unknown fusion 'add'"),
        (["--fusion", ","], "unknown fusion"),
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
    assert document["schema"] == "fastbn.bench/2"
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
    assert {row["fusion"] for row in rows} == {"none"}
    assert all(row["status"] == "ok" for row in rows)
    assert all(row["fastbn_speedup"] > 0 for row in rows if row["provider"] == "torch")
    assert "vs torch" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "fusions"),
    [
        (["--shape", "4,3,5,5"], {"none"}),
        (["--shape", "4,3,5,5", "--fusion", "relu,add_relu"], {"relu", "add_relu"}),
        (["--suite", "quick", "--fusion", "add_relu"], {"add_relu"}),
        (["--suite", "quick"], set(FUSIONS)),
    ],
)
def test_fusion_flag_replaces_each_points_fusion(args, fusions):
    parser = build_parser()
    _, points = choose_points(parser, parser.parse_args(args), "cuda")
    assert {point.fusion for point in points} == fusions
    if "--fusion" in args:
        unfused = choose_points(parser, parser.parse_args(args[:2]), "cuda")[1]
        assert len(points) == len({(p.shape, p.dtype, p.layout) for p in unfused}) * len(
            fusions
        )


def test_fused_run_on_cpu_checks_every_provider_and_writes_the_fusion(tmp_path, capsys):
    args = ["--shape", "2,8,6,6", "--fusion", "relu,add_relu", "--reps", "2", "--warmup", "0",
            "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("custom-*.json")
    document = json.loads(path.read_text())
    rows = document["rows"]
    assert len(rows) == 2 * 2 * len(MODES) * len(document["providers"])  # fusions x layouts
    assert {row["provider"] for row in rows} == set(document["providers"])
    assert all(row["status"] == "ok" for row in rows), [r for r in rows if r["status"] != "ok"]
    assert {row["fusion"] for row in rows} == {"relu", "add_relu"}
    assert set(document["geomean_speedup"]["torch"]) == {"relu", "add_relu", "all"}
    out = capsys.readouterr().out
    assert "fusion" in out.splitlines()[out.splitlines().index("") + 1]
    assert "add_relu" in out


@pytest.mark.slow
def test_compile_provider_runs_every_fusion():
    points = [Point((2, 8, 6, 6), "bf16", "channels_last", fusion) for fusion in FUSIONS]
    rows = run(points, MODES, [CompiledProvider()], CPU_SETTINGS)
    assert [(row.fusion, row.status) for row in rows] == [
        (fusion, "ok") for fusion in FUSIONS for _ in MODES
    ], [row.message for row in rows]


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


# --- the model step ---------------------------------------------------------------------------


def test_graph_fused_model_computes_each_relu_and_residual_in_its_batchnorm_layer():
    """fastbn.convert(SmallResNet(), fuse="graph"), what the model step times at "graph":
    13 of its 15 BatchNorm2d layers take their ReLU (all but the two blocks' bn2 whose
    add goes into the strided shortcut's BN), 6 the residual too (every block's add)."""
    model = fastbn.convert(SmallResNet(), fuse="graph")
    layers = [m for m in model.modules() if isinstance(m, fastbn.BatchNorm2d)]
    assert len(layers) == 15
    assert sum(layer.activation == "relu" for layer in layers) == 13
    residual_calls = [node for node in model.graph.nodes if "residual" in node.kwargs]
    assert len(residual_calls) == 6


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
def test_model_step_times_each_fuse_level_against_torch_after_the_float64_check(fuse):
    step = measure_model_step(1, False, fuse, warmup=0, reps=1)
    assert (step.threads, step.layout, step.fuse) == (1, "nchw", fuse)
    assert step.torch_ms > 0 and step.fastbn_ms > 0
    assert step.speedup == pytest.approx(step.torch_ms / step.fastbn_ms)
    assert step.ok, (step.torch_error, step.fastbn_error)
    assert f"fuse={fuse}" in model_table([step])
    assert model_json([step])[0]["fuse"] == fuse
