# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: bad inputs to fastbn.batch_norm / modules: exception type vs torch's, state unchanged."""
import torch
import torch.nn.functional as F

import fastbn

C = 3
def state():
    return dict(rm=torch.zeros(C), rv=torch.ones(C), w=torch.nn.Parameter(torch.ones(C)),
                b=torch.nn.Parameter(torch.zeros(C)), nbt=torch.tensor(0))

def run(label, fn_t, fn_f, flagged_only=False):
    """Print the two outcomes (only when flagged, with flagged_only); return the flag."""
    out = []
    for fn in (fn_t, fn_f):
        s = state()
        snap = {k: (v.detach().clone(), v._version) for k, v in s.items()}
        try:
            fn(s); res = "ok"
        except Exception as e:
            res = f"{type(e).__name__}: {str(e)[:90]}"
        changed = [k for k, v in s.items() if v._version != snap[k][1] or not torch.equal(v.detach(), snap[k][0])]
        out.append((res, changed))
    (rt, ct), (rf, cf) = out
    flag = "" if (rt.split(":")[0] == rf.split(":")[0]) else "  <-- TYPE DIFFERS"
    if rf != "ok" and cf: flag += "  <-- STATE CHANGED ON ERROR"
    if flag or not flagged_only:
        print(f"{label}\n   torch : {rt} changed={ct}\n   fastbn: {rf} changed={cf}{flag}")
    return flag


CASES = {  # (fastbn.batch_norm's keyword arguments to override, from the state)
 "rm wrong shape": lambda s: dict(running_mean=torch.zeros(C + 1)),
 "rm 2-D (C,1)": lambda s: dict(running_mean=torch.zeros(C, 1)),
 "weight wrong shape": lambda s: dict(weight=torch.ones(C + 1)),
 "weight int dtype": lambda s: dict(weight=torch.ones(C, dtype=torch.int64)),
 "rm fp64 with fp32 input": lambda s: dict(running_mean=torch.zeros(C, dtype=torch.float64)),
 "rm aliasing rv": lambda s: dict(running_var=s["rm"]),
 "rm expanded (stride 0)": lambda s: dict(running_mean=torch.zeros(1).expand(C)),
 "rm non-contiguous view": lambda s: dict(running_mean=torch.zeros(2 * C)[::2]),
 "rm requires_grad": lambda s: dict(running_mean=torch.zeros(C, requires_grad=True)),
 "eps negative": lambda s: dict(eps=-1.0),
 "eps zero train": lambda s: dict(eps=0.0),
 "momentum str": lambda s: dict(momentum="0.1"),
 "momentum tensor": lambda s: dict(momentum=torch.tensor(0.1)),
 "eps tensor": lambda s: dict(eps=torch.tensor(1e-5)),
 "input int": lambda s: dict(input=torch.ones(4, C, 5, dtype=torch.int64)),
 "input complex": lambda s: dict(input=torch.randn(4, C, 5, dtype=torch.complex64)),
 "input 1-D": lambda s: dict(input=torch.randn(C)),
 "input N=1 L=1": lambda s: dict(input=torch.randn(1, C, 1)),
 "input fp16 w fp64": lambda s: dict(input=torch.randn(4, C, 5).half(), weight=torch.ones(C, dtype=torch.float64)),
 "input fp16 rm fp16 rv fp32": lambda s: dict(input=torch.randn(4, C, 5).half(), running_mean=torch.zeros(C).half()),
 "input meta": lambda s: dict(input=torch.randn(4, C, 5, device="meta")),
 "rm on meta": lambda s: dict(running_mean=torch.zeros(C, device="meta")),
 "weight list": lambda s: dict(weight=[1.0, 1.0, 1.0]),
 "input nan": lambda s: dict(input=torch.full((4, C, 5), float("nan"))),
 "rm int64": lambda s: dict(running_mean=torch.zeros(C, dtype=torch.int64)),
 "rm only, rv None": lambda s: dict(running_var=None),
 "training int 1": lambda s: dict(training=1),
 "input channel 0 nonempty?": lambda s: dict(input=torch.randn(4, 0, 5)),
}

if __name__ == "__main__":
    x = torch.randn(4, C, 5)
    for label, mk in CASES.items():
        def call(f, s, mk=mk):
            kw = dict(input=x, running_mean=s["rm"], running_var=s["rv"], weight=s["w"], bias=s["b"],
                      training=True, momentum=0.1, eps=1e-5)
            kw.update(mk(s))
            inp = kw.pop("input")
            return f(inp, **kw)
        run(label, lambda s: call(F.batch_norm, s),
            lambda s: call(lambda i, **k: fastbn.batch_norm(i, num_batches_tracked=None, **k), s))

    # module-level
    print("\n--- modules ---")
    def mod_case(label, make_input, train=True, **kw):
        res = []
        for cls in (torch.nn.BatchNorm2d, fastbn.BatchNorm2d):
            m = cls(C, **kw).train(train)
            snap = {k: (v.clone(), v._version) for k, v in m.state_dict(keep_vars=True).items()}
            try:
                m(make_input()); r = "ok"
            except Exception as e:
                r = f"{type(e).__name__}: {str(e)[:90]}"
            ch = [k for k, v in m.state_dict(keep_vars=True).items() if v._version != snap[k][1] or not torch.equal(v.detach(), snap[k][0].detach())]
            res.append((r, ch))
        flag = "" if res[0][0].split(":")[0] == res[1][0].split(":")[0] else "  <-- TYPE DIFFERS"
        if res[1][0] != "ok" and res[1][1]: flag += "  <-- STATE CHANGED ON ERROR"
        print(f"{label}\n   torch : {res[0]}\n   fastbn: {res[1]}{flag}")

    mod_case("3-D input to 2d", lambda: torch.randn(4, C, 5))
    mod_case("wrong C", lambda: torch.randn(4, C + 1, 5, 5))
    mod_case("N=1 1x1", lambda: torch.randn(1, C, 1, 1))
    mod_case("int input", lambda: torch.ones(4, C, 5, 5, dtype=torch.int32))
    mod_case("empty N=0", lambda: torch.randn(0, C, 5, 5))
    mod_case("empty wrong C", lambda: torch.randn(0, C + 1, 5, 5))
    mod_case("fp64 input fp32 module", lambda: torch.randn(4, C, 5, 5, dtype=torch.float64))
    mod_case("momentum None wrong C", lambda: torch.randn(4, C + 1, 5, 5), momentum=None)
