"""bench/trace_gaps.py on a hand-made chrome trace: the GPU's idle time, and what launched the kernel after a gap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import trace_gaps  # noqa: E402


def _x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_trace_gaps_measures_idle_and_names_the_launching_op(tmp_path):
    events = [
        _x("cpu_op", "aten::mm", 0, 20), _x("cuda_runtime", "cudaLaunchKernel", 5, 2, correlation=1),
        _x("kernel", "gemm_a", 10, 100, correlation=1),  # busy 10-110
        _x("kernel", "gemm_b", 50, 100, correlation=2),  # overlaps: busy to 150
        _x("cpu_op", "aten::topk", 300, 60), _x("cuda_runtime", "cudaStreamSynchronize", 160, 120),
        _x("cuda_runtime", "cudaLaunchKernel", 340, 3, correlation=3),
        _x("kernel", "topk_kernel", 400, 50, correlation=3),  # a 250 us gap before it
        _x("kernel", "tail", 460, 40, correlation=9),  # a 10 us gap, its launch not in the trace
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    report = trace_gaps.analyse(str(path))
    assert report.splitlines()[0] == ("GPU busy 0.2 ms of a 0.5 ms span: idle 0.3 ms in 2 gaps "
                                      "(0.0 ms of them in gaps under 20 us)")
    assert "| 0.25 | topk_kernel | aten::topk | cudaStreamSynchronize |" in report
    assert "| 0.01 | tail | (launch not found) | - |" in report
