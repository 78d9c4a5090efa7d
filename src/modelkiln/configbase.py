"""The base of every config model (kept apart so stage configs can import it without cycles)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class KilnModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
