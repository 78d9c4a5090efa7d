"""``kiln monitor report``: every feature, every applicable test, reference vs current plots.

The current side is a JSONL feature log written by the server (``kiln serve
--monitor-log FILE``: one line per request with its features, never the
prompt text) or a folder of such logs. Outputs ``report.json``,
``report.html`` and ``report.png`` (one histogram per feature).

Evidently is not used: its report needs pandas frames of both sides and
pulls a large dependency tree for what is here a table and a few histograms;
the tests themselves are the library's own.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import ConfigError
from modelkiln.monitor.profile import Profile
from modelkiln.monitor.stattests import registered


def read_feature_log(source: str | Path, model: str | None = None) -> dict[str, np.ndarray]:
    """Scalar and categorical features of every request in a JSONL log (or a folder of them).

    Raises:
        ConfigError: the path does not exist or holds no feature lines.
    """
    path = Path(source)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ConfigError(f"no feature log at '{source}'",
                          hint="pass the JSONL file written by kiln serve --monitor-log, "
                               "or a folder of them")  # fmt: skip
    cols: dict[str, list[Any]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if model is not None and row.get("model") != model:
                continue
            for k, v in row.get("features", {}).items():
                if isinstance(v, int | float):
                    cols.setdefault(k, []).append(float(v))
                elif isinstance(v, str):  # a category (finish_reason)
                    cols.setdefault(k, []).append(v)
    if not cols:
        raise ConfigError(f"the feature log '{source}' holds no features",
                          hint="send traffic to a server started with --monitor-log")  # fmt: skip
    return {k: np.asarray(v) for k, v in cols.items()}


def compare(profile: Profile, current: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Every (feature, test) that applies: statistic, p-value, threshold, verdict."""
    rows = []
    for name, ref in profile.features.items():
        cur = current.get(name)
        if cur is None or len(cur) == 0 or ref.kind == "emb":
            continue
        for test in sorted(registered().values(), key=lambda t: t.name):
            if ref.kind not in test.feature_types or test.name == "confidence_drop":
                continue
            r = test.run(ref.values, cur, ref.kind)
            rows.append({"feature": name, "group": ref.group, "default": test.name == ref.test,
                         **r.to_dict()})  # fmt: skip
    return rows


def _plot(profile: Profile, current: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, f in profile.features.items() if f.kind == "num" and n in current]
    cols = 3
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        ref, cur = profile.features[name].values, current[name]
        bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=30)
        ax.hist(ref, bins=bins, alpha=0.5, density=True, label="reference")
        ax.hist(cur, bins=bins, alpha=0.5, density=True, label="current")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_report(profile: Profile, current: dict[str, np.ndarray], out: str | Path) -> Path:
    """Write report.json, report.png and report.html into ``out``; return the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = compare(profile, current)
    drifted = sorted({r["feature"] for r in rows if r["default"] and r["drifted"]})
    doc = {"model_name": profile.meta.model_name, "reference": str(profile.path),
           "n_current": {k: len(v) for k, v in current.items()},
           "drifted_features": drifted, "results": rows}  # fmt: skip
    (out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    _plot(profile, current, out / "report.png")
    png = base64.b64encode((out / "report.png").read_bytes()).decode()
    cells = "".join(
        f"<tr class='{'d' if r['drifted'] else ''}'><td>{html.escape(r['feature'])}</td>"
        f"<td>{r['test']}{' *' if r['default'] else ''}</td><td>{r['statistic']:.4g}</td>"
        f"<td>{'' if r['p_value'] is None else format(r['p_value'], '.3g')}</td>"
        f"<td>{r['threshold']:.3g}</td><td>{'drift' if r['drifted'] else 'ok'}</td></tr>"
        for r in rows
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>drift report</title><style>"
        "body{font:14px sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:2px 8px}"
        "table{border-collapse:collapse}.d{background:#fdd}</style>"
        f"<h1>Drift report: {html.escape(profile.meta.model_name)}</h1>"
        f"<p>Drifted (default test, marked *): {html.escape(', '.join(drifted) or 'none')}</p>"
        "<table><tr><th>feature</th><th>test</th><th>statistic</th><th>p-value</th>"
        f"<th>threshold</th><th>verdict</th></tr>{cells}</table>"
        f"<h2>Reference vs current</h2><img alt='distributions' src='data:image/png;base64,{png}'>"
    )
    (out / "report.html").write_text(page)
    return out / "report.html"
