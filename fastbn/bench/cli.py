"""``python -m fastbn.bench``: the command line, the run's metadata, and what it prints."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import fastbn
from fastbn.backend import resolve_backend, triton_problem
from fastbn.bench.extra import run_extra
from fastbn.bench.meta import run_meta
from fastbn.bench.model import model_json, model_steps, model_table
from fastbn.bench.modes import MODES
from fastbn.bench.problem import TOLERANCE
from fastbn.bench.providers import PROVIDERS, make_providers
from fastbn.bench.report import (
    Progress,
    breakdown_table,
    geomean_breakdown,
    geomean_speedups,
    problems,
    summary,
    table,
    write_json,
    write_plot,
)
from fastbn.bench.runner import Row, Settings, describe, run
from fastbn.bench.shapes import DTYPES, FUSIONS, LAYOUTS, SUITES, grid, parse_shape, restyle
from fastbn.bench.timing import COPY_BYTES, copy_bandwidth, time_eager_cuda, timer
from fastbn.bench.traffic import PASSES_PER_ELEMENT

DEFAULTS = {  # per device type: suite, providers, warmup calls, timed calls, suite threads
    "cuda": {"suite": "quick", "providers": PROVIDERS, "warmup": 10, "reps": 100,
             "threads": ("default",)},
    "cpu": {"suite": "cpu", "providers": ("fastbn", "torch"), "warmup": 3, "reps": 15,
            "threads": ("1", "default")},
}
MODEL_REPS = 7  # timed training steps of the small ResNet-style model, per provider

CPU_BANNER = (
    "NO CUDA GPU: fastbn's Triton kernels need one, so these are CPU numbers - fastbn's "
    "PyTorch path against torch's CPU BatchNorm. They say nothing about speed on a GPU."
)


def listed(choices: tuple[str, ...], what: str):
    """An argparse type: a comma-separated list of ``choices`` (repeats dropped)."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"choose from {', '.join(choices)}"
            )
        return names

    return parse


def thread_list(text: str) -> tuple[str, ...]:
    """An argparse type for --threads: positive integers or 'default', comma-separated."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names or any(n != "default" and not (n.isdigit() and int(n) > 0) for n in names):
        raise argparse.ArgumentTypeError(
            f"bad --threads {text!r}: expected positive integers or 'default', e.g. 1,default"
        )
    return names


def thread_counts(names: tuple[str, ...]) -> list[int]:
    """--threads as numbers ('default' = torch.get_num_threads() at start), no repeats."""
    default = torch.get_num_threads()
    return list(dict.fromkeys(default if n == "default" else int(n) for n in names))


def shape_argument(text: str) -> tuple[int, ...]:
    """An argparse type for --shape (see shapes.parse_shape)."""
    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    suites = "\n".join(
        textwrap.fill(suite.description, 90, initial_indent=f"  {name:10s}",
                      subsequent_indent=" " * 12)
        for name, suite in SUITES.items()
    )
    passes = "\n".join(
        f"  {fusion:10s}" + ", ".join(f"{mode} {n}s" for mode, n in per_mode.items())
        for fusion, per_mode in PASSES_PER_ELEMENT.items()
    )
    tolerances = ", ".join(f"{dtype} {tol:g}" for dtype, tol in TOLERANCE.items())
    parser = argparse.ArgumentParser(
        prog="python -m fastbn.bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Time fastbn's BatchNorm (alone, or fused with a ReLU or a residual add and a "
            "ReLU) against torch eager, torch.compile and apex on real shapes, after checking "
            "each against a float64 truth, and say how close each gets to the memory "
            "bandwidth this device measures."
        ),
        epilog=f"""\
suites (--suite):
{suites}
  Without CUDA only 'cpu' runs; the GPU-sized suites are refused (use --shape for your own).
  --dtypes / --layouts / --fusion, when given, replace each point's dtype / layout / fusion.

fusions (--fusion {",".join(FUSIONS)}): what follows BatchNorm in the timed call.
  none      y = BN(x), plain BatchNorm (every suite; the default for --shape)
  relu      y = relu(BN(x))
  add_relu  y = relu(BN(x) + z), z a second input of x's shape, dtype and layout
  The resnet50 suite has its plain points in every dtype and layout, and adds fused points
  where resnet50 fuses: relu after the stem's bn1 and each Bottleneck's bn1 and bn2, add_relu
  after each bn3 (the downsample bn stays plain) - fused points in fp16 and bf16 only
  (mixed-precision training), both layouts. The quick suite has one of each.

