"""Write a benchmark's figures into its own section of docs/BENCHMARKS.md.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; re-running it replaces only that section, so the
file keeps every benchmark's latest figures with the command that made them.
"""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = """# Benchmarks

Every figure below was produced by the command shown with it (`make bench`
runs them all) and is rewritten when that command runs again. The machine is
shared and noisy (±10-40 % between runs): ratios are measured side by side in
one run; absolute numbers are for orientation only.

Each section names the CPU class it was measured on (`kiln doctor` shows this machine's):
class A = AVX2 only (AMD EPYC Zen 3), class B = AVX-512 + AVX512-BF16 + VNNI, no AMX
(AMD EPYC Zen 4), class C = AVX-512 + AMX (Intel Sapphire Rapids). Every section dated
2026-11 comes from class A. A conclusion about bf16 or int8 speed holds for its class only.
"""


def machine_line() -> str:
    """One line naming the machine and the time of the measurement."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"_{cpu_model()}, CPU class {cpu_class_label()}, {cores} usable cores, {when}._"


def cpu_class_label() -> str:
    """The CPU class the figures belong to (e.g. ``B: AVX-512 + AVX512-BF16 ...``)."""
    from modelkiln.hardware import CLASSES, cpu_class

    return CLASSES[cpu_class()].label


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def update_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of the benchmarks document."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    block = f"<!-- bench:{name} -->\n{markdown.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
    )
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
