"""``python -m modelkiln.serve --model-path DIR [--model-path DIR ...] --port 8000``.

The handbook's command line. Flags override the YAML file given with
``--config``; ``--set a.b=value`` overrides any field. Exit codes: 0 after a
clean drain, 1 when serving failed, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from modelkiln.errors import KilnError

if TYPE_CHECKING:
    from modelkiln.serve.config import ServeConfig

_DESCRIPTION = "Serve Hugging Face causal LMs and encoders over an OpenAI-compatible HTTP API."


_EPILOG = "Example: kiln serve --model-path runs/quickstart/train/model --port 8000"


def build_parser(prog: str = "python -m modelkiln.serve") -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, epilog=_EPILOG)
    p.add_argument("--model-path", action="append", default=[], metavar="DIR",
                   help="model directory (repeat to serve several)")  # fmt: skip
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="served name of the matching --model-path")  # fmt: skip
    p.add_argument("--config", metavar="YAML", help="ServeConfig YAML file")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", dest="overrides",
                   help="override a config field")  # fmt: skip
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accepted API key (repeatable; also $MODELKILN_API_KEYS)")  # fmt: skip
    p.add_argument("--admin-key", action="append", default=[], metavar="KEY",
                   help="/admin routes key (repeatable; also $MODELKILN_ADMIN_KEYS)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder models (off by default)")  # fmt: skip
    p.add_argument("--cache-url", metavar="URL", help="redis://host:port/db response cache")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights precision of every model (default auto)")  # fmt: skip
    p.add_argument("--backend", choices=["torch", "onnx"], help="backend of every model")
    p.add_argument("--threads", type=int, help="intra-op threads of torch and ONNX Runtime")
    p.add_argument("--drain-timeout", type=float, help="seconds to drain on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The :class:`ServeConfig` the arguments describe.

    Raises:
        KilnError: the arguments or the config file are invalid.
    """
    from modelkiln.serve.config import ServeConfig, load_serve_config

    named: dict[str, object] = {"host": args.host, "port": args.port, "threads": args.threads,
                                "drain_timeout_s": args.drain_timeout}  # fmt: skip
    if args.model_path:
        if args.name and len(args.name) != len(args.model_path):
            raise KilnError("give one --name per --model-path", hint="or leave --name out")
        models = []
        for i, path in enumerate(args.model_path):
            spec: dict[str, object] = {"path": path}
            if args.name:
                spec["name"] = args.name[i]
            if args.precision:
                spec["precision"] = args.precision
            if args.backend:
                spec["backend"] = args.backend
            if args.compile:
                spec["compile"] = True
            models.append(spec)
        named["models"] = models
    overrides = list(args.overrides)
    if args.cache_url:
        overrides.append(f"cache.url={args.cache_url}")
    cfg = load_serve_config(args.config, overrides, named)
    if args.api_key or args.admin_key:
        keys = [k.get_secret_value() for k in cfg.api_keys] + list(args.api_key)
        admin = [k.get_secret_value() for k in cfg.admin_keys] + list(args.admin_key)
        cfg = ServeConfig.model_validate(cfg.model_dump() | {"api_keys": keys, "admin_keys": admin})
    return cfg


def main(argv: list[str] | None = None, prog: str = "python -m modelkiln.serve") -> int:
    """Parse, serve, return the exit code."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.model_path and not args.config:
        print("error: pass --model-path DIR (or --config YAML)", file=sys.stderr)
        return 2
    from modelkiln.errors import ConfigError
    from modelkiln.serve.server import serve

    try:
        cfg = config_from_args(args)
    except KilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serve(cfg, log_level=args.log_level)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
