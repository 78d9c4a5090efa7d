"""Benchmarks and profiling: server load (``kiln bench serve``), offline sweeps
(``kiln bench offline``), comparisons and history, and ``kiln profile``.

Layout (GuideLLM's): load shapes one per module under :mod:`.profiles`, the HTTP
client under :mod:`.backends`, writers one per format under :mod:`.outputs`.
This module stays light (no torch): the serve stage imports the load generator
from here.
"""

from modelkiln.bench.load import KINDS, run_load, run_load_async
from modelkiln.bench.results import SLO, LoadReport, RequestResult, percentile

__all__ = ["KINDS", "SLO", "LoadReport", "RequestResult", "percentile", "run_load",
           "run_load_async"]  # fmt: skip
