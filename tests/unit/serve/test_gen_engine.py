"""Generation engine on tiny random GPT-2 / Llama models: parity with ``generate``, streaming,
stops, cancellation, deadlines, errors, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from modelkiln.config import TokenizerConfig
from modelkiln.data.tokenizer import train_tokenizer
from modelkiln.errors import ServingError
from modelkiln.serve.generation import (
    DEADLINE_EXCEEDED,
    ContinuousBatchingEngine,
    FakeClock,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TorchCausalLMBackend,
)

T = TypeVar("T")
VOCAB = 300
EOS, PAD = 0, 1
TEXTS = ["def add(x, y):\n    return x + y\n\n", "héllo wörld — 日本語 🙂\n", "class A:\n    pass"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    return train_tokenizer(TEXTS * 20, TokenizerConfig(vocab_size=VOCAB))


def tiny_model(arch: str = "gpt2", seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    special = {"eos_token_id": EOS, "bos_token_id": EOS, "pad_token_id": PAD}
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=VOCAB, **special
        )
        cfg.update(special)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, **special,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def make_engine(model: Any, **kwargs: Any) -> ContinuousBatchingEngine:
    return ContinuousBatchingEngine(TorchCausalLMBackend(model), tokenizer(), **kwargs)


def greedy(rid: str, prompt: list[int], max_tokens: int, **kw: Any) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens, temperature=0.0, **kw))


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 9, 17, 30, 5, 12, 2][:count]
    return [torch.randint(5, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def reference(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
        eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


async def drain(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [event async for event in stream]


def token_ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_under_concurrency_matches_generate_one_at_a_time(arch: str) -> None:
    model = tiny_model(arch)
    ps = prompts(8)
    budgets = [12, 20, 7, 16, 20, 9, 14, 18]
    expected = [reference(model, p, n) for p, n in zip(ps, budgets, strict=True)]
    # Groups join together; each group joins once the previous one has its first token,
    # so requests join at different decode steps, queue (max_num_seqs=5) and leave early.
    groups = [[0, 1], [2], [3, 4, 5], [6], [7]]
    engine = make_engine(model, max_num_seqs=5, max_batched_tokens=64)

    async def main() -> dict[int, list[TokenEvent]]:
        await engine.start()
        results: dict[int, list[TokenEvent]] = {}

        async def rest(i: int, first: TokenEvent, stream: AsyncIterator[TokenEvent]) -> None:
            results[i] = [first, *await drain(stream)]

        tasks = []
        for group in groups:
            streams = {i: engine.generate(greedy(f"r{i}", ps[i], budgets[i])) for i in group}
            for i, stream in streams.items():
                first = await stream.__anext__()
                tasks.append(asyncio.create_task(rest(i, first, stream)))
        await asyncio.gather(*tasks)
        await engine.shutdown(drain_timeout=5)
        return results

    results = run(main())
    assert [token_ids(results[i]) for i in range(len(ps))] == expected
    for i, events in results.items():
        assert events[-1].finish_reason == ("stop" if expected[i][-1] == EOS else "length")
        assert [e.completion_tokens for e in events] == list(range(1, len(events) + 1))
        assert all(e.prompt_tokens == len(ps[i]) for e in events)
    assert engine.stats()["tokens_out"] == sum(len(e) for e in expected)


def test_backend_parity_with_scripted_joins_and_leaves() -> None:
    """Join and leave at exact steps (no event-loop timing) and compare with generate."""
    model = tiny_model("gpt2", seed=3)
    ps, budgets, join_at = prompts(6, seed=1), [5, 14, 3, 9, 12, 6], [0, 0, 2, 3, 3, 8]
    expected = [reference(model, p, n) for p, n in zip(ps, budgets, strict=True)]
    backend, got, last = TorchCausalLMBackend(model), {i: [] for i in range(6)}, {}
    for step in range(40):
        done = [i for i in last if len(got[i]) >= budgets[i] or got[i][-1] == EOS]
        backend.release([str(i) for i in done])
        for i in done:
            del last[i]
        if last:
            logits = backend.decode([str(i) for i in last], list(last.values()))
            for row, i in enumerate(list(last)):
                last[i] = int(logits[row].argmax())
                got[i].append(last[i])
        new = [i for i in range(6) if join_at[i] == step]
        if new:
            logits = backend.prefill([(str(i), ps[i]) for i in new])
            for row, i in enumerate(new):
                got[i].append(last.setdefault(i, int(logits[row].argmax())))
    assert [got[i] for i in range(6)] == expected
    assert backend.rows == []


def test_streaming_yields_each_token_as_it_is_made() -> None:
    engine = make_engine(tiny_model())

    async def main() -> tuple[TokenEvent, dict[str, float], list[TokenEvent]]:
        await engine.start()
        stream = engine.generate(greedy("s", prompts(1)[0], 20))
        first = await stream.__anext__()
        live = engine.stats()
        rest = await drain(stream)
        await engine.shutdown(5)
        return first, live, rest

    first, live, rest = run(main())
    assert first.finish_reason is None and first.completion_tokens == 1
    assert live["running"] == 1.0  # the first token arrived while the request still ran
    assert len(rest) >= 1 and rest[-1].finish_reason is not None


def test_text_is_the_decoded_output_and_stop_strings_end_it() -> None:
    engine, tok = make_engine(tiny_model()), tokenizer()
    prompt = tok.encode("def add(x, y):\n")

    async def main() -> tuple[list[TokenEvent], list[TokenEvent], str]:
        await engine.start()
        full = await drain(engine.generate(greedy("a", prompt, 40)))
        whole = text(full)
        start = next(i for i in range(3, len(whole) - 2) if "\ufffd" not in whole[i : i + 2])
        stop = whole[start : start + 2]
        cut = await drain(engine.generate(greedy("b", prompt, 40, stop=(stop, "\x00never"))))
        await engine.shutdown(5)
        return full, cut, stop

    full, cut, stop = run(main())
    whole = text(full)
    assert whole == tok.decode(token_ids(full), skip_special_tokens=True)
    assert text(cut) == whole[: whole.index(stop)]
    assert cut[-1].finish_reason == "stop" and stop not in text(cut)
    assert token_ids(cut) == token_ids(full)[: len(cut)]


def test_closing_the_stream_cancels_and_frees_the_slot() -> None:
    engine = make_engine(tiny_model(), max_num_seqs=1)

    async def main() -> tuple[list[TokenEvent], dict[str, float], list[str]]:
        await engine.start()
        hog = engine.generate(greedy("hog", prompts(1)[0], 100))
        await hog.__anext__()
        waiting = engine.generate(greedy("next", prompts(2)[1], 3))
        await hog.aclose()  # client disconnected
        events = await drain(waiting)
        for _ in range(500):  # the next step frees the finished rows
            if not engine.backend.rows:
                break
            await asyncio.sleep(0.01)
        stats, rows = engine.stats(), engine.backend.rows
        await engine.shutdown(5)
        return events, stats, rows

    events, stats, rows = run(main())
    assert events[-1].finish_reason == "length" and len(token_ids(events)) == 3
    assert stats["requests_cancelled"] == 1 and stats["running"] == 0 and rows == []


def test_deadline_cancels_a_running_request() -> None:
    clock = FakeClock(1000.0)
    engine = make_engine(tiny_model(), clock=clock)

    async def main() -> list[TokenEvent]:
        await engine.start()
        request = greedy("late", prompts(1)[0], 100)
        request.deadline = clock.now() + 5
        stream = engine.generate(request)
        first = await stream.__anext__()
        clock.advance(10)
        events = [first, *await drain(stream)]
        await engine.shutdown(5)
        return events

    events = run(main())
    assert events[-1].finish_reason == "cancelled" and events[-1].error == DEADLINE_EXCEEDED
    assert events[-1].token_id is None and len(events) < 100


def test_seeded_sampling_does_not_depend_on_the_other_requests() -> None:
    engine = make_engine(tiny_model())
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)

    async def main() -> tuple[list[int], list[int]]:
        await engine.start()
        alone = await drain(engine.generate(GenerationRequest("alone", prompts(1)[0], params)))
        others = [
            engine.generate(GenerationRequest(f"o{i}", p, SamplingParams(20, seed=i)))
            for i, p in enumerate(prompts(4, seed=5))
        ]
        crowded = engine.generate(GenerationRequest("crowd", prompts(1)[0], params))
        results = await asyncio.gather(drain(crowded), *(drain(s) for s in others))
        await engine.shutdown(5)
        return token_ids(alone), token_ids(results[0])

    alone, crowded = run(main())
    assert alone == crowded


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(tiny_model())
    calls = {"n": 0}
    real_decode = engine.backend.decode

    def flaky(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_decode(*args)

    async def main() -> tuple[list[TokenEvent], list[TokenEvent]]:
        await engine.start()
        monkeypatch.setattr(engine.backend, "decode", flaky)
        failed = await drain(engine.generate(greedy("f", prompts(1)[0], 10)))
        ok = await drain(engine.generate(greedy("ok", prompts(1)[0], 4)))
        await engine.shutdown(5)
        return failed, ok

    failed, ok = run(main())
    assert failed[-1].finish_reason == "error" and "boom" in (failed[-1].error or "")
    assert ok[-1].finish_reason == "length" and len(token_ids(ok)) == 4


def test_shutdown_drains_in_flight_requests_then_refuses_new_ones() -> None:
    engine = make_engine(tiny_model(), max_num_seqs=2)

    async def main() -> list[list[TokenEvent]]:
        await engine.start()
        streams = [engine.generate(greedy(f"d{i}", p, 8)) for i, p in enumerate(prompts(4))]
        tasks = [asyncio.create_task(drain(s)) for s in streams]
        await asyncio.sleep(0)
        await engine.shutdown(drain_timeout=60)
        with pytest.raises(ServingError, match="not accepting"):
            engine.generate(greedy("late", [5], 2))
        return await asyncio.gather(*tasks)

    for events in run(main()):
        assert events[-1].finish_reason in ("length", "stop")


def test_shutdown_past_the_drain_timeout_cancels_what_is_left() -> None:
    engine = make_engine(tiny_model(), max_num_seqs=1)

    async def main() -> list[list[TokenEvent]]:
        await engine.start()
        streams = [engine.generate(greedy(f"c{i}", p, 100)) for i, p in enumerate(prompts(2))]
        first = await streams[0].__anext__()
        tasks = [asyncio.create_task(drain(s)) for s in streams]
        await engine.shutdown(drain_timeout=0.0)
        return [[first, *await tasks[0]], await tasks[1]]

    running, queued = run(main())
    assert running[-1].finish_reason == "cancelled" and running[-1].error == "engine shut down"
    assert queued == [TokenEvent("c1", None, "", "cancelled", 3, 0, "engine shut down")]


def test_from_path_loads_model_tokenizer_and_adapter(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model(), tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lora_cfg = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    lora = get_peft_model(tiny_model(), lora_cfg)
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload()
    prompt = prompts(2)[1]

    async def generate(engine: ContinuousBatchingEngine) -> list[int]:
        await engine.start()
        events = await drain(engine.generate(greedy("x", prompt, 10)))
        await engine.shutdown(5)
        return token_ids(events)

    threads = torch.get_num_threads()
    try:
        engine = ContinuousBatchingEngine.from_path(tmp_path / "m", precision="fp32", threads=1)
        assert engine.model_name == "m" and engine.backend.dtype == torch.float32
        assert run(generate(engine)) == reference(model, prompt, 10)
        adapted = ContinuousBatchingEngine.from_path(
            tmp_path / "m", adapter=tmp_path / "adapter", precision="fp32"
        )  # the reference is fp32: pin it (auto may pick bf16 on this CPU)
        assert run(generate(adapted)) == reference(merged, prompt, 10)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ServingError, match="cannot load a causal LM"):
        ContinuousBatchingEngine.from_path(tmp_path / "missing")


def test_prefill_groups_prompts_by_length_without_changing_results() -> None:
    from modelkiln.serve.generation.backend import length_groups

    model = tiny_model("llama", seed=2)
    gen = torch.Generator().manual_seed(4)
    ps = [torch.randint(5, VOCAB, (n,), generator=gen).tolist() for n in (90, 1, 2, 40, 3)]
    groups = length_groups([(str(i), p) for i, p in enumerate(ps)])
    assert [[len(p) for _, p in g] for g in groups] == [[1, 2, 3], [40, 90]]
    expected = [reference(model, p, 6) for p in ps]
    backend = TorchCausalLMBackend(model)
    rids = [str(i) for i in range(len(ps))]
    last = backend.prefill(list(zip(rids, ps, strict=True))).argmax(-1).tolist()
    got = [[t] for t in last]
    for _ in range(5):
        last = backend.decode(rids, last).argmax(-1).tolist()
        for out, t in zip(got, last, strict=True):
            out.append(t)
    assert [g[: len(e)] for g, e in zip(got, expected, strict=True)] == expected  # EOS ends it


def test_cancelling_the_consumer_task_cancels_the_request() -> None:
    engine = make_engine(tiny_model())

    async def main() -> dict[str, float]:
        await engine.start()
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(greedy("gone", prompts(1)[0], 100)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()  # what a server does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = engine.stats()
        await engine.shutdown(5)
        return stats

    stats = run(main())
    assert stats["requests_cancelled"] == 1 and stats["running"] == 0


def test_ready_hands_over_the_queued_events_without_waiting() -> None:
    """A consumer that fell behind takes every waiting event at once, in order."""
    engine = make_engine(tiny_model())
    prompt = prompts(1)[0]

    async def main() -> tuple[list[TokenEvent], list[TokenEvent]]:
        await engine.start()
        stream = engine.generate(greedy("lag", prompt, 6))
        first = await stream.__anext__()
        while engine.stats()["requests_finished"] < 1:  # let the engine run ahead
            await asyncio.sleep(0.01)
        waiting = stream.ready()  # type: ignore[attr-defined]
        rest = await drain(stream)
        await engine.shutdown(5)
        return [first, *waiting], rest

    got, rest = run(main())
    assert rest == []  # ready() took the final event: the stream is over
    assert [e.completion_tokens for e in got] == [1, 2, 3, 4, 5, 6]
    assert got[-1].finish_reason == "length"
    assert token_ids(got) == reference(tiny_model(), prompt, 6)


def test_a_lagging_single_choice_consumer_gets_the_queued_tokens_in_one_batch() -> None:
    """``generation.runs.events`` takes what the engine already queued (one SSE write)."""
    from types import SimpleNamespace

    from modelkiln.serve.generation.runs import build_run, events
    from modelkiln.serve.metrics import ServeMetrics

    engine = make_engine(tiny_model())
    served: Any = SimpleNamespace(engine=engine, name="m", adapter=None)
    prompt = prompts(1)[0]

    async def main() -> list[list[int]]:
        await engine.start()
        run_ = build_run(served, [prompt], [SamplingParams(6, temperature=0.0)], 1, 30.0)
        batches: list[list[int]] = []
        stream = events(run_, ServeMetrics())
        batches.append([e.completion_tokens for _, e in await anext(stream)])
        while engine.stats()["requests_finished"] < 1:  # the consumer lags: tokens pile up
            await asyncio.sleep(0.01)
        batches += [[e.completion_tokens for _, e in batch] async for batch in stream]
        await engine.shutdown(5)
        return batches

    assert run(main()) == [[1], [2, 3, 4, 5, 6]]


def test_asked_for_logprobs_the_engine_scores_each_token_as_the_model_does() -> None:
    """Greedy + logprobs: each token's log p and entropy equal a plain forward pass's."""
    model = tiny_model("gpt2")
    prompt = prompts(1)[0] + [7, 8, 9]
    engine = make_engine(model)

    async def main() -> tuple[list[TokenEvent], list[TokenEvent]]:
        await engine.start()
        scored = await drain(engine.generate(greedy("a", prompt, 5, logprobs=True)))
        plain = await drain(engine.generate(greedy("b", prompt, 5)))
        await engine.shutdown(5)
        return scored, plain

    scored, plain = run(main())
    assert token_ids(scored) == token_ids(plain) == reference(model, prompt, 5)
    assert all(e.logprob is None and e.entropy is None for e in plain)
    ids = torch.tensor([prompt + token_ids(scored)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    for k, event in enumerate(e for e in scored if e.token_id is not None):
        row = logp[len(prompt) - 1 + k]
        assert event.logprob == pytest.approx(row[event.token_id].item(), abs=1e-4)
        assert event.entropy == pytest.approx(-(row.exp() * row).sum().item(), abs=1e-4)
