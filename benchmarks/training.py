"""Training speed and memory: our trainer against a re-implementation of A1111 1.10.1's step.

    python benchmarks/training.py [--steps 20] [--size 64] [--batch 2] [--device cpu|cuda]

Both train the same network on the same real ldm ``LatentDiffusion`` (built small from a config,
see tests/support/training_models.py; ``--large`` uses SD1.5's UNet layout) and the same images.

The A1111 step, as ``train_hypernetwork`` runs it from the UI: attention optimisations undone (the
einsum ``attention_CrossAttention_forward`` with ``apply_hypernetworks`` on the context), the UNet
weights left with ``requires_grad`` as loaded, shuffled tags so the text encoder runs every step
and is moved to the device and back to the CPU around it, ``devices.autocast()`` + ``GradScaler``,
clipping on the still-scaled gradients, ``sd_model(x, c)`` (LatentDiffusion.forward) for the loss.
Ours: ``hypernetwork_ext.training.train`` with the same options, attention left on the host's
optimisation (here PyTorch SDP, as A1111's "sdp" option).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hypernetwork_ext as hx
from hypernetwork_ext.training import LdmBackend, TrainingConfig, train
from tests.support.models import LDM_WIDTHS
from tests.support.training_models import LDM_CONTEXT, dataset_folder, tiny_latent_diffusion


def a1111_attention(network):
    """A1111's unoptimised forward with its hypernetwork call (x + f(x) on the context)."""

    def forward(self, x, context=None, mask=None):
        heads = self.heads
        q = self.to_q(x)
        context = x if context is None else context
        pair = network.layers.get(context.shape[2])
        context_k, context_v = (pair[0](context), pair[1](context)) if pair else (context, context)
        k, v = self.to_k(context_k), self.to_v(context_v)
        q, k, v = (
            t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).reshape(-1, t.shape[1], t.shape[2] // heads)
            for t in (q, k, v)
        )
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        out = (
            out.reshape(-1, heads, out.shape[1], out.shape[2])
            .transpose(1, 2)
            .reshape(out.shape[0] // heads, out.shape[1], -1)
        )
        return self.to_out(out)

    return forward


def sdp_attention(self, x, context=None, mask=None):
    """A1111's "sdp" optimisation (to_k/to_v called as modules, so our hooks act)."""
    heads = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    k, v = self.to_k(context), self.to_v(context)
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def patch_attention(model, forward):
    import types

    for module in model.model.diffusion_model.modules():
        if type(module).__name__ == "CrossAttention":
            module.forward = types.MethodType(forward, module)


def a1111_run(model, network, data, args, device) -> float:
    """Steps per second of A1111's loop body (dataset prepared beforehand, as A1111 does)."""
    from hypernetwork_ext.training.data import load_pixels, scan_images

    network.to(device).train()
    patch_attention(model, a1111_attention(network))
    images = scan_images(str(data))
    latents, words = [], []
    with torch.no_grad():
        for path, text, _size in images:
            pixels, _ = load_pixels(path, (args.size, args.size), keep_aspect=False, with_alpha=False)
            latents.append(model.get_first_stage_encoding(model.encode_first_stage(pixels[None].to(device)))[0])
            words.append(text)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    autocast = torch.autocast("cuda") if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)

    def step():
        order = torch.randperm(len(latents), generator=generator)[: args.batch].tolist()
        with autocast:
            x = torch.stack([latents[i] for i in order]).to(device)
            texts = []
            for i in order:
                tags = words[i].split(" ")
                tags = [tags[j] for j in torch.randperm(len(tags), generator=generator).tolist()]
                texts.append(" ".join(tags))
            model.cond_stage_model.to(device)
            c = model.cond_stage_model(texts).to(device)
            model.cond_stage_model.to("cpu")
            loss = model(x, c)[0]
        scaler.scale(loss).backward()
        torch.nn.utils.clip_grad_norm_(list(network.parameters()), 1.0)  # still scaled: the host's bug
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, args.steps, device)


def timed(step, steps: int, device) -> float:
    step()  # warm-up
    synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronise(device)
    return steps / (time.perf_counter() - started)


def synchronise(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_run(model, network, data, args, device, folder) -> float:
    patch_attention(model, sdp_attention)
    config = TrainingConfig(
        hypernetwork_name="bench",
        learn_rate="1e-5",
        batch_size=args.batch,
        data_root=str(data),
        log_directory="",
        training_width=args.size,
        training_height=args.size,
        steps=args.steps + 1,
        create_image_every=0,
        save_hypernetwork_every=0,
        template_filename="filewords.txt",
        shuffle_tags=True,
        clip_grad_mode="norm",
        clip_grad_value="1.0",
        seed=0,
        save_training_settings_to_txt=False,
    )
    times = []

    def on_progress(progress):
        synchronise(device)
        times.append(time.perf_counter())

    train(
        network,
        LdmBackend(model),
        config,
        hx.training.TrainingCallbacks(on_progress=on_progress),
        source_path=os.path.join(folder, "bench.pt"),
        progress_bar=False,
    )
    return (len(times) - 1) / (times[-1] - times[0])  # the first step is the warm-up


def peak(device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    value = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return f"{value:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    folder = tempfile.mkdtemp()
    data = dataset_folder(Path(folder) / "data", args.images, size=args.size)
    results = {}
    for label in ("A1111 1.10.1 step", "ours"):
        model = tiny_latent_diffusion(0).to(device)
        network = hx.create((LDM_CONTEXT, *LDM_WIDTHS), (1, 2, 1), "relu", seed=1, name="bench")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if label == "ours":
            speed = ours_run(model, network, data, args, device, folder)
        else:
            speed = a1111_run(model, network, data, args, device)
        results[label] = (speed, peak(device))
        del model
    print(
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{args.size}px, batch {args.batch}, {args.steps} steps, torch {torch.__version__}"
    )
    base_speed = results["A1111 1.10.1 step"][0]
    for label, (speed, memory) in results.items():
        ratio = speed / base_speed if base_speed else math.nan
        print(f"{label:>20}: {speed:7.2f} steps/s  ({ratio:4.2f}x)  peak memory {memory}")


if __name__ == "__main__":
    main()
