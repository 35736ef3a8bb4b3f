"""Radix tree over token ids that keeps requests' KV indices for reuse (LRU eviction).

Token-level KV makes sharing exact: a new request whose prompt starts with a cached run of tokens
points its req_to_token row at the cached indices and computes only the rest. Nodes on a running
request's path are locked (ref-counted) so eviction never frees KV that is in use.

A running request `publish`es its prompt as each prefill chunk is computed (SGLang caches unfinished
requests the same way), so requests that share a long system prompt reuse it while it is still being
computed; the rest of its tokens go in at `release`.

The scheduler asks for the evictable size per admission candidate and evicts under memory pressure, so
both stay independent of the tree's size (as SGLang's radix cache does it): a running count of the
tokens in unlocked nodes, kept at every lock, unlock, insert and eviction, and a heap of unlocked leaves
by last access, whose stale entries (a leaf since locked, re-accessed, grown or evicted) are skipped when
popped and dropped when they outnumber the nodes.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from lightllm.engine.kv_cache import TokenKVPool

_clock = itertools.count()


@dataclass(eq=False)
class _Node:
    key: list[int]
    value: torch.Tensor  # KV indices of the tokens in `key`
    parent: "_Node | None"
    children: dict[int, "_Node"] = field(default_factory=dict)
    ref: int = 0
    last_access: int = 0

    @property
    def evictable_leaf(self) -> bool:
        return not self.children and self.ref == 0 and self.parent is not None


class PrefixCache:
    def __init__(self, pool: TokenKVPool):
        self.pool = pool
        self.root = _Node([], torch.empty(0, dtype=torch.long), None)
        self.root.ref = 1  # never evicted
        self.total_tokens = 0
        self._evictable = 0  # tokens in nodes no request locks (ref 0)
        self._nodes = 0  # nodes below the root
        self._heap: list[tuple[int, int, _Node]] = []  # (last_access, tie-break, leaf) for unlocked leaves
        self._pushes = itertools.count()
        self._locked: dict[str, tuple[_Node, int]] = {}  # rid -> (deepest locked node, matched length)

    # ------------------------------------------------------------------------------------ lookup

    def _walk(self, ids: list[int], split: bool) -> tuple[_Node, int, list[torch.Tensor]]:
        node, pos, values = self.root, 0, []
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            common = common_prefix_len(child.key, ids[pos:])
            if common < len(child.key):
                if not split or common == 0:
                    if common:
                        values.append(child.value[:common])
                        pos += common
                    break
                child = self._split(child, common)
            values.append(child.value)
            pos += len(child.key)
            node = child
        return node, pos, values

    def _split(self, node: _Node, at: int) -> _Node:
        """Split `node` so its first `at` tokens become a new parent node; returns that parent."""
        parent = node.parent
        head = _Node(node.key[:at], node.value[:at], parent, ref=node.ref, last_access=node.last_access)
        node.key, node.value, node.parent = node.key[at:], node.value[at:], head
        head.children[node.key[0]] = node
        parent.children[head.key[0]] = head
        self._nodes += 1  # the tokens stay as (un)locked as they were: the evictable count is unchanged
        return head

    def match_len(self, ids: list[int]) -> int:
        return self._walk(ids, split=False)[1]

    def acquire(self, rid: str, ids: list[int]) -> torch.Tensor | None:
        """Lock and return the cached KV indices for the longest cached prefix of `ids`."""
        node, matched, values = self._walk(ids, split=True)
        now = next(_clock)
        cursor = node
        while cursor is not self.root:
            if cursor.ref == 0:
                self._evictable -= len(cursor.key)
            cursor.ref += 1
            cursor.last_access = now  # a heap entry of this leaf is stale from now on (re-pushed when unlocked)
            cursor = cursor.parent
        self._locked[rid] = (node, matched)
        return torch.cat(values) if values else None

    def publish(self, rid: str, ids: list[int], indices: torch.Tensor) -> None:
        """Share the KV a running request has computed so far (`indices`: its row for `ids`). The tree takes
        ownership of the new part and the request's lock moves to it. When another request has meanwhile
        cached part of the same range, this one keeps its own copies private (freed or deduplicated at
        release), so ownership stays unambiguous."""
        node, matched = self._locked.get(rid, (self.root, 0))
        if len(ids) <= matched:
            return
        end, pos, _ = self._walk(ids, split=True)
        if pos != matched or end is not node:
            return  # diverged from the tree: publish nothing more for this request
        # The new node is locked by this request (ref 1); the path above it already counts this request.
        child = _Node(list(ids[pos:]), indices[pos:len(ids)].clone(), node, ref=1, last_access=next(_clock))
        node.children[ids[pos]] = child
        self.total_tokens += len(ids) - pos
        self._nodes += 1
        self._locked[rid] = (child, len(ids))

    # ------------------------------------------------------------------------------------ release

    def release(self, rid: str, ids: list[int], indices: torch.Tensor, insert: bool) -> torch.Tensor:
        """Unlock `rid`; optionally insert its tokens. Returns indices the pool should free."""
        node, matched = self._locked.pop(rid, (self.root, 0))
        cursor = node
        while cursor is not self.root:
            cursor.ref -= 1
            if cursor.ref == 0:
                self._evictable += len(cursor.key)
                self._push_if_leaf(cursor)
            cursor = cursor.parent
        if not insert or len(ids) <= matched:
            return indices[matched:]
        return self._insert(ids, indices, matched)

    def _insert(self, ids: list[int], indices: torch.Tensor, owned: int) -> torch.Tensor:
        node, pos, _ = self._walk(ids, split=True)
        # Positions [owned, pos) were computed by this request but another one cached them meanwhile.
        duplicate = indices[owned:pos] if pos > owned else indices[:0]
        if pos < len(ids):
            child = _Node(list(ids[pos:]), indices[pos:].clone(), node, last_access=next(_clock))
            node.children[ids[pos]] = child
            self.total_tokens += len(ids) - pos
            self._evictable += len(ids) - pos
            self._nodes += 1
            self._push_if_leaf(child)
        return duplicate

    # ------------------------------------------------------------------------------------ eviction

    def evictable(self) -> int:
        """Tokens no running request uses (what eviction could free)."""
        return self._evictable

    def _push_if_leaf(self, node: _Node) -> None:
        if node.evictable_leaf:
            if len(self._heap) > 2 * self._nodes + 64:  # mostly stale entries: rebuild from the live leaves
                self._heap = [entry for entry in self._heap if self._current(entry)]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (node.last_access, next(self._pushes), node))

    @staticmethod
    def _current(entry: tuple[int, int, _Node]) -> bool:
        """Whether a heap entry still stands for an unlocked leaf as it was last accessed."""
        last_access, _, node = entry
        return node.evictable_leaf and node.last_access == last_access

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` (if possible), least recently used unlocked leaves first; a parent whose
        last child goes becomes a leaf and competes by its own last access."""
        freed = 0
        while freed < num_tokens and self._heap:
            entry = heapq.heappop(self._heap)
            if not self._current(entry):
                continue
            leaf = entry[2]
            parent = leaf.parent
            self.pool.free(leaf.value)
            freed += len(leaf.key)
            self.total_tokens -= len(leaf.key)
            self._evictable -= len(leaf.key)
            self._nodes -= 1
            del parent.children[leaf.key[0]]
            leaf.parent = None  # detached: any other entry of it is stale
            self._push_if_leaf(parent)
        return freed

    def clear(self) -> int:
        return self.evict(self.total_tokens)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix; binary search on slice equality (C-speed compares, log n of them)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
