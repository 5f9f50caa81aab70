"""The sparse attention layer (estimation + index + kernel) against dense attention, on a GPU.

    PYTHONPATH=. python benchmarks/kernels.py                       # synthetic, Llama-3-8B shapes
    PYTHONPATH=. python benchmarks/kernels.py --lengths 32768 131072 --budgets 500,3048
    PYTHONPATH=. python benchmarks/kernels.py --lengths 131072 --inputs clustered --patterns default block_mass:0.99,16,max
    MCOMPILE_SMOLLM2_DIR=<gguf dir> PYTHONPATH=. python benchmarks/kernels.py --real 32768 131072

Rows (one per input, length and budget): kept density of the index (fraction of causal pairs,
tile coverage included), attention recall (mass on kept keys, fp32, four sampled 64-row query
blocks per head), estimation time, kernel time, their sum against causal SDPA under cuDNN and
flash and against FlexAttention with the BlockMask that covers the same index, and the
kernel's TFLOP/s over the tiles it computes (4 * D FLOPs per score entry).

Inputs:
- ``clustered``: Llama-3-8B shapes (32 query / 8 KV heads, head dim 128, bf16) with the
  structure real long-context heads have (see ``clustered_qk``): attention sinks, a few hundred
  vertical keys, a local window whose logits decay with distance, and three narrow bands far
  from the diagonal. Its mass sits near the diagonal, as in real heads, so slashes cluster
  into a handful of runs.
- ``gaussian``: i.i.d. Gaussian Q/K, no structure: the degenerate case (top diagonals scatter,
  every 64-wide tile of a stray diagonal is computed).
- ``real``: Q/K/V captured from SmolLM2-135M (real weights) with RoPE extended by YaRN (x16),
  on real text, three layers (head dim 64, 9 / 3 heads).

Timing: median of CUDA-event timings after a warm-up; each side runs in the same process on
the same inputs. Correctness is checked before timing: at the shortest length the kernel's
output is compared with the reference on a slice of query blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check_kernels import index_stats  # noqa: E402

from mcompile.index import BLOCK, SparseIndex, block_mask_rows, num_blocks  # noqa: E402
from mcompile.patterns import PatternKind  # noqa: E402

LLAMA3_8B = {"h": 32, "hk": 8, "d": 128}
DEFAULT_BUDGETS = (1000, 6096)  # MInference's vertical-slash default
RECALL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # where the sampled query blocks sit
FLEX_BLOCK = 128  # FlexAttention's default block size

# Clustered synthetic structure (per KV head). Two smooth latents: z1 with knots every LOCAL
# tokens gives q_i . k_j a peak at i = j decaying over ~LOCAL diagonals (the local window); z2
# with knots every BAND tokens, copied into k at the BAND_OFFSETS, gives narrow far bands.
# Sinks and vertical keys point along a direction u that every query shares.
LOCAL, BAND = 8192, 64
BAND_OFFSETS = (0.1, 0.35, 0.7)  # fractions of N
LOCAL_GAIN, BAND_GAIN = 1.3, 0.8  # peak logits LOCAL_GAIN * sqrt(D), BAND_GAIN * sqrt(D / 3)
SINKS, VERTICALS, VERTICAL_LOGIT = 4, 300, 6.0
NOISE = 0.3  # per-query Gaussian noise (std per coordinate)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def _smooth(n, d, spacing, g, device):
    knots = torch.randn(n // spacing + 2, d, device=device, generator=g)
    pos = torch.arange(n, device=device, dtype=torch.float32) / spacing
    i0 = pos.long()
    w = (pos - i0)[:, None]
    return knots[i0] * (1 - w) + knots[i0 + 1] * w  # (N, D)


def clustered_qk(n, h, hk, d, seed=0, device="cuda"):
    """(q (1, H, N, D), k (1, Hk, N, D)) bf16 with real-head-like structure (constants above);
    built one KV head at a time so that 1M tokens fit."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.empty(1, h, n, d, device=device, dtype=torch.bfloat16)
    k = torch.empty(1, hk, n, d, device=device, dtype=torch.bfloat16)
    group = h // hk
    for kv in range(hk):
        u = torch.randn(d, device=device, generator=g)
        u /= u.norm()

        def unit(z):
            z = z - (z @ u)[:, None] * u
            return z / z.norm(dim=-1, keepdim=True) * math.sqrt(d)

        z1 = unit(_smooth(n, d, LOCAL, g, device))
        z2 = unit(_smooth(n, d, BAND, g, device))
        kk = z1
        for f in BAND_OFFSETS:
            off = int(f * n)
            kk[: n - off] += z2[off:] / math.sqrt(len(BAND_OFFSETS))
        cols = torch.cat([torch.arange(SINKS, device=device),
                          torch.randperm(n, device=device, generator=g)[:VERTICALS]])
        kk[cols] += VERTICAL_LOGIT * math.sqrt(d) * u  # logit VERTICAL_LOGIT for q . u = 1
        k[0, kv] = kk.bfloat16()
        base = LOCAL_GAIN * z1 + BAND_GAIN * z2 + u
        for i in range(group):
            q[0, kv * group + i] = (base + NOISE * torch.randn(n, d, device=device, generator=g)).bfloat16()
        del z1, z2, kk, base
    return q, k


