"""Watch the representation while pretraining runs (issue #26): weighted kNN, an online linear classifier and
RankMe on a fixed subset, as one engine hook.

A package of four files, each with one job: :mod:`~maecore.monitor.metrics` (the measures as pure functions of
feature matrices: tested against brute force and numpy, reusable offline), :mod:`~maecore.monitor.subset` (which
images, decoded once, gathered across ranks), :mod:`~maecore.monitor.hook` (:class:`Monitor`, the hook: when to
measure, the online classifier, checkpointed state, failures) and :mod:`~maecore.monitor.cli` (the flags).
The hook uses the engine's hook interface only; the one thing it needed added is ``trainer.batch`` (the
micro-batch just trained on, in ``after_backward``: its labels).
"""
