"""Evaluation: question sets, grading, reports, and the runners behind ``abstain calibrate``
and ``abstain eval`` (the selective-prediction metrics they report live in the core,
:mod:`proxy.confidence.selective`, because fitting needs them too).

Grading and reports are pure; only :mod:`proxy.evaluation.runner` and
:mod:`proxy.evaluation.inproc` talk HTTP, and plotting imports matplotlib lazily.
"""
