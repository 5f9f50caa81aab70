"""Graph passes of the minference backend."""

from .match import AttentionSite, find_attention
from .rewrite import RewriteReport, SiteReport, rewrite_attention

__all__ = ["AttentionSite", "find_attention", "RewriteReport", "SiteReport", "rewrite_attention"]
