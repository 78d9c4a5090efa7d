"""Per-key token buckets for requests per minute and tokens per minute.

Each limit is a bucket of capacity ``limit`` refilled at ``limit / 60`` per
second. A request needs one request token and a token bucket that is not in
debt; its prompt + completion tokens are debited once the response tells how
many it used (the bucket may go negative: the next requests wait until it
refills). Over a long window the admitted tokens per minute therefore equal the
limit.

:class:`MemoryLimiter` keeps the buckets in the process; :class:`RedisLimiter`
keeps them in Redis, updated by Lua scripts (atomic, Redis's clock), so that
every worker and replica shares them.

Example:
    >>> lim = MemoryLimiter()
    >>> lim.acquire("key:a", rpm=2, tpm=None).allowed
    True
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Decision:
    """Whether a request is admitted, and the numbers for the ``x-ratelimit-*`` headers."""

    allowed: bool
    retry_after_s: float = 0.0
    rpm: int | None = None
    remaining_requests: float | None = None
    reset_requests_s: float = 0.0
    tpm: int | None = None
    remaining_tokens: float | None = None
    reset_tokens_s: float = 0.0

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers (plus ``Retry-After`` when refused)."""
        out: dict[str, str] = {}
        if self.rpm is not None and self.remaining_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, math.floor(self.remaining_requests)))
            out["x-ratelimit-reset-requests"] = f"{self.reset_requests_s:.3f}s"
        if self.tpm is not None and self.remaining_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(self.remaining_tokens)))
            out["x-ratelimit-reset-tokens"] = f"{self.reset_tokens_s:.3f}s"
        if not self.allowed:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s - 1e-6)))
        return out


class Limiter(Protocol):
    """What the security middleware needs from a limiter."""

    def acquire(self, key: str, rpm: int | None, tpm: int | None) -> Decision:
        """Admit one request (taking a request token) or refuse it."""
        ...

    def debit(self, key: str, tpm: int | None, tokens: int) -> None:
        """Charge the tokens a finished request used."""
        ...


def _refill(level: float, stamp: float, now: float, limit: int) -> float:
    return min(float(limit), level + (now - stamp) * limit / 60.0)


class MemoryLimiter:
    """Token buckets in this process (one server process, or a test)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # bucket name -> (level, last update)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, name: str, limit: int, now: float) -> float:
        level, stamp = self._buckets.get(name, (float(limit), now))
        return _refill(level, stamp, now, limit)

    def acquire(self, key: str, rpm: int | None, tpm: int | None) -> Decision:
        """Admit one request or refuse it, with the wait until it would be admitted."""
        with self._lock:
            now = self._clock()
            req = self._level(f"{key}:r", rpm, now) if rpm else math.inf
            tok = self._level(f"{key}:t", tpm, now) if tpm else math.inf
            wait_r = (1.0 - req) * 60.0 / rpm if rpm and req < 1.0 else 0.0
            wait_t = (1e-9 - tok) * 60.0 / tpm if tpm and tok <= 0.0 else 0.0
            allowed = wait_r == 0.0 and wait_t == 0.0
            if allowed and rpm:
                req -= 1.0
            if rpm:
                self._buckets[f"{key}:r"] = (req, now)
            if tpm:
                self._buckets[f"{key}:t"] = (tok, now)
        return _decision(allowed, rpm, req, tpm, tok, max(wait_r, wait_t))

    def debit(self, key: str, tpm: int | None, tokens: int) -> None:
        """Charge ``tokens`` to the key's token bucket (it may go into debt)."""
        if not tpm or tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            self._buckets[f"{key}:t"] = (self._level(f"{key}:t", tpm, now) - tokens, now)


def _decision(
    allowed: bool, rpm: int | None, req: float, tpm: int | None, tok: float, wait: float
) -> Decision:
    return Decision(
        allowed=allowed,
        retry_after_s=wait,
        rpm=rpm,
        remaining_requests=req if rpm else None,
        reset_requests_s=(rpm - req) * 60.0 / rpm if rpm else 0.0,
        tpm=tpm,
        remaining_tokens=tok if tpm else None,
        reset_tokens_s=(tpm - tok) * 60.0 / tpm if tpm else 0.0,
    )


# KEYS: request bucket, token bucket. ARGV: rpm (0 = none), tpm (0 = none), ttl seconds.
# Returns {allowed, request level, token level, wait} as strings (Lua numbers lose floats).
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function level(key, limit)
  local v = redis.call('HMGET', key, 'l', 's')
  if not v[1] then return limit end
  return math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / 60.0)
end
local rpm, tpm, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local req, tok, wait = 1e18, 1e18, 0
if rpm > 0 then req = level(KEYS[1], rpm); if req < 1 then wait = (1 - req) * 60 / rpm end end
if tpm > 0 then
  tok = level(KEYS[2], tpm)
  if tok <= 0 then wait = math.max(wait, (1e-9 - tok) * 60 / tpm) end
end
local allowed = 0
if wait == 0 then allowed = 1; if rpm > 0 then req = req - 1 end end
if rpm > 0 then redis.call('HSET', KEYS[1], 'l', tostring(req), 's', tostring(now));
  redis.call('EXPIRE', KEYS[1], ttl) end
if tpm > 0 then redis.call('HSET', KEYS[2], 'l', tostring(tok), 's', tostring(now));
  redis.call('EXPIRE', KEYS[2], ttl) end
return {allowed, tostring(req), tostring(tok), tostring(wait)}
"""

# KEYS: token bucket. ARGV: tpm, tokens, ttl.
_DEBIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tpm, n, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'l', 's')
local lvl = tpm
if v[1] then lvl = math.min(tpm, tonumber(v[1]) + (now - tonumber(v[2])) * tpm / 60.0) end
redis.call('HSET', KEYS[1], 'l', tostring(lvl - n), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], ttl)
return tostring(lvl - n)
"""


class RedisLimiter:
    """Token buckets in Redis, shared by every process that points at the same server.

    Args:
        url: ``redis://host:port/db``.
        prefix: key prefix of the buckets.
    """

    def __init__(self, url: str, prefix: str = "modelkiln:rl:") -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=1.0)
        self._prefix = prefix
        self._acquire = self._redis.register_script(_ACQUIRE_LUA)
        self._debit = self._redis.register_script(_DEBIT_LUA)

    def acquire(self, key: str, rpm: int | None, tpm: int | None) -> Decision:
        """Admit one request or refuse it (one atomic script call)."""
        if not rpm and not tpm:
            return Decision(allowed=True)
        keys = [f"{self._prefix}{key}:r", f"{self._prefix}{key}:t"]
        allowed, req, tok, wait = self._acquire(keys=keys, args=[rpm or 0, tpm or 0, 120])
        return _decision(bool(int(allowed)), rpm, float(req), tpm, float(tok), float(wait))

    def debit(self, key: str, tpm: int | None, tokens: int) -> None:
        """Charge ``tokens`` to the key's token bucket (it may go into debt)."""
        if tpm and tokens > 0:
            self._debit(keys=[f"{self._prefix}{key}:t"], args=[tpm, tokens, 120])
