"""The package's sparse kernel against a minimal block-sparse tile walk on the same blocks-only
index at real-head density (16% of the causal pairs, SmolLM2's 9 query / 3 KV heads, head dim 64,
bf16), with the walk's variants: 128-row programs over the union of two blocks' tiles (rows masked
to their own block's tiles), and exp2 by a polynomial on the FMA units (all, or every other column).
Findings: docs/BENCHMARKS.md, "2026-12-07 (afternoon)" and "(evening)". On the CPU (TRITON_INTERPRET=1,
N = 512) it checks every variant and the package's kernel against the package's PyTorch reference
(``sparse_attention_ref``) on the same index.

    python -m benchmarks.kernel_walk_probe 131072 out.json   # with each kernel's registers and spills
    python -m benchmarks.kernel_walk_probe 131072 out.json --against HEAD~1  # and the kernel as of a revision
    python -m benchmarks.kernel_walk_probe --registers       # no GPU: both compiled for sm_90, ptxas -v
    python -m benchmarks.kernel_walk_probe --registers --vertical-slash  # the package's on runs + columns

``--registers`` compiles the walk and the package's kernel (blocks-only index, head dim 64, bf16,
its fixed launch configuration) for sm_90 on any machine with Triton's bundled ptxas, and prints
registers and spills per thread (at 4 warps, up to 128 registers let 4 programs share an SM's
64K registers, up to 168 three, up to 256 two), the package's at the default's index capacity
(2048 tiles) unless ``kb`` says otherwise.
"""
import json, os, sys, time
import torch, triton, triton.language as tl

from mcompile.index import SENTINEL, SparseIndex, index_rows
from mcompile.kernels import sparse_attention_triton as tri
from mcompile.kernels.sparse_attention import sparse_attention_ref
from mcompile.kernels.triton_common import LOG2E


