"""Holding back a streamed tail that may still become a marker (a stop string, a tool-call or reasoning tag).

Every streaming parser emits text only once no later delta can change its meaning; the tail that is the
beginning of a marker waits for the next delta. This is the one home of that decision."""

from __future__ import annotations

from collections.abc import Iterable


def partial_marker_len(text: str, markers: Iterable[str], start: int = 0) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of one of `markers` (0 if none).
    Costs O(sum of the markers' squared lengths), whatever the length of `text`."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text) - start), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best
