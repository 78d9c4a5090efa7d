"""``kiln serve`` flags of the security plug-in, and the hooks they build.

Example:
    kiln serve --model-path runs/x/train/model --key-store keys.json \\
        --audit-log audit.jsonl --trust-policy trust.yaml \\
        --ssl-certfile cert.pem --ssl-keyfile key.pem
"""

from __future__ import annotations

import argparse
from typing import Any

from modelkiln.contract.serving import ServeHooks
from modelkiln.errors import ConfigError


class SecurityExtension:
    """The :class:`~modelkiln.contract.serving.ServeExtension` of :mod:`modelkiln.security`."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the security flags to the server's parser."""
        g = parser.add_argument_group("security (scoped keys, JWT, audit, signing, TLS)")
        g.add_argument(
            "--key-store",
            metavar="FILE",
            help="kiln keys store: scoped keys with rpm/tpm limits (re-read on change)",
        )
        g.add_argument(
            "--key-secret-file",
            metavar="FILE",
            help="HMAC secret of the key store (default FILE.secret)",
        )
        g.add_argument(
            "--rate-limit-redis",
            metavar="URL",
            help="redis:// URL: share the rate-limit buckets between processes",
        )
        g.add_argument("--jwt-secret", metavar="SECRET", help="accept HS256 JWTs signed with it")
        g.add_argument("--jwt-jwks-file", metavar="FILE", help="accept RS256/ES256 JWTs (JWKS)")
        g.add_argument("--jwt-jwks-url", metavar="URL", help="JWKS URL of the identity provider")
        g.add_argument("--jwt-issuer", metavar="ISS", help="required 'iss' claim")
        g.add_argument("--jwt-audience", metavar="AUD", help="required 'aud' claim")
        g.add_argument(
            "--jwt-leeway",
            type=float,
            default=30.0,
            metavar="S",
            help="clock-skew leeway in seconds (default 30)",
        )
        g.add_argument(
            "--audit-log",
            metavar="FILE",
            help="hash-chained JSONL audit log: start/stop, adapter loads, key-store and JWKS "
            "reloads, auth failures, requests (kiln audit verify FILE); may be shared with "
            "kiln keys --audit-log",
        )
        g.add_argument(
            "--audit-requests",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="audit every authenticated request, not only admin actions",
        )
        g.add_argument(
            "--audit-prompts",
            action="store_true",
            help="also audit the prompts' token ids (off: never prompts)",
        )
        g.add_argument(
            "--audit-fsync",
            type=float,
            default=1.0,
            metavar="S",
            help="fsync the audit log at most every S seconds (0: every line)",
        )
        g.add_argument(
            "--trust-policy",
            metavar="FILE",
            help="refuse models/adapters not signed by a key it trusts",
        )
        g.add_argument(
            "--allow-pickle",
            action="store_true",
            help="load pickle checkpoints after an allowlist scan (audited)",
        )
        g.add_argument(
            "--decrypt-key-file",
            metavar="FILE",
            help="key of AES-GCM encrypted weights (kiln encrypt): safetensors or ONNX "
            "variants, decrypted in memory, never written in plaintext",
        )
        g.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate")
        g.add_argument("--ssl-keyfile", metavar="PEM", help="private key of --ssl-certfile")
        g.add_argument(
            "--ssl-ca-certs",
            metavar="PEM",
            help="require client certificates signed by this CA (mTLS)",
        )

    def hooks(self, args: argparse.Namespace, cfg: Any) -> ServeHooks | None:
        """The hooks the flags ask for (only the pickle refusal when no flag is given)."""
        policy = policy_from_args(args)
        if policy is None:  # no security flag: pickle checkpoints are still refused
            from modelkiln.security.serving import model_check

            return ServeHooks(model_checks=[lambda path: model_check(path, None, False, None)])
        if policy.audit is not None:
            models = [
                {"name": m.served_name, "path": str(m.path), "version": m.version}
                for m in getattr(cfg, "models", [])
            ]
            policy.audit.write("server.start", actor="server", models=models, **_settings(args))
        return policy.hooks()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The security settings of a server start, as audited (never a secret or a URL's
    credentials)."""
    return {
        "key_store": args.key_store,
        "jwt": {
            "hs256": bool(args.jwt_secret),
            "jwks": args.jwt_jwks_file or (args.jwt_jwks_url and "url"),
            "issuer": args.jwt_issuer,
            "audience": args.jwt_audience,
        },
        "rate_limit": "redis" if args.rate_limit_redis else "in-process",
        "trust_policy": args.trust_policy,
        "decrypt": bool(args.decrypt_key_file),
        "tls": bool(args.ssl_certfile),
        "mtls": bool(args.ssl_ca_certs),
        "allow_pickle": args.allow_pickle,
        "audit_requests": args.audit_requests,
        "audit_prompts": args.audit_prompts,
    }


def _tls_options(args: argparse.Namespace) -> dict[str, Any]:
    if not args.ssl_certfile and not args.ssl_keyfile:
        if args.ssl_ca_certs:
            raise ConfigError("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile")
        return {}
    if not (args.ssl_certfile and args.ssl_keyfile):
        raise ConfigError(
            "give both --ssl-certfile and --ssl-keyfile", hint="the certificate and its private key"
        )
    opts: dict[str, Any] = {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    if args.ssl_ca_certs:
        import ssl

        opts |= {"ssl_ca_certs": args.ssl_ca_certs, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return opts


def policy_from_args(args: argparse.Namespace) -> Any:
    """The :class:`SecurityPolicy` of the flags, or None when none is given."""
    from modelkiln.security.serving import SecurityPolicy

    names = (
        "key_store",
        "jwt_secret",
        "jwt_jwks_file",
        "jwt_jwks_url",
        "audit_log",
        "trust_policy",
        "allow_pickle",
        "decrypt_key_file",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_ca_certs",
    )
    if not any(getattr(args, n, None) for n in names):
        return None
    policy = SecurityPolicy(
        audit_requests=args.audit_requests,
        audit_prompts=args.audit_prompts,
        allow_pickle=args.allow_pickle,
        uvicorn_options=_tls_options(args),
    )
    if args.key_store:
        from modelkiln.security.keys import KeyStore

        policy.keys = KeyStore(args.key_store, args.key_secret_file)
    if args.jwt_secret or args.jwt_jwks_file or args.jwt_jwks_url:
        from modelkiln.security.jwt_auth import JWTAuthenticator, JWTConfig

        try:
            jwt_cfg = JWTConfig(
                secret=args.jwt_secret,
                jwks_file=args.jwt_jwks_file,
                jwks_url=args.jwt_jwks_url,
                issuer=args.jwt_issuer,
                audience=args.jwt_audience,
                leeway_s=args.jwt_leeway,
            )
        except ValueError as exc:
            raise ConfigError(f"bad --jwt-* flags: {exc}", hint="see kiln serve --help") from None
        policy.jwt = JWTAuthenticator(jwt_cfg)
    if args.rate_limit_redis:
        from modelkiln.security.ratelimit import RedisLimiter

        policy.limiter = RedisLimiter(args.rate_limit_redis)
    if args.audit_log:
        from modelkiln.contract.audit import AuditLog

        policy.audit = AuditLog(args.audit_log, fsync_interval_s=args.audit_fsync)
    if args.trust_policy:
        from modelkiln.security.signing import TrustPolicy

        policy.trust = TrustPolicy.load(args.trust_policy)
    if args.decrypt_key_file:
        from pathlib import Path

        from modelkiln.security.encryption import read_key_file

        read_key_file(args.decrypt_key_file)  # a missing or malformed key fails at start
        policy.decrypt_key_file = Path(args.decrypt_key_file)
    return policy
