"""MInference's own vertical-slash pipeline, run beside mcompile's on the same Q/K/V.

MInference (github.com/microsoft/MInference, MIT license) ships the layer mcompile reimplements:
per head, an estimate from the last 64 queries (vertical = column sums of their softmax, slash =
diagonal sums; the first 30 columns and the 100 nearest diagonals always kept), a CUDA kernel
that turns the top vertical / slash indices into per-64-query-block key tiles and key columns
(``convert_vertical_slash_indexes``), and a Triton kernel that attends over them
(``_triton_mixed_sparse_attention``). None of it is a dependency of the package: the vendoring
step copies their files, unmodified, into ``.peer/minference/`` (ignored by git), and this script
builds and imports them from there.

Layout of ``.peer/minference/`` (paths mirror the MInference repository):

    LICENSE                                          MInference's MIT license
    SOURCE                                           repository, commit and files copied
    csrc/kernels.cpp, csrc/vertical_slash_index.cu   the index builder (built as a torch extension)
    minference/ops/pit_sparse_flash_attention_v2.py  the Triton kernel and its Python glue (imported)
    minference/modules/minference_forward.py         the per-head estimate and layer loop (three
                                                     functions are compiled from it; the module
                                                     itself needs transformers and is not imported)

Their layer loops over heads in Python; ``minference_layer`` runs the same arithmetic for all
heads at once (their builder and kernel take (B, H, ...) tensors; the estimate is batched by a
generalised ``sum_all_diagonal_matrix``), which is the fast form of their pipeline. Their loop
as shipped (``minference_prefill_forward``) is kept for the checks and ``--per-head`` timing.

Usage:

    # vendoring, where the repository can be read (a clone, a bare mirror or an unpacked sdist)
    python benchmarks/peer_minference.py --vendor /path/to/MInference
    # GPU machine (carry .peer): build (~50 s, once per machine), check, time beside ours and cuDNN
    python -m benchmarks.peer_minference --lengths 32768 65536 131072 --budgets 1000,6096 --out peer.json
    # glue, index-format and coverage checks without a GPU (their kernel under the Triton interpreter,
    # their CUDA builder replaced by the pure-PyTorch ``_convert_reference``); on a GPU it also
    # compares the built extension with that reference
    TRITON_INTERPRET=1 python benchmarks/peer_minference.py --self-check

From another script (captured Q/K/V):

    from benchmarks.peer_minference import load_minference, minference_layer, minference_kept, recall_on_blocks
    load_minference()                                      # builds once per process
    out = minference_layer(q, k, v, 1000, 6096, scale)     # q (1, H, N, D), k/v (1, Hk, N, D)
    covered = minference_kept(q, k, 1000, 6096, scale, rows)   # rows: query-block starts, multiples of 64
    recall = recall_on_blocks(q, k, covered, rows, scale)  # (B, H) mean true mass on kept keys
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO_ROOT / ".peer" / "minference"
UPSTREAM = "https://github.com/microsoft/MInference"
PINNED_COMMIT = "fb56c917f618e8645f1cfc37535afd7424d78f0d"  # main on 2025-08-11, the version read for this script
VENDORED = (
    "LICENSE",
    "csrc/kernels.cpp",
    "csrc/vertical_slash_index.cu",
    "minference/ops/pit_sparse_flash_attention_v2.py",
    "minference/modules/minference_forward.py",
)
OPS_FILE = "minference/ops/pit_sparse_flash_attention_v2.py"
FORWARD_FILE = "minference/modules/minference_forward.py"
FORWARD_FUNCTIONS = ("sum_all_diagonal_matrix", "minference_prefill_kernel", "minference_prefill_forward")
EXTENSION_NAME = "peer_minference_vs_index"
PACKAGE = "_peer_minference"  # private name of the package their relative imports resolve in

# Their glue prefers sgl_kernel's or vLLM's CUDA attention when either is installed; blocking
# those imports while their module loads keeps the comparison on their own Triton kernel.
BLOCKED_IMPORTS = ("sgl_kernel", "sgl_kernel.sparse_flash_attn", "vllm", "vllm._custom_ops", "vllm_flash_attn")

# MInference's constants (minference_forward.py, pit_sparse_flash_attention_v2.py).
BLOCK = 64  # block_size_M = block_size_N: their builder asserts 64x64
LAST_Q = 64  # queries of the estimate
SINK_COLUMNS = 30  # vertical[..., :30] = inf
LOCAL_DIAGONALS = 100  # slash[..., -100:] = inf
MIN_VERTICAL, MIN_SLASH = 30, 50  # min(q_len, max(vertical_size, 30)), min(q_len, max(slash_size, 50))

RECALL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # sampled query blocks, as benchmarks/kernels.py samples them

_PEER: Optional[types.SimpleNamespace] = None
_LAST_Q_MASKS: dict = {}  # per device, as their module keeps one LAST_Q_MASK on "cuda"


# ------------------------------------------------------------------------------------------------
# Vendoring
# ------------------------------------------------------------------------------------------------

def vendor(source: str, root: Optional[str] = None, commit: str = PINNED_COMMIT) -> Path:
    """Copy MInference's files (``VENDORED``) from ``source`` into ``root`` unmodified.

    ``source`` is a git repository (work tree or bare mirror: files are read at ``commit``) or a
    plain directory (an unpacked sdist: files are copied as they are, commit unknown)."""
    root = Path(root) if root else DEFAULT_ROOT
    src = Path(source)
    def git(*argv):
        return subprocess.run(["git", "-C", str(src), *argv], capture_output=True, text=True)
    # A git source is a bare mirror or the top of a work tree (a plain directory inside some other
    # repository is copied as files).
    bare = git("rev-parse", "--is-bare-repository").stdout.strip() == "true"
    top = git("rev-parse", "--show-toplevel")
    from_git = bare or (top.returncode == 0 and Path(top.stdout.strip()).resolve() == src.resolve())
    if from_git:
        resolved = git("rev-parse", "--verify", f"{commit}^{{commit}}")
        if resolved.returncode:
            raise ValueError(f"{src} has no commit {commit}: {resolved.stderr.strip()}")
        resolved = resolved.stdout.strip()
    root.mkdir(parents=True, exist_ok=True)
    for rel in VENDORED:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if from_git:
            data = subprocess.run(["git", "-C", str(src), "show", f"{resolved}:{rel}"], capture_output=True,
                                  check=True).stdout
            dest.write_bytes(data)
        else:
            shutil.copyfile(src / rel, dest)
    (root / "SOURCE").write_text(
        f"repository: {UPSTREAM}\ncommit: {resolved if from_git else 'unknown (copied from ' + str(src) + ')'}\n"
        f"license: MIT (LICENSE)\nfiles, copied unmodified:\n" + "".join(f"  {rel}\n" for rel in VENDORED[1:]))
    return root


# ------------------------------------------------------------------------------------------------
# Loading their code
# ------------------------------------------------------------------------------------------------

def load_minference(root: Optional[str] = None, build_dir: Optional[str] = None,
                    convert: Optional[Callable] = None, verbose: bool = False) -> types.SimpleNamespace:
    """Build MInference's index builder and import their Triton kernel; returns (and caches for
    ``minference_layer`` / ``minference_kept``) a namespace with ``convert`` (their
    ``convert_vertical_slash_indexes``), ``ops`` (their pit_sparse_flash_attention_v2 module),
    ``forward`` (their ``sum_all_diagonal_matrix``, ``minference_prefill_kernel``,
    ``minference_prefill_forward``) and ``build_s``.

    The extension is built with ``torch.utils.cpp_extension.load`` from their two sources (about
    50 s the first time on a machine; torch caches it under ``build_dir`` or
    ``$TORCH_EXTENSIONS_DIR`` / ``~/.cache/torch_extensions``). ``convert`` replaces the built
    builder (``_convert_reference`` for checks without CUDA)."""
    global _PEER
    root = Path(root) if root else DEFAULT_ROOT
    if _PEER is not None and convert is None and _PEER.root == root and _PEER.built:
        return _PEER
    missing = [rel for rel in VENDORED if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"MInference's sources are not in {root} (missing {missing}); vendor them with "
                                f"`python benchmarks/peer_minference.py --vendor <MInference clone or mirror>`")
    t0 = time.perf_counter()
    if convert is None:
        ext = _build_extension(root, build_dir, verbose)
        built = True
    else:
        ext = types.ModuleType(f"{PACKAGE}.cuda")
        ext.convert_vertical_slash_indexes = convert
        built = False
    build_s = time.perf_counter() - t0
    ops = _import_ops(root, ext)
    forward = _compile_forward(root, ops)
    _PEER = types.SimpleNamespace(root=root, built=built, convert=ext.convert_vertical_slash_indexes, ops=ops,
                                  forward=forward, build_s=build_s)
    return _PEER


def _peer() -> types.SimpleNamespace:
    return _PEER if _PEER is not None else load_minference()


def _build_extension(root: Path, build_dir: Optional[str], verbose: bool):
    from torch.utils.cpp_extension import load

    kwargs = {}
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
        kwargs["build_directory"] = str(build_dir)
    # setup.py builds these two files as the extension ``minference.cuda``; its -std=c++17 is left
    # to torch, which adds the standard its own headers need.
    return load(name=EXTENSION_NAME, sources=[str(root / "csrc" / "kernels.cpp"),
                                              str(root / "csrc" / "vertical_slash_index.cu")],
                extra_cuda_cflags=["-O3"], verbose=verbose, **kwargs)


def _import_ops(root: Path, ext) -> types.ModuleType:
    """Import their Triton kernel file by path. It starts with ``from ..cuda import
    convert_vertical_slash_indexes`` (the extension inside their package): it is loaded as
    ``_peer_minference.ops.pit_sparse_flash_attention_v2`` with ``_peer_minference.cuda`` set to
    the built extension. sgl_kernel / vLLM are hidden while it loads, and the hint it prints when
    they are missing is swallowed."""
    import importlib.util

    for name in (PACKAGE, f"{PACKAGE}.ops"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = []  # a package with nothing on disk: only the modules placed here resolve
            sys.modules[name] = pkg
    sys.modules[f"{PACKAGE}.cuda"] = ext
    name = f"{PACKAGE}.ops.pit_sparse_flash_attention_v2"
    spec = importlib.util.spec_from_file_location(name, root / OPS_FILE)
    module = importlib.util.module_from_spec(spec)
    saved = {m: sys.modules.get(m, None) for m in BLOCKED_IMPORTS if m in sys.modules}
    try:
        for m in BLOCKED_IMPORTS:
            sys.modules[m] = None  # `import m` raises ImportError, which their bare excepts catch
        sys.modules[name] = module
        with contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(module)
    finally:
        for m in BLOCKED_IMPORTS:
            if m in saved:
                sys.modules[m] = saved[m]
            else:
                sys.modules.pop(m, None)
    assert module.sparse_attn_func is None and module.convert_vertical_slash_indexes_opt is None
    return module


def _compile_forward(root: Path, ops: types.ModuleType) -> dict:
    """Their per-head estimate and layer loop, compiled from minference_forward.py as written.

    The module imports transformers and every other method of the repository at import time,
    so only ``FORWARD_FUNCTIONS`` are compiled, with the names they read bound here. The
    module-level ``LAST_Q_MASK`` is rebuilt by the same expression on the device in use (theirs
    is created on "cuda" at import); paths this benchmark never takes (search, dense layers,
    other patterns) get ``None``."""
    path = root / FORWARD_FILE
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in FORWARD_FUNCTIONS]
    found = {n.name for n in nodes}
    if found != set(FORWARD_FUNCTIONS):
        raise RuntimeError(f"{path} lacks {sorted(set(FORWARD_FUNCTIONS) - found)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arange = torch.arange(LAST_Q, device=device)
    namespace = {
        "torch": torch, "math": math, "os": os, "json": json, "last_q": LAST_Q, "arange": arange,
        "LAST_Q_MASK": arange[None, None, :, None] >= arange[None, None, None, :],
        "vertical_slash_sparse_attention": ops.vertical_slash_sparse_attention,
        "streaming_forward": None, "block_sparse_attention": None, "search_pattern": None, "flash_attn_func": None,
    }
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in FORWARD_FUNCTIONS}


def shipped_layer(q, k, v, vertical: int, slash: int):
    """Their layer as shipped: ``minference_prefill_forward`` (one head at a time), every head
    vertical-slash with the given budgets. k/v already repeated to H heads; scale 1/sqrt(D)."""
    peer = _peer()
    h = q.shape[1]
    kwargs = {"attn_forward_config": {"best_pattern": [{str(i): ["vertical_and_slash", vertical, slash, 1]
                                                        for i in range(h)}], "starting_layer": 0},
              "layer_idx": 0, "num_hidden_layers": 1}
    return peer.forward["minference_prefill_forward"](q, k, v, kwargs)


# ------------------------------------------------------------------------------------------------
# Their pipeline, all heads at once
# ------------------------------------------------------------------------------------------------

def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' repeat_kv: KV head j serves query heads j*g .. j*g+g-1. MInference's layer
    runs after it (its kernel reads one K/V head per query head)."""
    b, hk, n, d = x.shape
    if hk == heads:
        return x
    return x[:, :, None].expand(b, hk, heads // hk, n, d).reshape(b, heads, n, d)


def _sum_all_diagonals(mat: torch.Tensor) -> torch.Tensor:
    """Their ``sum_all_diagonal_matrix`` for any batch and head count: theirs hard-codes a
    (1, 1, ...) view in its ``as_strided`` call; the strides of the leading dims are the only
    change. (B, H, n, m) -> (B, H, n + m - 1); entry j sums diagonal ``key - row = j + 1 - n``."""
    b, h, n, m = mat.shape
    zero_mat = torch.zeros((b, h, n, n)).to(mat.device)
    mat_padded = torch.cat((zero_mat, mat, zero_mat), -1)
    w = 2 * n + m
    mat_strided = mat_padded.as_strided((b, h, n, n + m), (h * n * w, n * w, w + 1, 1))
    return torch.sum(mat_strided, 2)[:, :, 1:]


def _denominator(scale: float, d: int) -> float:
    # Their estimate divides by math.sqrt(head_dim); the same divisor keeps the bf16 logits
    # bit-identical at the default scale, and 1/scale serves any other.
    return math.sqrt(d) if math.isclose(scale, d ** -0.5, rel_tol=1e-12) else 1.0 / scale


def _estimate(q: torch.Tensor, k: torch.Tensor, vertical: int, slash: int, scale: float):
    """(v_idx (B, H, 1, V), s_idx (B, H, S)) int64: the arithmetic of the vertical_and_slash_kernel
    in their ``minference_prefill_kernel``, line for line, on every head at once (k repeated to
    H heads). s_idx are diagonal offsets (query - key)."""
    n, d = q.shape[2], q.shape[3]
    vertical_size, slash_size = min(n, max(vertical, MIN_VERTICAL)), min(n, max(slash, MIN_SLASH))
    last_q = min(LAST_Q, n)
    last_q_mask = _LAST_Q_MASKS.get(q.device)
    if last_q_mask is None:
        arange = torch.arange(LAST_Q, device=q.device)
        last_q_mask = _LAST_Q_MASKS[q.device] = arange[None, None, :, None] >= arange[None, None, None, :]
    qk = torch.einsum('bhmk, bhnk -> bhmn', q[:, :, -last_q:, :], k) / _denominator(scale, d)
    qk[:, :, :, -last_q:] = torch.where(last_q_mask[..., -last_q:, -last_q:], qk[:, :, :, -last_q:], -torch.inf)
    qk = F.softmax(qk, dim=-1, dtype=torch.float32)
    vert = qk.sum(-2, keepdim=True)
    vert[..., :SINK_COLUMNS] = torch.inf
    vertical_topk = torch.topk(vert, vertical_size, -1).indices
    sl = _sum_all_diagonals(qk)[..., :-last_q + 1]
    sl[..., -LOCAL_DIAGONALS:] = torch.inf
    slash_idx = (n - 1) - torch.topk(sl, slash_size, -1).indices
    return vertical_topk, slash_idx


def _build_index(v_idx: torch.Tensor, s_idx: torch.Tensor, context_size: int):
    """(seqlens, block_count, block_offset, column_count, column_index), as their
    vertical_slash_sparse_attention builds them (sorts, then their CUDA builder)."""
    peer = _peer()
    batch_size, num_heads = v_idx.shape[:2]
    v_idx = v_idx.to(torch.int32).reshape((batch_size, num_heads, -1)).sort(dim=-1, descending=False)[0]
    s_idx = s_idx.to(torch.int32).reshape((batch_size, num_heads, -1)).sort(dim=-1, descending=True)[0]
    # Theirs is torch.tensor([context_size]): one entry, which their builder and kernel read per
    # batch element, so batch 1 only; one entry per batch element is the same thing for B = 1.
    seqlens = torch.tensor([context_size] * batch_size, dtype=torch.int32, device=v_idx.device)
    return (seqlens, *peer.convert(seqlens, v_idx, s_idx, context_size, BLOCK, BLOCK))


def _vs_attention(query, key, value, v_idx, s_idx, scale: float):
    """Their vertical_slash_sparse_attention (Triton branch), with ``scale`` as sm_scale (theirs is
    head_dim ** -0.5); returns (output, index). K/V have H heads."""
    peer = _peer()
    batch_size, num_heads, context_size, head_dim = query.shape
    pad = (BLOCK - context_size) & (BLOCK - 1)
    query = F.pad(query, [0, 0, 0, pad, 0, 0, 0, 0])
    key = F.pad(key, [0, 0, 0, pad, 0, 0, 0, 0])
    value = F.pad(value, [0, 0, 0, pad, 0, 0, 0, 0])
    if head_dim not in [16, 32, 64, 128, 256, 512]:
        target_dim = 2 ** math.ceil(math.log2(head_dim)) - head_dim
        query = F.pad(query, [0, target_dim, 0, 0, 0, 0, 0, 0])
        key = F.pad(key, [0, target_dim, 0, 0, 0, 0, 0, 0])
        value = F.pad(value, [0, target_dim, 0, 0, 0, 0, 0, 0])
    index = _build_index(v_idx, s_idx, context_size)
    out = peer.ops._triton_mixed_sparse_attention(query, key, value, *index, scale, BLOCK, BLOCK)
    return out[..., :context_size, :head_dim], index


def minference_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vertical: int, slash: int,
                     scale: float) -> torch.Tensor:
    """MInference's layer on q (B, H, N, D), k/v (B, Hk, N, D): repeat K/V to H heads, estimate
    from the last 64 queries, their CUDA index builder, their Triton kernel; (B, H, N, D).
    Every head in one call of each. B = 1 is what MInference itself runs."""
    h = q.shape[1]
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    v_idx, s_idx = _estimate(q, k, vertical, slash, scale)
    return _vs_attention(q, k, v, v_idx, s_idx, scale)[0]


