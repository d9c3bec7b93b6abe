"""EK-FAC curvature of the selected Linear modules (George et al., NeurIPS 2018), fitted as kronfluence fits it.

For a Linear module with per-token inputs a (a column of ones appended when its bias is selected) and
per-token output gradients g, over the Fisher's keyed draws (:func:`common.unlearning.fisher.fisher_batch`):

- covariance pass: A = E[a aᵀ], G = E[g gᵀ], both averaged over tokens;
- eigendecomposition (float64): A = Q_A diag(·) Q_Aᵀ, G = Q_G diag(·) Q_Gᵀ;
- lambda pass: Λ = E[(Q_Gᵀ W Q_A)²] over samples, W = Σ_tokens g aᵀ the sample's weight gradient (out, in);
- the preconditioned gradient of a module is Q_G [(Q_Gᵀ V Q_A) / (Λ + λ·mean Λ)] Q_Aᵀ, λ the relative damping,
  taken per module (FastGDA's AbU+: λ = 0.1).

Per-sample gradients are those of the per-sample loss (mean over pixels), as for the diagonal Fisher, so
the two are on one scale: the entries of Λ sum to the entries of the diagonal Fisher from the same draws.
Selected weights outside Linear modules (norms, convolutions) keep a diagonal Fisher from the lambda
pass's draws. The factors are a folder in kronfluence's layout (one safetensors file per factor, keyed by
module name), so a released folder (FastGDA's ``ekfac_fisher/``) is read by the same checked import.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.cache import _refuse, canonical, differing, resumable_sums
from common.data import ArrayTrainingSet
from common.diffusion.ddpm_loss import per_sample_loss, unet_denoiser
from common.diffusion.gradients import per_sample_gradients
from common.errors import AttributionError, require
from common.files import read_safetensors, save_tensors
from common.fingerprints import fingerprint_tensors
from common.model import DiffusionModel
from common.processes import barrier, rank_world
from common.unlearning.fisher import FisherConfig, curvature_identity, fisher_batch, newton_direction, relative_floor

# kronfluence's file names; the first four are what a preconditioner needs (FastGDA ships only these).
REQUIRED = ("activation_eigenvectors", "gradient_eigenvectors", "lambda_matrix", "num_lambda_processed")
COVARIANCES = (
    "activation_covariance",
    "gradient_covariance",
    "num_activation_covariance_processed",
    "num_gradient_covariance_processed",
)
EIGENVALUES = ("activation_eigenvalues", "gradient_eigenvalues")
DIAGONAL = "diagonal_fisher"  # ours: selected weights outside Linear modules (not in kronfluence's layout)


@dataclass(frozen=True)
class KroneckerModule:
    """A Linear module whose selected weight (and bias, when selected) is preconditioned by Kronecker factors."""

    name: str
    weight: str
    bias: str | None
    out_features: int
    in_features: int  # the activation side: input features, plus one when the bias is selected


def kronecker_modules(unet: torch.nn.Module, names: list[str]) -> tuple[list[KroneckerModule], list[str]]:
    """The selected Linear modules, and the selected parameters that belong to none (kept diagonal)."""
    chosen = set(names)
    modules, covered = [], set()
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in chosen:
            bias = f"{name}.bias" if module.bias is not None and f"{name}.bias" in chosen else None
            out_f, in_f = module.weight.shape
            modules.append(KroneckerModule(name, f"{name}.weight", bias, out_f, in_f + (bias is not None)))
            covered |= {f"{name}.weight", bias}
    return modules, [n for n in names if n not in covered]


@contextlib.contextmanager
def _captured(unet: torch.nn.Module, modules: list[KroneckerModule]):
    """Record each module's input and output of one forward pass."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    lookup = dict(unet.named_modules())

    def hook(name: str):
        def record(_module, inputs, output):
            require(name not in store, f"module {name} runs twice in one forward: EK-FAC needs each module once")
            store[name] = (inputs[0], output)

        return record

    handles = [lookup[m.name].register_forward_hook(hook(m.name)) for m in modules]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def activations_and_gradients(
    model: DiffusionModel,
    modules: list[KroneckerModule],
    x0: torch.Tensor,
    text: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: inputs a (B,L,in) with the bias column, and gradients g (B,L,out) of the summed per-sample
    losses with respect to its outputs (float64): sample b's own, since samples do not interact."""
    unet = model.unet
    params = dict(unet.named_parameters())
    tracked = [params[m.weight] for m in modules]
    flags = [p.requires_grad for p in tracked]
    for p in tracked:  # so the outputs carry gradients
        p.requires_grad_(True)
    try:
        with _captured(unet, modules) as store:
            loss = per_sample_loss(unet_denoiser(unet), x0, text, t, noise, model.alphas_cumprod).sum()
        grads = torch.autograd.grad(loss, [store[m.name][1] for m in modules])
    finally:
        for p, flag in zip(tracked, flags):
            p.requires_grad_(flag)
    out = {}
    for m, g in zip(modules, grads):
        a = store[m.name][0].detach().double()
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        if m.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], -1)
        out[m.name] = (a, g.detach().double().reshape(a.shape[0], -1, g.shape[-1]))
    return out


