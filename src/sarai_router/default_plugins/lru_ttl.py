"""Default cache policy: evict the least recently used idle model; unload after a TTL idle.

The TTL is ``[cache] ttl_seconds``, overridden per model by ``[models.NAME] ttl_seconds``,
and counts from the end of the model's last generation. The pool itself never offers a
pinned or busy model to these hooks.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl(trylast=True)
def select_eviction(candidates, needed_mb, loading):
    if not candidates:
        return None
    return min(candidates, key=lambda resident: resident.last_used).name


@hookimpl(trylast=True)
def model_expired(resident, now, cache):
    ttl = cache.ttl_seconds if resident.spec.ttl_seconds is None else resident.spec.ttl_seconds
    return now - resident.last_used >= ttl
