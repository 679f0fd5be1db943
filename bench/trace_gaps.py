"""The GPU's idle time in a torch.profiler trace (a chrome-trace JSON of kineto's): how much of the profiled span
no kernel, copy or memset ran, and, for the idle gaps, what the CPU was doing: the runtime call that launched
the kernel ending the gap and the innermost CPU op around it, plus any synchronizing runtime call (stream /
event / device synchronize, a blocking copy) in the gap.

    python bench/trace_gaps.py TRACE.json [--top 15]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json

GPU = ("kernel", "gpu_memcpy", "gpu_memset")
SYNCS = ("Synchronize", "cudaMemcpy ", "cudaMemcpy2D ", "cudaStreamWaitEvent")


def analyse(path: str, top: int = 15) -> str:
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e) for e in events if e.get("cat") in GPU)
    if not gpu:
        return "no GPU activity in the trace"
    runtime = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    cpu_ops = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "cpu_op")
    starts = [s for s, _, _ in cpu_ops]
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and any(s in e["name"] + " " for s in SYNCS)]

    def innermost(ts):
        """The shortest CPU op running at time ts (the one that made the runtime call)."""
        best = None
        for s, e, name in cpu_ops[max(0, bisect.bisect_right(starts, ts) - 400):bisect.bisect_right(starts, ts)]:
            if s <= ts <= e and (best is None or e - s < best[0]):
                best = (e - s, name)
        return best[1] if best else "(no CPU op)"

    merged = []  # busy intervals, with the event that starts each
    for s, e, ev in gpu:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e, ev])
    span = merged[-1][1] - merged[0][0]
    busy = sum(e - s for s, e, _ in merged)
    gaps = []
    for (_, end, _), (start, _, ev) in zip(merged, merged[1:], strict=False):
        launch = runtime.get(ev.get("args", {}).get("correlation"))
        where = innermost(launch["ts"]) if launch else "(launch not found)"
        blocking = [r["name"] for r in syncs if r["ts"] < start and r["ts"] + r["dur"] > end]
        gaps.append((start - end, where, ev["name"][:70], ",".join(sorted(set(blocking)))))
    by_op = collections.defaultdict(lambda: [0.0, 0])
    for g, where, _, _ in gaps:
        by_op[where][0] += g
        by_op[where][1] += 1
    small = sum(g for g, *_ in gaps if g < 20)
    lines = [f"GPU busy {busy / 1e3:.1f} ms of a {span / 1e3:.1f} ms span: idle {(span - busy) / 1e3:.1f} ms in "
             f"{len(gaps)} gaps ({small / 1e3:.1f} ms of them in gaps under 20 us)", "",
             "| idle (ms) | gaps | CPU op launching the kernel after the gap |", "|---|---|---|"]
    for where, (g, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {g / 1e3:.2f} | {n} | {where[:90]} |")
    lines += ["", "| gap (ms) | next kernel | launched in | blocking call in the gap |", "|---|---|---|---|"]
    for g, where, name, blocking in sorted(gaps, key=lambda x: -x[0])[:top]:
        lines.append(f"| {g / 1e3:.2f} | {name} | {where[:70]} | {blocking or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    print(analyse(a.trace, a.top))
