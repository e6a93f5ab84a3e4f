#!/usr/bin/env python
"""Issue #26 item 6's numbers from a finished study: do the pretraining monitors (kNN, online linear classifier,
RankMe) at each kept checkpoint predict its linear-probe and fine-tune rows?  ``pipeline.study_monitor``.

    python tools/monitor_study.py runs/study [--docs docs/results.md]
"""

from pipeline.study_monitor import cli

cli()
