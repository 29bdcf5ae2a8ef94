"""`SliceStats`: what a slice reports about itself, one typed record wherever stats travel.

A slice fills in its layout, memory and compute time; the Ray actor adds where it runs; the pipeline adds
health and restarts. A slice that does not answer is still reported (`SliceStats.down`), from its spec alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SliceStats:
    first: int  # first layer, inclusive
    end: int  # last layer + 1
    has_embeddings: bool
    has_lm_head: bool
    device: str = ""
    dtype: str = ""
    cache_bytes: int = 0
    weight_bytes: int = 0
    peak_rss_bytes: int = 0
    forward_seconds: float = 0.0  # cumulative time inside forwards since the slice (re)started
    steps: int = 0
    # Where it runs (Ray actors only).
    actor_id: str = ""
    node_id: str = ""
    pid: int = 0
    incarnation: str = ""  # changes when Ray restarts the actor
    # The pipeline's view.
    healthy: bool = True
    restarts: int = 0

    @classmethod
    def down(cls, first: int, end: int, num_layers: int, restarts: int) -> SliceStats:
        """A slice that is not answering, described from its spec: the layers and parts it is meant to hold."""
        return cls(first=first, end=end, has_embeddings=first == 0, has_lm_head=end == num_layers,
                   healthy=False, restarts=restarts)
