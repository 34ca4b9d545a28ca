"""Event embeddings of the chest X-ray triplet dataset: what ``prepare-cxr`` puts in ``event_embeddings``.

:class:`EventEmbedder` embeds each distinct event content once with the named sentence embedder (the offline MiniLM
by default; the reproduction's ``thomas-sounack/BioClinical-ModernBERT-base``, mean pooled, by its id or folder):
at MIMIC's size (up to 1,024 events for each of ~150,000 triplets) embedding every event is out of reach on a CPU,
while the contents, without their relative time, repeat a lot. With ``retrieval``, each event vector is enriched with
its nearest neighbours among the *train* split's event contents (or a supplied knowledge list), as
:mod:`~ehr_diffusers.text.retrieval` defines; the neighbours never come from validation or test events.

It lives in the text layer and is handed to :func:`~ehr_diffusers.data.cxr.dataset.prepare_cxr` as its
``embed_events``, so that the data layer needs no model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from ..data.cxr.dataset import EventEmbeddingOptions
from ..errors import ArgumentError
from .embed import load_embedder
from .retrieval import RetrievalIndex, augment, build_event_index, load_knowledge


class EventEmbedder:
    """Turns each split's event contents into one float16 ``(n_events, dim)`` array per triplet.

    Built before any work, so that what the options cannot check alone (faiss for ``retrieval``) fails early; the
    model loads when called, after the triplets are built, so a cohort without triplets fails without loading it.
    """

    def __init__(self, options: EventEmbeddingOptions) -> None:
        if options.embedder is None:
            raise ValueError("EventEmbedder needs options.embedder; for no event embeddings pass embed_events=None")
        if options.retrieval:
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise ArgumentError("--retrieval needs faiss: pip install 'ehr-diffusers[retrieval]'") from None
        self.options = options

    def __call__(self, contents: Mapping[str, pl.Series], show_progress: bool = True
                 ) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
        """Per split, the event contents of each triplet -> one array per triplet, and the summary's ``embeddings``
        (model, dim, number of distinct texts, pooling, retrieval)."""
        options = self.options
        embedder = load_embedder(options.embedder)
        texts = pl.concat([series.explode().drop_nulls() for series in contents.values()]).unique().sort()
        vectors = embedder.encode(texts.to_list(), batch_size=options.batch_size, show_progress=show_progress)
        vectors = vectors.float().cpu().numpy()
        info: dict[str, Any] = {"model": embedder.config.source, "dim": embedder.dim, "distinct_texts": len(texts),
                                "pooling": embedder.config.pooling, "retrieval": None}
        lookup = pl.DataFrame({"text": texts, "row": np.arange(len(texts), dtype=np.int64)})
        if options.retrieval:
            if options.knowledge is not None:
                index = build_event_index(load_knowledge(options.knowledge), embedder, batch_size=options.batch_size,
                                          show_progress=show_progress, source=str(options.knowledge))
            elif "train" not in contents:
                raise ValueError("--retrieval over events needs a train split with triplets (or give --knowledge)")
            else:  # train events only, so no validation or test event informs another
                train = contents["train"].explode().drop_nulls().unique().sort()
                rows = lookup.join(pl.DataFrame({"text": train}), on="text", maintain_order="right")["row"].to_numpy()
                index = RetrievalIndex.build(train.to_list(), vectors[rows], source="events:train")
            # an event of the corpus itself is not its own neighbour; a knowledge entry equal to an event may be
            vectors = augment(vectors, index, k=options.retrieval_k, weight=options.retrieval_weight,
                              exclude_self=options.knowledge is None)
            info["retrieval"] = {"source": index.source, "corpus": len(index), "k": options.retrieval_k,
                                 "weight": options.retrieval_weight}
        vectors = vectors.astype(np.float16)
        out: dict[str, list[np.ndarray]] = {}
        for name, series in contents.items():
            frame = series.alias("text").to_frame()
            rows = frame.explode("text").join(lookup, on="text", how="left", maintain_order="left")
            counts = frame["text"].list.len().to_numpy()
            flat = rows.drop_nulls("row")["row"].to_numpy()
            out[name] = np.split(vectors[flat], np.cumsum(counts)[:-1]) if len(counts) else []
        return out, info
