"""Generation throughput: our ``LumenGenerator`` vs the stock ``StableDiffusionControlNetPipeline`` per image.

    python benchmarks/generation.py [--images 16] [--repeats 3] [--threads 1 2] [--batch-size 16]
                                    [--steps 20] [--guidance 3.0] [--compile] [--bf16] [--only cpu|gpu]
                                    [--out benchmarks/results/generation.json]

Two parts, each timing every path side by side in this process, interleaved (round robin, so other load
on the machine hits them alike), median of ``--repeats``:

* **cpu**: the shipped tiny models (``pipeline/assets/tiny-base`` + ``tiny-lumen-layout``), 64x64, fp32,
  conditions = random (B, 8, 64, 64) in [0, 1], once per ``--threads`` value;
* **gpu** (only when CUDA is available; otherwise skipped with a message): SD 1.5-sized UNet, VAE and
  CLIP text encoder built from the SD 1.5 configuration with random weights (timing does not need
  trained weights) and a ControlNet made from that UNet (8 condition channels, like a layout), 512x512,
  bf16 weights for every path. Also reports the achieved TFLOP/s against the device's bf16 peak.

Paths:

1. ``stock, 1 image per call``: the baseline, what a user would write: the stock pipeline called once
   per image with its own ``torch.Generator``;
2. ``stock, batched``: the stock pipeline called with ``--batch-size`` prompts and a generator list
   (``LumenGenerator(fast=False)``, the project's generator before the fast path);
3. ``ours``: ``LumenGenerator`` (fast path), ``--batch-size`` images per batch;
4. ``ours + torch.compile`` (``--compile``; compile time reported separately) and
   ``ours, bf16 autocast`` (``--bf16``, CPU only: a different dtype than the stock rows, flagged).

GFLOP/s counts the FLOPs of the UNet, ControlNet and VAE decode (text encoder and scheduler left out),
counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image of each path
(:func:`pipeline.lumen.generate.count_generation_flops`). Every path's images are compared with the
baseline's for the same seeds (max absolute difference in uint8 levels).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.lumen.base import BaseComponents, load_base
from pipeline.lumen.generate import LumenGenerator, count_generation_flops

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "pipeline" / "assets"
BASELINE = "stock, 1 image per call"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets; --peak-tflops overrides.
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]

PROMPTS = [
    "a red sphere and a wooden box on a tiled floor, bright daylight",
    "a blue cylinder next to a grey wall, evening light",
    "two spheres and a box in a studio, soft light",
    "a green box on a floor under a blue sky",
]


def device_peak_tflops(name: str) -> float | None:
    """bf16 dense peak of a CUDA device from its name (None if unknown)."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def tiny_components() -> tuple[BaseComponents, Any]:
    """The shipped tiny base model and layout ControlNet, in fp32 (as ``lumen expand`` loads them)."""
    from diffusers import ControlNetModel

    base = load_base(ASSETS / "tiny-base")
    cn = ControlNetModel.from_pretrained(ASSETS / "tiny-lumen-layout", torch_dtype=torch.float32)
    return base, cn.eval()


SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}  # fmt: skip
"""The SD 1.5 UNet configuration (``UNet2DConditionModel(**SD15_UNET)``; also benchmarks/flops_sd15.py)."""

SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215,
}  # fmt: skip
"""The SD 1.5 VAE configuration (``AutoencoderKL(**SD15_VAE)``)."""


