# ruff: noqa  (a throwaway helper of the trial's probes, not library code)
"""What the s5 probes share: one line per check, and the list of the ones that failed."""
BAD = []


def report(tag, ok, why="", width=60):
    print(f"{tag:{width}s} {'ok' if ok else 'BAD ' + why}", flush=True)
    if not ok:
        BAD.append(tag)
