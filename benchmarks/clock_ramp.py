"""The sparse kernel right after large matrix products: how much slower, and why (GPU).

    PYTHONPATH=. python benchmarks/clock_ramp.py --out clock_ramp.json

In a whole model the sparse attention kernel runs about a third slower than alone
(docs/BENCHMARKS.md). This script times it (A-shape 500/3048, Llama-3-8B shape, 128K tokens,
the inlined launch configuration) in phases: alone; right after matrix products of the MLP's
size; after the same products and an idle wait; after large copies (memory-bound, little power); alone again. Each phase
repeats a preparation and then ``--calls`` kernels back to back, each timed by CUDA events, and
prints the median time of the first, second, ... kernel after the preparation. Meanwhile
``nvidia-smi`` samples SM clock, power and throttle reasons every 20 ms; their median / range
per phase is printed beside the times. Throttle reason 0x4 is the software power cap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kernel_configs import run_config
from kernels import LLAMA3_8B, clustered_qk

from mcompile.kernels.estimate_triton import estimate_index_triton
from mcompile.kernels.sparse_attention_triton import fixed_config
from mcompile.patterns import PatternKind

SMI_FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def start_sampler(out):
    """``nvidia-smi`` writing a sample every 20 ms to the open file ``out``; None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader", "-lms", "20"],
                            stdout=out, stderr=subprocess.DEVNULL)


def read_samples(text: str) -> list[tuple]:
    """(epoch seconds, SM MHz, watts, temperature, throttle reasons) per sample."""
    out = []
    for line in text.splitlines():
        p = [x.strip() for x in line.split(",")]
        try:
            t = datetime.datetime.strptime(p[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((t, float(p[1].split()[0]), float(p[2].split()[0]), p[3], p[4]))
        except (ValueError, IndexError):
            continue  # a header or a field the driver does not report
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=6, help="preparations per phase")
    ap.add_argument("--calls", type=int, default=4, help="kernels timed after each preparation")
    ap.add_argument("--out", default=None, help="write the times and clock samples as JSON")
    args = ap.parse_args()
    n, shape = args.length, LLAMA3_8B
    h, hk, d = shape["h"], shape["hk"], shape["d"]
    q, k = clustered_qk(n, h, hk, d)
    v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    index = estimate_index_triton(q, k, None, [int(PatternKind.A_SHAPE)] * h, [500] * h, [3048] * h, scale)
    cfg = fixed_config(d, d, q.dtype)
    config = (cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])

    def kernel():
        run_config(q, k, v, index, scale, config)

    a = torch.randn(65536, 4096, device="cuda", dtype=torch.bfloat16)  # an MLP chunk's gate/up product
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    big = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")

    def gemms(count):
        for _ in range(count):
            F.linear(a, w)

    for _ in range(3):
        kernel()
        gemms(1)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    gemms(10)
    stop.record()
    torch.cuda.synchronize()
    gemm_ms = start.elapsed_time(stop) / 10
    sleep_cycles = 200_000_000  # about 0.1 s of GPU clock cycles at 1.5-2 GHz

    phases = [
        ("alone", "kernel alone", lambda: None),
        ("gemm", "after 8 matrix products", lambda: gemms(8)),
        ("gemm_idle", "after 8 matrix products + idle ~0.1 s", lambda: (gemms(8), torch.cuda._sleep(sleep_cycles))),
        ("copy", "after 2 copies of 2 GiB", lambda: [big.copy_(big.flip(0)) for _ in range(2)]),
        ("gemm_long", "after 30 matrix products", lambda: gemms(30)),
        ("alone_again", "kernel alone again", lambda: None),
    ]
    results = {}
    with tempfile.TemporaryFile("w+") as smi_out:
        sampler = start_sampler(smi_out)
        time.sleep(0.2)
        for key, label, prepare in phases:
            rows = []
            t0 = time.time()
            for _ in range(args.reps):
                prepare()
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(args.calls)]
                for s, e in events:
                    s.record()
                    kernel()
                    e.record()
                torch.cuda.synchronize()
                rows.append([s.elapsed_time(e) for s, e in events])
            results[key] = {"label": label, "ms": rows, "start": t0, "end": time.time()}
        samples = []
        if sampler is not None:
            time.sleep(0.2)
            sampler.terminate()
            sampler.wait()
            smi_out.seek(0)
            samples = read_samples(smi_out.read())

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, length {n}, config {config}, "
          f"matrix product 65536x4096x14336: {gemm_ms:.2f} ms ({2 * 65536 * 4096 * 14336 / gemm_ms / 1e9:.0f} TFLOP/s)")
    header = " | ".join(f"kernel {i + 1} ms" for i in range(args.calls))
    print(f"| phase | {header} | SM MHz median (min-max) | W median (max) | throttle reasons |")
    print("| --- |" + " --- |" * (args.calls + 3))
    for key, r in results.items():
        medians = [statistics.median(c) for c in zip(*r["ms"])]
        s = [x for x in samples if r["start"] <= x[0] <= r["end"]]
        r["kernel_median_ms"] = medians
        if s:
            mhz, watts = [x[1] for x in s], [x[2] for x in s]
            r["clocks"] = {"mhz_median": statistics.median(mhz), "mhz_min": min(mhz), "mhz_max": max(mhz),
                           "w_median": statistics.median(watts), "w_max": max(watts),
                           "throttle": sorted({x[4] for x in s}), "samples": len(s)}
            c = r["clocks"]
            clock = (f"{c['mhz_median']:.0f} ({c['mhz_min']:.0f}-{c['mhz_max']:.0f}) | {c['w_median']:.0f} "
                     f"({c['w_max']:.0f}) | {', '.join(c['throttle'])}")
        else:
            clock = "- | - | -"
        print(f"| {r['label']} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {clock} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": n,
                       "config": config, "gemm_ms": gemm_ms, "phases": results,
                       "date": datetime.date.today().isoformat()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