@dataclass
class EkfacFactors:
    """Fitted (or imported) EK-FAC factors: eigenbases and corrected eigenvalues per module, float64."""

    modules: list[KroneckerModule]
    activation_eigenvectors: dict[str, torch.Tensor]  # (in, in), eigenvectors as columns
    gradient_eigenvectors: dict[str, torch.Tensor]  # (out, out)
    lambdas: dict[str, torch.Tensor]  # (out, in): lambda_matrix / num_lambda_processed
    diagonal: dict[str, torch.Tensor]  # parameter -> diagonal Fisher, for selected weights outside Linear modules

    def fingerprint(self) -> str:
        tensors = [d[m.name] for m in self.modules for d in (self.activation_eigenvectors, self.gradient_eigenvectors)]
        tensors += [self.lambdas[m.name] for m in self.modules] + [self.diagonal[n] for n in sorted(self.diagonal)]
        return "ekfac:" + fingerprint_tensors(*tensors)

    def direction(self, grads: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        """Q_G [(Q_Gᵀ V Q_A) / (Λ + damping·mean Λ)] Q_Aᵀ per module (V: the weight gradient, bias as a last
        column); selected weights outside Linear modules divided by their damped diagonal Fisher."""
        out = {}
        for m in self.modules:
            v = grads[m.weight].double().reshape(m.out_features, -1)
            if m.bias is not None:
                v = torch.cat([v, grads[m.bias].double()[:, None]], 1)
            q_a = self.activation_eigenvectors[m.name].to(v)
            q_g = self.gradient_eigenvectors[m.name].to(v)
            lam = self.lambdas[m.name].to(v)
            rotated = q_g.T @ v @ q_a
            p = q_g @ (rotated / (lam + relative_floor(lam, damping, f"the EK-FAC eigenvalues of {m.name}"))) @ q_a.T
            out[m.weight] = p[:, : v.shape[1] - (m.bias is not None)].reshape(grads[m.weight].shape)
            if m.bias is not None:
                out[m.bias] = p[:, -1]
        rest = {n: g for n, g in grads.items() if n not in out}
        if rest:
            out |= newton_direction(rest, self.diagonal, damping)
        return out


def check_samples(model: DiffusionModel, data: ArrayTrainingSet, cfg: FisherConfig, modules: list[KroneckerModule]):
    """Refuse a fit whose covariances would be rank-deficient: each factor of side d needs d rows (samples × the
    tokens a sample gives the module, read off one probe sample), before any pass."""
    if not modules:
        return
    captured = activations_and_gradients(model, modules, *fisher_batch(model, data, cfg, 0, 1))
    for m in modules:
        tokens = captured[m.name][0].shape[1]
        side = max(m.in_features, m.out_features)
        require(
            cfg.num_samples * tokens >= side,
            f"EK-FAC needs more Fisher samples: {m.name} has a factor of side {side} and {tokens} tokens per sample, "
            f"so at least {-(-side // tokens)} samples; fisher.num_samples is {cfg.num_samples}",
        )


def _covariance_contribution(model, data, cfg, modules):
    def contribution(j0: int) -> dict[str, torch.Tensor]:
        batch = fisher_batch(model, data, cfg, j0, min(j0 + cfg.batch_size, cfg.num_samples))
        out = {}
        captured = activations_and_gradients(model, modules, *batch)
        for m in modules:
            a, g = (x.reshape(-1, x.shape[-1]) for x in captured[m.name])
            out[f"activation_covariance/{m.name}"] = a.T @ a
            out[f"gradient_covariance/{m.name}"] = g.T @ g
            out[f"num_activation_covariance_processed/{m.name}"] = torch.tensor([float(len(a))], dtype=torch.float64)
            out[f"num_gradient_covariance_processed/{m.name}"] = torch.tensor([float(len(g))], dtype=torch.float64)
        return out

    return contribution


def _lambda_contribution(model, data, cfg, modules, rest, q_a, q_g):
    def contribution(j0: int) -> dict[str, torch.Tensor]:
        batch = fisher_batch(model, data, cfg, j0, min(j0 + cfg.batch_size, cfg.num_samples))
        captured = activations_and_gradients(model, modules, *batch)
        out = {}
        for m in modules:
            a, g = captured[m.name]
            w = torch.einsum("blo,bli->boi", g, a)  # each sample's weight gradient, summed over its tokens
            rotated = q_g[m.name].to(w).T @ w @ q_a[m.name].to(w)
            out[f"lambda_matrix/{m.name}"] = rotated.pow(2).sum(0)
            out[f"num_lambda_processed/{m.name}"] = torch.tensor([float(len(w))], dtype=torch.float64)
        if rest:
            grads = per_sample_gradients(model, rest, *batch)
            out |= {f"{DIAGONAL}/{n}": grads[n].double().pow(2).sum(0) for n in rest}
            out["num_diagonal_processed"] = torch.tensor([float(len(batch[0]))], dtype=torch.float64)
        return out

    return contribution


def _sum_over_processes(sums: dict[str, torch.Tensor], shapes: dict[str, tuple], accelerator, device):
    """Every process's sums (zeros where it had no batch), added up across processes."""
    full = {k: sums[k].to(device) if k in sums else torch.zeros(s, dtype=torch.float64, device=device)
            for k, s in shapes.items()}  # fmt: skip
    if accelerator is not None and accelerator.num_processes > 1:
        full = {k: accelerator.reduce(v, reduction="sum") for k, v in full.items()}
    return {k: v.cpu() for k, v in full.items()}


def _group(sums: dict[str, torch.Tensor], factor: str) -> dict[str, torch.Tensor]:
    prefix = f"{factor}/"
    return {k[len(prefix) :]: v for k, v in sums.items() if k.startswith(prefix)}


def _eigenbasis(covariance: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = covariance.double() / count.double().clamp_min(1)
    values, vectors = torch.linalg.eigh(0.5 * (c + c.T))
    return values, vectors


def fit_ekfac(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: FisherConfig,
    folder: str | Path | None = None,
    progress: bool = True,
    accelerator=None,
) -> tuple[EkfacFactors, dict[str, dict[str, torch.Tensor]]]:
    """Fit EK-FAC factors of ``cfg.selection`` from the Fisher's keyed draws: the factors and every file's tensors.

    With several processes, process r takes batches r, r + W, ... of both passes and the sums are added up:
    the same factors up to summation order. With a ``folder``, each process saves its partial sums every
    ``cfg.checkpoint_batches`` batches under ``folder/partial/`` and a rerun resumes from them.
    """
    from common.diffusion.selection import select_parameters

    names = select_parameters(model.unet, cfg.selection)
    modules, rest = kronecker_modules(model.unet, names)
    check_samples(model, data, cfg, modules)
    rank, world = rank_world(accelerator)
    starts = list(range(0, cfg.num_samples, cfg.batch_size))[rank::world]
    identity = curvature_identity(model, data, cfg, "ekfac") | {"batch_size": cfg.batch_size, "share": [rank, world]}
    partial = Path(folder) / "partial" if folder is not None else None
    device = next(model.unet.parameters()).device
    one = (1,)

    def part(stage: str) -> Path | None:
        return partial / f"{stage}-{rank}of{world}.safetensors" if partial is not None else None

    show = progress and rank == 0
    shapes = {}
    for m in modules:
        shapes |= {f"activation_covariance/{m.name}": (m.in_features,) * 2,
                   f"gradient_covariance/{m.name}": (m.out_features,) * 2,
                   f"num_activation_covariance_processed/{m.name}": one,
                   f"num_gradient_covariance_processed/{m.name}": one}  # fmt: skip
    cov = resumable_sums(part("covariance"), identity | {"stage": "covariance"}, starts,
                         _covariance_contribution(model, data, cfg, modules), cfg.checkpoint_batches,
                         "EK-FAC covariances", show)  # fmt: skip
    cov = _sum_over_processes(cov, shapes, accelerator, device)
    files: dict[str, dict[str, torch.Tensor]] = {f: _group(cov, f) for f in COVARIANCES}
    for side in ("activation", "gradient"):
        for m in modules:
            values, vectors = _eigenbasis(files[f"{side}_covariance"][m.name],
                                          files[f"num_{side}_covariance_processed"][m.name])  # fmt: skip
            files.setdefault(f"{side}_eigenvalues", {})[m.name] = values
            files.setdefault(f"{side}_eigenvectors", {})[m.name] = vectors
    params = dict(model.unet.named_parameters())
    shapes = {}
    for m in modules:
        shapes |= {f"lambda_matrix/{m.name}": (m.out_features, m.in_features), f"num_lambda_processed/{m.name}": one}
    if rest:
        shapes |= {f"{DIAGONAL}/{n}": tuple(params[n].shape) for n in rest} | {"num_diagonal_processed": one}
    contribution = _lambda_contribution(model, data, cfg, modules, rest, files["activation_eigenvectors"],
                                        files["gradient_eigenvectors"])  # fmt: skip
    lam = resumable_sums(part("lambda"), identity | {"stage": "lambda", "bases": _bases_fingerprint(files)},
                         starts, contribution, cfg.checkpoint_batches, "EK-FAC eigenvalues", show)  # fmt: skip
    lam = _sum_over_processes(lam, shapes, accelerator, device)
    files["lambda_matrix"] = _group(lam, "lambda_matrix")
    files["num_lambda_processed"] = _group(lam, "num_lambda_processed")
    if rest:
        count = lam["num_diagonal_processed"]
        files[DIAGONAL] = {n: v / count for n, v in _group(lam, DIAGONAL).items()}
    return factors_from_files(files, modules, rest), files


def _bases_fingerprint(files: dict[str, dict[str, torch.Tensor]]) -> str:
    keys = sorted(files["activation_eigenvectors"])
    return fingerprint_tensors(
        *(files[f][k] for f in ("activation_eigenvectors", "gradient_eigenvectors") for k in keys)
    )


def factors_from_files(
    files: dict[str, dict[str, torch.Tensor]], modules: list[KroneckerModule], rest: list[str]
) -> EkfacFactors:
    """The preconditioner's view of a factor folder's tensors (float64; Λ divided by its sample count)."""
    lam = {m.name: files["lambda_matrix"][m.name].double() / files["num_lambda_processed"][m.name].double().sum()
           for m in modules}  # fmt: skip
    return EkfacFactors(
        modules,
        {m.name: files["activation_eigenvectors"][m.name].double() for m in modules},
        {m.name: files["gradient_eigenvectors"][m.name].double() for m in modules},
        lam,
        {n: files[DIAGONAL][n].double() for n in rest} if rest else {},
    )


def write_factor_folder(folder: str | Path, files: dict[str, dict[str, torch.Tensor]], identity: dict) -> None:
    """One safetensors file per factor (kronfluence's names and keys), each carrying ``identity``; counts int64."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"identity": json.dumps(canonical(identity), sort_keys=True)}
    order = [f for f in files if f != "lambda_matrix"] + ["lambda_matrix"]  # written last: marks the folder done
    for factor in order:
        tensors = {k: (v.round().long() if factor.startswith("num_") else v).cpu().contiguous()
                   for k, v in files[factor].items()}  # fmt: skip
        save_tensors(folder / f"{factor}.safetensors", tensors, metadata=meta)


def _saved_identity(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("identity", "null"))
    except Exception as err:  # noqa: BLE001 - truncated or corrupt files raise several types
        raise AttributionError(f"EK-FAC factor file {path} is damaged ({err.__class__.__name__}); delete it") from None


def cached_ekfac(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: FisherConfig,
    folder: str | Path | None,
    progress: bool = True,
    accelerator=None,
) -> EkfacFactors:
    """The factors in ``folder`` if they were fitted from this model, training set and settings; else fit them.

    Raises:
        AttributionError: the folder holds factors of another model, training set or settings, or is damaged.
    """
    identity = curvature_identity(model, data, cfg, "ekfac")
    if folder is not None:
        folder = Path(folder)
        done = folder / "lambda_matrix.safetensors"
        if done.exists():
            diff = differing(_saved_identity(done) or {}, canonical(identity))
            if diff:
                _refuse(folder, "EK-FAC factor folder", diff)
            return read_factor_folder(folder, model, cfg.selection)
    factors, files = fit_ekfac(model, data, cfg, folder, progress, accelerator)
    if folder is not None:
        rank, _ = rank_world(accelerator)
        if rank == 0:
            write_factor_folder(folder, files, identity)
        barrier(accelerator)
        if rank == 0:
            shutil.rmtree(folder / "partial", ignore_errors=True)
    return factors


def read_factor_folder(folder: str | Path, model: DiffusionModel, selection: str) -> EkfacFactors:
    """A factor folder in kronfluence's layout (ours, or a released one such as FastGDA's ``ekfac_fisher/``),
    checked against the selected modules: every file present, exactly the selected modules, the right shapes,
    finite values and positive sample counts.

    Raises:
        AttributionError: a missing or damaged file; modules missing or outside the selection; a wrong shape.
    """
    from common.diffusion.selection import select_parameters

    folder = Path(folder)
    require(folder.is_dir(), f"EK-FAC factor folder {folder} does not exist")
    modules, rest = kronecker_modules(model.unet, select_parameters(model.unet, selection))
    wanted = list(REQUIRED) + ([DIAGONAL] if rest else [])
    missing = [f for f in wanted if not (folder / f"{f}.safetensors").exists()]
    if missing:
        why = f" (selection {selection!r} has weights outside Linear modules)" if missing[0] == DIAGONAL else ""
        raise AttributionError(f"EK-FAC factor folder {folder} lacks {missing[0]}.safetensors{why}")
    files = {f: read_safetensors(folder / f"{f}.safetensors", "EK-FAC factor file") for f in wanted}
    _check_modules(folder, files, modules, selection)
    if rest:
        params = dict(model.unet.named_parameters())
        for n in rest:
            require(n in files[DIAGONAL] and files[DIAGONAL][n].shape == params[n].shape,
                    f"{folder}/{DIAGONAL}.safetensors lacks {n} or has another shape")  # fmt: skip
    return factors_from_files(files, modules, rest)


def _check_modules(folder: Path, files: dict, modules: list[KroneckerModule], selection: str) -> None:
    """Exactly the selected modules in every file, each factor of the shape the model needs, finite and counted."""
    names = {m.name for m in modules}
    for factor in REQUIRED:
        lacking, others = sorted(names - set(files[factor])), sorted(set(files[factor]) - names)
        if lacking:
            raise AttributionError(
                f"{folder}/{factor}.safetensors lacks {len(lacking)} selected modules, e.g. {lacking[0]}"
            )
        if others:
            raise AttributionError(
                f"{folder}/{factor}.safetensors covers {len(others)} modules outside selection {selection!r}, "
                f"e.g. {others[0]}: it was fitted for other weights"
            )
    for m in modules:
        expect = {
            "activation_eigenvectors": (m.in_features,) * 2,
            "gradient_eigenvectors": (m.out_features,) * 2,
            "lambda_matrix": (m.out_features, m.in_features),
        }
        for factor, shape in expect.items():
            value = files[factor][m.name]
            bias = " (its bias column included)" if m.bias and factor != "gradient_eigenvectors" else ""
            require(
                tuple(value.shape) == shape,
                f"{folder}/{factor}.safetensors: {m.name} has shape {tuple(value.shape)}, the model needs "
                f"{shape}{bias}",
            )
            require(bool(torch.isfinite(value).all()), f"NaN or inf in {folder}/{factor}.safetensors: {m.name}")
        require(bool((files["lambda_matrix"][m.name] >= 0).all()), f"negative eigenvalues in {folder}: {m.name}")
        require(
            float(files["num_lambda_processed"][m.name].sum()) > 0,
            f"{folder}/num_lambda_processed.safetensors: {m.name} counts no samples",
        )