providers (--providers):
  fastbn   fastbn.batch_norm, backend "auto" (the Triton kernels on CUDA; the PyTorch path
           on CPU). The header says which backend ran. Fused points: one call with
           residual=z, activation="relu".
  torch    torch.nn.functional.batch_norm, eager (cuDNN / native CUDA kernels, or CPU).
           Fused points: F.relu(F.batch_norm(x, ...) + z), three eager ops (two for relu).
  compile  torch.compile of the torch provider's function (F.batch_norm, or the composite
           for fused points), Inductor, static shapes, compiled for each point.
           On CPU only when asked for: compiling there is slow.
  apex     apex.parallel.SyncBatchNorm in one process (its fused syncbn kernels), CUDA only;
           skipped with a note when apex or its CUDA extension is missing. Plain points
           only: fused points have no apex rows.
  Default: all on CUDA, fastbn,torch on CPU.

modes (--modes): {", ".join(MODES)}
  forward-train updates the running statistics with autograd recording; forward-eval runs
  under no_grad; backward times only torch.autograd.grad(retain_graph=True) on a forward
  made beforehand; forward-backward is a training forward and its gradients (of x, weight,
  bias, and z for add_relu).
  Inputs are fp32/fp16/bf16 (--dtypes {",".join(DTYPES)}); weight, bias and running stats
  are fp32. Layouts (--layouts {",".join(LAYOUTS)}): channels_last is channels_last_3d
  for 5-D; 2-D and 3-D input has one layout, shown as nchw.

check: before timing, each provider's outputs (y, running stats, dx, dweight, dbias, dz as
  the mode has them) are compared with BatchNorm and its fusion computed in float64 from the
  same inputs: max|out - truth| / max|truth| must be within {tolerances}.
  Where relu's input is within that tolerance of 0, rounding may put it on either side; the
  truth's gradients there take the provider's side, read from its dx.
  A row outside it is marked WRONG (ERROR if it raised) and is not timed.

timing: CUDA events around each call with the L2 cache flushed before it; on CPU
  time.perf_counter, the providers' calls interleaved (one call of each in turn, so load
  from other processes hits all alike). Median (and 20%/80% quantiles in the JSON) over
  --reps calls after --warmup calls. The copy bandwidth is dst.copy_(src) of
  {COPY_BYTES["cuda"] >> 30} GiB ({COPY_BYTES["cpu"] >> 20} MiB on CPU): GB/s = 2 x bytes / time.

bytes model: compulsory traffic per element of x, of s bytes each, per fusion:
{passes}
  (add_relu reads z and writes dz too; relu moves nothing more.)
  GB/s = compulsory bytes / median time; %copy = that over the measured copy bandwidth.
  Speedup "vs NAME" = NAME's median / fastbn's median (> 1: fastbn is faster); the summary
  is its geometric mean over the suite's points, per fusion (and over all fusions when
  there are several), per mode and over all modes.

threads (--threads): on CPU the whole run repeats at each torch thread count
  (torch.set_num_threads); the cpu suite's default is 1,default (one thread, then torch's
  own count), --shape runs use torch's own. Each row records its count; speedups pair rows
  of the same count. The breakdown table gives the geometric mean (and the worst row) per
  thread count, dtype, layout, fusion and mode.

model (--model/--no-model, default on for the cpu suite): a small ResNet-style CIFAR model
  (fastbn.bench.model: 3 stages of 2 BasicBlocks, 15 BatchNorm2d, batch 32 at 32x32), one
  SGD training step (forward, cross-entropy, backward, update) with torch's BatchNorm and
  converted by fastbn.convert with fuse="none" (layers swapped) and fuse="graph" (BN+ReLU
  and BN+add+ReLU fused), both layouts, at each thread count, each interleaved with
  torch's; checked first against a float64 copy of the model. In the JSON under
  "model_step" (one entry per thread count, layout and fuse level).

