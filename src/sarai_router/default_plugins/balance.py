"""Which replica of a model takes a request: the least busy one, or the one that holds the
request's prefix in its prompt cache.

An engine such as llama-server keeps each slot's last prompt: a conversation's next turn on
the same replica evaluates only the new tokens, on another replica the whole prompt again.
``balance = "prefix"`` keeps a conversation where its history was evaluated, in the manner
of SGLang's cache-aware router, with blocks of whole messages instead of a character tree:

* a request is cut into blocks: the tools it offers, then each message. Block ``i`` is
  known by a hash of blocks ``0..i`` (a chain), so equal hashes mean equal prefixes;
* the index maps each block hash to the replica that most recently served a request
  starting with that prefix. It holds at most ``prefix_index_blocks`` hashes, least
  recently used first out, and forgets every hash of a replica that starts a cooldown;
* a request with history (an earlier turn before its last message) goes to the replica
  of its longest known prefix, if that prefix covers at least ``prefix_min_match`` of its
  history's characters (SGLang's ``cache_threshold``) and the replica is not overloaded:
  more than ``prefix_overload_inflight`` requests in flight beyond the least busy replica
  (``balance_abs_threshold``) *and* more than ``prefix_overload_ratio`` times its count
  (``balance_rel_threshold``). Otherwise it goes to the least busy replica;
* a request without history (a new conversation) goes to the least busy replica;
* whichever replica takes a request, its blocks are recorded for it.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any, Hashable, Iterable, Mapping, Sequence

import attrs

BALANCES = ("least_busy", "prefix")
#: Roles whose messages open a conversation rather than continue it.
_LEADING_ROLES = ("system", "developer")


@attrs.frozen
class BalanceSettings:
    """Keys of ``[models.NAME]`` for a model with several replicas (``openai`` endpoints,
    ``llama_server`` replicas)."""

    #: how a request picks a replica: "least_busy" (fewest in flight) or "prefix"
    balance: str = "least_busy"
    #: prefix: the share of a request's history (characters) a replica must have served
    #: for the request to follow it (SGLang's cache_threshold)
    prefix_min_match: float = 0.5
    #: prefix: a replica is overloaded with more than this many requests in flight beyond
    #: the least busy one (SGLang's balance_abs_threshold) ...
    prefix_overload_inflight: int = 4
    #: ... and more than this many times the least busy one's (balance_rel_threshold)
    prefix_overload_ratio: float = 1.5
    #: prefix: block hashes remembered, least recently used first out (about 50 bytes each)
    prefix_index_blocks: int = 10000


def balance_problems(settings: BalanceSettings) -> Iterable[tuple[str, str]]:
    """``(key, message)`` for each balance key out of range."""
    if settings.balance not in BALANCES:
        yield "balance", (f"must be one of {', '.join(map(repr, BALANCES))}, got "
                          f"{settings.balance!r}")
    if not 0.0 <= settings.prefix_min_match <= 1.0:
        yield "prefix_min_match", "must be between 0 and 1 (a share of the history)"
    if settings.prefix_overload_inflight < 0:
        yield "prefix_overload_inflight", "must be >= 0"
    if settings.prefix_overload_ratio < 1.0:
        yield "prefix_overload_ratio", "must be >= 1"
    if settings.prefix_index_blocks < 1:
        yield "prefix_index_blocks", "must be >= 1"


def balance_fields(settings: BalanceSettings) -> dict[str, Any]:
    """The balance keys of ``settings`` (to pass them on to another settings class)."""
    return {field.name: getattr(settings, field.name)
            for field in attrs.fields(BalanceSettings)}


@attrs.frozen
class PrefixKey:
    """A request cut into blocks: ``hashes[i]`` names blocks ``0..i``, ``sizes[i]`` is
    block ``i``'s length in characters. The last block is the new turn: looked up never,
    recorded always."""

    hashes: tuple[bytes, ...]
    sizes: tuple[int, ...]
    #: an earlier turn precedes the last message
    history: bool

    @property
    def history_chars(self) -> int:
        return sum(self.sizes[:-1])


def prefix_key(messages: Sequence[Mapping[str, Any]],
               tools: Sequence[Mapping[str, Any]] | None = None) -> PrefixKey:
    """``messages`` (and the ``tools`` the request offers, which chat templates render
    before them) as chained block hashes."""
    blocks: list[str] = []
    if tools:
        blocks.append(_canonical({"tools": list(tools)}))
    blocks.extend(_canonical(message) for message in messages)
    hashes: list[bytes] = []
    digest = hashlib.blake2b(digest_size=16)
    for block in blocks:
        digest.update(block.encode("utf-8", errors="replace"))
        digest.update(b"\x00")
        hashes.append(digest.copy().digest())
    history = any(m.get("role") not in _LEADING_ROLES for m in messages[:-1])
    return PrefixKey(hashes=tuple(hashes), sizes=tuple(len(b) for b in blocks),
                     history=history)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)


class PrefixIndex:
    """Block hash -> the replica that most recently served that prefix; LRU-bounded.
    Not thread-safe: its owner (the replica set) holds a lock around it."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._owner: collections.OrderedDict[bytes, Hashable] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def longest(self, key: PrefixKey) -> tuple[Hashable | None, int]:
        """The replica of ``key``'s longest known prefix (the new turn left out) and how
        many characters that prefix holds; ``(None, 0)`` when none is known."""
        for i in range(len(key.hashes) - 2, -1, -1):
            owner = self._owner.get(key.hashes[i])
            if owner is not None:
                self._owner.move_to_end(key.hashes[i])
                return owner, sum(key.sizes[:i + 1])
        return None, 0

    def record(self, key: PrefixKey, replica: Hashable) -> None:
        """``replica`` now holds every prefix of ``key``."""
        for block in key.hashes:
            self._owner[block] = replica
            self._owner.move_to_end(block)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> int:
        """Drop every prefix ``replica`` holds (it cools down: its cache may be gone, and
        its conversations should spread over the others); how many were dropped."""
        gone = [block for block, owner in self._owner.items() if owner is replica]
        for block in gone:
            del self._owner[block]
        return len(gone)
