"""Shared test utilities: reference attention with a materialised mask, random inputs, gloo groups."""

import contextlib
import os
import socket

import torch
import torch.nn.functional as F

from mcompile.index import index_to_mask


def qkv(b, h, hk, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k = torch.randn(b, hk, n, d, generator=g).to(dtype)
    v = torch.randn(b, hk, n, d, generator=g).to(dtype)
    return q, k, v


def masked_dense(q, k, v, index, scale, key_padding=None):
    """Dense attention with the index's mask materialised (fp32); fully masked rows -> 0."""
    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    mask = index_to_mask(index, n, key_padding)
    kr, vr = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q.float(), kr, vr, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0)


def dense_causal(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), is_causal=True, scale=scale)


def padding_mask(b, n, left=(), right=()):
    """(B, N) bool: batch i has left[i] padded tokens at the start, right[i] at the end."""
    kp = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(left):
        kp[i, :p] = False
    for i, p in enumerate(right):
        if p:
            kp[i, n - p:] = False
    return kp


def exception_notes(exc: BaseException) -> str:
    """The notes on ``exc`` and on the exceptions it was raised from or during (Dynamo wraps a
    backend's exception in its own)."""
    notes = []
    while exc is not None:
        notes.extend(getattr(exc, "__notes__", []))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(notes)


def free_port() -> int:
    """A free TCP port on this machine for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """The default process group over gloo (CPU) for this process, destroyed on exit; the
    environment variables transformers' ``tp_plan`` reads are set too."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