output: the table on stdout, progress on stderr. --out DIR writes
  SUITE-DEVICE-DATE.json (device, versions, command, date, copy bandwidth, geometric means,
  every row in long format with its fusion) and, when matplotlib is installed,
  SUITE-DEVICE-DATE.png (speedup per point).

exit status: 0, or 1 when some fastbn row was wrong or failed, 2 for a bad argument.
""",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--suite", choices=(*SUITES, "host"),
        help="a named suite (default: quick on CUDA, cpu on CPU); 'host': the host cost per "
        "call against torch's BatchNorm (fastbn.bench.host)",
    )
    which.add_argument(
        "--shape", action="append", type=shape_argument, metavar="N,C[,D][,H,W]",
        help="a shape of your own, rank 2 to 5 (repeatable), e.g. 256,1024 or 8,64,16,56,56",
    )
    parser.add_argument(
        "--modes", type=listed(MODES, "mode"), default=MODES, metavar="LIST",
        help=f"comma-separated modes (default: all: {','.join(MODES)})",
    )
    parser.add_argument(
        "--dtypes", type=listed(DTYPES, "dtype"), metavar="LIST",
        help="comma-separated input dtypes (default: the suite's; for --shape fp32,fp16,bf16 "
        "on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--layouts", type=listed(LAYOUTS, "layout"), metavar="LIST",
        help="comma-separated layouts (default: the suite's; both for --shape)",
    )
    parser.add_argument(
        "--fusion", type=listed(FUSIONS, "fusion"), metavar="LIST",
        help="comma-separated fusions: none, relu, add_relu (default: the suite's; none for "
        "--shape)",
    )
    parser.add_argument(
        "--providers", type=listed(PROVIDERS, "provider"), metavar="LIST",
        help="comma-separated providers (default: all on CUDA, fastbn,torch on CPU)",
    )
    parser.add_argument(
        "--warmup", type=int, metavar="N",
        help="untimed calls before timing (default: 10 on CUDA, 3 on CPU)",
    )
    parser.add_argument(
        "--reps", type=int, metavar="N", help="timed calls (default: 100 on CUDA, 15 on CPU)"
    )
    parser.add_argument(
        "--threads", type=thread_list, metavar="LIST",
        help="torch thread counts to run everything at, comma-separated, 'default' for "
        "torch's own (default: 1,default for the cpu suite, default otherwise)",
    )
    parser.add_argument(
        "--model", action=argparse.BooleanOptionalAction, default=None,
        help="also time a small ResNet-style model's training step, torch's BatchNorm "
        "against fastbn.convert, at each thread count (default: on for the cpu suite)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="write the JSON file (and the PNG plot) here"
    )
    parser.add_argument(
        "--plan", action="store_true",
        help="run nothing: print each launch fastbn would make per point (fastbn.bench.plan)",
    )
    return parser


def choose_points(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str):
    """The run's suite name and points, from --suite / --shape and the device's defaults."""
    if args.shape:
        dtypes = DTYPES if device == "cuda" else ("fp32",)
        points = grid(args.shape, dtypes=dtypes)
        return "custom", restyle(points, args.dtypes, args.layouts, args.fusion)
    suite = SUITES[args.suite or DEFAULTS[device]["suite"]]
    if suite.for_gpu and device != "cuda":
        parser.error(
            f"suite {suite.name!r} is sized for a GPU and this machine has no CUDA device; "
            "on CPU run --suite cpu (the default) or give your own --shape N,C,..."
        )
    return suite.name, restyle(suite.points, args.dtypes, args.layouts, args.fusion)


def fastbn_backend(device: torch.device, notes: list[str]) -> str:
    """The backend fastbn.batch_norm picks on ``device`` under "auto"; a note when it matters."""
    try:
        with fastbn.use_backend("auto"):
            backend = resolve_backend(torch.empty(0, device=device))
    except Exception as exc:  # the fastbn rows will fail and say why; the baselines still run
        notes.append(f"fastbn cannot choose a backend here: {describe(exc)}")
        return "none"
    if device.type == "cuda" and backend == "torch":
        notes.append(f"fastbn runs its PyTorch path on this GPU: {triton_problem()}")
    return backend


def header(meta: dict, points: int, modes: int) -> str:
    """What the run is and where: printed above the table."""
    device, copy, timing = meta["device"], meta["copy_bandwidth"], meta["timing"]
    method = (
        "CUDA events, L2 flushed before each call" if device["type"] == "cuda"
        else "time.perf_counter"
    )
    lines = [CPU_BANNER] if device["type"] == "cpu" else []
    lines += [
        f"fastbn bench: suite {meta['suite']}, {points} points x {modes} modes x "
        f"{len(meta['providers'])} providers ({', '.join(meta['providers'])}) on "
        f"{device['name']} ({device['type']})",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        f"fastbn backend: {meta['fastbn_backend']}; copy bandwidth {copy['gbps']:.1f} GB/s "
        f"(dst.copy_(src), {copy['bytes'] >> 20} MiB)",
        f"timing: {method}; median of {timing['reps']} calls after {timing['warmup']} warmup",
        *(f"note: {note}" for note in meta["notes"]),
    ]
    return "\n".join(lines)


def save(out: Path, meta: dict, rows: list[Row], geomeans: dict) -> list[Path]:
    """Write SUITE-DEVICE-DATE.json, and .png when matplotlib is there; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", meta["device"]["name"].lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = out / f"{meta['suite']}-{device}-{stamp}"
    written = [stem.with_suffix(".json")]
    write_json(written[0], meta, rows, geomeans)
    title = f"fastbn speedup: {meta['suite']} on {meta['device']['name']}"
    if write_plot(stem.with_suffix(".png"), rows, title):
        written.append(stem.with_suffix(".png"))
    return written


