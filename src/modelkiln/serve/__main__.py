"""``python -m modelkiln.serve --model-path DIR [--model-path DIR ...] --port 8000``.

The handbook's command line, and the only definition of the server's flags:
``kiln serve`` passes its arguments here unchanged. Flags override the YAML
file given with ``--config``; ``--set a.b=value`` overrides any field. The
server extensions (:data:`~modelkiln.contract.serving.SERVE_EXTENSIONS`) add
their flags to the same parser and their hooks to the server.

Exit codes, decided in one place (:func:`main`): 0 after a clean drain, 2 for a
bad command line, config or extension flag (anything before serving starts,
and a config error found while starting), 1 when serving failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ConfigError, KilnError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from modelkiln.contract.serving import ServeExtension
    from modelkiln.serve.config import ServeConfig

_DESCRIPTION = "Serve Hugging Face causal LMs and encoders over an OpenAI-compatible HTTP API."


_EPILOG = "Example: kiln serve --model-path runs/quickstart/train/model --port 8000"


def build_parser(
    prog: str = "python -m modelkiln.serve", extensions: Sequence[ServeExtension] = ()
) -> argparse.ArgumentParser:
    """The command-line parser: the server's flags, then each extension's."""
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
    p.add_argument("--backend", choices=["torch", "onnx"],
                   help="backend of every model (default: an encoder's HF directory runs on the "
                        "fastest engine that passes the parity gate here)")  # fmt: skip
    p.add_argument("--threads", type=int, help="intra-op threads of torch and ONNX Runtime")
    p.add_argument("--workers", type=int, metavar="N",
                   help="server processes sharing the port (default 1; the response cache and "
                        "key limits then need Redis)")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, help="seconds to drain on SIGTERM")
    p.add_argument("--auto-truncate", action="store_true", default=None,
                   help="cut inputs past the model's limit instead of 400 (embeddings: to the "
                        "limit; prompts: their last tokens that fit)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", type=Path, metavar="PATH",
                   help="where third-party warnings, log lines and bars go "
                        f"(default {default_log_file()})")  # fmt: skip
    p.add_argument("-v", "--verbose", "--debug", action="store_true", dest="verbose",
                   help="also show third-party output on the terminal")  # fmt: skip
    for extension in extensions:
        extension.add_arguments(p)
    return p


def config_from_args(
    args: argparse.Namespace, extensions: Sequence[ServeExtension] = ()
) -> ServeConfig:
    """The :class:`ServeConfig` the arguments describe.

    An extension with ``model_spec(path)`` may turn a ``--model-path`` into other
    ``ModelSpec`` fields (e.g. a ``registry://`` reference into the verified folder).

    Raises:
        ConfigError: the arguments or the config file are invalid.
    """
    from modelkiln.serve.config import ServeConfig, load_serve_config

    if not args.model_path and not args.config:
        raise ConfigError("no model to serve", hint="pass --model-path DIR (or --config YAML)")
    named: dict[str, object] = {"host": args.host, "port": args.port, "threads": args.threads,
                                "drain_timeout_s": args.drain_timeout,
                                "auto_truncate": args.auto_truncate,
                                "workers": args.workers}  # fmt: skip
    if args.model_path:
        if args.name and len(args.name) != len(args.model_path):
            raise ConfigError("give one --name per --model-path", hint="or leave --name out")
        models = []
        for i, path in enumerate(args.model_path):
            spec = _model_spec(path, extensions)
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


def _model_spec(path: str, extensions: Sequence[ServeExtension]) -> dict[str, object]:
    """The ModelSpec fields of one ``--model-path`` (the first extension that knows it wins)."""
    for extension in extensions:
        resolve = getattr(extension, "model_spec", None)
        spec = resolve(path) if resolve is not None else None
        if spec is not None:
            return dict(spec)
    return {"path": path}


def main(
    argv: list[str] | None = None,
    prog: str = "python -m modelkiln.serve",
    *,
    extensions: Sequence[ServeExtension] | None = None,
    debug: bool = False,
) -> int:
    """Parse, serve, return the exit code (the one place errors become exit codes).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        prog: the command name shown in help and usage.
        extensions: the server extensions (default: those of ``SERVE_EXTENSIONS``).
        debug: re-raise errors instead of printing them (``kiln --debug serve``).
    """
    quiet_openmp()  # first: before any extension or engine imports torch
    from modelkiln.contract.serving import SERVE_EXTENSIONS, load_extensions

    started = False
    try:
        if extensions is None:
            extensions = load_extensions(SERVE_EXTENSIONS)
        args = build_parser(prog, extensions).parse_args(argv)  # exits 2 itself on bad flags
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with _third_party_output(args, verbose=debug or args.verbose):
            cfg = config_from_args(args, extensions)
            hooks = _hooks(extensions, args, cfg)
            started = True
            from modelkiln.serve import workers
            from modelkiln.serve.server import serve

            if (sock := workers.worker_socket()) is not None:  # a worker of --workers N
                workers.serve_worker(cfg, sock, log_level=args.log_level, hooks=hooks)
            elif cfg.workers > 1:
                workers.supervise(cfg, args, sys.argv[1:] if argv is None else list(argv))
            else:
                serve(cfg, log_level=args.log_level, hooks=hooks)
    except KilnError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1 if started and not isinstance(exc, ConfigError) else 2
    return 0


def quiet_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` for this process and its workers, unless the user set it.

    torch's OpenMP threads (GNU libgomp) spin for about 3 ms after every parallel
    region by default (``GOMP_SPINCOUNT`` 300,000). A server between two engine steps
    runs its event loop, tokenizer and HTTP parsing on the same cores, which the
    spinning threads then hold: issue 18 measured a loaded server streaming a GPT-2
    6x slower with them (64 tokens in 61.8 s vs 9.8 s at load 16). The price on an
    otherwise idle machine: ~11 % for a torch causal-LM engine (class B), none for the
    default ONNX Runtime one (docs/BENCHMARKS.md ``serve-default-engine``); a dedicated
    machine may set ``OMP_WAIT_POLICY=ACTIVE``. libgomp reads the variable once, when
    it is loaded, so this must run before torch is imported. A user's own
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept as it is.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def default_log_file() -> Path:
    """The server's third-party log when ``--log-file`` is not given (user cache dir)."""
    from modelkiln.hardware import cache_dir

    return cache_dir() / "logs" / "serve.log"


@contextlib.contextmanager
def _third_party_output(args: argparse.Namespace, *, verbose: bool) -> Iterator[None]:
    """Keep the terminal to modelkiln's and uvicorn's lines while the server runs.

    Third-party warnings, log records and bars (torchao, torch, transformers,
    bitsandbytes) go to ``--log-file``; ``-v`` / ``--debug`` shows them too.
    """
    from modelkiln.logs import capture_output, set_verbose, terminal_logging

    path: Path = args.log_file or default_log_file()
    try:  # one header per start: the file is appended to by every server run
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(f"--- modelkiln.serve pid {os.getpid()} started {time.ctime()} ---\n")
    except OSError as exc:
        raise ConfigError(f"cannot write the log file {path}: {exc}",
                          hint="pass --log-file PATH in a writable folder") from exc  # fmt: skip
    print(f"third-party output: {path}", flush=True)  # stdout: stderr is for errors
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    previous = set_verbose(verbose)
    try:
        with terminal_logging(args.log_level, fmt), capture_output(path):
            yield
    finally:
        set_verbose(previous)


def _hooks(extensions: Sequence[ServeExtension], args: argparse.Namespace, cfg: ServeConfig) -> Any:
    from modelkiln.contract.serving import merge_hooks

    return merge_hooks(*(extension.hooks(args, cfg) for extension in extensions))


if __name__ == "__main__":
    sys.exit(main())