def sd15_components(seed: int = 0, conditioning_channels: int = 8) -> tuple[BaseComponents, Any]:
    """SD 1.5-sized models with random weights: UNet (860 M), VAE (84 M), CLIP ViT-L text encoder (123 M),
    and a ControlNet from the UNet (361 M), from the SD 1.5 configuration. Nothing is downloaded."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.lumen.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    unet: Any = UNet2DConditionModel(**SD15_UNET)  # diffusers' stubs lack nn.Module's methods (eval)
    vae: Any = AutoencoderKL(**SD15_VAE)  # likewise
    tokenizer = build_tokenizer(PROMPTS, max_length=77)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(49408, len(tokenizer)), hidden_size=768, intermediate_size=3072,
            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, hidden_act="quick_gelu",
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels)
    base = BaseComponents(vae.eval(), unet.eval(), text.eval(), tokenizer, scheduler)
    return base, controlnet.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(paths: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each path, interleaved (round robin)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def measure(
    build: Callable[[], tuple[BaseComponents, Any]],
    device: torch.device,
    args: argparse.Namespace,
    size: int,
    channels: int,
    dtype: torch.dtype,
    extra_rows: bool,
) -> dict[str, Any]:
    """Time the paths on ``args.images`` images; returns rows, FLOPs, equivalence, timings."""
    n = args.images
    rng = np.random.default_rng(0)
    conds = rng.random((n, channels, size, size)).astype(np.float32)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = [1000 + i for i in range(n)]
    kw = {"steps": args.steps, "guidance_scale": args.guidance}

    # 1. Models: the stock paths and ours get separate, identical copies (ours may set channels_last).
    stock_base, stock_cn = build()
    ours_base, ours_cn = copy.deepcopy(stock_base), copy.deepcopy(stock_cn)
    if dtype != torch.float32:
        for m in (stock_base.vae, stock_base.unet, stock_base.text_encoder, stock_cn):
            m.to(dtype=dtype)
        for m in (ours_base.vae, ours_base.unet, ours_base.text_encoder, ours_cn):
            m.to(dtype=dtype)
    stock_gen = LumenGenerator(stock_base, stock_cn, device=device, fast=False)
    ours = LumenGenerator(ours_base, ours_cn, device=device, dtype=dtype)
    gens: dict[str, LumenGenerator] = {"stock, batched": stock_gen, "ours": ours}
    pipe = stock_gen.pipe
    cond_dev = torch.from_numpy(conds).to(device)
    outputs: dict[str, np.ndarray] = {}

    def stock_one() -> None:
        imgs = []
        for i in range(n):
            img = pipe(
                prompts[i], image=cond_dev[i : i + 1], num_inference_steps=args.steps, guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(seeds[i]), height=size, width=size, output_type="np",
            ).images  # fmt: skip
            imgs.append((np.clip(img[0], 0, 1) * 255).round().astype(np.uint8))
        outputs[BASELINE] = np.stack(imgs)

    def run(name: str) -> Callable[[], None]:
        def fn() -> None:
            outputs[name] = gens[name].generate(conds, prompts, seeds, batch_size=args.batch_size, **kw)

        return fn

    compile_s = None
    if args.compile:
        gens["ours + torch.compile"] = LumenGenerator(
            copy.deepcopy(ours_base), copy.deepcopy(ours_cn), device=device, dtype=dtype, compile=True
        )
    if extra_rows and args.bf16:
        gens["ours, bf16 autocast (not the stock dtype)"] = LumenGenerator(
            ours_base, ours_cn, device=device, dtype=torch.bfloat16
        )
    paths: dict[str, Callable[[], None]] = {BASELINE: stock_one, **{name: run(name) for name in gens}}
    student_rows: dict[str, LumenGenerator] = {}
    if args.student_steps:  # speed only: a student's architecture (guidance input, v-prediction), untrained
        from pipeline.lumen.distill import add_guidance_input, student_scheduler

        sb = copy.deepcopy(ours_base)
        sb.unet = add_guidance_input(sb.unet, 256)
        sb.scheduler = student_scheduler(sb.scheduler)
        name = f"distilled student, {args.student_steps} steps x 1 pass"
        student_rows[name] = LumenGenerator(sb, copy.deepcopy(ours_cn), device=device, dtype=dtype)

        def run_student() -> None:
            outputs[name] = student_rows[name].generate(
                conds, prompts, seeds, batch_size=args.batch_size, steps=args.student_steps,
                guidance_scale=args.guidance,
            )  # fmt: skip

        paths[name] = run_student

    # 2. Warm-up (compiles), then the interleaved repeats.
    for name, fn in paths.items():
        t0 = time.perf_counter()
        fn()
        if name == "ours + torch.compile":
            compile_s = time.perf_counter() - t0
    times = _timed(paths, args.repeats, device)
    denoise_s: list[float] = []
    for _ in range(args.repeats):  # the denoising loop's share of our path, for the utilisation figure
        ours.generate(conds, prompts, seeds, batch_size=args.batch_size, **kw)
        denoise_s.append(ours.timings["denoise"])

    # 3. FLOPs per image (one image through each path) and the images against the baseline.
    flops = {
        "ours": count_generation_flops(ours, conds[:1], prompts[:1], seeds[:1], **kw),
        "stock": count_generation_flops(stock_gen, conds[:1], prompts[:1], seeds[:1], **kw),
    }
    for name, gen in student_rows.items():
        flops[name] = count_generation_flops(gen, conds[:1], prompts[:1], seeds[:1], steps=args.student_steps,
                                             guidance_scale=args.guidance)  # fmt: skip
    base_rate = n / statistics.median(times[BASELINE])
    rows = []
    for name, t in times.items():
        rate = n / statistics.median(t)
        f = flops[name] if name in student_rows else flops["stock" if name.startswith("stock") else "ours"]
        model_flops = f["unet"] + f.get("controlnet", 0) + f["vae_decode"]
        diff = np.abs(outputs[name].astype(int) - outputs[BASELINE].astype(int))
        same = name not in student_rows  # a student makes other images by design: no diff to report
        rows.append({
            "path": name, "images_per_s": rate, "images_per_s_best": n / min(t), "speedup": rate / base_rate,
            "seconds": t, "gflop_per_s": model_flops * rate / 1e9,
            "max_abs_diff_vs_stock": int(diff.max()) if same else None,
            "mean_abs_diff_vs_stock": float(diff.mean()) if same else None,
        })  # fmt: skip
    loop_flops = flops["ours"]["unet"] + flops["ours"].get("controlnet", 0)
    return {
        "images": n,
        "size": size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "batch_size": args.batch_size,
        "dtype": str(dtype).replace("torch.", ""),
        "rows": rows,
        "flops_per_image": flops,
        "unet_controlnet_tflop_per_s": loop_flops * n / statistics.median(denoise_s) / 1e12,
        "denoise_seconds": denoise_s,
        "compile_seconds": compile_s,
    }


def _print_table(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(
        "| path | images/s (median) | images/s (best) | vs stock per image | GFLOP/s | max abs diff vs stock |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(
            f"| {r['path']} | {r['images_per_s']:.2f} | {r['images_per_s_best']:.2f} | {r['speedup']:.2f}x "
            f"| {r['gflop_per_s']:.1f} | {'n/a (other images)' if r['max_abs_diff_vs_stock'] is None else r['max_abs_diff_vs_stock']} |"
        )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="images per path per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU part: intra-op thread counts")
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch of the batched paths")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--compile", action="store_true", help="add an 'ours + torch.compile' row")
    ap.add_argument("--bf16", action="store_true", help="CPU part: add an 'ours, bf16 autocast' row")
    ap.add_argument(
        "--student-steps",
        type=int,
        default=4,
        help="add a distilled-student row at this step count (0: none)",
    )
    ap.add_argument("--only", choices=("cpu", "gpu"), default=None)
    ap.add_argument("--gpu-size", type=int, default=512, help="GPU part: image side")
    ap.add_argument(
        "--gpu-images", type=int, default=None, help="GPU part: images per path (default --images)"
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="GPU bf16 dense peak, if not in the table"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generation.json")
    args = ap.parse_args()

    result: dict[str, Any] = {"benchmark": "generation", "machine": machine(), "cpu": [], "gpu": None}
    if args.only != "gpu":
        for threads in args.threads:
            torch.set_num_threads(threads)
            load = os.getloadavg()[0]
            r = measure(tiny_components, torch.device("cpu"), args, 64, 8, torch.float32, extra_rows=True)
            r.update(threads=threads, load_before=load, load_after=os.getloadavg()[0], models="shipped tiny")
            result["cpu"].append(r)
            _print_table(
                f"CPU, shipped tiny models, 64x64, {args.steps} steps, guidance {args.guidance}, fp32, "
                f"{threads} thread(s), batch {args.batch_size}, {args.images} images, median of {args.repeats} "
                f"(1-min load {r['load_before']:.1f} -> {r['load_after']:.1f} on {os.cpu_count()} cores)",
                r,
            )
    if args.only != "cpu":
        if not torch.cuda.is_available():
            msg = "GPU part skipped: no CUDA device here (torch.cuda.is_available() is False)"
            print(f"\n{msg}")
            result["gpu"] = {"skipped": msg}
        else:
            dev = torch.device("cuda")
            gpu_args = argparse.Namespace(**{**vars(args), "images": args.gpu_images or args.images})
            r = measure(sd15_components, dev, gpu_args, args.gpu_size, 8, torch.bfloat16, extra_rows=False)
            name = torch.cuda.get_device_name(dev)
            peak = args.peak_tflops or device_peak_tflops(name)
            r.update(device=name, models="SD 1.5-sized, random weights", bf16_peak_tflops=peak)
            for row in r["rows"]:
                row["tflop_per_s"] = row["gflop_per_s"] / 1e3
                row["share_of_peak"] = row["tflop_per_s"] / peak if peak else None
            r["unet_controlnet_share_of_peak"] = r["unet_controlnet_tflop_per_s"] / peak if peak else None
            result["gpu"] = r
            _print_table(
                f"GPU {name}, SD 1.5-sized UNet + ControlNet (random weights), {args.gpu_size}x{args.gpu_size}, "
                f"{args.steps} steps, guidance {args.guidance}, bf16, batch {args.batch_size}",
                r,
            )
            share = r["unet_controlnet_share_of_peak"]
            print(
                f"UNet + ControlNet in the denoising loop: {r['unet_controlnet_tflop_per_s']:.1f} TFLOP/s"
                + (f" = {share:.0%} of the {peak:.0f} TFLOP/s bf16 peak" if share else " (peak unknown)")
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
