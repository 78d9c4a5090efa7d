"""The byte-level BPE tokenizer: exact round trip, special tokens, save/load, the stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelkiln.artifacts import load_artifact, stage_writer
from modelkiln.config import PipelineConfig, TokenizerConfig
from modelkiln.data import tokenizer as tk
from modelkiln.errors import ArtifactError, DataError, StageError
from modelkiln.pipeline import run_pipeline

CORPUS = [
    'def add(a, b):\n    """Return a + b."""\n    return a + b\n',
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(name)\n",
    "if __name__ == '__main__':\n\tmain()\r\n",
    "# naïve café — ünïcode\nvalue = {'key': [1, 2, 3]}\n",
] * 20

TRICKY = [
    "",
    " ",
    "\n",
    "a\r\nb\r\n",
    "lone\rcarriage\r",
    "\ttabs\t\tand  spaces   \n",
    "trailing   \n\n\n   ",
    "form\x0cfeed\x0b",
    "nul\x00byte",
    "π = 3.14159\nnaïve = 'café'\n",
    "def 函数(参数):\n    return 参数  # 中文\n",
    "emoji = '🐍🔥👩‍💻'\n",
    "combining: e\u0301 vs \u00e9; nbsp:\u00a0; zwsp:\u200b; bom:\ufeff",
    "\U0010ffff\ue000",
    "x" * 5000,
    "    " * 300 + "deep()\n",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return tk.train_tokenizer(CORPUS, TokenizerConfig(vocab_size=400, min_frequency=2))


@pytest.fixture(scope="module")
def saved(tok: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tk.save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer")


def roundtrip(tok: Any, text: str) -> str:
    result: str = tok.decode(tok.encode(text))
    return result


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tricky_strings_round_trip_exactly(tok: Any, text: str) -> None:
    assert roundtrip(tok, text) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text())
def test_any_text_round_trips_exactly(tok: Any, text: str) -> None:
    assert roundtrip(tok, text) == text


def _package_sources(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed")
    return sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py"))


@pytest.mark.parametrize("package", ["rich", "typer"])
def test_unseen_package_sources_round_trip(tok: Any, package: str) -> None:
    files = _package_sources(package)
    # bytes -> str without newline translation: CRLF and lone CR must survive.
    texts = [f.read_bytes().decode("utf-8") for f in files]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    decoded = tok.batch_decode(ids)
    bad = [str(f) for f, text, back in zip(files, texts, decoded, strict=True) if text != back]
    assert len(files) > 10
    assert bad == []


def test_encode_adds_no_special_tokens(tok: Any) -> None:
    ids = tok.encode("x = 1\n")
    assert not set(ids) & set(range(len(tk.SPECIAL_TOKENS)))
    assert tok("x = 1\n")["input_ids"] == ids


def test_special_tokens_have_fixed_single_ids(tok: Any) -> None:
    assert [tok.encode(t) for t in tk.SPECIAL_TOKENS] == [[0], [1], [2], [3], [4]]
    assert tok.eos_token_id == tok.bos_token_id == 0
    assert tok.pad_token_id == 1
    assert tok.unk_token is None
    assert (tok.fim_prefix_token_id, tok.fim_middle_token_id, tok.fim_suffix_token_id) == (2, 3, 4)
    assert tok.model_max_length == 1024


def test_vocab_size_is_capped_and_alphabet_complete(tok: Any) -> None:
    assert 256 + len(tk.SPECIAL_TOKENS) < len(tok) <= 400
    # every byte is a base token, so nothing is ever unknown
    assert tok.decode(tok.encode(bytes(range(128, 256)).decode("latin-1"))) == bytes(
        range(128, 256)
    ).decode("latin-1")


def test_training_is_deterministic(tok: Any) -> None:
    again = tk.train_tokenizer(CORPUS, TokenizerConfig(vocab_size=400, min_frequency=2))
    assert again.get_vocab() == tok.get_vocab()


def test_cap_bytes_keeps_order_and_cuts_last() -> None:
    assert list(tk.cap_bytes(["abc", "déf", "ghi"], 5)) == ["abc", "d"]
    assert list(tk.cap_bytes(["abc", "déf"], 3)) == ["abc"]
    assert list(tk.cap_bytes(["ab"], None)) == ["ab"]


def test_max_train_bytes_limits_what_is_learned() -> None:
    texts = ["aaaa bbbb " * 50, "zzzz yyyy " * 50]
    capped = tk.train_tokenizer(texts, TokenizerConfig(vocab_size=300, max_train_bytes=500))
    vocab = capped.get_vocab()
    assert "aaaa" in vocab
    assert "zzzz" not in vocab


def test_auto_tokenizer_loads_saved_folder(tok: Any, saved: Path) -> None:
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(saved))
    for text in [*TRICKY, *CORPUS[:5]]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert (loaded.eos_token, loaded.pad_token) == (tk.EOS_TOKEN, tk.PAD_TOKEN)
    assert loaded.fim_middle_token_id == 3
    assert loaded.extra_special_tokens == list(tk.FIM_TOKENS.values())
    assert set(tk.SPECIAL_TOKENS) <= set(loaded.all_special_tokens)
    assert loaded.model_max_length == 1024
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False


def test_load_tokenizer_accepts_folder_or_stage_dir(saved: Path) -> None:
    assert tk.load_tokenizer(saved).pad_token_id == 1
    assert tk.load_tokenizer(saved.parent).pad_token_id == 1


def test_load_tokenizer_without_tokenizer_raises(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no tokenizer"):
        tk.load_tokenizer(tmp_path)


def test_skip_special_tokens_drops_fim_markers(tok: Any) -> None:
    ids = [tok.fim_prefix_token_id, *tok.encode("a = "), tok.fim_suffix_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "a = "


# --- the stage through the engine ------------------------------------------------------


def _write_data_artifact(run_dir: Path, splits: dict[str, list[tuple[str, str]]]) -> None:
    from datasets import Dataset, DatasetDict

    corpus = DatasetDict(
        {
            name: Dataset.from_dict({"path": [p for p, _ in rows], "text": [t for _, t in rows]})
            for name, rows in splits.items()
        }
    )
    with stage_writer(run_dir, "data", cache_key="x") as out:
        corpus.save_to_disk(str(out.path / "corpus"))


def _splits() -> dict[str, list[tuple[str, str]]]:
    train = [(f"pkg/mod{i}.py", text) for i, text in enumerate(CORPUS)]
    return {
        "train": train,
        "validation": [("val/a.py", TRICKY[3]), ("val/b.py", TRICKY[10])],
        "test": [("test/c.py", TRICKY[11]), ("test/empty.py", "")],
    }


def _config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(
        run="tok",
        runs_dir=tmp_path,
        stages=["tokenizer"],
        tokenizer=TokenizerConfig(vocab_size=400),
    )


def test_stage_trains_saves_verifies_and_caches(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    _write_data_artifact(cfg.run_dir, _splits())
    first = run_pipeline(cfg, report=None)
    outcome = first.outcome("tokenizer")
    assert outcome.status == "ran"
    artifact = load_artifact(cfg.run_dir / "tokenizer")
    m = artifact.metrics
    assert m["roundtrip_failures"] == 0
    assert m["roundtrip_files_checked"] == len(CORPUS) + 4
    assert m["special_token_ids"] == {t: i for i, t in enumerate(tk.SPECIAL_TOKENS)}
    assert m["splits"]["test"]["files"] == 2
    assert m["splits"]["train"]["bytes"] == m["train_bytes"] == sum(len(t.encode()) for t in CORPUS)
    assert m["splits"]["train"]["bytes_per_token"] > 1.0
    assert m["vocab_size"] <= 400
    report = (artifact.path / "report.md").read_text()
    assert report.startswith("## Tokenizer")
    assert f"]({tk.REPORT_PLOT})" in report
    assert (artifact.path / tk.REPORT_PLOT).read_bytes().startswith(b"\x89PNG")
    loaded = tk.load_tokenizer(artifact)
    assert loaded.decode(loaded.encode(TRICKY[3])) == TRICKY[3]

    second = run_pipeline(cfg, report=None)
    assert second.outcome("tokenizer").status == "cached"


def test_stage_names_the_first_file_that_fails_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenizers import normalizers

    real_train = tk.train_tokenizer

    def lossy_train(texts: Any, cfg: TokenizerConfig) -> Any:
        tok = real_train(texts, cfg)
        tok.backend_tokenizer.normalizer = normalizers.NFKC()  # "ﬁ" -> "fi": not reversible
        return tok

    monkeypatch.setattr(tk, "train_tokenizer", lossy_train)
    cfg = _config(tmp_path)
    splits = _splits()
    splits["validation"].append(("val/ligature.py", "de\ufb01ne = 1\n"))
    _write_data_artifact(cfg.run_dir, splits)
    with pytest.raises(DataError, match=r"val/ligature\.py \(validation split\)"):
        run_pipeline(cfg, report=None)
    assert not (cfg.run_dir / "tokenizer").exists()


def test_stage_without_data_artifact_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="needs the 'data' artifact"):
        run_pipeline(_config(tmp_path), report=None)
