"""The random projection and the gradient-feature baselines (TRAK, JourneyTRAK, D-TRAK) on tiny float64 models."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from common import keyed_random, projection
from common.data import Query
from common.diffusion import selection
from common.diffusion.sampling import sample
from common.errors import AttributionError
from common.methods import get_method, trak
from common.methods.trak import Trak, TrakConfig
from common.projection import Projection

# Small and fast: cross-attention K,V gradients, two timesteps, one vmap call per pass, float64 storage.
FAST = dict(
    selection="cross-attn-kv",
    projection_dim=16,
    num_timesteps=2,
    feature_dtype="float64",
    projection_rng="cpu",
    batch_size=256,
)


def unit_rows(n: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) + 0.7 * torch.randn(1, p, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products(kind: str) -> None:
    """Johnson–Lindenstrauss with ε = 0.15 for n = 20 unit vectors (correlated, so <x,y> ≈ 0.3).

    JL: a 1/sqrt(d)-scaled Gaussian or Rademacher map keeps ‖u‖² within (1 ± ε) for a set of m
    points with high probability once d ≥ 4 ln m / (ε²/2 − ε³/3). Inner products of unit vectors
    follow by polarization, <x,y> = (‖x+y‖² − ‖x−y‖²)/4, with error ≤ ε(‖x+y‖² + ‖x−y‖²)/4 = ε
    when the m = 2n² sums and differences are kept: 4 ln 800 / 0.010125 = 2,641 ≤ d = 4,096.
    The typical error is sqrt(2/d) ≈ 0.02, so the bound is far from this seed's luck.
    """
    eps, d = 0.15, 4096
    assert d >= 4 * math.log(2 * 20**2) / (eps**2 / 2 - eps**3 / 3)
    x = unit_rows(20, 2000, seed=0)
    px = Projection(2000, d, seed=3, kind=kind).project(x)
    assert px.shape == (20, d) and px.dtype == torch.float64
    exact, projected = x @ x.T, px @ px.T
    assert (projected - exact).abs().max() <= eps
    assert (projected.diagonal() - 1).abs().max() <= eps
    # float32 gradients give float32 features from the same matrix
    p32 = Projection(2000, d, seed=3, kind=kind).project(x.float())
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), px, rtol=1e-4, atol=1e-5)


def test_projection_same_for_any_batch_split_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient projects to the same vector in any batch, as a dict or a flat matrix, cached or not."""
    monkeypatch.setattr(projection, "BLOCK_ENTRIES", 16 * 6)  # 6 rows per block: parameters straddle blocks
    layout = {"a.weight": (7, 5), "b.bias": (30,), "c.weight": (2, 2, 4)}
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(9, *s, generator=g, dtype=torch.float64) for n, s in layout.items()}
    flat = torch.cat([v.reshape(9, -1) for v in grads.values()], dim=1)
    proj = Projection(layout, 16, seed=1)
    assert proj.rows_per_block == 6 and proj.num_blocks == math.ceil(81 / 6)
    whole = proj.project(grads)
    assert torch.equal(Projection(81, 16, seed=1).project(flat), whole)
    reordered = {n: grads[n] for n in reversed(layout)}  # the layout, not the dict order, fixes the rows
    assert torch.equal(proj.project(reordered), whole)
    parts = torch.cat([proj.project({n: v[i : i + 2] for n, v in grads.items()}) for i in range(0, 9, 2)])
    torch.testing.assert_close(parts, whole, rtol=1e-13, atol=1e-15)
    cached = Projection(layout, 16, seed=1, cache_bytes=1 << 20)
    assert torch.equal(cached.project(grads), whole) and torch.equal(cached.project(grads), whole)
    assert cached._cache and not torch.equal(Projection(layout, 16, seed=2).project(grads), whole)


def test_projection_dimension_refused() -> None:
    for dim in (0, -3):
        with pytest.raises(AttributionError, match="projection dimension must be a positive integer") as err:
            Projection(10, dim)
        assert "\n" not in str(err.value)
        with pytest.raises(AttributionError, match="projection_dim must be a positive integer"):
            TrakConfig(projection_dim=dim)
    with pytest.raises(AttributionError, match="projection_dim"):
        get_method("d-trak").Config(projection_dim=0)


