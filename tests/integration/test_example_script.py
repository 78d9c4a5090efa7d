"""examples/train_code_model.py keeps the handbook's command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_code_model.py"


def test_handbook_flags_are_accepted() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--quick-demo", "--model_name", "--use_lora", "--use_qlora", "--num_epochs",
                 "--output_dir", "--r", "--alpha"):  # fmt: skip
        assert flag in out.stdout
