"""Time the Triton kernels on a GPU against dense SDPA.

    PYTHONPATH=. python benchmarks/gpu_check_kernels.py

N = 32K and 128K, Llama-3-8B heads, vertical-slash (1000, 6096) on every head, on synthetic Q/K
with structure (vertical keys and diagonal bands) and on Gaussian Q/K (the degenerate case: its
slashes are scattered and merge into near-dense runs). Medians of ``triton.testing.do_bench``;
dense baselines are causal SDPA under cuDNN and flash. The kernels' correctness at real shapes
(bf16, against the PyTorch references) is checked by tests/test_gpu.py.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from mcompile.index import BLOCK, num_blocks
from mcompile.kernels import estimate_triton, sparse_attention_triton as attn
from mcompile.kernels.estimate import estimate_index_ref
from mcompile.patterns import PatternKind

LLAMA3_8B = dict(h=32, hk=8, d=128)  # query heads, KV heads, head dim
VERTICAL_SLASH = (1000, 6096)  # MInference's default vertical-slash budgets
BENCH_LENGTHS = (32 * 1024, 128 * 1024)
# Synthetic structure: a smooth latent z per KV head (correlated over ~CORRELATION tokens);
# q_i ~ z_i and k_j ~ sum_b z_{j + off_b}, so q_i . k_j peaks in bands of diagonals around the
# offsets off_b (0: the local window); a few hundred keys point along q's mean direction u.
CORRELATION = 1024  # tokens between the latent's independent knots (band half-width ~ this)
BAND_OFFSETS = (0.0, 0.1, 0.35, 0.7)  # band centres as fractions of N
SIGNAL = 2.6  # q gain: a band-centre logit of ~12 against Gaussian background logits of std ~2
NUM_VERTICAL = 300
MEAN_Q = 1.0  # q's component along u
VERTICAL_LOGIT = 8.0  # logit of a vertical key for every query


# ------------------------------------------------------------------------------------------------
# Index statistics from counts (no N x N mask)
# ------------------------------------------------------------------------------------------------

def _tri(x):
    x = x.clamp(min=0)
    return x * (x + 1) // 2


def index_stats(index, n, block_n):
    """(kept causal pairs, computed score entries) summed over heads, from the index alone."""
    runs, run_count, prefix, columns, column_count, blocks, block_count = index
    dev = runs.device
    nb = num_blocks(n)
    # Per-block tensors carry a spare row past the last block: leave it out.
    column_count, blocks, block_count = column_count[..., :nb], blocks[:, :, :nb], block_count[..., :nb]
    m = torch.arange(nb, device=dev, dtype=torch.int64)
    r0, r1 = m * BLOCK, torch.clamp((m + 1) * BLOCK, max=n)  # (NB,)
    kept = torch.zeros((), dtype=torch.int64, device=dev)
    computed = torch.zeros((), dtype=torch.int64, device=dev)
    # Runs: rows i of block m keep keys [lo, min(hi, i + 1)).
    runs = runs[:, :, :max(1, int(run_count.max()))]  # capacity can be far above the runs in use
    valid = torch.arange(runs.shape[2], device=dev) < run_count[..., None]  # (B, H, R)
    d_lo = runs[..., 0].long()[..., None]
    d_hi = runs[..., 1].long()[..., None]  # (B, H, R, 1)
    lo = (r0 - d_hi).clamp(min=0)
    hi = torch.minimum(r0 + BLOCK - d_lo, torch.tensor(n, device=dev))  # (B, H, R, NB)
    e = torch.minimum(r1, hi - 1).clamp(min=r0)  # rows [r0, e) see the growing part
    per = _tri(e - lo) - _tri(r0 - lo) + (r1 - torch.maximum(r0, hi - 1)).clamp(min=0) * (hi - lo).clamp(min=0)
    kept += (per * valid[..., None]).sum()
    computed += (torch.div(hi - lo + block_n - 1, block_n, rounding_mode="floor").clamp(min=0)
                 * valid[..., None]).sum() * BLOCK * block_n
    # Columns outside the run tiles: rows i >= j of the block keep column j.
    c = columns.shape[-1]
    if c:
        computed += torch.div(column_count.long() + block_n - 1, block_n, rounding_mode="floor").sum() * BLOCK * block_n
        for start in range(0, nb, 256):  # (B, H, C, blocks) stays small
            mm = m[start:start + 256]
            j = columns.long()[..., None]  # (B, H, C, 1)
            lo_d = (mm * BLOCK - j).clamp(min=0)
            hi_d = ((mm + 1) * BLOCK - 1 - j).clamp(max=n - 1)
            pl = prefix.long()
            cov = (hi_d >= lo_d) & ((pl.gather(2, (hi_d + 1).clamp(0, n).flatten(2)).view_as(hi_d)
                                     - pl.gather(2, lo_d.clamp(max=n).flatten(2)).view_as(lo_d)) > 0)
            live = (j < (mm + 1) * BLOCK) & (j < n) & ~cov
            rows = (torch.clamp((mm + 1) * BLOCK, max=n) - torch.maximum(mm * BLOCK, j)).clamp(min=0)
            kept += (rows * live).sum()
    # Key blocks: earlier blocks full, the diagonal block triangular.
    if blocks.shape[-1]:
        slot = torch.arange(blocks.shape[-1], device=dev) < block_count[..., None]
        nblk = blocks.long().clamp(max=nb)
        width = (torch.clamp((nblk + 1) * BLOCK, max=n) - nblk * BLOCK).clamp(min=0)
        rows = (r1 - r0)[:, None]
        full = (nblk < m[:, None]) * rows * width
        diag = (nblk == m[:, None]) * _tri(rows)
        kept += ((full + diag) * slot).sum()
        computed += slot.sum() * BLOCK * BLOCK
    return kept.item(), computed.item()


# ------------------------------------------------------------------------------------------------
# Synthetic inputs
# ------------------------------------------------------------------------------------------------

def structured_qk(n, h, hk, d, seed=0, device="cuda"):
    """Q/K whose vertical-slash estimate finds real structure (see the constants above)."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = d ** -0.5
    knots = torch.randn(hk, n // CORRELATION + 2, d, device=device, generator=g)
    pos = torch.arange(n, device=device, dtype=torch.float32) / CORRELATION
    i0 = pos.long()
    w = (pos - i0)[None, :, None]
    u = torch.randn(d, device=device, generator=g)
    u = u / u.norm()
    z = knots[:, i0] * (1 - w) + knots[:, i0 + 1] * w  # (Hk, N, D), smooth in position
    z = z - (z @ u)[..., None] * u  # orthogonal to u: the vertical logit is the same for every query
    z = z / z.norm(dim=-1, keepdim=True) * math.sqrt(d)
    q = SIGNAL * z.repeat_interleave(h // hk, 0) + MEAN_Q * u
    q = q + 0.1 * torch.randn(h, n, d, device=device, generator=g)
    k = 0.1 * torch.randn(hk, n, d, device=device, generator=g)
    for frac in BAND_OFFSETS:  # k_j ~ z_{j + off}: diagonal band around d = off
        off = int(frac * n)
        k[:, : n - off] += z[:, off:] / math.sqrt(len(BAND_OFFSETS))
    cols = torch.randperm(n, device=device, generator=g)[:NUM_VERTICAL]
    k[:, cols] += (VERTICAL_LOGIT / (scale * MEAN_Q)) * u
    return q[None].bfloat16(), k[None].bfloat16()


def gaussian_qk(n, h, hk, d, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(1, h, n, d, device=device, generator=g).bfloat16(),
            torch.randn(1, hk, n, d, device=device, generator=g).bfloat16())


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def dense_ms(q, k, v, backend):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    try:
        run()
        return f"{bench(run):9.2f}"
    except Exception as exc:  # a backend that refuses these shapes is reported, not fatal
        print(f"    SDPA {backend.name} unavailable: {type(exc).__name__}: {str(exc)[:160]}")
        return "      n/a"


def time_case(n, label, make_qk):
    h, hk, d = LLAMA3_8B["h"], LLAMA3_8B["hk"], LLAMA3_8B["d"]
    q, k = make_qk(n, h, hk, d)
    v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    kinds, p0, p1 = [int(PatternKind.VERTICAL_SLASH)] * h, [VERTICAL_SLASH[0]] * h, [VERTICAL_SLASH[1]] * h
    est_ref_ms = bench(lambda: estimate_index_ref(q, k, None, kinds, p0, p1, scale))
    try:
        index = estimate_triton.estimate_index_triton(q, k, None, kinds, p0, p1, scale)
        est_ms = bench(lambda: estimate_triton.estimate_index_triton(q, k, None, kinds, p0, p1, scale))
        est = f"{est_ms:7.2f}/{est_ref_ms:7.2f}"
    except Exception as exc:
        print(f"    estimate kernel failed ({type(exc).__name__}: {str(exc)[:160]}); using estimate_index_ref")
        index = estimate_index_ref(q, k, None, kinds, p0, p1, scale)
        est = f"    n/a/{est_ref_ms:7.2f}"
    attn.sparse_attention_triton(q, k, v, index, scale, autotune=True)  # autotune
    kernel_ms = bench(lambda: attn.sparse_attention_triton(q, k, v, index, scale, autotune=True))
    block_n = attn.tuned_block_n(q, v) or 64
    kept, computed = index_stats(index, n, block_n)
    density = kept / (h * n * (n + 1) / 2)
    cudnn = dense_ms(q, k, v, SDPBackend.CUDNN_ATTENTION)
    flash = dense_ms(q, k, v, SDPBackend.FLASH_ATTENTION)
    dense = [float(x) for x in (cudnn, flash) if x.strip() != "n/a"]
    best = min(dense) if dense else float("nan")
    tflops = computed * d * 4 / (kernel_ms * 1e-3) / 1e12
    print(f"  {n:>7} {label:<10} {density:7.2%} {est} {kernel_ms:9.2f} {cudnn} {flash} "
          f"{best / kernel_ms:7.2f}x {tflops:8.1f}   (BLOCK_N={block_n}, runs/head {index.run_count.float().mean().item():.0f}, "
          f"computed/kept {computed / max(kept, 1):.2f})")
    del q, k, v, index
    torch.cuda.empty_cache()


def main():
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("speed (ms, median; est = estimate kernel / estimate_index_ref; speedup vs best dense; "
          "TFLOP/s over computed tiles):")
    print(f"  {'N':>7} {'Q/K':<10} {'density':>7} {'est':>15} {'kernel':>9} {'cuDNN':>9} {'flash':>9} "
          f"{'speedup':>8} {'TFLOP/s':>8}")
    for n in BENCH_LENGTHS:
        for label, make in (("structured", structured_qk), ("gaussian", gaussian_qk)):
            time_case(n, label, make)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
