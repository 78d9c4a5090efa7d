"""The bench tests reuse the serve tests' helpers (scripted engines, tiny models, ``run``)."""

from __future__ import annotations

import sys
from pathlib import Path

_SERVE_TESTS = str(Path(__file__).resolve().parent.parent / "serve")
if _SERVE_TESTS not in sys.path:
    sys.path.insert(0, _SERVE_TESTS)
