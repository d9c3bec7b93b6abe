"""Speed of our scoring and Fisher against loops written the way the original release writes them.

    python -m mscoco.bench [--device cuda] [--images 160] [--fisher-samples 256] [--out bench.json]

On the MSCOCO UNet architecture (random init) at the paper's shapes (4x16x16 latents, 5 captions of
77x1024, 20 timesteps), in the same run:

- scoring: UNet forwards per second of :func:`common.diffusion.keyed_losses.image_losses` (keyed noise drawn
  on the device, one read of each image group, losses kept on the device) against the original's
  ``collect_loss`` (80 images x 5 captions x 20 timesteps per batch by ``repeat_interleave``, a
  generator seeded per batch, losses copied to the host per batch); fp32 and bf16;
- Fisher: per-sample gradients per second of :func:`common.unlearning.fisher.estimate_fisher` on the
  cross-attention K/V against the original's ``vmap(grad)`` over all 684 weights, batch 32;
- the top-100 overlap of bf16 scores with fp32 scores (an unlearning-sized change of the K/V weights);
- with ``--compile``, our fp32 scoring under ``torch.compile`` too (timed after its first, compiling call).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from common.config import resolve_device
from common.data import ArrayTrainingSet
from common.diffusion.keyed_losses import LossConfig, image_losses
from common.diffusion.selection import select_parameters
from common.errors import cli
from common.evaluation.agreement import top_k_overlap
from common.model import use_classic_attention
from common.unlearning.fisher import FisherConfig, estimate_fisher
from mscoco.model import MscocoModel, build_unet


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


@torch.no_grad()
def original_scoring(model: MscocoModel, latents, text, images_per_batch: int, num_timesteps: int = 20) -> np.ndarray:
    """The original ``collect_loss``: a seeded device generator per batch, ``repeat_interleave``, a host copy."""
    device, unet, scheduler = model.device, model.unet, model.scheduler
    n_cap = text.shape[1]
    steps = torch.arange(0, model.num_train_timesteps, model.num_train_timesteps // num_timesteps)
    out = []
    for b, start in enumerate(range(0, len(latents), images_per_batch)):
        lat = latents[start : start + images_per_batch].to(device)
        cond = text[start : start + images_per_batch].to(device)
        bsz = len(lat)
        t = steps.repeat(bsz * n_cap).to(device)
        lat = lat.repeat_interleave(n_cap * num_timesteps, dim=0)
        cond = cond.reshape(bsz * n_cap, *cond.shape[2:]).repeat_interleave(num_timesteps, dim=0)
        generator = torch.Generator(device=device).manual_seed(b)
        noise = torch.randn(lat.shape, generator=generator, device=device)
        noisy = scheduler.add_noise(lat, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).reshape(bsz, n_cap, num_timesteps)
        out.append(loss.mean(-1).mean(-1).cpu().numpy())
    return np.concatenate(out)


def original_fisher(model: MscocoModel, latents, text, num_samples: int, batch_size: int = 32) -> None:
    """The original ``estimate_fisher``: vmap(grad) over every weight, squared in float64, per batch."""
    from torch.func import functional_call, grad, vmap

    unet, device = model.unet, model.device
    params = {k: v.detach() for k, v in unet.named_parameters()}
    alphas = model.scheduler.alphas_cumprod.to(device)

    def loss(p, x, c, t, a, e):
        x_t = a.sqrt() * x[None] + (1 - a).sqrt() * e[None]
        pred = functional_call(unet, p, (x_t, t[None]), {"encoder_hidden_states": c[None]}).sample
        return ((pred - e[None]) ** 2).mean()

    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0, 0), randomness="different")
    for start in range(0, num_samples, batch_size):
        idx = torch.arange(start, min(start + batch_size, num_samples)) % len(latents)
        x = latents[idx].to(device)
        c = text[idx, np.random.randint(text.shape[1])].to(device)  # one caption per batch, as the original
        t = torch.randint(0, model.num_train_timesteps, (len(idx),), device=device)
        grads = per_sample(params, x, c, t, alphas[t], torch.randn_like(x))
        for k in total:
            total[k] += grads[k].double().pow(2).mean(0)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=160, help="training images scored (2 x 80 on a GPU)")
    parser.add_argument("--images-per-batch", type=int, default=80, help="the original's 8000 rows / (5 x 20)")
    parser.add_argument("--fisher-samples", type=int, default=256, help="per-sample gradients timed")
    parser.add_argument("--widths", default="128,256,256,256", help="UNet block widths (the paper's by default)")
    parser.add_argument("--compile", action="store_true", help="also time our scoring under torch.compile (fp32)")
    parser.add_argument("--out", default=None, help="write the numbers as JSON")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    torch.manual_seed(0)
    unet = build_unet(block_out_channels=widths, **({} if widths[0] % 32 == 0 else {"norm_num_groups": 8}))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model = MscocoModel(unet.to(device).eval(), components=None)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(args.images, 4, 16, 16, generator=g)
    text = torch.randn(args.images, 5, 77, 1024, generator=g)
    data = ArrayTrainingSet(latents, text, flipped=latents.flip(-1))
    cfg = LossConfig(num_timesteps=20, batch_size=args.images_per_batch * 100)
    positions = torch.arange(args.images)
    rows = args.images * 5 * 20
    result: dict = {"device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"}
    result |= {"widths": widths, "images": args.images, "rows": rows, "torch": torch.__version__}

    def ours(precision: str, weights=None, compile: bool = False):
        return image_losses(
            model, data, positions, positions, cfg, flips=False, precision=precision, weight_sets={"": weights},
            compile=compile,
        )[""]  # fmt: skip

    original_scoring(model, latents[: args.images_per_batch], text[: args.images_per_batch], args.images_per_batch)
    ours("fp32")  # warm-up: kernels, allocator
    t_orig = timed(lambda: original_scoring(model, latents, text, args.images_per_batch), device)
    t_fp32 = timed(lambda: ours("fp32"), device)
    t_bf16 = timed(lambda: ours("bf16"), device)
    result["scoring_forwards_per_s"] = {
        "original": rows / t_orig,
        "ours_fp32": rows / t_fp32,
        "ours_bf16": rows / t_bf16,
    }
    result["scoring_speedup"] = {"fp32": t_orig / t_fp32, "bf16": t_orig / t_bf16}
    if args.compile:
        try:
            t_first = timed(lambda: ours("fp32", compile=True), device)  # the first call compiles
        except Exception as e:  # a compiler that fails here is reported; the other numbers still count
            result["compile_error"] = f"{type(e).__name__}: {e}"[:500]
        else:
            t_compiled = timed(lambda: ours("fp32", compile=True), device)
            result["compile_first_call_s"] = t_first
            result["scoring_forwards_per_s"]["ours_fp32_compile"] = rows / t_compiled
            result["scoring_speedup"]["fp32_compile"] = t_orig / t_compiled
    # bf16 against fp32 on the ranking: a K/V change of the size one unlearning step makes (~1%)
    names = select_parameters(model.unet, "cross-attn-kv")
    params = dict(model.unet.named_parameters())
    changed = {n: params[n].detach() * (1 + 0.01 * torch.randn_like(params[n])) for n in names}
    scores = {p: (ours(p, changed) - ours(p)).mean(-1)[:, 0].double().cpu().numpy() for p in ("fp32", "bf16")}
    k = min(100, max(1, args.images // 10))
    result["bf16_top_k_overlap"] = {"k": k, "overlap": top_k_overlap(scores["fp32"], scores["bf16"], k)}
    # Fisher: ours on K/V (the classic attention processor so vmap batches it) against the original's all-weights loop
    use_classic_attention(model.unet)
    model.unet.requires_grad_(False)
    fisher_cfg = FisherConfig(selection="cross-attn-kv", num_samples=args.fisher_samples, batch_size=32)
    t_ours = timed(lambda: estimate_fisher(model, data, fisher_cfg, progress=False), device)
    t_fisher_orig = timed(lambda: original_fisher(model, latents, text, args.fisher_samples), device)
    n = args.fisher_samples
    result["fisher_grads_per_s"] = {"original_all_weights": n / t_fisher_orig, "ours_kv": n / t_ours}
    result["fisher_speedup"] = t_fisher_orig / t_ours
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
