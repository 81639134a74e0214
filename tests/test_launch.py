"""The launch plans, without running a kernel: how many launches a call makes and nothing
else, that they go to the tensors' device, and that every grid is one CUDA accepts for
any shape torch accepts."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import fastbn
from fastbn import launch

pytestmark = pytest.mark.skipif(
    bool(fastbn.backend.triton_problem()), reason="the Triton kernels cannot run here"
)

# aten ops that would be device work besides the planned launches (fills, copies, math).
DEVICE_WORK = ("fill", "zero", "copy", "add", "mul", "div", "sub", "clone", "contiguous")


class AtenOps(TorchDispatchMode):
    """Records the names of the aten ops that run inside and produce elements (an op on
    empty tensors is no device work)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(t, torch.Tensor) and t.numel() > 0 for t in results):
            self.names.append(func.__name__)
        return out


def device_work(names):
    return [name for name in names if any(word in name for word in DEVICE_WORK)]


def module_step(x, training=True, backward=True, **kwargs):
    """Launches and aten ops of one fastbn.BatchNorm2d call (and its backward), after one
    call that allocated the (then cached) ticket counters."""
    _module_step(x, training, backward, **kwargs)
    return _module_step(x, training, backward, **kwargs)


def _module_step(x, training, backward, **kwargs):
    bn = fastbn.BatchNorm2d(x.shape[1], **kwargs).to(x.device).train(training)
    leaf = x.clone().requires_grad_(backward)
    grad = torch.randn_like(x)
    with fastbn.use_backend("triton"), launch.recording() as records:
        with AtenOps() as forward_ops:
            y = bn(leaf)
        with AtenOps() as backward_ops:
            if backward:
                torch.autograd.grad(y, [leaf, bn.weight, bn.bias], grad)
    return records, forward_ops.names, backward_ops.names


ONE_LAUNCH = ["slice_backward_kernel"]
TWO_LAUNCHES = ["partial_grad_sums_kernel", "grad_input_kernel"]
ONE_LAUNCH_FORWARD = ["slice_forward_kernel"]
TWO_LAUNCH_FORWARD = ["partial_stats_kernel", "normalize_kernel"]


@pytest.mark.parametrize(
    "shape,layout,forward,backward",
    [((4, 3, 8, 8), "contiguous", ONE_LAUNCH_FORWARD, ONE_LAUNCH),
     ((16, 3, 33, 33), "contiguous", TWO_LAUNCH_FORWARD, TWO_LAUNCHES),  # chunked sums
     ((4, 64, 7, 7), "contiguous", ONE_LAUNCH_FORWARD, ONE_LAUNCH),
     ((129, 43, 7, 7), "contiguous", TWO_LAUNCH_FORWARD, TWO_LAUNCHES),  # flat d input
     ((8, 5, 6, 6), "channels_last", ONE_LAUNCH_FORWARD, ONE_LAUNCH),
     ((8, 5, 40, 40), "channels_last", TWO_LAUNCH_FORWARD, TWO_LAUNCHES)],
    ids=["one_chunk", "chunked", "flat_slice", "flat", "channels_last_slice",
         "channels_last"])
