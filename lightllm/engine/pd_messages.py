"""Messages between the pd_master and its prefill / decode nodes (pickled over zmq, like engine/protocol.py's).

One request's path: the master sends `AddRequest` to a prefill node, which computes the prompt's KV and the
first token (a `StepOutputs` like any engine's), keeps the KV and says `KVReady`. The master picks a decode
node and sends it `ReceiveKV`; the decode node reserves room (or refuses with an `unavailable` error output)
and answers `KVAccepted`; the master tells the prefill node `SendKV`. The pages then move over
torch.distributed point-to-point (engine/kv_transfer.py) and the decode node streams the rest of the tokens.
Plain dataclasses with no torch types, so the master imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightllm.engine.protocol import EngineReady, EngineStats, SamplingParams

NodeRole = Literal["prefill", "decode"]


@dataclass(frozen=True)
class KVPeer:
    """Where a node meets its transfer partners: the decode node hosts the rendezvous store at host:port."""

    node_id: str
    host: str
    port: int


@dataclass
class RegisterNode:
    """A node announces itself (and, sent again every HEARTBEAT_S, that it is alive). Idempotent: the master
    registers an unknown node and refreshes a known one, so a node re-registers after a master restart."""

    node_id: str
    role: NodeRole
    ready: EngineReady
    peer: KVPeer
    stats: EngineStats | None = None
    tp: int = 1  # ranks the node's KV is sharded over (by KV heads): a transfer pairs nodes of the same tp


@dataclass
class RegisterRefused:
    """The master will not route to this node (another model than its other nodes serve)."""

    reason: str


@dataclass
class KVReady:
    """Prefill node → master: the prompt KV of `rid` is computed and held; `first_token` was sampled."""

    rid: str
    first_token: int
    num_tokens: int  # KV tokens held: the prompt's
    cached_tokens: int  # of those, served by the prefill node's prefix cache
    generator_state: bytes | None  # the request's seeded random generator after the first token


@dataclass
class ReceiveKV:
    """Master → decode node: reserve room for `num_tokens` KV tokens of `rid` and receive them from `source`."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    ready: KVReady
    source: str  # the prefill node's id (rank 0 of the pair)
    tag: int  # the transfer's tag on the pair's group


@dataclass
class KVAccepted:
    """Decode node → master: room reserved for `rid` and the receive posted. The first `skip` prompt tokens' KV
    was in the decode node's prefix cache already: only the rest moves."""

    rid: str
    skip: int = 0


@dataclass
class KVRefused:
    """Decode node → master: no room for `rid`'s KV now (nothing reserved). The master holds the request until a
    decode node reports room, up to --pd_hold_timeout, then ends it with 503 + Retry-After."""

    rid: str


@dataclass
class SendKV:
    """Master → prefill node: send `rid`'s KV from position `skip` on to `target` (then the prefill node frees
    it)."""

    rid: str
    target: KVPeer
    tag: int
    skip: int = 0


HEARTBEAT_S = 0.5  # a node re-sends its registration this often
# a node silent this long is taken for dead (a few seconds of CPU starvation on a loaded host are not death)
NODE_TIMEOUT_S = 5.0
