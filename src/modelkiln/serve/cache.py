"""Response cache for deterministic requests: in-process LRU with TTL, or Redis.

Only requests whose answer is a function of the request (embeddings,
temperature-0 completions) are cached; the key hashes the model, its version,
the route and the canonical JSON of every field that shapes the answer.

:class:`RedisCache` uses the asyncio client (the event loop never blocks) with
short socket timeouts. When Redis fails it logs once, serves without a cache,
and tries again after ``retry_s`` — a dead Redis costs at most one timeout
per retry period, never an error to the client.

Example:
    >>> cache = make_cache(CacheConfig())               # in-process LRU
    >>> await cache.set(key, b"{...}"); await cache.get(key)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from modelkiln.serve.config import CacheConfig

log = logging.getLogger(__name__)


def cache_key(model: str, version: str, route: str, fields: dict[str, Any]) -> str:
    """A stable key: sha256 of the canonical JSON of what determines the answer."""
    canonical = json.dumps(
        [model, version, route, fields], sort_keys=True, separators=(",", ":"), default=str
    )
    return "modelkiln:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache(Protocol):
    """What the server needs from a cache (values are encoded responses)."""

    async def get(self, key: str) -> bytes | None:
        """The cached value, or None on a miss (or when the cache is unavailable)."""
        ...

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` for the cache's TTL."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class NullCache:
    """No cache: every lookup misses."""

    async def get(self, key: str) -> bytes | None:
        """Always a miss."""
        return None

    async def set(self, key: str, value: bytes) -> None:
        """Drop the value."""

    async def close(self) -> None:
        """Nothing to release."""


class LRUCache:
    """In-process LRU cache whose entries expire after ``ttl_s``."""

    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        """The live value of ``key`` (refreshing its LRU position), else None."""
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value``, evicting the least recently used entries beyond ``max_entries``."""
        self._items[key] = (self._clock() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def close(self) -> None:
        """Drop every entry."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class RedisCache:
    """Redis-backed cache (``SET key value EX ttl``) that degrades to no cache on failure.

    Args:
        url: ``redis://host:port/db``.
        ttl_s: expiry of each entry.
        timeout_s: socket connect / read timeout; bounds what a dead Redis costs a request.
        retry_s: after a failure, seconds without trying Redis.
    """

    def __init__(
        self, url: str, ttl_s: float, *, timeout_s: float = 0.25, retry_s: float = 5.0
    ) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._down_until = 0.0
        self._down = False

    @property
    def available(self) -> bool:
        """False while the cache is bypassed after a failure."""
        return not self._down

    async def get(self, key: str) -> bytes | None:
        """The value from Redis, or None on a miss or while Redis is unavailable."""
        if self._skipping():
            return None
        try:
            value = await self._client.get(key)
        except Exception as exc:  # boundary: any client failure means "no cache"
            self._failed(exc)
            return None
        self._recovered()
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes) -> None:
        """Store the value with the TTL (silently skipped while Redis is unavailable)."""
        if self._skipping():
            return
        try:
            await self._client.set(key, value, ex=max(1, int(self.ttl_s)))
        except Exception as exc:  # boundary: see get
            self._failed(exc)
            return
        self._recovered()

    async def close(self) -> None:
        """Close the connection pool."""
        try:
            await self._client.aclose()
        except Exception:  # boundary: closing a broken pool must not fail shutdown
            log.debug("closing the Redis client failed", exc_info=True)

    def _skipping(self) -> bool:
        return self._down and time.monotonic() < self._down_until

    def _failed(self, exc: Exception) -> None:
        if not self._down:
            log.warning(
                "Redis cache at %s is unavailable (%s: %s); serving without cache, "
                "retrying every %.0f s",
                self.url,
                type(exc).__name__,
                exc,
                self.retry_s,
            )
        self._down = True
        self._down_until = time.monotonic() + self.retry_s

    def _recovered(self) -> None:
        if self._down:
            log.warning("Redis cache at %s is back", self.url)
            self._down = False


def make_cache(cfg: CacheConfig) -> ResponseCache:
    """The cache ``cfg`` asks for: none, Redis (when ``url`` is set) or the in-process LRU."""
    if not cfg.enabled:
        return NullCache()
    if cfg.url:
        return RedisCache(cfg.url, cfg.ttl_s)
    return LRUCache(cfg.max_entries, cfg.ttl_s)