# ------------------------------------------------------------------------------------------------
# What their index covers
# ------------------------------------------------------------------------------------------------

def _check_rows(rows: Iterable[int], n: int) -> list[int]:
    rows = sorted(set(int(r) for r in rows))
    for r0 in rows:
        if r0 % BLOCK or not 0 <= r0 < n:
            raise ValueError(f"rows are query-block starts, multiples of {BLOCK} in [0, {n}); got {r0}")
    return rows


def coverage_counts(index: Sequence[torch.Tensor], n: int, rows: Iterable[int]) -> torch.Tensor:
    """How many times their kernel scores each (query, key) of the query blocks starting at
    ``rows``: (B, H, R, 64, n) int8, from their index (block_count, block_offset, column_count,
    column_index).

    The kernel's two loops for query block m: tiles ``[block_offset, block_offset + 64)`` for
    the first ``block_count`` offsets, masked by ``key <= query`` and ``query < seqlen``; then
    the first ``column_count`` columns, masked by ``query < seqlen`` only (no causal mask:
    their builder lists only columns left of the block's last tile, which lies on the block's
    own diagonal whenever diagonal 0 is kept, as their estimate forces). A key counted twice
    would enter the softmax twice; their builder never lists one twice (checked)."""
    block_count, block_offset, column_count, column_index = index
    rows = _check_rows(rows, n)
    b, h = block_count.shape[:2]
    dev = block_count.device
    keys = torch.arange(n, device=dev)
    out = torch.zeros(b, h, len(rows), BLOCK, n, dtype=torch.int8, device=dev)
    for i, r0 in enumerate(rows):
        m = r0 // BLOCK
        offs = block_offset[:, :, m].long()  # (B, H, S)
        valid = torch.arange(offs.shape[-1], device=dev) < block_count[:, :, m, None]
        tile_keys = offs[..., None] + torch.arange(BLOCK, device=dev)  # (B, H, S, 64)
        tile_keys = torch.where(valid[..., None] & (tile_keys < n), tile_keys, n).flatten(-2)
        tiles = torch.zeros(b, h, n + 1, dtype=torch.int32, device=dev)
        tiles.scatter_add_(-1, tile_keys, torch.ones_like(tile_keys, dtype=torch.int32))
        cols = column_index[:, :, m].long()  # (B, H, C)
        valid = torch.arange(cols.shape[-1], device=dev) < column_count[:, :, m, None]
        cols = torch.where(valid, cols.clamp(0, n), n)
        colc = torch.zeros(b, h, n + 1, dtype=torch.int32, device=dev)
        colc.scatter_add_(-1, cols, torch.ones_like(cols, dtype=torch.int32))
        queries = r0 + torch.arange(BLOCK, device=dev)
        causal = (keys[None, :] <= queries[:, None]).to(torch.int8)  # (64, n)
        live = (queries < n).to(torch.int8)[:, None]
        out[:, :, i] = (tiles[..., None, :n].to(torch.int8) * causal + colc[..., None, :n].to(torch.int8)) * live
    return out


