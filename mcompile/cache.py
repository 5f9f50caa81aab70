"""Keep Inductor's compile caches correct across mcompile versions.

Inductor's FX graph cache keys a compiled graph by the graph, its inputs and Inductor's config.
The graph names ``mcompile::`` ops and their arguments, but not how those ops compute or what
shapes their fake implementations give, so a cached graph could outlive a change of mcompile
(seen: a cached graph from an older index layout asserting the old shapes at run time). A
no-op post-grad pass whose ``uuid()`` hashes mcompile's sources puts mcompile itself into the
key. Pattern databases and options need nothing extra: they reach the graph as op arguments.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

log = logging.getLogger(__name__)
CACHE_HOOK = "post_grad_custom_pre_pass"  # the Inductor pass hook that carries the key


@functools.lru_cache(maxsize=1)
def source_hash() -> bytes:
    """Hash of every Python source of the package (what the ops compute and their fakes)."""
    root = Path(__file__).parent
    return get_hash_for_files(tuple(sorted(str(p) for p in root.rglob("*.py"))))


class MCompileCacheKey(CustomGraphPass):
    """Changes nothing in the graph; its uuid makes Inductor's cache key depend on mcompile."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return source_hash()


def cache_patches(user_patches: dict) -> dict:
    """``user_patches`` plus the cache-key pass, unless the user already uses that hook."""
    if user_patches.get(CACHE_HOOK) is not None:
        log.warning("mcompile: %s is set by the caller, so Inductor's cache key does not cover mcompile's "
                    "version; clear the cache (torch._inductor.utils.clear_inductor_caches) after upgrading", CACHE_HOOK)
        return dict(user_patches)
    return {**user_patches, CACHE_HOOK: MCompileCacheKey()}
