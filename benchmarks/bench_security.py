"""Security overhead and limiter accuracy (docs/BENCHMARKS.md "Security").

1. Overhead per request of the security plug-in's request path (authenticate +
   guard.admit + the observer's token debit), measured on the plug-in itself so
   that HTTP noise does not drown microseconds: no auth, hashed key, key + rate
   limit in-process, key + rate limit in Redis (a redis-server on loopback),
   JWT RS256 (JWKS file).
2. Limiter accuracy: a real server (fake engine) and 8 client threads pushing
   one key at 3x its tokens-per-minute limit for --seconds; the admitted tokens
   per minute after the initial burst is drained, against the limit.

Run: .venv/bin/python benchmarks/bench_security.py [--n 5000] [--rounds 10] [--seconds 60]
     [--skip-accuracy] [--skip-overhead] [--redis]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def _pcts(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_us": round(statistics.median(samples) * 1e6, 1),
        "p99_us": round(samples[int(len(samples) * 0.99)] * 1e6, 1),
    }


def _request(token: str | None) -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return SimpleNamespace(
        headers=headers, client=None, url=SimpleNamespace(path="/v1/completions")
    )


def _time_path(hooks: Any, token: str | None, n: int) -> list[tuple[float, float]]:
    """(wall, thread CPU) seconds of ``n`` passes through the plug-in's per-request path.

    The CPU time leaves out the time the thread was descheduled: on a machine loaded by
    other work, wall-clock p99 measures the scheduler more than the code."""
    from modelkiln.contract.serving import RequestRecord

    req = _request(token)
    out = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.thread_time()
        principal = hooks.authenticator.authenticate(req) if hooks.authenticator else None
        for guard in hooks.guards:
            guard.admit(principal, "lm", "/v1/completions", 64)
        record = RequestRecord(
            route="/v1/completions",
            method="POST",
            status=200,
            latency_s=0.0,
            time=0.0,
            model="lm",
            input_tokens=1,
            output_tokens=0,
            principal=getattr(principal, "subject", None),
        )
        for obs in hooks.observers:
            obs.observe(record)
        out.append((time.perf_counter() - t0, time.thread_time() - c0))
    return out


def _redis(tmp: Path) -> tuple[str, subprocess.Popen[bytes]] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    from serve_support import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return f"redis://127.0.0.1:{port}/0", proc


def overhead(n: int, rounds: int = 10) -> dict[str, Any]:
    """p50 / p99 of the plug-in's per-request work, per configuration (``n`` samples each,
    taken in ``rounds`` interleaved rounds)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from modelkiln.contract.audit import AuditLog
    from modelkiln.security.jwt_auth import JWTAuthenticator, JWTConfig
    from modelkiln.security.keys import KeyStore
    from modelkiln.security.ratelimit import RedisLimiter
    from modelkiln.security.serving import SecurityPolicy

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-sec-"))
    store = KeyStore(tmp / "keys.json")
    plain, _ = store.create("infer")
    limited, _ = store.create("infer", rpm=10**9, tpm=10**12)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) | {"kid": "k"}
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    token = jwt.encode(
        {"sub": "ana", "exp": int(time.time()) + 3600}, key, algorithm="RS256", headers={"kid": "k"}
    )
    jwt_auth = JWTAuthenticator(JWTConfig(jwks_file=tmp / "jwks.json"))
    audit = AuditLog(tmp / "audit.jsonl", fsync_interval_s=1.0)
    configs: dict[str, tuple[Any, str | None]] = {
        "no auth": (SecurityPolicy().hooks(), None),
        "hashed key": (SecurityPolicy(keys=store).hooks(), plain),
        "key + rate limit (in-process)": (SecurityPolicy(keys=store).hooks(), limited),
        "key + rate limit (in-process) + audit every request (fsync 1 s)": (
            SecurityPolicy(keys=store, audit=audit).hooks(),
            limited,
        ),
    }
    redis = _redis(tmp)
    if redis is not None:
        hooks = SecurityPolicy(keys=store, limiter=RedisLimiter(redis[0])).hooks()
        configs["key + rate limit (Redis, loopback)"] = (hooks, limited)
    configs["JWT RS256"] = (SecurityPolicy(jwt=jwt_auth).hooks(), token)
    # Interleaved: each round runs every configuration once, so a burst of load from other
    # work on the machine lands on all of them rather than on whichever ran then.
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, (hooks, tok) in configs.items():
            got = _time_path(hooks, tok, per_round + per_round // 10)
            samples[name] += got[per_round // 10 :]  # the first tenth warms caches
    if redis is not None:
        redis[1].kill()
    audit.close()
    return {
        name: _pcts([w for w, _ in got])
        | {f"cpu_{k}": v for k, v in _pcts([c for _, c in got]).items()}
        | {"n": len(got)}
        for name, got in samples.items()
    }


def accuracy(
    seconds: float, tpm: int = 12_000, clients: int = 8, redis: bool = False
) -> dict[str, Any]:
    """Admitted tokens per minute of one key pushed at 3x its limit by ``clients`` threads
    (buckets in-process, or in a redis-server on loopback with ``redis``)."""
    import httpx
    from serve_support import FakeEngine

    from modelkiln.security.keys import KeyStore
    from modelkiln.security.serving import SecurityPolicy
    from modelkiln.serve import ModelServer, ServeConfig

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-acc-"))
    store = KeyStore(tmp / "keys.json")
    key, _ = store.create("infer", tpm=tpm)
    cfg = ServeConfig.model_validate(
        {
            "models": [{"path": "f", "name": "lm"}],
            "port": 0,
            "cache": {"enabled": False},
            "drain_timeout_s": 1,
        }
    )
    policy = SecurityPolicy(keys=store)
    redis_proc = _redis(tmp) if redis else None
    if redis_proc is not None:
        from modelkiln.security.ratelimit import RedisLimiter

        policy.limiter = RedisLimiter(redis_proc[0])
    server = ModelServer(config=cfg, engines={"lm": FakeEngine()}, hooks=policy.hooks())
    url = server.start(timeout=60)
    body = {"model": "lm", "prompt": "def f(x):", "max_tokens": 16, "temperature": 0.5}
    probe = httpx.post(
        url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ).json()
    per_request = probe["usage"]["total_tokens"]
    interval = clients * 60.0 / (3 * tpm / per_request)  # each client's pace for 3x the limit
    log: list[tuple[float, int, int]] = []  # (time, status, tokens)
    lock = threading.Lock()
    # Run until the initial burst (one minute of tokens) is spent, then 5 s + the window.
    stop = [time.monotonic() + 600.0]

    def client() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            nxt = time.monotonic()
            while time.monotonic() < stop[0]:
                r = c.post(url + "/v1/completions", json=body)
                used = r.json()["usage"]["total_tokens"] if r.status_code == 200 else 0
                with lock:
                    now = time.monotonic()
                    log.append((now, r.status_code, used))
                    if r.status_code == 429 and stop[0] - now > seconds + 10.0:
                        stop[0] = now + seconds + 6.0
                nxt += interval
                time.sleep(max(0.0, nxt - time.monotonic()))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.stop()
    if redis_proc is not None:
        redis_proc[1].kill()
    first_429 = min(t for t, s, _ in log if s == 429)
    start = first_429 + 5.0  # the burst is spent: measure the steady state
    window = [(t, s, u) for t, s, u in log if start <= t < start + seconds]
    admitted = sum(u for _, s, u in window if s == 200)
    offered = len(window) * per_request
    per_min = admitted * 60.0 / seconds
    return {
        "buckets": "redis" if redis_proc else "in-process",
        "tpm_limit": tpm,
        "clients": clients,
        "seconds": seconds,
        "offered_tokens_per_min": round(offered * 60.0 / seconds),
        "admitted_tokens_per_min": round(per_min),
        "error_pct": round((per_min - tpm) / tpm * 100, 2),
        "statuses": {str(s): sum(1 for _, x, _ in window if x == s) for s in {200, 429}},
    }


def main() -> None:
    """Print both measurements as JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=5000, help="requests per overhead configuration")
    p.add_argument("--rounds", type=int, default=10, help="interleaved overhead rounds")
    p.add_argument("--seconds", type=float, default=60.0, help="accuracy window")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--redis", action="store_true", help="accuracy with the buckets in Redis")
    args = p.parse_args()
    out: dict[str, Any] = {"loadavg_start": os.getloadavg()}
    if not args.skip_overhead:
        out["overhead"] = overhead(args.n, args.rounds)
    if not args.skip_accuracy:
        out["accuracy"] = accuracy(args.seconds, redis=args.redis)
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