def minference_kept(q: torch.Tensor, k: torch.Tensor, vertical: int, slash: int, scale: float,
                    rows: Iterable[int]) -> torch.Tensor:
    """(B, H, R, 64, N) bool: the (query, key) pairs MInference's kernel computes for the query
    blocks starting at ``rows`` (multiples of 64), from the index its pipeline builds on q/k
    (k (B, Hk, N, D), repeated as the layer does). Memory: B*H*R*64*N bytes (1 GiB for 32 heads,
    4 blocks, 128K)."""
    n = q.shape[2]
    rows = _check_rows(rows, n)
    k = _repeat_kv(k, q.shape[1])
    v_idx, s_idx = _estimate(q, k, vertical, slash, scale)
    index = _build_index(v_idx, s_idx, n)[1:]
    return coverage_counts(index, n, rows) > 0


def recall_on_blocks(q: torch.Tensor, k: torch.Tensor, covered: torch.Tensor, rows: Iterable[int],
                     scale: float) -> torch.Tensor:
    """Mean (over the rows of the blocks) causal softmax mass (fp32) on covered keys, per (batch,
    head): (B, H) fp32. The quantity of ``mcompile.tools.capture.attention_recall`` (which takes a
    SparseIndex: MInference's tiles sit at per-block offsets no SparseIndex holds). ``covered``
    (B, H, R, 64, N) as ``minference_kept`` returns it for the same ``rows``."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = h // hk
    rows = _check_rows(rows, n)
    total = torch.zeros(b, h, dtype=torch.float64, device=q.device)
    count = 0
    keys = torch.arange(n, device=q.device)
    for i, r0 in enumerate(rows):
        r1 = min(n, r0 + BLOCK)
        qq = q[:, :, r0:r1].float().reshape(b, hk, g * (r1 - r0), d)  # query head kv*g + j -> KV head kv
        s = torch.matmul(qq, k[:, :, :r1].float().transpose(-1, -2)).view(b, h, r1 - r0, r1) * scale
        causal = keys[None, :r1] <= torch.arange(r0, r1, device=q.device)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        total += (p * covered[:, :, i, :r1 - r0, :r1]).sum(-1).double().sum(-1)
        count += r1 - r0
    return (total / max(count, 1)).float()


def kept_density(covered: torch.Tensor, rows: Sequence[int], n: int) -> float:
    """Share of the sampled blocks' causal pairs that are covered (a causal pair counts once)."""
    rows = _check_rows(rows, n)
    keys = torch.arange(n, device=covered.device)
    kept, causal = 0.0, 0.0
    for i, r0 in enumerate(rows):
        queries = r0 + torch.arange(BLOCK, device=covered.device)
        mask = (keys[None, :] <= queries[:, None]) & (queries < n)[:, None]
        kept += (covered[:, :, i] & mask).sum().item()
        causal += mask.sum().item() * covered.shape[0] * covered.shape[1]
    return kept / causal


