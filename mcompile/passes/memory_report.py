"""What the memory passes (passes/memory.py, passes/realize.py) report: one ``MemorySite`` per
place a pass looked at, with the reason when it left it alone."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemorySite:
    """What one memory pass did at one place of the graph."""

    pass_name: str  # "last_logits", "chunked_mlp", "rope_once", "store_residual" or "quadratic"
    module: str
    applied: bool
    reason: str = ""


@dataclass(frozen=True)
class MemoryReport:
    sites: tuple

    def applied(self, pass_name: str) -> int:
        return sum(s.applied for s in self.sites if s.pass_name == pass_name)

    def reasons(self, pass_name: str) -> list[str]:
        return [s.reason for s in self.sites if s.pass_name == pass_name and not s.applied]
