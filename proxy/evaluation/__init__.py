"""Evaluation: question sets, grading, selective-prediction metrics, and the runners behind
``abstain calibrate`` and ``abstain eval``.

The metric and grading modules are pure; only :mod:`proxy.evaluation.runner` and
:mod:`proxy.evaluation.inproc` talk HTTP, and plotting imports matplotlib lazily.
"""
