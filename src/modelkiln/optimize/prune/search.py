"""Evolutionary search for per-layer pruning ratios at a fixed global sparsity.

A candidate is one sparsity per prunable layer, projected so the weight-count-weighted mean is
exactly the target (so every candidate removes the same number of weights). Fitness, on a small
held-out slice of batches never trained on::

    fitness = agreement with the reference outputs + compression_weight * achieved sparsity

where agreement is the mean cosine similarity, per real token, between the pruned model's main
output (encoders: last hidden state; causal LMs: logits) and the unpruned reference's. With the
exact-target projection the compression term is the same for every candidate; it keeps its
meaning when candidates are compared with other sparsities (e.g. in reports).

The genetic algorithm: population (the uniform ratios + seeded perturbations), tournament
selection, uniform crossover, Gaussian mutation, one elite kept per generation. It stops after
``search_generations`` or ``search_budget_s`` seconds, whichever comes first; with the same seed
and no budget stop, it returns the same ratios. Hand-written (about 60 lines): the candidate
evaluation needs the torch model in the loop, and the GA itself is a few numpy lines, smaller than
adapting a general optimisation library.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modelkiln.optimize.prune.config import PruneConfig
from modelkiln.optimize.prune.training import feed
from modelkiln.optimize.prune.unstructured import counts_for, prunable_layers


def project(ratios: np.ndarray, sizes: np.ndarray, sparsity: float, max_ratio: float) -> np.ndarray:
    """Shift ``ratios`` by one constant (clipped to [0, max_ratio]) so their weighted mean is
    ``sparsity`` (bisection on the shift; the weighted mean is monotone in it)."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        mean = float(np.clip(ratios + mid, 0.0, max_ratio) @ sizes / sizes.sum())
        lo, hi = (mid, hi) if mean < sparsity else (lo, mid)
    return np.clip(ratios + (lo + hi) / 2, 0.0, max_ratio)


@dataclass
class SearchResult:
    """The best per-layer ratios found and how the search went."""

    layers: list[str]
    ratios: list[float]
    fitness: float
    uniform_fitness: float
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: int = 0
    stopped: str = "generations"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for the variant's card)."""
        return {
            "fitness": self.fitness,
            "uniform_fitness": self.uniform_fitness,
            "evaluations": self.evaluations,
            "stopped": self.stopped,
            "ratios": dict(zip(self.layers, self.ratios, strict=True)),
            "history": self.history,
        }


class _Evaluator:
    """Applies per-layer magnitude masks to a private copy of the model and scores them."""

    def __init__(
        self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], weight: float
    ) -> None:
        self.model = copy.deepcopy(model).eval()
        self.layers: list[tuple[str, Any]] = prunable_layers(self.model)
        self.originals = [m.weight.detach().clone() for _, m in self.layers]
        self.orders = [w.abs().reshape(-1).argsort() for w in self.originals]
        self.sizes = [w.numel() for w in self.originals]
        self.batches = batches
        self.weight = weight
        with torch.inference_mode():
            self.targets = [self._outputs(b) for b in batches]

    def _outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        out: torch.Tensor = self.model(**feed(batch))[0][keep]
        return out

    def fitness(self, ratios: np.ndarray, sparsity: float) -> float:
        counts = counts_for(list(ratios), self.sizes, sparsity)
        with torch.inference_mode():
            for (_, m), w, order, k in zip(
                self.layers, self.originals, self.orders, counts, strict=True
            ):
                flat = w.clone().reshape(-1)
                flat[order[:k]] = 0.0
                m.weight.copy_(flat.view_as(w))
            cos = [
                torch.nn.functional.cosine_similarity(self._outputs(b), t, dim=-1).mean()
                for b, t in zip(self.batches, self.targets, strict=True)
            ]
        achieved = sum(counts) / sum(self.sizes)
        return float(torch.stack(cos).mean()) + self.weight * achieved


def evolutionary_search(
    model: torch.nn.Module, held_out: list[dict[str, torch.Tensor]], cfg: PruneConfig
) -> SearchResult:
    """Search per-layer unstructured sparsities for ``model`` at ``cfg.target_sparsity``.

    Args:
        model: the unpruned model (not modified; the search works on a copy).
        held_out: batches to score candidates on (keep them out of any training).
        cfg: target, population, generations, time budget, tournament, mutation, seed.
    """
    started = time.perf_counter()
    ev = _Evaluator(model, held_out, cfg.compression_weight)
    rng = np.random.default_rng(cfg.seed)
    sizes = np.asarray(ev.sizes, dtype=np.float64)
    s, cap, n = cfg.target_sparsity, cfg.search_max_ratio, len(ev.sizes)

    def fix(r: np.ndarray) -> np.ndarray:
        return project(r, sizes, s, cap)

    uniform = fix(np.full(n, s))
    pop = [uniform] + [
        fix(uniform + rng.normal(0.0, 2 * cfg.search_mutation, n))
        for _ in range(cfg.search_population - 1)
    ]
    fits = [ev.fitness(c, s) for c in pop]
    evaluations, stopped = len(pop), "generations"
    history = [_record(0, fits, started)]

    def tournament() -> np.ndarray:
        picks = rng.choice(len(pop), size=min(cfg.search_tournament, len(pop)), replace=False)
        return pop[max(picks, key=lambda i: fits[i])]

    for gen in range(1, cfg.search_generations + 1):
        if time.perf_counter() - started > cfg.search_budget_s:
            stopped = "budget"
            break
        best = int(np.argmax(fits))
        children, child_fits = [pop[best]], [fits[best]]
        while len(children) < cfg.search_population:
            a, b = tournament(), tournament()
            child = np.where(rng.random(n) < 0.5, a, b)
            child = fix(child + rng.normal(0.0, cfg.search_mutation, n) * (rng.random(n) < 0.5))
            children.append(child)
            child_fits.append(ev.fitness(child, s))
            evaluations += 1
        pop, fits = children, child_fits
        history.append(_record(gen, fits, started))
    best = int(np.argmax(fits))
    return SearchResult(
        layers=[name for name, _ in ev.layers],
        ratios=[float(r) for r in pop[best]],
        fitness=fits[best],
        uniform_fitness=history[0]["uniform"] if history else fits[0],
        history=history,
        evaluations=evaluations,
        stopped=stopped,
    )


def _record(gen: int, fits: list[float], started: float) -> dict[str, float]:
    row = {
        "generation": float(gen),
        "best": max(fits),
        "mean": float(np.mean(fits)),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if gen == 0:
        row["uniform"] = fits[0]
    return row
