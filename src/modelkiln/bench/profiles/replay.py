"""Trace replay: one JSON object a line with a send time and the request's lengths.

Each line: ``timestamp`` (seconds from the trace's start; or ``timestamp_ms``),
``input_tokens`` (or ``input_length``; approximate prompt length in words) or an
explicit ``prompt``, and ``output_tokens`` (or ``output_length`` / ``max_tokens``).
Times are shifted so the first request goes at 0 and divided by ``speedup``.

Example line: ``{"timestamp": 0.25, "input_tokens": 128, "output_tokens": 32}``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelkiln.errors import ConfigError

#: Filler words a synthetic prompt is made of (one token each in most tokenizers).
_WORDS = ("the", "model", "kiln", "bench", "data", "code", "test", "load")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    offset_s: float
    prompt: str
    max_tokens: int


def synthetic_prompt(n_words: int) -> str:
    """A prompt of about ``n_words`` tokens."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(max(n_words, 1)))


def _field(obj: dict[str, object], names: tuple[str, ...]) -> object | None:
    return next((obj[n] for n in names if n in obj), None)


def _parse_line(line: str, where: str, default_out: int) -> tuple[float, str, int]:
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        ts = _field(obj, ("timestamp", "timestamp_s"))
        t = float(ts) if ts is not None else float(obj["timestamp_ms"]) / 1000  # type: ignore[arg-type]
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            n_in = _field(obj, ("input_tokens", "input_length"))
            prompt = synthetic_prompt(int(n_in) if n_in is not None else 16)  # type: ignore[call-overload]
        out = _field(obj, ("output_tokens", "output_length", "max_tokens"))
        n_out = int(out) if out is not None else default_out  # type: ignore[call-overload]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"malformed trace line {where}: {exc} ({line.strip()[:80]!r})",
            hint='each line needs e.g. {"timestamp": 0.5, "input_tokens": 64, "output_tokens": 32}',
        ) from exc
    if t < 0 or n_out < 1:
        raise ConfigError(f"trace line {where}: negative time or output length < 1",
                          hint="timestamps >= 0, output_tokens >= 1")  # fmt: skip
    return t, prompt, n_out


def load_trace(path: Path, speedup: float = 1.0, default_output: int = 64) -> list[TraceRequest]:
    """Read a JSONL trace, sorted by time and starting at 0.

    Raises:
        ConfigError: the file is missing, empty, or a line does not parse.
    """
    if not path.is_file():
        raise ConfigError(f"trace file not found: {path}", hint="pass a JSONL file")
    if speedup <= 0:
        raise ConfigError(f"speedup must be > 0, got {speedup}", hint="e.g. 1.0")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            rows.append(_parse_line(line, f"{path}:{n}", default_output))
    if not rows:
        raise ConfigError(f"trace file {path} has no requests", hint="one JSON object a line")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [TraceRequest((t - t0) / speedup, p, m) for t, p, m in rows]
