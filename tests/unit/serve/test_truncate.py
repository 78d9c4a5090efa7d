"""Long embedding inputs: refused with a 400 naming the limit, or truncated on request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_helpers import client, config, run, tiny_encoder_dir

from modelkiln.serve import create_app
from modelkiln.serve.__main__ import build_parser, config_from_args
from modelkiln.serve.config import ModelSpec
from modelkiln.serve.encoders import LightTokenizer
from modelkiln.serve.truncation import cut, special_suffix

LIMIT = 16  # the sentence-transformers max_seq_length written below (the tokenizer says 64)
LONG = " ".join(["hello world"] * 20)  # 40 words + [CLS] [SEP] = 42 tokens


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder with a sentence_bert_config.json: its max_seq_length is the limit."""
    out = tmp_path_factory.mktemp("st") / "enc"
    shutil.copytree(tiny_encoder_dir(), out)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": LIMIT}))
    return out


def post_all(model_dir: Path, bodies: list[dict[str, Any]], **cfg: Any) -> list[httpx.Response]:
    spec = ModelSpec(path=model_dir, name="enc", precision="fp32").model_dump(mode="json")

    async def go() -> list[httpx.Response]:
        app = create_app(config(models=[spec], **cfg))
        async with client(app) as c:
            return [await c.post("/v1/embeddings", json=b) for b in bodies]

    return run(go())


def test_cut_keeps_the_closing_special_tokens() -> None:
    assert cut(list(range(10)), 4, 1) == [0, 1, 2, 9]
    assert cut(list(range(10)), 4, 0) == [0, 1, 2, 3]
    assert cut([1, 2], 4, 1) == [1, 2]


def test_special_suffix_of_bert_and_of_a_tokenizer_without_template() -> None:
    bert = LightTokenizer.from_dir(tiny_encoder_dir())
    assert special_suffix(bert) == 1
    bert._tok.post_processor = None  # no template: nothing is appended
    assert special_suffix(bert) == 0


def test_long_input_refused_by_default_names_limit_length_and_flag(st_dir: Path) -> None:
    (r,) = post_all(st_dir, [{"model": "enc", "input": ["hi", LONG]}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert f"limit of 'enc' is {LIMIT}" in err["message"]
    assert "input 1 has 42 tokens" in err["message"]
    assert '"truncate": true' in err["message"] and "--auto-truncate" in err["message"]


def test_truncate_true_cuts_to_the_limit_and_reports_the_tokens_used(st_dir: Path) -> None:
    tok = LightTokenizer.from_dir(st_dir)
    ids = tok(LONG)["input_ids"]
    expected_ids = ids[: LIMIT - 1] + ids[-1:]  # [CLS] ... [SEP], as sentence-transformers cuts
    r, by_ids = post_all(
        st_dir,
        [
            {"model": "enc", "input": [LONG, "hello"], "truncate": True},
            {"model": "enc", "input": [expected_ids]},
        ],
    )
    assert r.status_code == 200, r.text
    short = len(tok("hello")["input_ids"])
    assert r.json()["usage"]["prompt_tokens"] == LIMIT + short
    assert r.json()["data"][0]["embedding"] == pytest.approx(
        by_ids.json()["data"][0]["embedding"], abs=1e-5
    )


def test_server_auto_truncate_and_a_request_that_opts_out(st_dir: Path) -> None:
    ok, refused, too_long_ids = post_all(
        st_dir,
        [
            {"model": "enc", "input": LONG},
            {"model": "enc", "input": LONG, "truncate": False},
            {"model": "enc", "input": [5] * 40},
        ],
        auto_truncate=True,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == LIMIT
    assert refused.status_code == 400 and "truncate" in refused.json()["error"]["message"]
    assert too_long_ids.status_code == 200
    assert too_long_ids.json()["usage"]["total_tokens"] == LIMIT


def test_auto_truncate_flag_sets_the_config() -> None:
    args = build_parser().parse_args(["--model-path", "m", "--auto-truncate"])
    assert config_from_args(args).auto_truncate is True
    args = build_parser().parse_args(["--model-path", "m"])
    assert config_from_args(args).auto_truncate is False