def gaussian_qk(n, h, hk, d, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(1, h, n, d, device=device, generator=g, dtype=torch.bfloat16),
            torch.randn(1, hk, n, d, device=device, generator=g, dtype=torch.bfloat16))


def real_qkv(lengths, layers):
    """{n: {layer: (q, k, v)}} from SmolLM2 + YaRN x16 on real text (bf16, CUDA)."""
    from mcompile.tools.capture import capture_qkv
    from mcompile.tools.data import haystack
    from mcompile.tools.models import load_smollm2

    model, tok = load_smollm2(dtype=torch.bfloat16, device="cuda", yarn_factor=16)
    out = {}
    for n in lengths:
        ids = torch.tensor([haystack(tok, n)], device="cuda")
        out[n] = capture_qkv(model, ids, layers)
    del model
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

def timed(fn, budget_s=1.0, max_reps=20):
    """Median milliseconds of ``fn`` (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if times[0] > 1000 * budget_s:  # one slow call is enough
            break
    times.sort()
    return times[len(times) // 2]


def head_slice(index: SparseIndex, h: int) -> SparseIndex:
    return SparseIndex(*(t[:, h:h + 1] for t in index))


def sampled_recall(q, k, index, scale):
    """Mean attention mass on kept keys over every head and RECALL_FRACTIONS' query blocks."""
    from mcompile.tools.capture import attention_recall

    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    rows = sorted({min((int(n * f) // BLOCK) * BLOCK, (n - 1) // BLOCK * BLOCK) for f in RECALL_FRACTIONS})
    per_head = [attention_recall(q[:, i:i + 1], k[:, i // group:i // group + 1], head_slice(index, i), scale,
                                 rows=rows).mean().item() for i in range(q.shape[1])]
    return sum(per_head) / len(per_head), min(per_head)


def check_kernel(q, k, v, index, scale, attention):
    """Max error of the kernel against fp32 masked attention on the last query blocks, and
    PyTorch's own bf16 error there (rule: kernel <= 2x torch + 1e-3)."""
    n = q.shape[2]
    r0 = max(0, (n - 2 * BLOCK) // BLOCK * BLOCK)
    out = attention(q, k, v, index, scale, None)[:, :, r0:].float()
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    keep = block_mask_rows(index, r0, n, n)

    def masked(dtype):
        s = torch.matmul(q[:, :, r0:].to(dtype), kk.to(dtype).transpose(-1, -2)).float() * scale
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        return torch.matmul(p.to(dtype), vv.to(dtype)).float()

    ref = masked(torch.float32)
    err = (out - ref).abs().max().item()
    torch_err = (masked(q.dtype) - ref).abs().max().item()
    return err, torch_err, err <= 2 * torch_err + 1e-3


def dense_ms(q, k, v, scale, backend):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    try:
        return timed(run)
    except Exception as exc:  # a backend that refuses these shapes is reported, not fatal
        print(f"    SDPA {backend.name} unavailable: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return float("nan")


def flex_block_mask(index: SparseIndex, n: int, heads: int):
    """The FlexAttention BlockMask (FLEX_BLOCK x FLEX_BLOCK blocks) that covers every pair the
    index keeps; partial blocks are computed whole, under a causal mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    dev = index.runs.device
    nq = (n + FLEX_BLOCK - 1) // FLEX_BLOCK
    per = FLEX_BLOCK // BLOCK
    nums, lists = [], []
    m = torch.arange(num_blocks(n), device=dev)
    for h in range(heads):
        cover = torch.zeros(nq, nq + 1, dtype=torch.int32, device=dev)
        runs = index.runs[0, h, :int(index.run_count[0, h])].long()  # (R, 2)
        d_lo, d_hi = runs[:, :1], runs[:, 1:]
        end = m[None, :] * BLOCK + BLOCK - d_lo  # (R, M): run tile of block m is [start, end)
        ok = end > 0
        lo = (m[None, :] * BLOCK - d_hi).clamp(min=0) // FLEX_BLOCK
        hi = (end.clamp(min=1, max=n) - 1) // FLEX_BLOCK + 1
        qb = (m // per)[None, :].expand_as(lo)
        one = torch.ones(int(ok.sum()), dtype=torch.int32, device=dev)
        cover.index_put_((qb[ok], lo[ok]), one, accumulate=True)
        cover.index_put_((qb[ok], hi[ok]), -one, accumulate=True)
        covered = cover.cumsum(-1)[:, :nq] > 0
        cols = index.columns[0, h]
        cols = cols[cols < n].long() // FLEX_BLOCK
        colmask = torch.zeros(nq, dtype=torch.bool, device=dev)
        colmask[cols] = True
        qrow = torch.arange(nq, device=dev)
        covered |= colmask[None, :] & (torch.arange(nq, device=dev)[None, :] <= qrow[:, None])
        covered &= torch.arange(nq, device=dev)[None, :] <= qrow[:, None]
        nums.append(covered.sum(-1).to(torch.int32))
        lists.append(covered)
    width = nq  # full-width lists (narrow ones need a KV size the CPU lowering rejects)
    kv_num = torch.stack(nums)[None]  # (1, H, NQ)
    kv_idx = torch.zeros(1, heads, nq, width, dtype=torch.int32, device=dev)
    for h, cov in enumerate(lists):
        order = torch.sort(cov.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
        kv_idx[0, h] = order.to(torch.int32)
    blocks = kv_num.sum().item()

    def causal(b, h, q_idx, kv_idx_):
        return q_idx >= kv_idx_

    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=causal, seq_lengths=(n, n),
                                    compute_q_blocks=False)
    return mask, blocks / (heads * nq * (nq + 1) / 2)


_FLEX = {}


def flex_ms(q, k, v, scale, index):
    from torch.nn.attention.flex_attention import flex_attention

    try:
        mask, block_density = flex_block_mask(index, q.shape[2], q.shape[1])
        fn = _FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=False))
        return timed(lambda: fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)), block_density
    except Exception as exc:
        print(f"    FlexAttention failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return float("nan"), float("nan")


# ------------------------------------------------------------------------------------------------
# One row
# ------------------------------------------------------------------------------------------------

def measure(label, q, k, v, pattern, args, check=False):
    """One row: ``pattern`` (a patterns.Pattern) on every head of q/k/v."""
    from mcompile.kernels import estimate_triton
    from mcompile.kernels import sparse_attention_triton as attn
    from mcompile.patterns import encode

    b, h, n, d = q.shape
    scale = d ** -0.5
    kinds, p0, p1 = encode([pattern] * h)

    def estimate():
        return estimate_triton.estimate_index_triton(q, k, None, kinds, p0, p1, scale)

    index = estimate()
    est = timed(estimate)
    attention = attn.sparse_attention_triton
    ok = None
    if check:
        err, torch_err, ok = check_kernel(q, k, v, index, scale, attention)
        print(f"    check {label} N={n}: kernel err {err:.2e}, torch bf16 err {torch_err:.2e} -> "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
    kern = timed(lambda: attention(q, k, v, index, scale, None))
    block_n = attn.tuned_block_n(q, v) or 64
    kept, computed = index_stats(index, n, block_n)
    causal = b * h * n * (n + 1) / 2
    recall, recall_min = sampled_recall(q, k, index, scale)
    cudnn = dense_ms(q, k, v, scale, SDPBackend.CUDNN_ATTENTION)
    flash = dense_ms(q, k, v, scale, SDPBackend.FLASH_ATTENTION) if n <= args.flash_max else float("nan")
    flex, flex_density = flex_ms(q, k, v, scale, index) if n <= args.flex_max else (float("nan"), float("nan"))
    total = est + kern
    row = {
        "input": label, "n": n, "heads": h, "kv_heads": k.shape[1], "head_dim": d, "pattern": pattern.to_dict(),
        "density": kept / causal, "computed_density": computed / causal, "recall": recall, "recall_min": recall_min,
        "runs_per_head": index.run_count.float().mean().item(), "estimate_ms": est, "kernel_ms": kern,
        "cudnn_ms": cudnn, "flash_ms": flash, "flex_ms": flex, "flex_block_density": flex_density,
        "speedup_vs_cudnn": cudnn / total, "estimate_share": est / total,
        "kernel_tflops": computed * d * 4 / (kern * 1e-3) / 1e12,
        "cudnn_tflops": causal * d * 4 / (cudnn * 1e-3) / 1e12, "block_n": block_n, "check": ok,
    }
    short = "/".join(str(x) for x in pattern.to_dict().values() if not isinstance(x, str) or x in ("mass", "max"))
    print(f"  {label:<14} {n:>8} {short:>11} {row['density']:7.2%} {recall:6.3f} {est:8.2f} "
          f"{kern:9.2f} {cudnn:9.2f} {flash:9.2f} {flex:9.2f} {row['speedup_vs_cudnn']:7.2f}x {row['estimate_share']:6.1%} "
          f"{row['kernel_tflops']:6.0f} {row['cudnn_tflops']:6.0f}", flush=True)
    return row


HEADER = (f"  {'input':<14} {'N':>8} {'pattern':>11} {'density':>7} {'recall':>6} {'est ms':>8} {'kernel ms':>9} "
          f"{'cuDNN ms':>9} {'flash ms':>9} {'flex ms':>9} {'speedup':>8} {'est %':>6} {'TF/s':>6} {'cuDNN':>6}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072, 524288, 1048576])
    p.add_argument("--inputs", nargs="*", default=["clustered", "gaussian"], choices=["clustered", "gaussian"])
    p.add_argument("--gaussian-max", type=int, default=131072, help="longest Gaussian (degenerate) case")
    p.add_argument("--budgets", nargs="*", default=None, help="vertical,slash pairs (default 1000,6096 unless --patterns)")
    p.add_argument("--patterns", nargs="*", default=[], help="patterns as `mcompile demo --pattern` takes them "
                   "(block_mass:0.99,8,max, a_shape:128,4096, JSON) or `default` (the package's default pattern)")
    p.add_argument("--real", type=int, nargs="*", default=[], help="lengths for captured SmolLM2 + YaRN Q/K/V")
    p.add_argument("--real-layers", type=int, nargs="*", default=[2, 15, 28])
    p.add_argument("--flash-max", type=int, default=524288)
    p.add_argument("--flex-max", type=int, default=131072)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    import triton

    from mcompile.config import MInferenceConfig
    from mcompile.patterns import Pattern
    from mcompile.tools.options import pattern_arg

    budgets = args.budgets if args.budgets is not None else ([] if args.patterns else ["1000,6096"])
    patterns = [Pattern.from_dict({"kind": "vertical_slash", "vertical": int(b.split(",")[0]),
                                   "slash": int(b.split(",")[1])}) for b in budgets]
    patterns += [MInferenceConfig().default_pattern if x == "default" else Pattern.from_dict(pattern_arg(x))
                 for x in args.patterns]
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    print(HEADER, flush=True)
    rows = []
    first = True
    for n in args.lengths:
        for label in args.inputs:
            if label == "gaussian" and n > args.gaussian_max:
                continue
            shape = LLAMA3_8B
            make = clustered_qk if label == "clustered" else gaussian_qk
            q, k = make(n, shape["h"], shape["hk"], shape["d"])
            v = torch.randn(1, shape["hk"], n, shape["d"], device="cuda", dtype=torch.bfloat16)
            for pattern in patterns:
                rows.append(measure(label, q, k, v, pattern, args, check=first))
                first = False
            del q, k, v
            torch.cuda.empty_cache()
    if args.real:
        store = real_qkv(args.real, args.real_layers)
        for n, layers in store.items():
            for layer, (q, k, v) in sorted(layers.items()):
                for pattern in patterns:
                    rows.append(measure(f"smollm2 L{layer}", q, k, v, pattern, args, check=first))
                    first = False
    print(f"total {time.time() - t0:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