def test_training_step_is_at_most_two_launches_forward_and_two_backward(shape, layout,
                                                                        forward, backward):
    """One launch each way where a channel block's slice fits one program."""
    x = torch.randn(shape, device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    records, forward_ops, backward_ops = module_step(x)
    kernels = [planned.kernel for planned, _, _ in records]
    assert kernels == [*forward, *backward]
    # num_batches_tracked is counted by the statistics launch; the backward fills nothing.
    assert device_work(forward_ops) == [] and device_work(backward_ops) == []


def backward_kernels(shape, dtype, layout="nchw", fusion="none"):
    """The kernels of a training backward of a module with this input, planned on meta
    tensors (fastbn.bench's --plan)."""
    from fastbn.bench.plan import point_launches
    from fastbn.bench.shapes import Point

    return [planned.kernel
            for planned in point_launches(Point(shape, dtype, layout, fusion))["backward"]]


@pytest.mark.parametrize(
    "shape,dtype,layout,fusion,expected",
    [
        # A channel's whole (N, S) slice, padded to powers of two, fits one program.
        ((32, 2048, 7, 7), "bf16", "nchw", "none", ONE_LAUNCH),
        ((32, 2048, 7, 7), "bf16", "nchw", "relu", ONE_LAUNCH),
        ((32, 1024, 14, 14), "bf16", "nchw", "none", ONE_LAUNCH),  # 32 x 256: the limit
        ((32, 512, 7, 7), "bf16", "nchw", "add_relu", ONE_LAUNCH),  # activation bits
        ((256, 4096), "bf16", "nchw", "none", ONE_LAUNCH),  # BatchNorm1d: 8 channels x 256
        ((256, 4096), "fp32", "nchw", "none", ONE_LAUNCH),
        # Too large a slice: sums, then d input.
        ((32, 1024, 14, 14), "bf16", "nchw", "add_relu", TWO_LAUNCHES),  # a third stream
        ((32, 512, 28, 28), "bf16", "nchw", "none", TWO_LAUNCHES),
        ((256, 2048, 7, 7), "bf16", "nchw", "none", TWO_LAUNCHES),
        # channels_last: 8 bf16 channels (a 16-byte run) x 32 * 49 positions do not fit.
        ((32, 2048, 7, 7), "bf16", "channels_last", "none", TWO_LAUNCHES),
    ],
    ids=str,
)
def test_backward_is_one_launch_where_a_slice_fits_one_program(shape, dtype, layout, fusion,
                                                                expected):
    assert backward_kernels(shape, dtype, layout, fusion) == expected


def train_forward_kernel(shape, dtype, layout="nchw", fusion="none"):
    """The kernel of the one-launch training forward of a module with this input (planned
    on meta tensors), or None where it takes the statistics launch and normalize."""
    x = torch.empty(shape, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                    device="meta")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = launch.geometry(x)
    residual = fusion == "add_relu"
    plan = launch.plan_train_forward(g, g, g if residual else None, x.dtype, True, True,
                                     "none" if fusion == "none" else "relu", residual, True,
                                     False, True)
    return None if plan is None else plan.launch.kernel


@pytest.mark.parametrize(
    "shape,dtype,layout,fusion,expected",
    [
        # The backward's rule: a channel's whole (N, S) slice fits one program.
        ((32, 2048, 7, 7), "bf16", "nchw", "none", "slice_forward_kernel"),
        ((32, 2048, 7, 7), "bf16", "nchw", "relu", "slice_forward_kernel"),
        ((32, 1024, 14, 14), "bf16", "nchw", "none", "slice_forward_kernel"),
        ((32, 512, 7, 7), "bf16", "nchw", "add_relu", "slice_forward_kernel"),  # bits
        ((256, 4096), "bf16", "nchw", "none", "slice_forward_kernel"),
        ((256, 4096), "fp32", "nchw", "none", "slice_forward_kernel"),
        ((32, 1024, 14, 14), "bf16", "nchw", "add_relu", None),  # a third stream
        ((32, 512, 28, 28), "bf16", "nchw", "none", None),
        ((256, 2048, 7, 7), "bf16", "nchw", "none", None),
        ((32, 2048, 7, 7), "bf16", "channels_last", "none", None),
        ((64, 8, 2, 2), "bf16", "nchw", "add_relu", None),  # rows shorter than a bits byte
    ],
    ids=str,
)
def test_training_forward_is_one_launch_where_a_slice_fits_one_program(shape, dtype, layout,
                                                                       fusion, expected):
    assert train_forward_kernel(shape, dtype, layout, fusion) == expected


@pytest.mark.parametrize("shape,forward", [((16, 3, 33, 33), TWO_LAUNCH_FORWARD),
                                           ((4, 3, 8, 8), ONE_LAUNCH_FORWARD)], ids=str)
def test_momentum_none_counts_the_step_in_the_same_launch(shape, forward):
    records, forward_ops, _ = module_step(torch.randn(shape, device=DEVICE), backward=False,
                                          momentum=None)
    assert [planned.kernel for planned, _, _ in records] == forward
    assert device_work(forward_ops) == []


def test_eval_forward_is_one_launch():
    records, forward_ops, _ = module_step(torch.randn(4, 3, 8, 8, device=DEVICE),
                                          training=False, backward=False)
    assert [planned.kernel for planned, _, _ in records] == ["normalize_kernel"]
    assert device_work(forward_ops) == []


def test_absent_tensors_travel_as_none():
    x = torch.randn(2, 3, 24, 24, device=DEVICE).to(memory_format=torch.channels_last)
    # (one chunk; too large a slice: 4 channels x 2048 padded positions)
    records, _, _ = module_step(x, affine=False, track_running_stats=False, backward=False)
    stats, normalize = records
    _, tensors, _ = stats
    assert tensors[1] is None and tensors[2] is None  # one chunk: no workspace, no tickets
    assert tensors[5:] == (None, None, None)  # running statistics, num_batches_tracked
    assert normalize[0].constexprs["HAS_WEIGHT"] is False and normalize[1][5] is None


def test_absent_tensors_travel_as_none_to_the_one_launch_forward():
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    records, _, _ = module_step(x, affine=False, track_running_stats=False, backward=False)
    ((planned, tensors, _),) = records
    assert planned.kernel == "slice_forward_kernel"
    # residual; running statistics, num_batches_tracked, tickets; weight, bias; bits
    assert tensors[2] is None and tensors[5:] == (None,) * 7
    assert planned.constexprs["HAS_WEIGHT"] is False


def test_plans_are_cached_per_call_signature():
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    module_step(x)
    setups = launch.train_forward_setup.cache_info().hits
    plans = launch.plan_train_forward.cache_info().misses
    module_step(torch.randn_like(x))
    # The call's setup (copies, stand-ins and plan) comes from the cache: nothing planned anew.
    assert launch.train_forward_setup.cache_info().hits > setups
    assert launch.plan_train_forward.cache_info().misses == plans


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    guard = launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch.device_guard(torch.device("cuda", 0)), contextlib.nullcontext)
    assert isinstance(launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_inside_its_tensors_device_guard(monkeypatch):
    """Each launcher asks for x's device around its launches (Triton then launches on
    that device's current stream)."""
    with launch.recording() as records:

        @contextlib.contextmanager
        def guard(device):
            records.append(("enter", device))
            yield
            records.append(("exit", device))

        monkeypatch.setattr(launch, "device_guard", guard)
        x = torch.randn(16, 3, 33, 33, device=DEVICE)
        bn = fastbn.BatchNorm2d(3, activation="relu").to(DEVICE)
        leaf = x.clone().requires_grad_(True)
        with fastbn.use_backend("triton"):
            y = bn(leaf)
            torch.autograd.grad(y, [leaf, bn.weight], torch.randn_like(x))
            bn.eval()(x)
    inside = None
    launches = 0
    for record in records:
        if record[0] == "enter":
            inside = record[1]
        elif record[0] == "exit":
            inside = None
        else:
            launches += 1
            assert inside == x.device, f"{record[0].kernel} launched outside the guard"
    assert launches == 5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_run_there():
    torch.cuda.set_device(0)
    x = torch.randn(8, 16, 14, 14, device="cuda:1", requires_grad=True)
    bn = fastbn.BatchNorm2d(16).to("cuda:1")
    reference = torch.nn.BatchNorm2d(16).to("cuda:1")
    with fastbn.use_backend("triton"):
        y = bn(x)
        (grad,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = reference(x)
    (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, grad_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(bn.running_var, reference.running_var)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launches_follow_the_current_stream():
    x = torch.randn(32, 64, 28, 28, device="cuda")
    expected = fastbn.batch_norm(x, None, None, training=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = fastbn.batch_norm(x, None, None, training=True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Grid limits
# ---------------------------------------------------------------------------------------------
HUGE = [
    ((2, 2**20, 32, 32), "contiguous"),  # C = 2**20 at S = 1024
    ((2, 2**20, 32, 32), "channels_last"),
    ((2, 2**20, 7, 7), "contiguous"),  # flat walk
    ((2**13, 2**20), "contiguous"),  # 2-D, C = 2**20
    ((2**23, 2, 1024), "contiguous"),  # N * S = 2**33
    ((2**24, 4, 16, 32), "channels_last"),
    ((2**33, 3), "contiguous"),
    ((1, 1, 2**33), "contiguous"),
]


@pytest.mark.parametrize("shape,layout", HUGE, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_grids_stay_within_cuda_limits_for_huge_shapes(shape, layout, dtype):
    x = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = launch.geometry(x)
    plans = [
        launch.plan_batch_stats(g, dtype, True, False, True).launch,
        launch.plan_normalize(g, g, g, dtype, dtype, True, True, "relu", False),
        launch.plan_normalize(g, g, None, dtype, None, True, True, "relu", True),
    ]
    backward = launch.plan_backward(g, g, g, g, g, dtype, True, True, "silu", False, True,
                                    True, True, True)
    plans += [p for p in (backward.sums, backward.grad_input, backward.one_launch) if p]
    forward = launch.plan_train_forward(g, g, None, dtype, True, True, "relu", False, True,
                                        False, True)
    plans += [forward.launch] if forward else []
    for planned in plans:
        assert len(planned.grid) == 1 and 1 <= planned.grid[0] <= 2**31 - 1, planned.kernel
        assert planned.constexprs["USE_INT64"] == (x.numel() + launch.FLAT_ELEMENTS >= 2**31)


def test_merges_take_few_tree_steps_on_every_bench_shape():
    """The last program of a channel block merges its chunks in at most 16 tree steps (the
    serial finalize this replaced took one step per chunk, up to 523)."""
    from fastbn.bench.plan import point_launches
    from fastbn.bench.shapes import SUITES

    worst = 0
    for name in ("quick", "resnet50", "bn1d", "video"):
        for point in SUITES[name].points:
            for launches in point_launches(point).values():
                for planned in launches:
                    if planned.constexprs.get("CHUNKED"):
                        chunks, per_step = planned.ints[-1], planned.constexprs["MERGE_CHUNKS"]
                        worst = max(worst, -(-chunks // per_step))
    assert 1 <= worst <= 16


# ---------------------------------------------------------------------------------------------
# CUDA graphs (GPU only): no host sync, shape-only grids and self-resetting tickets replay
# ---------------------------------------------------------------------------------------------
def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), fastbn.BatchNorm2d(16, activation="relu"),
        torch.nn.Conv2d(16, 16, 3, padding=1), fastbn.BatchNorm2d(16, momentum=None),
    ).cuda()


def _step(model, x):
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return y, grads


def _assert_same_state(a, b):
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_replays_in_a_cuda_graph():
    eager, graphed = _small_model(), _small_model()
    x = torch.randn(16, 3, 24, 24, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch's guide does it
        _step(graphed, x)
    torch.cuda.current_stream().wait_stream(side)
    _step(eager, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_grads = _step(graphed, x)
    for _ in range(3):
        graph.replay()
        y, grads = _step(eager, x)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, y, atol=1e-5, rtol=1e-5)
    for a, b in zip(static_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    _assert_same_state(graphed, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_under_reduce_overhead_compile():
    eager, compiled_model = _small_model(), _small_model()
    compiled = torch.compile(compiled_model, mode="reduce-overhead")
    x = torch.randn(16, 3, 24, 24, device="cuda", requires_grad=True)
    for _ in range(3):
        y_c = compiled(x)
        grads_c = torch.autograd.grad(y_c.square().sum(), [x, *compiled_model.parameters()])
        y, grads = _step(eager, x)
        torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads_c, grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    _assert_same_state(compiled_model, eager)


def test_offsets_near_two_to_the_31_are_64_bit():
    """A flat slice may run FLAT_ELEMENTS past the last element: int64 before 2**31."""
    x = torch.empty(2**31 - 1000, device="meta")
    assert launch.needs_int64([launch.geometry(x)])
    assert not launch.needs_int64([launch.geometry(torch.empty(2**30, device="meta"))])


@pytest.mark.parametrize(
    "shape,layout,row,run",
    [((32, 1024, 14, 14), "contiguous", 196, 2048),  # rows align to 4 elements: 8-byte bf16
     ((32, 2048, 7, 7), "contiguous", 0, 2048),  # odd rows align to nothing
     ((32, 512, 28, 28), "contiguous", 0, 0),  # 784 = 16 * 49: Triton's own hint
     ((32, 1024, 14, 14), "channels_last", 0, 0)],
    ids=str,
)
def test_tile_kernels_know_rows_whose_length_carries_alignment(shape, layout, row, run):
    """ROW: rows of a length the compiler knows; RUN: the statistics load a tile's
    consecutive rows (8 x 196 or 32 x 49 elements) as one contiguous run."""
    x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = launch.geometry(x)
    stats = launch.plan_batch_stats(g, x.dtype, True, False, True).launch
    masked = launch.plan_normalize(g, g, g, x.dtype, x.dtype, True, True, "relu", True)
    sums = launch.plan_backward(g, g, None, None, None, x.dtype, True, True, "relu", True,
                                True, True, True, True).sums
    assert [p.constexprs["ROW"] for p in (stats, masked, sums)] == [row] * 3
    assert stats.constexprs["RUN"] == run


def _window_plans(x, residual=None):
    """VECTOR of the mask-writing normalize, the one-launch forward and backward (None
    where the slice does not fit one program) and the backward sums, for x (and a
    residual) of these geometries."""
    g, r = launch.geometry(x), None if residual is None else launch.geometry(residual)
    masked = launch.plan_normalize(g, g, r, x.dtype, None if r is None else x.dtype, True,
                                   True, "relu", True)
    forward = launch.plan_train_forward(g, g, r, x.dtype, True, True, "none", False, True,
                                        False, True)
    one = launch.plan_backward(g, g, None, g, None, x.dtype, True, True, "relu", True, True,
                               True, True, True).one_launch
    sums = launch.plan_backward(g, g, None, None, None, x.dtype, True, True, "relu", True,
                                True, True, True, True).sums
    return [None if p is None else p.constexprs["VECTOR"]
            for p in (masked, forward and forward.launch, one, sums)]


@pytest.mark.parametrize(
    "shape,dtype,vector",
    [((32, 256, 7, 7), torch.bfloat16, 8), ((32, 2048, 7, 7), torch.float16, 8),
     ((32, 512, 7, 7), torch.float32, 4), ((32, 1024, 14, 14), torch.bfloat16, 8),
     ((32, 256, 14, 14), torch.float32, 0),  # 196 = 49 * 4: rows align to 16 bytes (ROW)
     ((32, 512, 28, 28), torch.bfloat16, 0),  # 784 = 16 * 49: Triton's own hint
     ((8, 16, 13, 5), torch.float64, 2)],
    ids=str,
)
def test_contiguous_rows_without_alignment_are_read_through_windows(shape, dtype, vector):
    """VECTOR: every tensor contiguous and S not a multiple of a 16-byte vector: rows
    read through aligned windows, a tile as long as a row and a vector (64 at 7x7, 256 at
    14x14); 14x14 slices of 32 samples are too large for one program with a third stream
    (the activation bits), so the backward is two launches there."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    plans = _window_plans(x)
    assert [v for v in plans if v is not None] == [vector] * sum(v is not None for v in plans)
    assert plans[3] == vector and plans[0] == vector


@pytest.mark.parametrize("layout", ["channels_last", "sliced_channels", "residual_channels_last"])
def test_no_windows_unless_every_tensor_is_contiguous(layout):
    """A window reads past its row into the neighbouring rows' memory: only where every
    tensor of the call is contiguous."""
    x = torch.empty((32, 256, 7, 7), dtype=torch.bfloat16, device="meta")
    residual = None
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced_channels":
        x = torch.empty((32, 512, 7, 7), dtype=torch.bfloat16, device="meta")[:, :256]
    else:
        residual = torch.empty_like(x).to(memory_format=torch.channels_last)
    plans = _window_plans(x, residual)
    # The backward plans read no residual: with a channels_last one only the forward's lose
    # their windows.
    assert not any(plans if residual is None else plans[:2]), plans
