"""CLIP text similarity (Table 1's "CLIP text"): the query's prompt against each training image's captions.

Features are open_clip ViT-B/32 ``encode_text`` embeddings (512-d, open_clip's BPE tokenizer, 77
tokens, truncated), compared by cosine similarity. An image with several captions (MSCOCO has 5)
is scored by the **mean of its captions' cosine similarities** by default (``captions: mean``):
it treats the captions as the paper's own method does, which averages the training loss over
them, and one odd caption cannot decide an image's score alone. ``max`` takes the best-matching
caption; ``first`` only the first caption, which is what FastGDA's released extraction does
(``feature_extraction/extract_coco.py`` embeds ``anns[0]['caption']`` per image). The AbC
benchmark (GenDataAttribution) and the AttributeByUnlearning release have no text baseline.

Text does not change with a flip, so both orientation columns hold the same score. Every caption
is cached (N, C, D), C the most captions of any image; the reduction happens at scoring time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import no_effect
from common.data import Query
from common.errors import require
from common.fingerprints import module_fingerprint
from common.methods.clip_image import ClipConfig, load_open_clip
from common.methods.features import Encoder, FeatureMethod
from common.methods.registry import register

REDUCTIONS = ("mean", "max", "first")


@dataclass
class ClipTextConfig(ClipConfig):
    """CLIP text-embedding similarity between the query prompt and the training captions (the same weights)."""

    batch_size: int = no_effect(256, "images whose captions are embedded per batch (does not change results)")
    captions: str = field(
        default="mean", metadata={"help": "an image's score from its captions' similarities: mean, max or first"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.captions in REDUCTIONS, f"captions must be one of {', '.join(REDUCTIONS)}, got {self.captions!r}")


def clip_text_encoder(model: torch.nn.Module, arch: str, device: torch.device | str) -> Encoder:
    """The text tower of a loaded open_clip model: unnormalised ``encode_text`` features of strings."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(arch)  # BPE vocabulary shipped in the package: nothing downloaded
    fingerprint = module_fingerprint(model)
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device)).float().cpu()

    name = f"open_clip {arch} encode_text (context {tokenizer.context_length})"
    return Encoder(name, fingerprint, int(model.visual.output_dim), embed)


@register
class ClipText(FeatureMethod):
    """Cosine similarity of CLIP text embeddings: the query prompt vs each training image's captions."""

    name = "clip-text"
    uses_captions = True
    Config = ClipTextConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.captions = [[c for c in caps if c.strip()] for caps in self.data.captions]
        empty = [i for i, caps in enumerate(self.captions) if not caps]
        require(not empty, f"clip-text needs caption strings; training image {empty[:1]} has none")
        self.counts = np.array([len(caps) for caps in self.captions])

    def load_encoder(self) -> Encoder:
        model = load_open_clip(self.cfg.arch, self.cfg.weights, self.cfg.quick_gelu, "CLIP", self.flag("weights"))
        return clip_text_encoder(model, self.cfg.arch, self.model.device)

    def views(self) -> int:
        return int(self.counts.max())

    def embed_training(self, start: int, stop: int) -> np.ndarray:
        """Caption features (stop - start, C, D); an image with fewer than C captions is padded with zeros."""
        flat = [c for caps in self.captions[start:stop] for c in caps]
        feats = self.encoder.embed(flat).numpy()
        out = np.zeros((stop - start, self.views(), feats.shape[1]), dtype=np.float32)
        offset = 0
        for row, caps in enumerate(self.captions[start:stop]):
            out[row, : len(caps)] = feats[offset : offset + len(caps)]
            offset += len(caps)
        return out

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        require(bool(query.prompt.strip()), f"clip-text needs the query's prompt; query {query.id} has none")
        return super().score_flips(query)

    def embed_query(self, query: Query) -> torch.Tensor:
        return self.encoder.embed([query.prompt])[0]

    def columns(self, sims: np.ndarray) -> np.ndarray:
        """Scores (N, F): the captions' similarities (N, C) reduced per image, the same for each orientation."""
        score = reduce_captions(sims, self.counts, self.cfg.captions)
        return np.repeat(score[:, None], len(self.flip_states()), axis=1)


def reduce_captions(sims: np.ndarray, counts: np.ndarray, how: str) -> np.ndarray:
    """One score per image (N,) from its captions' similarities (N, C), of which the first ``counts`` (N,) are real
    (padding rows are zero vectors: similarity 0): their mean, their max, or the first's."""
    if how == "mean":
        return sims.sum(1) / counts
    if how == "max":
        return np.where(np.arange(sims.shape[1]) < counts[:, None], sims, -np.inf).max(1)
    return sims[:, 0]
