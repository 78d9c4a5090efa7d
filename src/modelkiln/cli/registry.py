"""``kiln registry``: register, list, show, promote, archive and roll back model versions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from modelkiln.cli._common import console, guard

if TYPE_CHECKING:
    from modelkiln.rollout.registry import ModelVersion, Registry

RegistryOpt = Annotated[
    Path | None,
    typer.Option(
        "--registry",
        help="Registry folder (default: $MODELKILN_REGISTRY or ~/.local/share/modelkiln/registry).",
    ),
]
KeepOpt = Annotated[
    int, typer.Option("--keep", min=1, help="Production versions kept deployable (default 3).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

group = typer.Typer(
    help="Model registry: immutable, sha256-verified versions (HF folder, ONNX variant, PEFT "
    "adapter) with staging / production stages. Serve one with "
    "kiln serve --model registry://NAME@production.",
    no_args_is_help=True,
)


def _open(registry: Path | None, keep: int = 3) -> Registry:
    from modelkiln.rollout.registry import Registry

    return Registry(registry, keep=keep)


def _ref(ref: str) -> tuple[str, str | None]:
    from modelkiln.rollout.uri import parse_ref

    return parse_ref(ref)


def _print(versions: list[ModelVersion], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps([v.model_dump() for v in versions], indent=2) + "\n")
        return
    table = Table(title="model registry", title_justify="left")
    for col in ("model", "version", "kind", "stage", "files", "MB", "carries", "created"):
        table.add_column(col, overflow="fold")
    for v in versions:
        table.add_row(
            escape(v.name), str(v.version), v.kind, v.stage, str(v.files),
            f"{v.size_bytes / 1e6:.1f}", ", ".join(v.carries), v.created,
        )  # fmt: skip
    console.print(table)


@group.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Model name.")],
    path: Annotated[Path, typer.Argument(help="HF model folder, ONNX variant or PEFT adapter.")],
    link: Annotated[
        bool, typer.Option("--link", help="Hard-link the files instead of copying them.")
    ] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register PATH as the next version of NAME (files copied in, sha256 recorded).

    Example: kiln registry add tiny runs/quickstart/optimize/model
    """
    with guard():
        v = _open(registry).add(name, path, link=link)
    _print([v], as_json)


@group.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered versions (all models, or one).

    Example: kiln registry list tiny
    """
    with guard():
        versions = _open(registry).list_versions(name)
    _print(versions, as_json)


@group.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION, NAME@production or @staging.")],
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file too.")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one version (default: the production one) and its history.

    Example: kiln registry show tiny@2 --verify
    """
    with guard():
        reg = _open(registry)
        name, sel = _ref(ref)
        v = reg.show(name, sel)
        if verify:
            reg.resolve(name, v.version)
    _print([v], as_json)
    if not as_json:
        for e in reg.events(name):
            console.print(f"  {e['at']}  v{e['version']}  {e['action']}", highlight=False)
        if verify:
            console.print(f"verified: every file of {v.ref} matches its sha256")


@group.command("promote")
def promote(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION.")],
    to: Annotated[str, typer.Option("--to", help="staging or production.")],
    keep: KeepOpt = 3,
    registry: RegistryOpt = None,
) -> None:
    """Promote NAME@VERSION to staging or production (older production versions beyond
    --keep are archived).

    Example: kiln registry promote tiny@2 --to production
    """
    with guard():
        name, sel = _ref(ref)
        v = _open(registry, keep).promote(name, _number(ref, sel), to)  # type: ignore[arg-type]
    console.print(f"{v.ref} is now in {v.stage}")


@group.command("archive")
def archive(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION.")],
    registry: RegistryOpt = None,
) -> None:
    """Archive NAME@VERSION: its files are removed, its metadata and history stay.

    Example: kiln registry archive tiny@1
    """
    with guard():
        name, sel = _ref(ref)
        v = _open(registry).archive(name, _number(ref, sel))
    console.print(f"{v.ref} archived")


@group.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    registry: RegistryOpt = None,
) -> None:
    """Put the previous production version of NAME back into production.

    Example: kiln registry rollback tiny
    """
    with guard():
        v = _open(registry).rollback(name)
    console.print(f"{v.ref} is in production again")


def _number(ref: str, sel: str | None) -> int:
    from modelkiln.errors import ConfigError

    if sel is None or not sel.isdigit():
        raise ConfigError(
            f"{ref!r} names no version number", hint="write NAME@VERSION, e.g. tiny@2"
        )
    return int(sel)


def register(app: typer.Typer) -> None:
    """Add the ``registry`` group to the root app."""
    app.add_typer(group, name="registry")