def test_kernel_and_scores_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Φ = [[1,0],[0,2],[1,1]]: ΦᵀΦ = [[2,1],[1,5]]; λ = 1: K⁻¹ = [[6,−1],[−1,3]]/17; q = (1,1): scores (5, 4, 7)/17."""
    monkeypatch.setattr(trak, "CHUNK_BYTES", 8 * 2)  # one row per chunk: the streamed sums are exercised
    phi = np.array([[1, 0], [0, 2], [1, 1]], dtype=np.float16)
    xtx = trak.gram(phi)
    assert torch.equal(xtx, torch.tensor([[2.0, 1.0], [1.0, 5.0]], dtype=torch.float64))
    kinv = trak.kernel_inverse(xtx, 1.0)
    torch.testing.assert_close(kinv, torch.tensor([[6.0, -1.0], [-1.0, 3.0]], dtype=torch.float64) / 17)
    scores = trak.kernel_scores(phi, kinv, torch.tensor([1.0, 1.0]))
    np.testing.assert_allclose(scores, np.array([5.0, 4.0, 7.0]) / 17, rtol=1e-12)
    # λ = 0 on a rank-deficient kernel: the pseudo-inverse (the λ → 0 limit), as numpy computes it.
    low = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]])
    np.testing.assert_allclose(
        trak.kernel_inverse(trak.gram(low), 0.0).numpy(), np.linalg.pinv(low.T @ low), atol=1e-12
    )


def test_trak_equals_exact_solve_when_d_covers_the_weights(model, data, query, monkeypatch: pytest.MonkeyPatch) -> None:
    """With d ≥ p and λ → 0, projected TRAK equals the unprojected solve g_qᵀ(GᵀG)⁻¹g_i.

    Features are Φ = G Pᵀ with P (d x p) Gaussian, of full column rank (almost surely) when d ≥ p;
    a ±1 matrix can be singular (this seed's 11 x 11 Rademacher one is). Write P = U S Vᵀ with S, V
    invertible p x p and A = GᵀG (invertible: 24 rows ≥ p = 11 weights). Then ΦᵀΦ = U(S Vᵀ A V S)Uᵀ,
    its pseudo-inverse is U(S Vᵀ A V S)⁻¹Uᵀ, and Pᵀ(ΦᵀΦ)⁺P = V S (S Vᵀ A V S)⁻¹ S Vᵀ = A⁻¹: the
    scores are exactly the unprojected ones. This is a true equality only at λ = 0 (λ is the
    references' regularization, applied as λ/d here): for λ > 0, Pᵀ(P A Pᵀ + λI)⁻¹P ≠ (A + λI)⁻¹ unless
    P is orthogonal, which a Rademacher or Gaussian sketch is not. So the test sets λ = 0 on this
    full-rank case, with d = p (K invertible) and d = 2p + 1 (K singular: its pseudo-inverse).
    """
    monkeypatch.setitem(selection.PRESETS, "test-out-bias", r"^conv_(norm_)?out\.bias$")
    cfg = TrakConfig(**(FAST | {"selection": "test-out-bias", "regularization": 0.0, "projection_type": "gaussian"}))
    names = selection.select_parameters(model.unet, cfg.selection)
    p = sum(dict(model.unet.named_parameters())[n].numel() for n in names)
    assert p == 11
    steps = trak.window_timesteps(cfg.num_timesteps, 0, model.num_train_timesteps)
    flat = lambda g: torch.cat([g[n].flatten(1) for n in names], dim=1)
    gtrain = flat(trak.mean_gradients(model, names, trak.training_rows(data, 0, 24, 2, steps, 1), cfg))
    gquery = flat(trak.mean_gradients(model, names, trak.query_rows(query, steps, 1), cfg))[0]
    exact = (gtrain @ torch.linalg.solve(gtrain.T @ gtrain, gquery)).numpy().reshape(12, 2)
    for d in (p, 2 * p + 1):
        method = Trak(replace(cfg, projection_dim=d), model, data)
        scores, _ = method.score_flips(query)
        assert torch.linalg.matrix_rank(method.members[0].projection.project(torch.eye(p, dtype=torch.float64))) == p
        np.testing.assert_allclose(scores, exact, rtol=1e-7, atol=1e-9 * np.abs(exact).max())


def test_features_do_not_depend_on_batch_size(model, data) -> None:
    names = selection.select_parameters(model.unet, "cross-attn-kv")
    rows = trak.training_rows(data, 5, 7, 2, [100, 700], 2)
    one = trak.mean_gradients(model, names, rows, TrakConfig(**(FAST | {"batch_size": 1})))
    many = trak.mean_gradients(model, names, rows, TrakConfig(**FAST))
    for n in names:
        torch.testing.assert_close(one[n], many[n], rtol=1e-12, atol=1e-15)


def test_features_cache_reused_and_mismatch_refused(model, data, query, tmp_path) -> None:
    cfg = TrakConfig(**FAST)
    first, _ = Trak(cfg, model, data, tmp_path).score_flips(query)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("-features.npy") for f in files) and any(f.endswith("-gram.safetensors") for f in files)
    # batch sizes and the projection cache change speed only: same identity, the cache is reused
    faster = replace(cfg, batch_size=7, feature_batch_size=5, projection_cache_gb=0.01)
    assert Trak(faster, model, data).identity() == Trak(cfg, model, data).identity()
    again, _ = Trak(faster, model, data, tmp_path).score_flips(query)
    np.testing.assert_allclose(again, first, rtol=1e-10)
    with pytest.raises(AttributionError, match="TRAK features .* was made with another settings \\(features\\)") as err:
        Trak(replace(cfg, num_draws=2), model, data, tmp_path).prepare()
    assert "\n" not in str(err.value)


def generated_query(model) -> Query:
    """A query sampled by the model itself (DDPM, 4 steps, guidance 2), with its initial noise saved."""
    key = Query("gen", torch.zeros(1, 1, 1), torch.zeros(1, 1)).key
    noise = keyed_random.keyed_normal([(0, keyed_random.Purpose.SAMPLE, key)], (3, 8, 8), dtype=torch.float64)
    text = model.encode_text(["a red square"]).double()
    info = {"seed": 0, "sampler": "ddpm", "num_steps": 4, "guidance_scale": 2.0}
    image = sample(model, text, noise, [key], progress=False, **info)[0]
    return Query("gen", image, text, "a red square", extra=info, noise=noise[0])


@pytest.mark.parametrize(
    "name, extra",
    [
        ("trak", {}),
        ("d-trak", {}),
        ("journey-trak", {"query_steps": 4, "query_draws": 2, "num_bins": 2}),
    ],
)
def test_scores_finite_with_one_column_per_orientation(model, data, query, name: str, extra: dict) -> None:
    method_cls = get_method(name)
    cfg = method_cls.Config(**(FAST | extra))
    method = method_cls(cfg, model, data)
    scores, stats = method.score_flips(query)
    assert scores.shape == (12, 2) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert stats["ensemble_size"] == 1
    if name == "journey-trak":
        assert stats["trajectory"] == "forward-noised"  # the fixture query has no saved noise
        gen_scores, gen_stats = method.score_flips(generated_query(model))
        assert gen_stats["trajectory"] == "regenerated" and gen_stats["regeneration_error"] < 1e-10
        assert gen_scores.shape == (12, 2) and np.isfinite(gen_scores).all()


def test_model_without_flips_scores_one_column(model, data, query) -> None:
    model.flips = False
    scores, _ = Trak(TrakConfig(**FAST), model, data).score_flips(query)
    assert scores.shape == (12, 1) and np.isfinite(scores).all()


def test_ensemble_averages_the_members_scores(model, data, query, tmp_path) -> None:
    other = model.with_unet(copy.deepcopy(model.unet))
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    cfg = TrakConfig(**FAST)
    alone = Trak(cfg, model, data, tmp_path).score_flips(query)[0]
    other_alone = Trak(cfg, other, data, tmp_path).score_flips(query)[0]
    assert not np.allclose(alone, other_alone)
    with pytest.raises(AttributionError, match="no loader"):
        Trak(replace(cfg, ensemble=["other"]), model, data, tmp_path).prepare()
    ensemble = Trak(replace(cfg, ensemble=["other"]), model, data, tmp_path, load_model={"other": other}.__getitem__)
    scores, stats = ensemble.score_flips(query)
    assert stats["ensemble_size"] == 2
    np.testing.assert_allclose(scores, (alone + other_alone) / 2, rtol=1e-10, atol=1e-14)
