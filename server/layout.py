"""How a model's layers are cut into contiguous slices."""

from __future__ import annotations


def even_split(num_layers: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous [first, end) ranges, sizes differing by at most one (earlier slices larger)."""
    if not 1 <= shards <= num_layers:
        raise ValueError(f"--shards must be between 1 and the model's {num_layers} layers, got {shards}")
    base, extra = divmod(num_layers, shards)
    ranges, first = [], 0
    for i in range(shards):
        end = first + base + (1 if i < extra else 0)
        ranges.append((first, end))
        first = end
    return ranges


def parse_layers(spec: str, num_layers: int) -> list[tuple[int, int]]:
    """Parse `0-15,16-31` (inclusive ranges, in order, covering every layer once) into [first, end) ranges."""
    ranges, expected = [], 0
    for part in spec.split(","):
        first_text, sep, last_text = part.strip().partition("-")
        try:
            first, last = int(first_text), int(last_text if sep else first_text)
        except ValueError as e:
            raise ValueError(f"--layers: {part!r} is not a range like 0-15") from e
        if first != expected or last < first:
            raise ValueError(f"--layers: {part!r} must start at layer {expected} and not end before it starts")
        ranges.append((first, last + 1))
        expected = last + 1
    if expected != num_layers:
        raise ValueError(f"--layers: the ranges cover layers 0-{expected - 1}, the model has {num_layers}")
    return ranges


def describe(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}-{b - 1}" for a, b in ranges)
