"""Pruning: unstructured global magnitude, structured FFN / attention-head removal, gradual
schedules with recovery fine-tuning, and an evolutionary per-layer ratio search.

Modules (all but :mod:`~modelkiln.optimize.prune.config` and
:mod:`~modelkiln.optimize.prune.variants` import torch):

* :mod:`~modelkiln.optimize.prune.config`: :class:`PruneConfig`, the ``prune`` section of
  :class:`~modelkiln.optimize.config.OptimizeConfig`;
* :mod:`~modelkiln.optimize.prune.structured`: find the FFN / attention blocks of BERT-style,
  GPT-2 and Llama-style models, score neurons and heads (L1, L2, Taylor), remove them;
* :mod:`~modelkiln.optimize.prune.unstructured`: global (or per-layer) magnitude / Taylor masks
  with ``torch.nn.utils.prune`` and the sparsity report;
* :mod:`~modelkiln.optimize.prune.training`: the losses (LM loss, feature distillation, the
  Taylor loss) and the recovery fine-tune;
* :mod:`~modelkiln.optimize.prune.gradual`: :func:`~modelkiln.optimize.prune.gradual.prune_model`,
  the cubic schedule of pruning steps, each followed by recovery;
* :mod:`~modelkiln.optimize.prune.search`: the evolutionary per-layer ratio search;
* :mod:`~modelkiln.optimize.prune.variants`: the registered variants ``prune-unstructured``,
  ``prune-structured`` and ``prune-evo``.

Importing this package does not import torch.
"""

from __future__ import annotations

from modelkiln.optimize.prune.config import PruneConfig

__all__ = ["PruneConfig"]
