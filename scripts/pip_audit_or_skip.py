"""`make lint`'s dependency audit: pip-audit over the venv; skipped with a message when the
vulnerability service cannot be reached (pip-audit then reports every package as "not found
on PyPI" and audits nothing, which must not read as "no known vulnerabilities")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def main() -> int:
    cmd = [
        str(BIN / "pip-audit"),
        "--local",
        "--skip-editable",
        "--progress-spinner",
        "off",
        "--format",
        "json",
        "--timeout",
        "15",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"pip-audit: skipped ({exc})")
        return 0
    try:
        deps = json.loads(proc.stdout or "{}").get("dependencies", [])
    except ValueError:
        deps = []
    audited = [d for d in deps if "skip_reason" not in d]
    if not audited:
        print(
            f"pip-audit: skipped, the vulnerability service is unreachable (none of "
            f"{len(deps)} packages could be looked up; exit {proc.returncode})"
        )
        return 0
    vulnerable = [d for d in audited if d.get("vulns")]
    for d in vulnerable:
        ids = ", ".join(v["id"] for v in d["vulns"])
        print(f"pip-audit: {d['name']} {d['version']} is vulnerable: {ids}")
    print(f"pip-audit: {len(audited)} packages audited, {len(vulnerable)} vulnerable")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
