# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): the eager native route and the traced route (the custom ops, under
torch.compile aot_eager fullgraph and torch.jit.trace) give the same bits: output (and its
strides), every gradient, running statistics, num_batches_tracked; a sweep of odd shapes,
dtypes, layouts, options and activations (including cases the rule sends to the exact path).

Usage: python trial_scripts/probe_s5_traced_bits.py

Finding (53 of 756 differ, all channels_last 4-D/5-D, by ~1 ulp in the gradients): the
gradient here is contiguous; AOTAutograd hands the compiled backward it in y's format, and
the eager backward of fp16/bf16 leaky_relu and of the exact (large-mean) path sums in the
gradient's own format (tests/test_trial_s5.py::test_compiled_gradients_equal_eager_...).
"""
import itertools
import warnings

import torch

import fastbn
from fastbn import cpu

torch.set_num_threads(1)
warnings.simplefilter("ignore")
BAD = []
SHAPES = [((2, 1, 3, 3), True), ((1, 3, 2, 5), True), ((5, 3, 1, 1), True), ((2, 3), False), ((13, 1), False),
          ((2, 3, 2, 3, 5), True), ((3, 4, 5, 6), False)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = [dict(), dict(affine=False), dict(momentum=None), dict(stats=False), dict(slope=0.0), dict(offset=1e4)]


def call(x, z, w, b, rm, rv, nbt, act, opt):
    return fastbn.batch_norm(x, rm, rv, w, b, True, opt.get("momentum", 0.1) if "momentum" not in opt else None,
                             1e-5, residual=z, activation=act, negative_slope=opt.get("slope", 0.1),
                             num_batches_tracked=nbt)


def run(fn, x0, z0, opt, c, dtype):
    x = x0.clone().requires_grad_()
    z = None if z0 is None else z0.clone().requires_grad_()
    w = None if opt.get("affine") is False else torch.linspace(0.5, 1.5, c).requires_grad_()
    b = None if opt.get("affine") is False else torch.linspace(-0.3, 0.3, c).requires_grad_()
    rm, rv = (None, None) if opt.get("stats") is False else (torch.zeros(c), torch.ones(c))
    nbt = torch.tensor(0)
    y = fn(x, z, w, b, rm, rv, nbt)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    y.backward(g)
    return [y.detach(), x.grad] + [t.grad for t in (z, w, b) if t is not None] + [t for t in (rm, rv) if t is not None] + [nbt]


n = 0
for (shape, cl), dtype, act, res, opt in itertools.product(SHAPES, DTYPES, ("relu", "leaky_relu", None), (False, True), OPTIONS):
    c = shape[1]
    torch.manual_seed(0)
    x0 = (torch.randn(shape) * 2 + 0.5 + opt.get("offset", 0.0)).to(dtype)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    z0 = torch.randn(shape).to(dtype).contiguous(memory_format=torch.preserve_format) if res else None
    if z0 is not None and cl:
        z0 = z0.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    native = cpu.serves_natively(x0, torch.zeros(c), torch.ones(c), torch.ones(c), torch.ones(c), act or "none", opt.get("slope", 0.1))
    eager_fn = lambda x, z, w, b, rm, rv, nbt, act=act, opt=opt: call(x, z, w, b, rm, rv, nbt, act, opt)
    torch._dynamo.reset()  # (a fresh compile per case: no recompile limit)
    traced_fn = torch.compile(eager_fn, backend="aot_eager", fullgraph=True, dynamic=False)
    tag = f"{shape} cl={int(cl)} {str(dtype)[6:]} act={act} res={int(res)} {opt} native={int(native)}"
    try:
        e = run(eager_fn, x0, z0, opt, c, dtype)
        t = run(traced_fn, x0, z0, opt, c, dtype)
        bad = [i for i, (p, q) in enumerate(zip(e, t)) if not torch.equal(p, q)]
        strides = e[0].stride() == t[0].stride()
        n += 1
        if bad or not strides:
            BAD.append(tag)
            print(f"{tag}: BAD items {bad} maxdiff {[(e[i].float() - t[i].float()).abs().max().item() for i in bad]} strides {e[0].stride()} vs {t[0].stride()}", flush=True)
    except Exception as ex:  # noqa: BLE001
        BAD.append(tag)
        print(f"{tag}: ERROR {type(ex).__name__}: {str(ex)[:300]}", flush=True)
print(f"BAD: {len(BAD)} of {n}")
