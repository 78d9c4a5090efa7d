"""Config loading, overrides and one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkiln.config import PipelineConfig, load_config, parse_override
from modelkiln.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert ROOT / "configs" / "quickstart.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# kiln "), "every shipped YAML starts with the command that runs it"


def test_packaged_quickstart_matches_repo_copy() -> None:
    packaged = ROOT / "src" / "modelkiln" / "recipes" / "quickstart.yaml"
    assert packaged.read_text() == (ROOT / "configs" / "quickstart.yaml").read_text()


def test_defaults_without_a_file() -> None:
    cfg = load_config()
    assert cfg.run == "quickstart"
    assert cfg.stages[:2] == ["data", "tokenizer"]
    assert cfg.run_dir == Path("runs/quickstart")


def test_overrides_parse_yaml_values_and_nest(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("run: a\ndata:\n  max_files: 5\n")
    cfg = load_config(
        f, ["data.max_files=7", "data.pairs.enabled=false", "tokenizer.vocab_size=512"]
    )
    assert cfg.data.max_files == 7
    assert cfg.data.pairs.enabled is False
    assert cfg.tokenizer.vocab_size == 512


def test_named_values_win_over_overrides(tmp_path: Path) -> None:
    cfg = load_config(None, ["run=fromset"], {"run": "named", "runs_dir": tmp_path, "stages": None})
    assert cfg.run == "named"
    assert cfg.runs_dir == tmp_path
    assert cfg.stages[0] == "data"


def test_unknown_field_is_one_line_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  max_filez: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    text = str(exc.value)
    assert "data.max_filez" in text
    assert "\n" not in text
    assert "fix:" in text


def test_bad_value_names_field_value_and_fix() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["tokenizer.vocab_size=10"])
    text = str(exc.value)
    assert "tokenizer.vocab_size = 10" in text
    assert "greater than or equal to 300" in text
    assert "--set tokenizer.vocab_size=" in text


def test_unknown_stage_and_fraction_sum_are_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown stage 'trian'"):
        load_config(None, ["stages=[data, trian]"])
    with pytest.raises(ConfigError, match="leaves almost"):
        load_config(None, ["data.validation_fraction=0.45", "data.test_fraction=0.46"])


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="bad override"):
        parse_override(bad)


def test_override_into_a_scalar_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("run: a\n")
    with pytest.raises(ConfigError, match="'run' is a value, not a section"):
        load_config(f, ["run.x=1"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_bad_run_name() -> None:
    with pytest.raises(ConfigError, match="run = '../escape'"):
        load_config(None, ["run=../escape"])


def test_model_level_check_names_its_field_and_fix() -> None:
    from pydantic import model_validator

    from modelkiln.configbase import FieldError, KilnModel, load_section

    class Span(KilnModel):
        low: int = 0
        high: int = 1

        @model_validator(mode="after")
        def _ordered(self) -> Span:
            if self.low > self.high:
                raise FieldError("low", f"low ({self.low}) > high ({self.high})", hint="lower low")
            return self

    class Outer(KilnModel):
        span: Span = Span()

    with pytest.raises(ConfigError) as info:
        load_section(Span, {"low": 3}, label="span config")
    assert str(info.value) == "span config: low: low (3) > high (1) — fix: lower low"
    assert info.value.hint == "lower low"
    with pytest.raises(ConfigError, match=r"span\.low: low \(5\)"):
        load_section(Outer, {"span": {"low": 5}})