def masked_reference(q, k, v, counts: torch.Tensor, rows: Sequence[int], scale: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Attention over exactly the pairs (with multiplicity) the kernel computes, for the blocks at
    ``rows``: (B, H, R*64, D) fp32 (rows past N are zero). k/v with H heads; matmuls in ``dtype``."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, len(rows) * BLOCK, v.shape[-1], dtype=torch.float32, device=q.device)
    for i, r0 in enumerate(_check_rows(rows, n)):
        r1 = min(n, r0 + BLOCK)
        s = torch.matmul(q[:, :, r0:r1].to(dtype), k.to(dtype).transpose(-1, -2)).float() * scale
        s = s + counts[:, :, i, :r1 - r0].float().log()  # log 0 = -inf drops a pair, log 2 counts it twice
        p = torch.softmax(s, -1)
        out[:, :, i * BLOCK:i * BLOCK + r1 - r0] = torch.matmul(p.to(dtype), v.to(dtype)).float()
    return out


# ------------------------------------------------------------------------------------------------
# Reference of their CUDA builder (checks only)
# ------------------------------------------------------------------------------------------------

def _convert_reference(seqlens, vertical_indexes, slash_indexes, context_size, block_size_M, block_size_N):
    """Pure-PyTorch (Python loops, slow) transcription of their convert_vertical_slash_indexes
    kernel (csrc/vertical_slash_index.cu), same signature and outputs. Used only by the checks:
    without CUDA in place of the extension, with CUDA compared with it."""
    assert block_size_M == 64 and block_size_N == 64
    batch_size, num_heads, nnz_s = slash_indexes.shape
    nnz_v = vertical_indexes.shape[2]
    num_rows = (context_size + block_size_M - 1) // block_size_M
    block_count = torch.zeros(batch_size, num_heads, num_rows, dtype=torch.int32)
    block_offset = torch.zeros(batch_size, num_heads, num_rows, nnz_s, dtype=torch.int32)
    column_count = torch.zeros(batch_size, num_heads, num_rows, dtype=torch.int32)
    column_index = torch.zeros(batch_size, num_heads, num_rows, nnz_v, dtype=torch.int32)
    lens, verts, slashes = seqlens.tolist(), vertical_indexes.tolist(), slash_indexes.tolist()
    bm, bn = block_size_M, block_size_N
    for b in range(batch_size):
        for h in range(num_heads):
            vi, si = verts[b][h], slashes[b][h]
            for m in range(num_rows):
                start_m = m * bm
                if start_m >= lens[b]:
                    continue
                end_m = start_m + bm
                v, s = 1, 1
                v_idx, s_idx = vi[0], si[0]
                while s_idx >= end_m:
                    if s >= nnz_s:  # the kernel would read past the list here
                        raise IndexError(f"no diagonal below {end_m} (block {m})")
                    s_idx = si[s]
                    s += 1
                s_idx = max(end_m - s_idx, bm)
                range_start, range_end = s_idx - bm, s_idx
                cols, blks = [], []
                while True:
                    if v_idx < range_end:
                        if v_idx < range_start:
                            cols.append(v_idx)
                        if v < nnz_v:
                            v_idx = vi[v]
                            v += 1
                        else:
                            v_idx = end_m + bm
                    else:
                        if s < nnz_s:
                            s_idx = max(end_m - si[s], bm)
                            s += 1
                        else:
                            blks.extend(range(range_start, range_end, bn))
                            break
                        if s_idx > range_end + bm:
                            blks.extend(range(range_start, range_end, bn))
                            range_start, range_end = s_idx - bm, s_idx
                        elif s_idx > range_end:
                            range_end += bm
                block_count[b, h, m] = len(blks)
                column_count[b, h, m] = len(cols)
                if blks:
                    block_offset[b, h, m, :len(blks)] = torch.tensor(blks, dtype=torch.int32)
                if cols:
                    column_index[b, h, m, :len(cols)] = torch.tensor(cols, dtype=torch.int32)
    dev = seqlens.device
    return [block_count.to(dev), block_offset.to(dev), column_count.to(dev), column_index.to(dev)]


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def _random_vs(b, h, n, nv, ns, gen, device):
    """Random sorted vertical / slash lists of the kind their estimate makes (diagonal 0 and the
    first columns always in)."""
    v = torch.stack([torch.cat([torch.arange(min(4, n)), 4 + torch.randperm(n - 4, generator=gen)[:nv - 4]])
                     for _ in range(b * h)]).view(b, h, nv)
    s = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=gen)[:ns - 1]])
                     for _ in range(b * h)]).view(b, h, ns)
    v = v.to(torch.int32).sort(-1)[0].to(device)
    s = s.to(torch.int32).sort(-1, descending=True)[0].to(device)
    return v, s


