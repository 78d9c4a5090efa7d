"""``kiln bench``: server load, offline sweeps, comparisons and history."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from modelkiln.cli._common import RichProgress, console, guard

bench_app = typer.Typer(
    help="Benchmark a server (serve), a model offline (offline), compare runs (compare, history).",
    no_args_is_help=True,
)

_ROWS = (
    "throughput_rps",
    "goodput_rps",
    "output_tokens_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "ttft_response_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "itl_p99_ms",
    "latency_p50_ms",
    "latency_p99_ms",
    "response_p50_ms",
    "response_p99_ms",
    "wait_p99_ms",
    "send_lag_p99_ms",
    "client_cpu_util",
    "errors",
)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_summary(result: dict[str, Any]) -> None:
    table = Table(
        title=f"kiln bench serve {result['url']} ({result['model']}, {result['kind']})",
        title_justify="left",
    )
    s = result.get("summary")
    if s is not None:
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("mode", s["mode"])
        for key in _ROWS:
            if key in s:
                table.add_row(key, _fmt(s[key]))
        for name, row in (result.get("slo") or {}).get("targets", {}).items():
            ci = row.get("ci_ms")
            extra = f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
            mark = "ok" if row["ok"] else "FAIL"
            table.add_row(
                f"slo {name}", f"{_fmt(row['value_ms'])}{extra} <= {row['bound_ms']:g} {mark}"
            )
    else:
        rows = result.get("steps") or result.get("probes") or []
        table.add_column("offered rps", justify="right")
        table.add_column("achieved rps", justify="right")
        table.add_column("detail")
        for row in rows:
            detail = (
                ("SLO ok" if row.get("ok") else "SLO fail")
                if "ok" in row
                else (f"response p99 {_fmt(row.get('response_p99_ms'))} ms, errors {row['errors']}")
            )
            table.add_row(
                _fmt(row.get("offered_rps", row.get("rate"))), _fmt(row["throughput_rps"]), detail
            )
    console.print(table)
    if "best_rate_rps" in result:
        lo, hi = result["ci_rps"]
        console.print(
            f"highest rate meeting {result['slo']}: {_fmt(result['best_rate_rps'])} "
            f"req/s (interval {_fmt(lo)} .. {_fmt(hi)})"
        )
    if "saturated_at_rps" in result:
        console.print(
            f"saturated at {_fmt(result['saturated_at_rps'])} req/s; "
            f"max throughput {_fmt(result['max_throughput_rps'])} req/s"
        )


@bench_app.command("serve")
def serve(
    url: Annotated[str, typer.Argument(help="Server base URL, e.g. http://127.0.0.1:8000.")],
    kind: Annotated[str, typer.Option(help="completions | chat | embeddings.")] = "completions",
    model: Annotated[str | None, typer.Option(help="Model (default: first of /v1/models).")] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Closed loop: N clients.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Open loop: requests/s (start of sweep/search).")
    ] = None,
    arrival: Annotated[str, typer.Option(help="constant | poisson | gamma.")] = "poisson",
    burstiness: Annotated[float, typer.Option(help="Gamma shape (<1 bursty, 1 = Poisson).")] = 1.0,
    trace: Annotated[
        Path | None, typer.Option(help="Replay a JSONL trace (timestamp, lengths).")
    ] = None,
    speedup: Annotated[float, typer.Option(help="Trace replay: divide its times by this.")] = 1.0,
    do_sweep: Annotated[
        bool, typer.Option("--sweep", help="Double the rate until saturation.")
    ] = False,
    search: Annotated[bool, typer.Option("--search", help="Highest rate meeting --slo.")] = False,
    slo: Annotated[str | None, typer.Option(help="e.g. ttft_p95=500ms,tpot_p95=50ms.")] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Open loop: cap in flight (wait counts).")
    ] = None,
    requests: Annotated[
        int | None, typer.Option("--requests", "-n", help="Requests per run.")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds of sending per run.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request.")] = 64,
    no_stream: Annotated[
        bool,
        typer.Option(
            "--no-stream", help="Completions/chat unstreamed: latency only (no TTFT/TPOT/ITL)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Arrival seed.")] = 0,
    api_key: Annotated[
        str | None, typer.Option(envvar="KILN_API_KEY", help="Bearer token.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full result (every request) here.")
    ] = None,
    history: Annotated[
        Path | None, typer.Option(help="Append the summary to this JSONL history.")
    ] = None,
) -> None:
    """Load-test any OpenAI-compatible server (kiln serve, vLLM, llama-server, infinity).

    Open-loop latencies run from each request's scheduled send (response time) and
    from its actual send (service time), reported apart.

    Example: kiln bench serve http://127.0.0.1:8000 --rate 4 -n 200 --json out.json
    """
    from modelkiln.bench.outputs.serialized import append_history, write_json
    from modelkiln.bench.serving import make_config, run_serve_bench

    with guard():
        cfg = make_config(
            url=url,
            kind=kind,
            model=model,
            concurrency=concurrency,
            rate=rate,
            arrival=arrival,
            burstiness=burstiness,
            trace=trace,
            speedup=speedup,
            sweep=do_sweep,
            search=search,
            slo=slo,
            max_concurrency=max_concurrency,
            requests=requests,
            duration_s=duration,
            max_tokens=max_tokens,
            stream=not no_stream,
            seed=seed,
            api_key=api_key,
        )
        result = run_serve_bench(cfg, RichProgress(console))
        if json_out is not None:
            write_json(result, json_out)
        if history is not None:
            append_history(result, history)
    _print_summary(result)
    if json_out is not None:
        console.print(f"json: {json_out}")


def _ints(text: str, what: str) -> list[int]:
    from modelkiln.errors import ConfigError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{what} must be comma-separated integers, got {text!r}", hint="e.g. 1,8,32"
        ) from None
    if not values or min(values) < 1:
        raise ConfigError(f"{what} must be positive integers, got {text!r}", hint="e.g. 1,8,32")
    return values


@bench_app.command("offline")
def offline(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model or optimize variant directories (several: timed interleaved, "
            "rows named VARIANT:backend)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "bench-offline"
    ),
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,16,32,64",
    seqs: Annotated[str, typer.Option(help="Sequence lengths, comma-separated.")] = "128",
    backend: Annotated[
        list[str] | None, typer.Option(help="torch / onnx (repeatable; default: all it holds).")
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls per cell.")] = 3,
    min_runs: Annotated[int, typer.Option(min=2, help="Timed calls before a cell may stop.")] = 5,
    max_runs: Annotated[int, typer.Option(min=2, help="Timed calls at most per cell.")] = 200,
    cv: Annotated[
        float, typer.Option(help="Stop a cell when its mean's standard error < this.")
    ] = 0.02,
    budget: Annotated[float, typer.Option(help="Seconds for the timed rounds.")] = 60.0,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads.")] = None,
    memory_cap_mb: Annotated[float | None, typer.Option(help="Optimal batch: memory cap.")] = None,
    history: Annotated[Path | None, typer.Option(help="Append the headline to this JSONL.")] = None,
    compile: Annotated[
        bool, typer.Option(help="Also time torch.compile(dynamic=True), interleaved with eager.")
    ] = False,
) -> None:
    """Sweep batch x sequence length on torch and ONNX Runtime; JSON + PNG + HTML.

    MODEL is a save_pretrained() folder or any variant kiln optimize writes (fp32 / bf16,
    torchao int8, pruned, distilled, TorchScript, torch.export, ONNX fp32 / int8 / int4).

    Reports p50/p95/p99, throughput, peak RSS (CUDA memory on a GPU), samples/s per
    MB and the optimal batch (largest that still gains > 5 % within --memory-cap-mb).

    Example: kiln bench offline runs/quickstart/optimize/model --batches 1,8,32 --seqs 64,128
    Side by side: kiln bench offline runs/q/optimize/variants/{torch-fp32,onnx-int8-dynamic}
    """
    from modelkiln.bench.offline import OfflineConfig, run_offline
    from modelkiln.bench.offline.report import write_offline
    from modelkiln.bench.outputs.serialized import append_history
    from modelkiln.cli._common import _state
    from modelkiln.logs import LOG_FILE, capture_output, set_verbose

    set_verbose(_state["debug"])  # --debug also shows third-party output
    with guard(), capture_output(out / LOG_FILE):
        cfg = OfflineConfig(
            model=models[0],
            others=models[1:],
            backends=backend or None,
            batches=_ints(batches, "--batches"),
            seqs=_ints(seqs, "--seqs"),
            warmup=warmup,
            min_runs=min_runs,
            max_runs=max_runs,
            cv_target=cv,
            budget_s=budget,
            threads=threads,
            memory_cap_mb=memory_cap_mb,
            compile=compile,
        )
        console.print(f"[dim]sweeping {', '.join(models)} ...[/dim]")
        result = run_offline(cfg)
        paths = write_offline(result, out)
        for v in result["variants"]:
            console.print(
                f"[dim]{v['backend']}: variant {v['variant'] or '-'}, format {v['format']}, "
                f"dtype {v['dtype'] or '-'}, device {v['device']}[/dim]"
            )
        if history is not None:
            append_history(result, history)
    table = Table(title=f"kiln bench offline {result['name']}", title_justify="left")
    cols = (
        "backend",
        "batch",
        "seq",
        "runs",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "items_per_s",
        "rss_mb",
        "items_per_s_per_mb",
        "stop",
    )
    for c in cols:
        table.add_column(c, justify="left" if c in ("backend", "stop") else "right")
    for row in result["rows"]:
        table.add_row(*(_fmt(row[c]) for c in cols))
    console.print(table)
    for o in result["optimal"]:
        console.print(
            f"optimal batch {o['backend']} seq {o['seq']}: {o['batch']} "
            f"({_fmt(o['items_per_s'])} samples/s)"
        )
    for c in result["compile_checks"]:
        console.print(
            f"{c['backend']}: first compile {c['first_compile_s']:.1f} s, "
            f"max |compiled - eager| {c['max_abs_diff']:.1e}"
        )
    console.print("  ".join(f"{k}: {v}" for k, v in paths.items()))
    console.print(f"[dim]library warnings and logs: {out / LOG_FILE}[/dim]")


def _percent(text: str) -> float:
    from modelkiln.errors import ConfigError

    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ConfigError(f"cannot parse {text!r} as a percentage", hint="e.g. 10%") from None
    return value / 100


@bench_app.command("compare")
def compare(
    files: Annotated[list[Path], typer.Argument(help="Result JSONs; the first is the baseline.")],
    fail_if_slower: Annotated[
        str | None, typer.Option(help="Exit 1 if a metric is this much slower (e.g. 10%).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a ratio plot (PNG) here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the rows here.")] = None,
) -> None:
    """Compare runs with a bootstrap 95 % interval on each ratio (noise is not a regression).

    Example: kiln bench compare base.json new.json --fail-if-slower 10%
    """
    from modelkiln.bench.compare import compare_runs, slower_than
    from modelkiln.bench.outputs.plot import plot_compare
    from modelkiln.bench.outputs.serialized import write_json

    with guard():
        threshold = _percent(fail_if_slower) if fail_if_slower else None
        rows = compare_runs(files)
        if plot is not None:
            plot_compare(rows, plot)
        if json_out is not None:
            write_json({"rows": rows}, json_out)
    table = Table(title=f"kiln bench compare (baseline {files[0].name})", title_justify="left")
    for c in ("run", "metric", "baseline ms", "ms", "ratio", "95 % CI", "verdict"):
        table.add_column(c, justify="left" if c in ("run", "metric", "verdict") else "right")
    for r in rows:
        ci = f"{r['ci'][0]:.3f} .. {r['ci'][1]:.3f}"
        table.add_row(
            r["run"],
            r["metric"],
            _fmt(r["baseline_median"]),
            _fmt(r["median"]),
            f"{r['ratio']:.3f}",
            ci,
            r["verdict"],
        )
    console.print(table)
    if threshold is not None:
        bad = slower_than(rows, threshold)
        if bad:
            names = ", ".join(f"{r['run']}:{r['metric']}" for r in bad)
            console.print(f"[red]slower than {fail_if_slower}:[/red] {names}")
            raise typer.Exit(1)


@bench_app.command("history")
def history_cmd(
    file: Annotated[Path, typer.Argument(help="JSONL history (from --history).")],
    metric: Annotated[str, typer.Option(help="Metric to show and plot.")] = "response_p99_ms",
    plot: Annotated[Path | None, typer.Option(help="Write the plot (PNG) here.")] = None,
) -> None:
    """Show (and plot) one metric of every run in a JSONL history.

    Example: kiln bench history bench-history.jsonl --metric throughput_rps --plot h.png
    """
    from modelkiln.bench.outputs.plot import plot_history
    from modelkiln.bench.outputs.serialized import read_history

    with guard():
        entries = read_history(file)
        if plot is not None:
            plot_history(entries, metric, plot)
    table = Table(title=f"{file.name}: {metric}", title_justify="left")
    for c in ("time", "label", "bench", metric):
        table.add_column(c)
    for e in entries:
        table.add_row(
            e.get("time", ""),
            str(e.get("label", "")),
            e.get("bench", ""),
            _fmt((e.get("metrics") or {}).get(metric)),
        )
    console.print(table)
    if plot is not None:
        console.print(f"plot: {plot}")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group."""
    app.add_typer(bench_app, name="bench")


__all__ = ["bench_app", "register"]