@triton.jit
def _poly_exp2(x):
    """2**x, x <= 0, on the FMA units (the package kernel would also need 0 exactly below -126,
    where this gives about 1e-38: nothing for the rows here, which all have keys)."""
    x = tl.maximum(x, -127.0)
    xi = tl.floor(x)
    f = x - xi
    pf = 1.0 + f * (0.695146143436431884765625 + f * (0.227564394474029541015625 + f * 0.077119089663028717041015625))
    return (pf.to(tl.int32, bitcast=True) + (xi.to(tl.int32) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _bs(Q, K, V, O, T, C, F, N, H, GROUP, MAXT, scale,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, UNION: tl.constexpr, POLY: tl.constexpr):
    m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    b = bh // H
    hk = h // GROUP
    rows = m * BM + tl.arange(0, BM)
    od = tl.arange(0, D)
    q = tl.load(Q + ((b * H + h) * N + rows)[:, None].to(tl.int64) * D + od[None, :])
    kb = K + (b * (H // GROUP) + hk).to(tl.int64) * N * D
    vb = V + (b * (H // GROUP) + hk).to(tl.int64) * N * D
    acc = tl.zeros([BM, D], tl.float32)
    l = tl.zeros([BM], tl.float32)
    mi = tl.full([BM], -1e30, tl.float32)
    base = (bh * tl.num_programs(0) + m).to(tl.int64) * MAXT
    cnt = tl.load(C + bh * tl.num_programs(0) + m)
    first_row = m * BM
    half = tl.arange(0, BM) >= BN  # second 64-row block of a 128-row program
    for i in range(0, cnt):
        t = tl.load(T + base + i)
        keys = t * BN + tl.arange(0, BN)
        k = tl.load(kb + keys[:, None].to(tl.int64) * D + od[None, :])
        v = tl.load(vb + keys[:, None].to(tl.int64) * D + od[None, :])
        qk = tl.dot(q, tl.trans(k))
        if UNION:
            f = tl.load(F + base + i)  # bit 0: first block chose it, bit 1: second
            own = tl.where(half, (f & 2) != 0, (f & 1) != 0)
            qk = tl.where(own[:, None] & (keys[None, :] <= rows[:, None]), qk, -float("inf"))
        else:
            if t * BN + BN - 1 > first_row:
                qk = tl.where(keys[None, :] <= rows[:, None], qk, -float("inf"))
        mn = tl.maximum(mi, tl.max(qk, 1) * scale)
        a = tl.math.exp2(mi - mn)
        x = qk * scale - mn[:, None]
        if POLY == 1:  # exp2 on the FMA units: 2^floor(x) * (degree-3 minimax of 2^f on [0, 1))
            p = _poly_exp2(x)
        elif POLY == 2:  # half the columns on the FMA units, half on MUFU
            xa, xb = tl.split(tl.reshape(x, (BM, BN // 2, 2)))
            p = tl.reshape(tl.join(tl.math.exp2(xa), _poly_exp2(xb)), (BM, BN))
        else:
            p = tl.math.exp2(x)
        l = l * a + tl.sum(p, 1)
        acc = acc * a[:, None] + tl.dot(p.to(v.dtype), v)
        mi = mn
    out = acc / tl.where(l == 0, 1.0, l)[:, None]
    tl.store(O + ((b * H + h) * N + rows)[:, None].to(tl.int64) * D + od[None, :], out.to(O.dtype.element_ty))


def make_index(B, H, N, density, p):
    """Per (batch, head) the sorted tile list of every 64-row block: pairs of blocks draw a shared
    ``density`` share of their causal tiles, each block then swaps each tile with probability
    ``p`` for a fresh one; the sink, the diagonal and the tile before it always kept."""
    import random
    rng = random.Random(0)
    nb = N // 64
    per_bh = []
    for bh in range(B * H):
        blocks = []
        for pair in range(nb // 2):
            m0 = 2 * pair
            k = max(2, int(density * (m0 + 1)))
            cand = rng.sample(range(m0 + 1), min(k, m0 + 1))
            base = set(cand) | {0, m0}
            for m in (m0, m0 + 1):
                s = set(x for x in base if rng.random() > p or x in (0,))
                fresh = [rng.randrange(m + 1) for _ in range(len(base) - len(s))]
                s |= set(fresh) | {m, max(m - 1, 0), 0}
                blocks.append(sorted(s))
        per_bh.append(blocks)
    return per_bh


def pack(per_bh, union):
    """(lists, flags, counts, longest, listed tiles): one row per program; ``union`` pairs the
    blocks, flag bit 0 / 1 saying whether the first / second block chose the tile."""
    nb = len(per_bh[0])
    if union:
        lists, flags = [], []
        for blocks in per_bh:
            for pair in range(nb // 2):
                a, b = set(blocks[2 * pair]), set(blocks[2 * pair + 1])
                u = sorted(a | b)
                lists.append(u)
                flags.append([(1 if x in a else 0) | (2 if x in b else 0) for x in u])
    else:
        lists = [l for blocks in per_bh for l in blocks]
        flags = [[3] * len(l) for l in lists]
    maxt = max(len(l) for l in lists)
    T = torch.zeros(len(lists), maxt, dtype=torch.int32)
    F = torch.zeros(len(lists), maxt, dtype=torch.int32)
    C = torch.zeros(len(lists), dtype=torch.int32)
    for i, (l, f) in enumerate(zip(lists, flags)):
        T[i, :len(l)] = torch.tensor(l, dtype=torch.int32)
        F[i, :len(f)] = torch.tensor(f, dtype=torch.int32)
        C[i] = len(l)
    return T, F, C, maxt, sum(len(l) for l in lists)


def blocks_index(lists, counts, b, h, n, kb) -> SparseIndex:
    """The package's index of the 64-row lists (rows of ``pack(.., False)``): blocks only, no
    runs, no columns, ``kb`` tiles of capacity (>= the longest list)."""
    nb, dev, width = n // 64, lists.device, lists.shape[-1]
    i32 = dict(dtype=torch.int32, device=dev)
    blocks = torch.full((b, h, index_rows(n), kb), SENTINEL, **i32)
    cnt = torch.zeros(b, h, index_rows(n), **i32)
    listed = torch.arange(width, device=dev) < counts.view(b, h, nb)[..., None]
    blocks[:, :, :nb, :width] = torch.where(listed, lists.view(b, h, nb, width), SENTINEL)
    cnt[:, :, :nb] = counts.view(b, h, nb)
    return SparseIndex(torch.full((b, h, 1, 2), SENTINEL, **i32), torch.zeros(b, h, **i32),
                       torch.zeros(b, h, n + 1, **i32), torch.full((b, h, 0), SENTINEL, **i32),
                       torch.zeros(b, h, index_rows(n), **i32), blocks, cnt)


def run_package(q, k, v, index, mod=tri, **launch):
    """The package's kernel (or ``mod``'s, a module like it: ``kernel_at``) at its fixed launch
    configuration (``launch``: extra options such as ``maxnreg``); returns the output and the
    compiled kernel."""
    o = torch.empty_like(q)
    grid, args, meta = mod.launch_args(q, k, v, o, index, q.shape[-1] ** -0.5, None, 0)
    kern = mod._sparse_attention_kernel[grid](*args, **meta, **mod.fixed_config(q.shape[-1], v.shape[-1], q.dtype, 64),
                                              **launch)
    return o, kern


def run(q, k, v, T, F, C, maxt, bm, union, warps, stages, H, G, poly=False):
    B, _, N, D = q.shape
    o = torch.empty_like(q)
    grid = (N // bm, B * H)
    run.kernel = _bs[grid](q, k, v, o, T, C, F, N, H, G, maxt, LOG2E * D ** -0.5,
                           D=D, BM=bm, BN=64, UNION=union, POLY=poly, num_warps=warps, num_stages=stages)
    return o


def kernel_at(rev: str):
    """The package's sparse kernel module as of git revision ``rev``, imported beside today's (as
    ``mcompile.kernels._sparse_attention_at_<rev>``, so that its relative imports resolve to
    today's package), to time a kernel change against its parent in one process."""
    import importlib.util
    import re
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:mcompile/kernels/sparse_attention_triton.py"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    name = "mcompile.kernels._sparse_attention_at_" + re.sub(r"\W", "_", rev)
    path = os.path.join(tempfile.mkdtemp(), name.rsplit(".", 1)[1] + ".py")
    with open(path, "w") as f:
        f.write(src)  # Triton reads a kernel's source from its file
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    argv = list(sys.argv[1:] if argv is None else argv)
    against = None
    if "--against" in argv:  # --against REV: the kernel as of REV timed (and on the CPU checked) too
        i = argv.index("--against")
        against = kernel_at(argv[i + 1])
        del argv[i:i + 2]
    N = int(argv[0]) if argv else 512
    out = argv[1] if len(argv) > 1 else None
    B, H, Hk, D = 1, 9, 3, 64
    G = H // Hk
    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(B, H, N, D, generator=gen).to(dev, dt)
    k = torch.randn(B, Hk, N, D, generator=gen).to(dev, dt)
    v = torch.randn(B, Hk, N, D, generator=gen).to(dev, dt)
    t0 = time.time()
    per_bh = make_index(B, H, N, 0.16, 0.069)
    T64, F64, C64, mt64, n64 = pack(per_bh, False)
    T128, F128, C128, mt128, n128 = pack(per_bh, True)
    print(f"index {time.time()-t0:.1f}s products 64:{n64 * 64} 128:{n128 * 128} ratio {n128 * 2 / n64:.3f}", flush=True)
    T64, F64, C64, T128, F128, C128 = (x.to(dev) for x in (T64, F64, C64, T128, F128, C128))
    index = blocks_index(T64, C64, B, H, N, mt64)
    if dev == "cpu":  # every variant against the package's reference on the same index, and its kernel
        r = sparse_attention_ref(q, k, v, index, D ** -0.5).float()
        for mod in (tri,) if against is None else (tri, against):
            err = (run_package(q, k, v, index, mod)[0].float() - r).abs().max().item()
            assert err < 1e-5, (mod.__name__, err)
        for bm, un, T, F, C, mt in ((64, False, T64, F64, C64, mt64), (128, True, T128, F128, C128, mt128)):
            for poly in (0, 1, 2):
                o = run(q, k, v, T, F, C, mt, bm, un, 4, 2, H, G, poly)
                err = (o.float() - r).abs().max().item()
                print(bm, poly, err)
                assert err < (1e-5 if poly == 0 else 1e-3), (bm, poly, err)  # the polynomial: ~1e-4 relative
        return
    res = {"N": N, "products_ratio": n128 * 2 / n64, "rows": []}
    from torch.nn.attention import sdpa_kernel, SDPBackend
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    def cud():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    ms = triton.testing.do_bench(cud, warmup=5, rep=30)
    res["cudnn_ms"] = ms
    print(f"sdpa causal {ms:.3f} ms", flush=True)
    base = None
    for bm, un, T, F, C, mt, cfgs in ((64, False, T64, F64, C64, mt64, ((4, 3, 0), (4, 2, 0), (4, 3, 1), (4, 3, 2))),
                                      (128, True, T128, F128, C128, mt128, ((8, 2, 0), (8, 3, 0), (4, 3, 0), (8, 3, 1), (8, 3, 2)))):
        for w, s, poly in cfgs:
            try:
                fn = lambda: run(q, k, v, T, F, C, mt, bm, un, w, s, H, G, poly)
                o = fn()
                if base is None:
                    base = o
                err = (o.float() - base.float()).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=5, rep=30)
            except Exception as e:
                print(bm, w, s, "failed", str(e)[:200]); continue
            row = {"block_m": bm, "warps": w, "stages": s, "poly_exp2": poly, "ms": ms, "err_vs_64": err,
                   "vs_cudnn": res["cudnn_ms"] / ms, "n_regs": getattr(run.kernel, "n_regs", None),
                   "n_spills": getattr(run.kernel, "n_spills", None)}
            res["rows"].append(row)
            print(row, flush=True)
    # The package's kernel on the same 64-row index, as launched and capped at the walk's
    # registers; with --against, the kernel as of that revision as launched.
    for mod, maxnreg in ((tri, None), (tri, 128)) + (() if against is None else ((against, None),)):
        try:
            launch = lambda: run_package(q, k, v, index, mod, **({} if maxnreg is None else {"maxnreg": maxnreg}))
            o, kern = launch()
            err = (o.float() - base.float()).abs().max().item()
            ms = triton.testing.do_bench(launch, warmup=5, rep=30)
        except Exception as e:
            print("package kernel failed", maxnreg, repr(e)[:300])
            continue
        row = {"block_m": 64, "package_kernel": mod.__name__, "maxnreg": maxnreg, "ms": ms, "err_vs_64": err,
               "vs_cudnn": res["cudnn_ms"] / ms, "n_regs": getattr(kern, "n_regs", None),
               "n_spills": getattr(kern, "n_spills", None)}
        res["rows"].append(row)
        print(row, flush=True)
    if out:
        json.dump(res, open(out, "w"), indent=1)


def registers(head_dim: int = 64, kb: int = 2048, vertical_slash: bool = False) -> dict:
    """Registers and spills per thread of the walk and of the package's kernel compiled for sm_90
    (no GPU needed), from ptxas -v; the PTX version is lowered to what the bundled ptxas reads.
    ``vertical_slash``: the package's kernel on an index of runs and columns instead of blocks."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_one(fn, args, meta, opts):
        sig, consts, attrs = {}, {}, {}
        pos = iter(args)
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                sig[p.name], consts[(i,)] = "constexpr", meta.get(p.name, p.default)
                continue
            a = next(pos)
            if isinstance(a, torch.Tensor):
                sig[p.name] = "*" + {torch.bfloat16: "bf16", torch.int32: "i32", torch.uint8: "u8"}[a.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(a, float):
                sig[p.name] = "fp32"
            elif a == 1:  # the launcher specialises ints equal to 1
                sig[p.name], consts[(i,)] = "constexpr", 1
            else:
                sig[p.name] = "i32"
                if a % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)
        ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
        ptx = k.asm["ptx"]
        with tempfile.TemporaryDirectory() as d:
            for _ in range(2):  # once more at the PTX version the bundled ptxas names, if it reads no newer
                open(f"{d}/k.ptx", "w").write(ptx)
                err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                                     capture_output=True, text=True).stderr
                older = re.search(r"current version is '([\d.]+)'", err)
                if not older:
                    break
                ptx = re.sub(r"^\.version \S+", f".version {older.group(1)}", ptx, count=1, flags=re.M)
        regs = re.search(r"Used (\d+) registers", err)
        spill = re.search(r"(\d+) bytes spill stores", err)
        return {"registers": int(regs.group(1)) if regs else err.strip()[-200:],
                "spill_bytes": int(spill.group(1)) if spill else None}

    n, b, h, hk, d = 4096, 1, 9, 3, head_dim
    q = torch.empty(b, h, n, d, dtype=torch.bfloat16)
    k = torch.empty(b, hk, n, d, dtype=torch.bfloat16)
    o = torch.empty_like(q)
    lists = torch.zeros(h * (n // 64), 40, dtype=torch.int32)
    counts = torch.zeros(h * (n // 64), dtype=torch.int32)
    out = {"walk": compile_one(_bs, (q, k, k, o, lists, counts, lists, n, h, h // hk, 40, 0.18),
                               dict(D=d, BM=64, BN=64, UNION=False, POLY=0), dict(num_warps=4, num_stages=3))}
    idx = blocks_index(lists, counts, b, h, n, kb)
    if vertical_slash:  # 64 runs and 1000 columns of capacity, no blocks (vertical-slash's shape)
        i32 = dict(dtype=torch.int32)
        idx = idx._replace(runs=torch.zeros(b, h, 64, 2, **i32), columns=torch.zeros(b, h, 1000, **i32),
                           blocks=torch.zeros(b, h, index_rows(n), 0, **i32))
    _, args, meta = tri.launch_args(q, k, k, o, idx, 0.125, None, 0)
    cfg = tri.fixed_config(d, d, q.dtype, 64)
    opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    out["package"] = compile_one(tri._sparse_attention_kernel, args, {**meta, **cfg}, opts)
    out["package, maxnreg 128"] = compile_one(tri._sparse_attention_kernel, args, {**meta, **cfg},
                                              {**opts, "maxnreg": 128})
    for name, r in out.items():
        print(f"{name:24s} {r}")
    return out


if __name__ == "__main__":
    if "--registers" in sys.argv:
        registers(vertical_slash="--vertical-slash" in sys.argv)
    else:
        main()