def check_index_format(n=1000, b=1, h=3, nv=40, ns=25, seed=0, device="cpu") -> dict:
    """Coverage derived from an index against what the vertical / slash lists ask for, on every
    query block: each covered pair counted once, every causal pair on a listed column or diagonal
    covered, tiles causal, any extra pair within two tiles of a listed diagonal. With CUDA and
    the extension loaded, the extension's index must equal ``_convert_reference``'s."""
    gen = torch.Generator().manual_seed(seed)
    v, s = _random_vs(b, h, n, nv, ns, gen, device)
    seqlens = torch.tensor([n] * b, dtype=torch.int32, device=device)
    ref = _convert_reference(seqlens, v, s, n, BLOCK, BLOCK)
    result = {}
    if device == "cuda" and _PEER is not None and _PEER.built:
        got = _PEER.convert(seqlens, v, s, n, BLOCK, BLOCK)
        result["extension_equals_reference"] = all(torch.equal(x, y) for x, y in zip(got, ref))
    rows = list(range(0, n, BLOCK))
    counts = coverage_counts(ref, n, rows).flatten(2, 3)[:, :, :n]  # (B, H, n, n)
    q_pos = torch.arange(n, device=device)[:, None]
    k_pos = torch.arange(n, device=device)[None, :]
    causal = k_pos <= q_pos
    dist = q_pos - k_pos
    on_col = torch.zeros(b, h, n, dtype=torch.bool, device=device).scatter_(-1, v.long(), True)[:, :, None, :]
    diag = torch.zeros(b, h, n, dtype=torch.bool, device=device).scatter_(-1, s.long(), True)
    on_diag = diag[:, :, dist.clamp(min=0)] & causal  # (B, H, n, n)
    wanted = causal & (on_col | on_diag)
    covered = counts > 0
    # Diagonals within 2 * BLOCK - 1 of a listed one, from a running count of listed diagonals.
    run = F.pad(diag.int().cumsum(-1), (1, 0))  # run[x] = listed diagonals < x
    x = torch.arange(n, device=device)
    near_diag = (run[..., (x + 2 * BLOCK).clamp(max=n)] - run[..., (x - 2 * BLOCK + 1).clamp(min=0)]) > 0
    near = near_diag[:, :, dist.clamp(min=0)]
    result.update({
        "max_multiplicity": int(counts.max().item()),
        "missing_wanted_pairs": int((wanted & ~covered).sum().item()),
        "non_causal_pairs": int((covered & ~causal).sum().item()),
        "extra_pairs_far_from_diagonals": int((covered & ~wanted & ~(near & causal)).sum().item()),
        "extra_share": float((covered & ~wanted).sum().item() / max(1, covered.sum().item())),
    })
    result["ok"] = (result["max_multiplicity"] == 1 and result["missing_wanted_pairs"] == 0
                    and result["non_causal_pairs"] == 0 and result["extra_pairs_far_from_diagonals"] == 0
                    and result.get("extension_equals_reference", True))
    return result


