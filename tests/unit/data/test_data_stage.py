"""The data stage through the pipeline engine, on a tiny fake source tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelkiln.config import DataConfig, PairsConfig, PipelineConfig
from modelkiln.data import SPLITS, load_corpus, load_humaneval, load_pairs
from modelkiln.errors import ArtifactError, DataError
from modelkiln.pipeline import run_pipeline

CORPUS_COLUMNS = ["path", "module", "text", "n_lines", "n_bytes", "n_tokens"]
PAIR_COLUMNS = ["docstring", "code", "name", "path", "module"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for i in range(8):
        pkg = root / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f'"""Package {i}."""\nVALUE = {i}\n')
        (pkg / "util.py").write_text(
            f"class Tool{i}:\n"
            f"    def run(self, x):\n"
            f'        """Run tool number {i} on x and return it."""\n'
            f"        return x + {i}\n"
        )
        (root / f"mod{i}.py").write_text(
            f'async def fetch{i}():\n    """Fetch item {i} from somewhere far away."""\n'
            f"    return {i}\n"
        )
    (root / "copy.py").write_text((root / "mod0.py").read_text())
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("assert True\n")
    return root


def config(tmp_path: Path, source: Path, **data: object) -> PipelineConfig:
    data_cfg = DataConfig(
        source=str(source),
        validation_fraction=0.2,
        test_fraction=0.2,
        **data,
    )
    return PipelineConfig(run="t", runs_dir=tmp_path / "runs", stages=["data"], data=data_cfg)


def test_stage_builds_loadable_datasets_then_caches(tmp_path: Path, tree: Path) -> None:
    cfg = config(tmp_path, tree)
    result = run_pipeline(cfg, report=None)
    outcome = result.outcome("data")
    assert outcome.status == "ran" and outcome.artifact is not None
    stage_dir = outcome.artifact.path

    corpus = load_corpus(outcome.artifact)
    assert list(corpus) == list(SPLITS)
    paths: dict[str, set[str]] = {}
    modules: dict[str, set[str]] = {}
    for split in SPLITS:
        assert corpus[split].column_names == CORPUS_COLUMNS
        assert len(corpus[split]) > 0
        paths[split] = set(corpus[split]["path"])
        modules[split] = set(corpus[split]["module"])
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not paths[a] & paths[b]
        assert not modules[a] & modules[b]
    all_paths = set().union(*paths.values())
    assert len(all_paths) == 24  # copy.py is a duplicate, tests/ is excluded
    row = corpus["train"][0]
    assert row["text"] == (tree / row["path"]).read_text()

    stats = json.loads((stage_dir / "stats.json").read_text())
    assert stats == outcome.artifact.metrics
    assert stats["duplicates_removed"] == 1
    assert sum(stats[s]["files"] for s in SPLITS) == stats["total"]["files"] == 24
    assert stats["total"]["bytes"] == sum(sum(corpus[s]["n_bytes"]) for s in SPLITS)
    assert stats["humaneval_problems"] == 164

    pairs = load_pairs(stage_dir)
    assert sum(len(pairs[s]) for s in SPLITS) == stats["total"]["pairs"] == 16
    for split in SPLITS:
        assert pairs[split].column_names == PAIR_COLUMNS
        assert set(pairs[split]["module"]) <= modules[split]
        assert stats[split]["pairs"] == len(pairs[split])
    assert "Tool3.run" in set().union(*(pairs[s]["name"] for s in SPLITS))

    problems = load_humaneval(stage_dir)
    assert len(problems) == 164 and problems.column_names[0] == "task_id"

    report = (stage_dir / "report.md").read_text()
    assert report.startswith("## Data") and "![" in report and "(data_splits.png)" in report
    assert (stage_dir / "data_splits.png").read_bytes()[:4] == b"\x89PNG"

    again = run_pipeline(cfg, report=None)
    assert again.outcome("data").status == "cached"


def test_pairs_and_humaneval_optional(tmp_path: Path, tree: Path) -> None:
    cfg = config(tmp_path, tree, humaneval=False, pairs=PairsConfig(enabled=False), max_files=5)
    stage_dir = run_pipeline(cfg, report=None).run_dir / "data"
    assert sum(len(split) for split in load_corpus(stage_dir).values()) == 5
    assert not (stage_dir / "pairs").exists() and not (stage_dir / "humaneval").exists()
    with pytest.raises(ArtifactError, match="pairs"):
        load_pairs(stage_dir)
    with pytest.raises(ArtifactError, match="humaneval"):
        load_humaneval(stage_dir)


def test_missing_source_is_a_data_error(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path / "missing-dir")
    with pytest.raises(DataError, match="missing-dir") as info:
        run_pipeline(cfg, report=None)
    assert info.value.hint
    assert not (cfg.run_dir / "data").exists()


def test_nothing_left_after_exclusion_is_a_data_error(tmp_path: Path, tree: Path) -> None:
    cfg = config(tmp_path, tree, exclude=["*.py"])
    with pytest.raises(DataError, match=r"no \.py files left"):
        run_pipeline(cfg, report=None)


def test_package_import_is_light() -> None:
    code = (
        "import sys, modelkiln.data, modelkiln.data.stage\n"
        "assert 'datasets' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_empty_split_is_saved_and_loads_back_empty(tmp_path: Path, tree: Path) -> None:
    cfg = config(tmp_path, tree)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test_fraction": 0.0})})
    artifact = run_pipeline(cfg, report=None).outcome("data").artifact
    assert artifact is not None
    corpus, pairs = load_corpus(artifact.path), load_pairs(artifact.path)
    assert len(corpus["test"]) == 0 and corpus["test"].column_names == CORPUS_COLUMNS
    assert len(pairs["test"]) == 0 and pairs["test"].column_names == PAIR_COLUMNS
    assert len(corpus["train"]) > 0
