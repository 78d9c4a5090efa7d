"""A tiny renderer for the subset of Go template the generated chart uses.

Helm cannot be installed here (no Debian package, no PyPI wheel shipping the binary;
see the deploy README), so tests render the chart with this and compare it with the
plain manifests. It supports exactly: ``{{ .Values.a.b }}``, ``{{ .Release.Namespace }}``,
``{{ add X Y N }}``, ``{{- toYaml X | nindent N }}`` and whole-file
``{{- if .Values.x }} ... {{- end }}``; anything else fails the test.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_ACTION = re.compile(r"(\s*)\{\{(-?) ?(.*?) ?\}\}")


def _lookup(expr: str, values: dict[str, Any], namespace: str) -> Any:
    if expr == ".Release.Namespace":
        return namespace
    if not expr.startswith(".Values."):
        raise AssertionError(f"unsupported reference {expr!r}")
    node: Any = values
    for part in expr.removeprefix(".Values.").split("."):
        node = node[part]
    return node


def _eval(expr: str, values: dict[str, Any], namespace: str) -> str:
    if m := re.fullmatch(r"toYaml (\S+) \| nindent (\d+)", expr):
        dumped = yaml.safe_dump(_lookup(m.group(1), values, namespace), sort_keys=False)
        pad = " " * int(m.group(2))
        return "\n" + "\n".join(pad + line for line in dumped.rstrip("\n").splitlines())
    if m := re.fullmatch(r"add (.+)", expr):
        terms = m.group(1).split()
        return str(sum(int(_lookup(t, values, namespace)) if t.startswith(".") else int(t)
                       for t in terms))  # fmt: skip
    if re.fullmatch(r"\.[A-Za-z.]+", expr):
        return str(_lookup(expr, values, namespace))
    raise AssertionError(f"unsupported action {{{{ {expr} }}}}")


def render(template: str, values: dict[str, Any], namespace: str) -> Any | None:
    """The YAML document a template renders to (None when its ``if`` is false)."""
    lines = template.splitlines()
    if m := re.fullmatch(r"\{\{- if (\S+) \}\}", lines[0]):
        assert lines[-1] == "{{- end }}"
        if not _lookup(m.group(1), values, namespace):
            return None
        template = "\n".join(lines[1:-1]) + "\n"

    def action(match: re.Match[str]) -> str:
        lead = "" if match.group(2) == "-" else match.group(1)
        return lead + _eval(match.group(3), values, namespace)

    return yaml.safe_load(_ACTION.sub(action, template))
