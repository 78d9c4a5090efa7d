"""Where rollouts live between checks and restarts: one JSON state file per model
(written atomically) and one JSONL decision log per model.

Starting a rollout takes an ``flock`` on the model's lock file, so two processes
cannot start two rollouts of one model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from modelkiln.artifacts import write_text_atomic
from modelkiln.errors import ArtifactError
from modelkiln.rollout.spec import ACTIVE, Decision, RolloutState


class StateStore:
    """Rollout state files and decision logs under one folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, model: str) -> Path:
        return self.root / f"{model}.json"

    def log_path(self, model: str) -> Path:
        """The model's JSONL decision log."""
        return self.root / f"{model}.decisions.jsonl"

    @contextlib.contextmanager
    def lock(self, model: str) -> Iterator[None]:
        """Exclusive lock on one model's rollout (across processes)."""
        with (self.root / f".{model}.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def load(self, model: str) -> RolloutState | None:
        """The model's last rollout state, or None."""
        f = self._file(model)
        if not f.is_file():
            return None
        try:
            return RolloutState.model_validate_json(f.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ArtifactError(
                f"{f} is corrupt ({exc.__class__.__name__})",
                hint="delete it to forget that rollout (traffic then goes to the baseline)",
            ) from None

    def save(self, state: RolloutState) -> None:
        """Write the state atomically (temporary file + rename)."""
        write_text_atomic(self._file(state.spec.model), state.model_dump_json(indent=2))

    def states(self) -> list[RolloutState]:
        """Every model's last rollout state."""
        out = []
        for f in sorted(self.root.glob("*.json")):
            state = self.load(f.stem)
            if state is not None:
                out.append(state)
        return out

    def active(self) -> list[RolloutState]:
        """Rollouts still running or awaiting promotion."""
        return [s for s in self.states() if s.status in ACTIVE]

    def log(self, decision: Decision) -> None:
        """Append one decision to the model's JSONL log."""
        with self.log_path(decision.model).open("a", encoding="utf-8") as fh:
            fh.write(decision.model_dump_json() + "\n")

    def decisions(self, model: str) -> list[Decision]:
        """Every logged decision of a model, oldest first."""
        f = self.log_path(model)
        if not f.is_file():
            return []
        lines = f.read_text(encoding="utf-8").splitlines()
        return [Decision.model_validate_json(line) for line in lines if line.strip()]
