"""Parity tolerances and variant families.

Apart from the config, so the variant registry needs no config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from modelkiln.configbase import FieldError, KilnModel

__all__ = ["Family", "Tolerance"]

Family = Literal["baseline", "export", "quantization", "pruning", "distillation"]


class Tolerance(KilnModel):
    """How close a variant's outputs must be to the fp32 reference (parity check).

    An element mismatches when ``|got - ref| > atol + rtol * |ref|`` (lossless
    variants: fp32 reload, ONNX export). Lossy variants (bf16, int8) are judged
    by the signal-to-noise ratio of each whole output instead, ``min_snr_db``,
    because a handful of quantized outliers says little about the model.
    """

    atol: float | None = Field(
        None, ge=0, description="Element-wise absolute tolerance; None: judge by SNR only."
    )
    rtol: float = Field(0.0, ge=0, description="Element-wise relative tolerance (with atol).")
    min_snr_db: float | None = Field(
        None, description="Minimum SNR in dB, 10*log10(sum ref^2 / sum (got-ref)^2), per output."
    )

    @model_validator(mode="after")
    def _something_to_check(self) -> Tolerance:
        if self.atol is None and self.min_snr_db is None:
            raise FieldError(
                "atol",
                "neither atol nor min_snr_db is set: nothing to check",
                hint="set atol (element-wise) or min_snr_db (whole output), or both",
            )
        return self

    def describe(self) -> str:
        """One short phrase, e.g. ``atol=1e-04, rtol=1e-03`` or ``SNR >= 20 dB``."""
        parts = []
        if self.atol is not None:
            parts.append(f"atol={self.atol:.0e}, rtol={self.rtol:.0e}")
        if self.min_snr_db is not None:
            parts.append(f"SNR >= {self.min_snr_db:g} dB")
        return " and ".join(parts)