def check_coverage_probe(n=1000, b=1, h=3, nv=40, ns=25, seed=1, device="cpu",
                         dtype: torch.dtype = torch.float16) -> dict:
    """Exact test of ``coverage_counts`` through their kernel itself. With q = 0 every score is 0,
    so a row's output is the plain mean of V over the keys the kernel visits (each as often as it
    visits it); V one-hot in a random bin per key makes that mean the row's bin histogram over
    the visited keys divided by their number. A key missing, added or shifted by one moves a
    row's histogram by 1/|kept|, far above the output's rounding at these sizes."""
    gen = torch.Generator().manual_seed(seed)
    v_idx, s_idx = _random_vs(b, h, n, nv, ns, gen, device)
    d = 64
    bins = torch.randint(0, d, (n,), generator=gen).to(device)
    val = F.one_hot(bins, d).to(dtype)[None, None].expand(b, h, n, d).contiguous()
    zeros = torch.zeros(b, h, n, d, dtype=dtype, device=device)
    out, index = _vs_attention(zeros, zeros, val, v_idx, s_idx, 1.0)
    rows = list(range(0, n, BLOCK))
    counts = coverage_counts(index[1:], n, rows).flatten(2, 3)[:, :, :n].float()  # (B, H, n, n)
    hist = torch.matmul(counts, val.float())  # (B, H, n, d)
    want = hist / counts.sum(-1, keepdim=True)
    rel = ((out.float() - want).abs() / want.abs().clamp(min=1e-30)).masked_fill(want == 0, 0)
    zero_bins_hit = int((out.float().abs() > 0)[want == 0].sum().item())
    eps = torch.finfo(dtype).eps
    res = {"max_rel_err": rel.max().item(), "nonzero_where_zero": zero_bins_hit,
           "smallest_step": (1 / counts.sum(-1).max()).item()}
    res["ok"] = res["max_rel_err"] <= 2 * eps and zero_bins_hit == 0
    return res


def _max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_pipeline(q, k, v, vertical, slash, scale, rows, dense_check: bool = True) -> dict:
    """On one input: (1) our glue equals their vertical_slash_sparse_attention (same v_idx/s_idx);
    (2) the batched estimate equals their per-head loop (index lists, output; scale 1/sqrt(D)
    only, as theirs hard-codes it); (3) the kernel against fp32 attention over exactly the pairs
    the index covers, on the blocks at ``rows``, with PyTorch's own bf16 error there as the
    yardstick (kernel <= 2 x torch + 1e-3, the rule of benchmarks/kernels.py)."""
    peer = _peer()
    b, h, n, d = q.shape
    kr, vr = _repeat_kv(k, h), _repeat_kv(v, h)
    v_idx, s_idx = _estimate(q, kr, vertical, slash, scale)
    out, index = _vs_attention(q, kr, vr, v_idx, s_idx, scale)
    res = {}
    default_scale = math.isclose(scale, d ** -0.5, rel_tol=1e-12)
    if default_scale:
        theirs = peer.ops.vertical_slash_sparse_attention(q, kr, vr, v_idx, s_idx)
        res["glue_identical"] = bool(torch.equal(out, theirs))
        shipped = shipped_layer(q, kr, vr, vertical, slash)
        res["per_head_max_diff"] = _max_err(out, shipped)
        same = 0
        for i in range(h):  # their per-head estimate, as minference_prefill_kernel computes it
            vi, si = _estimate(q[:, i:i + 1], kr[:, i:i + 1], vertical, slash, scale)
            same += int(torch.equal(vi.sort(-1)[0], v_idx[:, i:i + 1].sort(-1)[0])
                        and torch.equal(si.sort(-1)[0], s_idx[:, i:i + 1].sort(-1)[0]))
        res["heads_with_identical_index"] = f"{same}/{h}"
    if dense_check:
        counts = coverage_counts(index[1:], n, rows)
        res["max_multiplicity"] = int(counts.max().item())
        ref = masked_reference(q, kr, vr, counts, rows, scale)
        ref_low = masked_reference(q, kr, vr, counts, rows, scale, dtype=q.dtype)
        got = torch.zeros_like(ref)
        for i, r0 in enumerate(rows):
            r1 = min(n, r0 + BLOCK)
            got[:, :, i * BLOCK:i * BLOCK + r1 - r0] = out[:, :, r0:r1].float()
        res["kernel_err"] = _max_err(got, ref)
        res["torch_err"] = _max_err(ref_low, ref)
        res["kernel_ok"] = res["kernel_err"] <= 2 * res["torch_err"] + 1e-3
    return res


