"""Knowledge distillation: a shallower student trained to imitate the teacher.

Modules (only :mod:`~modelkiln.optimize.distill.core` imports torch):

* :mod:`~modelkiln.optimize.distill.config`: :class:`DistillConfig`, the ``distill`` section of
  :class:`~modelkiln.optimize.config.OptimizeConfig`;
* :mod:`~modelkiln.optimize.distill.core`: students from teacher layers or from scratch, the
  logit / hidden-state / pooled-embedding / attention-map losses, :func:`distill`,
  :func:`progressive_distill` and :func:`save_student`;
* :mod:`~modelkiln.optimize.distill.variants`: the registered variants ``distill-layers`` and
  ``distill-progressive``.

Importing this package does not import torch.
"""

from __future__ import annotations

from modelkiln.optimize.distill.config import DistillConfig, default_layer_map

__all__ = ["DistillConfig", "default_layer_map"]