@contextlib.contextmanager
def torch_threads() -> Iterator[None]:
    """Restore torch's thread count on the way out."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark the arguments describe; the exit status (see --help)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.plan or args.suite == "host":
        return run_extra(parser, args, argv, device)
    defaults = DEFAULTS[device.type]
    suite, points = choose_points(parser, args, device.type)
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    reps = defaults["reps"] if args.reps is None else args.reps
    if warmup < 0 or reps < 1:
        parser.error("--warmup must be at least 0 and --reps at least 1")
    providers, notes = make_providers(args.providers or defaults["providers"], device)
    wants_model = args.model if args.model is not None else (
        suite == "cpu" and device.type == "cpu")
    backend = fastbn_backend(device, notes)
    copy_gbps, copy_bytes = copy_bandwidth(device)
    meta = {
        **run_meta(argv, suite, device),
        "fastbn_backend": backend,
        "copy_bandwidth": {"gbps": copy_gbps, "bytes": copy_bytes},
        "timing": {"warmup": warmup, "reps": reps},
        "modes": list(args.modes),
        "providers": [p.name for p in providers],
        "threads": thread_counts(args.threads or (
            defaults["threads"] if not args.shape else ("default",))),
        "model_step": [] if wants_model else None,
        "notes": notes,
    }
    print(header(meta, len(points), len(args.modes)) + "\n", flush=True)

    settings = Settings(device, timer(device), warmup, reps, copy_gbps,
                        time_eager_cuda if device.type == "cuda" else None)
    start = time.perf_counter()
    rows = []
    with fastbn.use_backend("auto"), torch_threads():
        for threads in meta["threads"]:
            torch.set_num_threads(threads)
            rows += run(points, args.modes, providers, settings, Progress())
        if meta["model_step"] is not None:
            steps = model_steps(meta["threads"], warmup, MODEL_REPS)
            meta["model_step"] = model_json(steps)
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    geomeans = geomean_speedups(rows)
    print(table(rows, meta["providers"], by_threads=len(meta["threads"]) > 1))
    if problems(rows):
        print("\nnot timed:\n" + "\n".join(f"  {line}" for line in problems(rows)))
    if geomeans:
        print("\n" + summary(geomeans))
        if len(meta["threads"]) > 1 or device.type == "cpu":
            print("\n" + breakdown_table(geomean_breakdown(rows)))
    if meta["model_step"] is not None:
        print("\n" + model_table(steps))
    print(f"\nchecked and timed in {meta['elapsed_s']} s")
    if args.out is not None:
        written = save(args.out, meta, rows, geomeans)
        print("\n" + "\n".join(f"wrote {path}" for path in written))
        if len(written) == 1:
            print("no plot: matplotlib is not installed, or no speedup to plot")
    return 1 if any(r.provider == "fastbn" and r.status != "ok" for r in rows) else 0