def self_check() -> bool:
    """The checks that need no GPU (and, with one, the extension against the reference)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when their module's @triton.jit runs
    device = "cuda" if cuda else "cpu"
    peer = load_minference(convert=None if cuda else _convert_reference)
    ok = True

    # 1. The batched diagonal sums against theirs, head by head.
    gen = torch.Generator().manual_seed(0)
    mat = torch.rand(2, 3, LAST_Q, 300, generator=gen).to(device)
    mine = _sum_all_diagonals(mat)
    theirs = torch.stack([torch.stack([peer.forward["sum_all_diagonal_matrix"](mat[i:i + 1, j:j + 1])[0, 0]
                                       for j in range(3)]) for i in range(2)])
    diag_ok = torch.allclose(mine, theirs, rtol=0, atol=1e-6)
    print(f"sum_all_diagonal_matrix, batched vs theirs per head: {'equal' if diag_ok else 'DIFFERENT'}")
    ok &= diag_ok

    # 2. The index format: coverage from the builder's output against the lists it was given.
    for n, nv, ns in ((1000, 40, 25), (512, 30, 60), (4096, 100, 300)):
        res = check_index_format(n=n, nv=nv, ns=ns, device=device)
        print(f"index format N={n} V={nv} S={ns}: {res}")
        ok &= res["ok"]

    # 3. Coverage through their kernel, exactly (uniform scores, one-hot values).
    for n, nv, ns in ((1000, 40, 25), (1024, 30, 60)):
        res = check_coverage_probe(n=n, nv=nv, ns=ns, device=device)
        print(f"coverage probe N={n} V={nv} S={ns}: {res}")
        ok &= res["ok"]

    # 4. The whole pipeline, with their Triton kernel (interpreted without a GPU). Their kernel
    # takes bf16 or fp16; the interpreter's tl.dot on bf16 operands returns garbage (NumPy has no
    # bf16: a one-line bf16 dot kernel shows it, Triton 3.9), so it runs fp16 there.
    dtype = torch.bfloat16 if cuda else torch.float16
    for n, vertical, slash, scale_mul in ((1024, 40, 120, 1.0), (1000, 30, 100, 1.0), (1024, 40, 120, 0.7)):
        h, hk, d = 4, 2, 64
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, h, n, d, generator=g).to(device, dtype)
        k = torch.randn(1, hk, n, d, generator=g).to(device, dtype)
        v = torch.randn(1, hk, n, d, generator=g).to(device, dtype)
        k[:, :, 7] *= 3  # a strong column and a near diagonal, so the lists are not arbitrary
        q[:, :, 1:] += 0.5 * k.repeat_interleave(h // hk, 1)[:, :, :-1]
        scale = scale_mul * d ** -0.5
        rows = list(range(0, n, BLOCK))
        res = check_pipeline(q, k, v, vertical, slash, scale, rows)
        print(f"pipeline N={n} V={vertical} S={slash} scale={scale:.4f}: {res}")
        ok &= res["kernel_ok"] and res["max_multiplicity"] == 1 and res.get("glue_identical", True)
        if not cuda:  # on the CPU both run the same arithmetic; cuBLAS may round one head alone differently
            ok &= res.get("per_head_max_diff", 0.0) == 0.0

        covered = minference_kept(q, k, vertical, slash, scale, rows[-2:])
        out = minference_layer(q, k, v, vertical, slash, scale)
        every = torch.ones_like(covered)
        full = recall_on_blocks(q, k, every, rows[-2:], scale)
        rec = recall_on_blocks(q, k, covered, rows[-2:], scale)
        print(f"  recall on the last two blocks {rec.mean().item():.3f} (all keys: {full.min().item():.6f}), "
              f"kept {kept_density(covered, rows[-2:], n):.3f}, output finite {bool(out.isfinite().all())}")
        ok &= bool(torch.allclose(full, torch.ones_like(full), atol=1e-5)) and bool(out.isfinite().all())
    print("self-check", "PASSED" if ok else "FAILED")
    return bool(ok)


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------

def _bench_module(name: str):
    """A sibling benchmark module by path (its synthetic inputs), whatever sys.path holds."""
    import importlib.util

    key = f"_peer_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO_ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def synthetic_qkv(kind: str, n: int, h: int, hk: int, d: int, seed: int = 0):
    """benchmarks/kernels.py's inputs (``clustered``: real-head-like structure; ``gaussian``), V
    Gaussian; bf16 on CUDA."""
    kernels = _bench_module("kernels")
    make = kernels.clustered_qk if kind == "clustered" else kernels.gaussian_qk
    q, k = make(n, h, hk, d, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def sampled_rows(n: int) -> list[int]:
    return sorted({min((int(n * f) // BLOCK) * BLOCK, (n - 1) // BLOCK * BLOCK) for f in RECALL_FRACTIONS})


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def measure(label, q, k, v, vertical, slash, scale, args, check=False) -> dict:
    b, h, n, d = q.shape
    rows = sampled_rows(n)
    row = {"input": label, "n": n, "heads": h, "kv_heads": k.shape[1], "head_dim": d,
           "budgets": [vertical, slash]}
    if check:
        check_rows = sorted(set(rows) | {max(0, (n - 1) // BLOCK * BLOCK - BLOCK)})
        row["check"] = check_pipeline(q, k, v, vertical, slash, scale, check_rows)
        print(f"    check N={n}: {row['check']}", flush=True)

    kr, vr = _repeat_kv(k, h), _repeat_kv(v, h)
    v_idx, s_idx = _estimate(q, kr, vertical, slash, scale)
    index = _build_index(v_idx, s_idx, n)
    peer = _peer()
    row["mi_repeat_kv_ms"] = _ms(lambda: (_repeat_kv(k, h), _repeat_kv(v, h)))
    row["mi_estimate_ms"] = _ms(lambda: _estimate(q, kr, vertical, slash, scale))
    row["mi_index_ms"] = _ms(lambda: _build_index(v_idx, s_idx, n))
    # Their kernel alone reads whole 64-row blocks: unpadded inputs only when N is a multiple of 64.
    row["mi_kernel_ms"] = (_ms(lambda: peer.ops._triton_mixed_sparse_attention(q, kr, vr, *index, scale, BLOCK, BLOCK))
                           if n % BLOCK == 0 else None)
    row["mi_layer_ms"] = _ms(lambda: minference_layer(q, k, v, vertical, slash, scale))
    if args.per_head:
        row["mi_per_head_layer_ms"] = (_ms(lambda: shipped_layer(q, _repeat_kv(k, h), _repeat_kv(v, h), vertical,
                                                                 slash)) if math.isclose(scale, d ** -0.5) else None)
    counts = coverage_counts(index[1:], n, rows)
    covered = counts > 0
    del counts, kr, vr, index, v_idx, s_idx
    rec = recall_on_blocks(q, k, covered, rows, scale)
    row["mi_recall"], row["mi_recall_min"] = rec.mean().item(), rec.min().item()
    row["mi_kept"] = kept_density(covered, rows, n)
    del covered

    if not args.skip_ours:
        import mcompile  # noqa: F401  (registers torch.ops.mcompile)
        from mcompile.tools.capture import attention_recall
        from mcompile.index import SparseIndex, block_mask_rows
        from mcompile.patterns import PatternKind

        kinds, p0, p1 = [int(PatternKind.VERTICAL_SLASH)] * h, [vertical] * h, [slash] * h
        est = lambda: torch.ops.mcompile.estimate_index(q, k, None, kinds, p0, p1, scale)
        ours_index = SparseIndex(*est())
        row["ours_estimate_ms"] = _ms(est)
        row["ours_layer_ms"] = _ms(lambda: torch.ops.mcompile.sparse_attention(q, k, v, *est(), None, scale))
        rec = attention_recall(q, k, ours_index, scale, rows=rows)
        row["ours_recall"], row["ours_recall_min"] = rec.mean().item(), rec.min().item()
        kept = sum(block_mask_rows(ours_index, r0, min(n, r0 + BLOCK), n).sum().item() for r0 in rows)
        causal = b * h * sum(sum(range(r0 + 1, min(n, r0 + BLOCK) + 1)) for r0 in rows)  # query i sees i + 1 keys
        row["ours_kept"] = kept / causal
        del ours_index

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    try:
        row["cudnn_ms"] = _ms(cudnn)
    except Exception as exc:  # a backend that refuses these shapes is reported, not fatal
        print(f"    cuDNN SDPA unavailable: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        row["cudnn_ms"] = float("nan")
    torch.cuda.empty_cache()
    return row


HEADER = (f"  {'input':<10} {'N':>7} {'budgets':>10} | {'MI est':>7} {'index':>6} {'kernel':>7} {'layer':>7} "
          f"{'perhead':>7} {'recall':>6} {'kept':>6} | {'ours':>7} {'recall':>6} {'kept':>6} | {'cuDNN':>7}  (ms)")


def _line(r: dict) -> str:
    f = lambda x, w=7, p=2: f"{x:{w}.{p}f}" if isinstance(x, float) else f"{'-':>{w}}"
    return (f"  {r['input']:<10} {r['n']:>7} {r['budgets'][0]:>4}/{r['budgets'][1]:<5} | {f(r['mi_estimate_ms'])} "
            f"{f(r['mi_index_ms'], 6)} {f(r['mi_kernel_ms'])} {f(r['mi_layer_ms'])} {f(r.get('mi_per_head_layer_ms'))} "
            f"{f(r['mi_recall'], 6, 3)} {f(r['mi_kept'], 6, 3)} | {f(r.get('ours_layer_ms'))} "
            f"{f(r.get('ours_recall'), 6, 3)} {f(r.get('ours_kept'), 6, 3)} | {f(r['cudnn_ms'])}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536, 131072])
    p.add_argument("--budgets", nargs="*", default=["1000,6096"], help="vertical,slash pairs")
    p.add_argument("--input", default="clustered", choices=["clustered", "gaussian"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--per-head", action="store_true", help="also time their layer as shipped (a loop over heads)")
    p.add_argument("--skip-ours", action="store_true", help="do not run mcompile's layer")
    p.add_argument("--root", default=None, help=f"vendored sources (default {DEFAULT_ROOT})")
    p.add_argument("--build-dir", default=None, help="torch extension build directory (default: torch's cache)")
    p.add_argument("--verbose-build", action="store_true")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--vendor", metavar="SOURCE", default=None,
                   help="copy MInference's files from a clone / mirror / unpacked sdist into --root, then exit")
    p.add_argument("--commit", default=PINNED_COMMIT, help="commit to vendor from a git SOURCE")
    p.add_argument("--self-check", action="store_true", help="run the checks (no GPU needed), then exit")
    args = p.parse_args(argv)

    if args.vendor:
        root = vendor(args.vendor, args.root, args.commit)
        print(f"vendored into {root}:\n" + (root / "SOURCE").read_text())
        return
    if args.self_check:
        sys.exit(0 if self_check() else 1)
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--self-check runs without one)")
    if str(REPO_ROOT) not in sys.path:  # mcompile and the sibling benchmarks, when run as a script
        sys.path.append(str(REPO_ROOT))
    import triton

    budgets = [tuple(int(x) for x in b.split(",")) for b in args.budgets]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    peer = load_minference(args.root, args.build_dir, verbose=args.verbose_build)
    print(f"MInference extension ready in {peer.build_s:.0f} s ({(peer.root / 'SOURCE').read_text().splitlines()[1]})",
          flush=True)
    fmt = check_index_format(n=4096, h=4, nv=100, ns=300, device="cuda")
    print(f"index builder vs _convert_reference: {fmt}", flush=True)
    probe = check_coverage_probe(n=4096, h=4, nv=100, ns=300, device="cuda")
    print(f"coverage probe through their kernel: {probe}", flush=True)
    t0 = time.time()
    print(HEADER, flush=True)
    rows, first = [], True
    for n in args.lengths:
        q, k, v = synthetic_qkv(args.input, n, args.heads, args.kv_heads, args.head_dim)
        scale = args.head_dim ** -0.5
        for vertical, slash in budgets:
            row = measure(args.input, q, k, v, vertical, slash, scale, args, check=first)
            first = False
            rows.append(row)
            print(_line(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "minference": (peer.root / "SOURCE").read_text(), "index_check": fmt, "coverage_probe": probe,
                       "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
