"""abstain-proxy: an OpenAI-compatible proxy that answers only when the model is likely right.

The package is laid out as a pure core (``confidence/``, ``policy``, ``evaluation``) wrapped
by a thin web layer (``app``, ``routes``, ``pipeline``, ``streaming``, ``upstream/``).
"""

__version__ = "0.1.0"
