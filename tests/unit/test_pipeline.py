"""The pipeline engine: ordering, caching, inputs, failures, the report writer, the registry."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from modelkiln import pipeline
from modelkiln.config import PipelineConfig
from modelkiln.errors import DataError, StageError
from modelkiln.pipeline import StageContext, StageSpec, run_pipeline

CALLS: list[str] = []


def fake_data(ctx: StageContext) -> None:
    CALLS.append("data")
    (ctx.out / "corpus.txt").write_text(f"files={ctx.config.max_files}")  # type: ignore[attr-defined]
    ctx.metrics["files"] = ctx.config.max_files  # type: ignore[attr-defined]
    (ctx.out / "report.md").write_text("## Data\n\n![plot](p.png)\n")


def fake_tokenizer(ctx: StageContext) -> None:
    CALLS.append("tokenizer")
    text = (ctx.inputs["data"].path / "corpus.txt").read_text()
    (ctx.out / "tok.txt").write_text(text.upper())
    ctx.metrics["vocab_size"] = ctx.config.vocab_size  # type: ignore[attr-defined]


def failing(ctx: StageContext) -> None:
    (ctx.out / "half.bin").write_bytes(b"x")
    raise DataError("source 'x' is empty", hint="point data.source at Python files")


def crashing(ctx: StageContext) -> None:
    raise ZeroDivisionError("bug")


@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> dict[str, StageSpec]:
    mod = types.ModuleType("fake_stages_mod")
    for fn in (fake_data, fake_tokenizer, failing, crashing):
        setattr(mod, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "fake_stages_mod", mod)
    stages = {
        "data": StageSpec("data", "fake_stages_mod:fake_data", description="fake data"),
        "tokenizer": StageSpec("tokenizer", "fake_stages_mod:fake_tokenizer", requires=("data",)),
    }
    monkeypatch.setattr(pipeline, "STAGES", stages)
    CALLS.clear()
    return stages


def _cfg(tmp_path: Path, **kw: object) -> PipelineConfig:
    base: dict[str, object] = {"run": "t", "runs_dir": tmp_path, "stages": ["data", "tokenizer"]}
    base.update(kw)
    cfg = PipelineConfig.model_validate(base)
    cfg.data.max_files = 3
    return cfg


def test_runs_in_order_then_caches(tmp_path: Path, fake_stages: dict[str, StageSpec]) -> None:
    first = run_pipeline(_cfg(tmp_path))
    assert [(o.stage, o.status) for o in first.outcomes] == [("data", "ran"), ("tokenizer", "ran")]
    assert (tmp_path / "t" / "tokenizer" / "tok.txt").read_text() == "FILES=3"
    second = run_pipeline(_cfg(tmp_path))
    assert [o.status for o in second.outcomes] == ["cached", "cached"]
    assert CALLS == ["data", "tokenizer"]


def test_config_change_reruns_stage_and_dependents(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    run_pipeline(_cfg(tmp_path))
    cfg = _cfg(tmp_path)
    cfg.data.max_files = 4
    result = run_pipeline(cfg)
    assert [o.status for o in result.outcomes] == ["ran", "ran"]
    cfg.tokenizer.vocab_size = 999
    result = run_pipeline(cfg)
    assert [o.status for o in result.outcomes] == ["cached", "ran"]


def test_force_and_tampered_artifact_rerun(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    run_pipeline(_cfg(tmp_path))
    assert [o.status for o in run_pipeline(_cfg(tmp_path), force=True).outcomes] == ["ran", "ran"]
    (tmp_path / "t" / "data" / "corpus.txt").write_text("tampered")
    assert run_pipeline(_cfg(tmp_path)).outcome("data").status == "ran"


def test_stage_list_and_sections_come_from_the_registry() -> None:
    from modelkiln import stages

    assert PipelineConfig().stages == list(stages.STAGES)
    for name in stages.STAGES:
        assert isinstance(
            getattr(PipelineConfig(), name), type(pipeline.stage_config(PipelineConfig(), name))
        )
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        PipelineConfig(stages=["nope"])


def test_register_stage_checks_names_and_requirements() -> None:
    from modelkiln.stages import register_stage

    with pytest.raises(StageError, match="registered twice"):
        register_stage(StageSpec("data", "x:y", config="x:C"))
    with pytest.raises(StageError, match="needs nowhere"):
        register_stage(StageSpec("late", "x:y", requires=("nowhere",), config="x:C"))
    with pytest.raises(StageError, match="no config section"):
        register_stage(StageSpec("late", "x:y"))


def test_missing_input_artifact_is_a_clear_error(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    with pytest.raises(StageError, match="needs the 'data' artifact") as exc:
        run_pipeline(_cfg(tmp_path, stages=["tokenizer"]))
    assert "add 'data' to 'stages'" in str(exc.value)


def test_input_from_an_earlier_run_is_reused(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    run_pipeline(_cfg(tmp_path, stages=["data"]))
    result = run_pipeline(_cfg(tmp_path, stages=["tokenizer"]))
    assert result.outcome("tokenizer").status == "ran"


def test_stage_errors_leave_no_artifact_and_report_failure(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    fake_stages["tokenizer"] = StageSpec("tokenizer", "fake_stages_mod:failing", requires=("data",))
    with pytest.raises(DataError, match="source 'x' is empty"):
        run_pipeline(_cfg(tmp_path))
    run_dir = tmp_path / "t"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.endswith((".md", ".png"))) == [
        "data",
        "tokenizer.log.txt",  # the failed stage's third-party log, kept for the post-mortem
    ]
    report = (run_dir / "report.md").read_text()
    assert "| tokenizer | failed |" in report
    fake_stages["tokenizer"] = StageSpec(
        "tokenizer", "fake_stages_mod:crashing", requires=("data",)
    )
    with pytest.raises(StageError, match="ZeroDivisionError: bug"):
        run_pipeline(_cfg(tmp_path))


def test_run_report_includes_stage_sections(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    result = run_pipeline(_cfg(tmp_path, stages=["data", "tokenizer"]))
    assert result.report == tmp_path / "t" / "report.md"
    text = result.report.read_text()
    assert "| data | ran |" in text
    assert "| tokenizer | ran |" in text
    assert "files=3" in text
    assert "![plot](data/p.png)" in text, "stage image links point into the stage directory"
    assert (tmp_path / "t" / "stage_times.png").read_bytes()[:4] == b"\x89PNG"


def test_optional_inputs_are_passed_when_present(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    seen: list[list[str]] = []
    mod = sys.modules["fake_stages_mod"]
    mod.record = lambda ctx: seen.append(sorted(ctx.inputs))  # type: ignore[attr-defined]
    fake_stages["train"] = StageSpec(
        "train", "fake_stages_mod:record", requires=("data",), optional=("tokenizer",)
    )
    run_pipeline(_cfg(tmp_path, stages=["data", "train"]))
    run_pipeline(_cfg(tmp_path, stages=["data", "tokenizer", "train"]))
    assert seen == [["data"], ["data", "tokenizer"]]


def test_report_writer_is_passed_in(tmp_path: Path, fake_stages: dict[str, StageSpec]) -> None:
    seen: list[list[str]] = []

    def writer(cfg: PipelineConfig, result: pipeline.PipelineResult) -> Path:
        seen.append([o.status for o in result.outcomes])
        return cfg.run_dir / "custom.md"

    result = run_pipeline(_cfg(tmp_path, stages=["data"]), report=writer)
    assert seen == [["ran"]] and result.report == tmp_path / "t" / "custom.md"
    assert run_pipeline(_cfg(tmp_path, stages=["data"]), report=None).report is None
    assert not (tmp_path / "t" / "report.md").exists()


def test_build_stage_runs_one_stage_without_a_report(
    tmp_path: Path, fake_stages: dict[str, StageSpec]
) -> None:
    artifact = pipeline.build_stage(_cfg(tmp_path), "data")
    assert artifact.path == tmp_path / "t" / "data" and CALLS == ["data"]
    assert pipeline.build_stage(_cfg(tmp_path), "data").path == artifact.path
    assert CALLS == ["data"], "the second call reuses the cached artifact"
    assert not (tmp_path / "t" / "report.md").exists()
