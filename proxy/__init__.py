"""abstain-proxy: an OpenAI-compatible proxy that answers only when the model is likely right.

The package is a pure core (``confidence/``, ``policy/``, ``evidence``, ``judge``,
``verdict``) wrapped by a thin web layer (``app``, ``routes``, ``pipeline``,
``streaming``, ``upstream/``); ``evaluation/`` holds the offline commands.
"""

__version__ = "0.1.0"
