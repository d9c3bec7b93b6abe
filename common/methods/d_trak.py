"""D-TRAK (Zheng et al., ICLR 2024): TRAK with the output function ‖ε_θ(x_t, c, t)‖², one model.

As sail-sg/D-TRAK computes it (``ArtBench2/grad_text_to_image_lora.py`` with
``--f mean-squared-l2-norm --t_strategy uniform --K 10 --Z 32768``; scores in
``ArtBench2/methods/04_if/01_IF_gen_5000-0.5.ipynb``): the gradient of the mean over pixels of
ε_θ(x_t)² at K = 10 timesteps t = 0, 100, …, 900, one noise draw each, averaged over the
timesteps and projected with a Gaussian matrix; no gradient normalisation (their normalised
variant is a separate ablation); the generated image is featurized the same way; scores
φ_genᵀ(ΦᵀΦ + λI)⁻¹φ_i. The paper's baseline uses d = 32,768 and λ = 500 (λ in their unscaled
projection's units; see :mod:`common.methods.trak`). Everything else is TRAK's code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.methods.registry import register
from common.methods.trak import Trak, TrakConfig


@dataclass
class DTrakConfig(TrakConfig):
    """TRAK's settings with D-TRAK's defaults."""

    output: str = field(default="square", metadata={"help": "output function (D-TRAK: square, ‖ε_θ‖²)"})
    projection_dim: int = field(default=32768, metadata={"help": "projection dimension d (paper: 32768)"})
    projection_type: str = field(default="gaussian", metadata={"help": "rademacher or gaussian (D-TRAK: gaussian)"})
    regularization: float = field(default=500.0, metadata={"help": "λ in the references' units (paper: 500)"})
    num_timesteps: int = field(default=10, metadata={"help": "strided timesteps per feature (D-TRAK: 10)"})
    feature_dtype: str = field(default="float32", metadata={"help": "storage of training features (D-TRAK: float32)"})


@register
class DTrak(Trak):
    """TRAK with D-TRAK's output function and settings."""

    name = "d-trak"
    Config = DTrakConfig
