"""Watch the representation while pretraining runs (issue #26): weighted kNN, an online linear classifier and
RankMe on a fixed subset, as one engine hook.

A package of four files, each with one job: :mod:`~maecore.monitor.metrics` (the measures as pure functions of
feature matrices: tested against brute force and numpy, reusable offline), :mod:`~maecore.monitor.subset` (which
images, decoded once, gathered across ranks), :mod:`~maecore.monitor.hook` (:class:`Monitor`, the hook: when to
measure, the online classifier, checkpointed state, failures) and :mod:`~maecore.monitor.cli` (the flags).
The hook uses the engine's hook interface only.  Two general things were added to the engine for it:
``trainer.batch`` (the micro-batch just trained on, in ``after_backward``: its labels) and ``whole_weights()``
safe before the first forward under FSDP (the step-0 measurement).
"""

from maecore.monitor.cli import add_monitor_args, build_monitor
from maecore.monitor.hook import Monitor, OnlineProbe, pool_tokens
from maecore.monitor.metrics import knn_scores, knn_top1, rankme, top1
from maecore.monitor.subset import MonitorSubset, gather_in_order

__all__ = ["Monitor", "MonitorSubset", "OnlineProbe", "add_monitor_args", "build_monitor", "gather_in_order",
           "knn_scores", "knn_top1", "pool_tokens", "rankme", "top1"]
