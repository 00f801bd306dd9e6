"""FLOPs of the SD 1.5-sized models the cost estimate of docs/scaling.md rests on, counted, not timed.

    python benchmarks/flops_sd15.py [--channels 16] [--out benchmarks/results/flops_sd15.json]

The models are built from the SD 1.5 configuration on PyTorch's ``meta`` device (shapes only: no weights,
no memory, nothing downloaded; a few seconds on a CPU) and run under
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2 FLOPs; convolutions, matmuls and
attention are counted, elementwise ops and normalisation are not), one image at a time:

* UNet forward (64x64 latents, 77 text tokens), ControlNet forward (from that UNet, ``--channels``
  condition channels at 512x512) and its condition embedding, VAE decode and encode at 512x512;
* one ControlNet training step (ControlNet forward + frozen UNet with the residuals + backward to the
  ControlNet's weights), at 512x512 and 512x1024;
* the perception model of configs/sd15-dinov2.yaml (smp Unet, resnet50 encoder, 19 classes): forward,
  and a training step (forward + backward), at 512x512; the DINOv2-base layout backbone at 448x448.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from generation import SD15_UNET, SD15_VAE  # benchmarks/ (the script's folder)
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def tflop(fn: Callable[[], Any]) -> float:
    """TFLOP of one call of ``fn``."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e12


def count(channels: int) -> dict[str, float]:
    import segmentation_models_pytorch as smp
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):  # the SD 1.5 configuration of benchmarks/generation.py
        unet: Any = UNet2DConditionModel(**SD15_UNET)  # diffusers' stubs lack nn.Module's methods
        cn = ControlNetModel.from_unet(unet, conditioning_channels=channels)
        vae: Any = AutoencoderKL(**SD15_VAE)  # diffusers' stubs lack encode/decode
        seg = smp.Unet("resnet50", encoder_weights=None, encoder_depth=5, classes=19)
        dino = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,  # type: ignore[call-arg]  # not a declared field; configs accept extra keys
                                        intermediate_size=3072, patch_size=14, image_size=518))  # fmt: skip
    unet.requires_grad_(False)

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    emb, t = meta(1, 77, 768), torch.tensor([500], device="meta")

    def controlnet_step(h: int, w: int) -> None:
        down, mid = cn(
            meta(1, 4, h // 8, w // 8), t, emb, controlnet_cond=meta(1, channels, h, w), return_dict=False
        )
        out = unet(meta(1, 4, h // 8, w // 8), t, emb, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample  # fmt: skip
        out.float().pow(2).mean().backward()

    def seg_step() -> None:
        seg(meta(2, 3, 512, 512)).float().mean().backward()  # batch 2: BatchNorm needs more than one

    out = {"controlnet_train_step_512x512": tflop(lambda: controlnet_step(512, 512)),
           "controlnet_train_step_512x1024": tflop(lambda: controlnet_step(512, 1024)),
           "perception_train_step_512x512": tflop(seg_step) / 2}  # fmt: skip
    with torch.no_grad():
        out |= {
            "unet_forward_64x64_latents": tflop(lambda: unet(meta(1, 4, 64, 64), t, emb)),
            "controlnet_forward_512x512": tflop(
                lambda: cn(meta(1, 4, 64, 64), t, emb, controlnet_cond=meta(1, channels, 512, 512))
            ),
            "controlnet_cond_embedding_512x512": tflop(lambda: cn.controlnet_cond_embedding(meta(1, channels, 512, 512))),
            "vae_decode_512x512": tflop(lambda: vae.decode(meta(1, 4, 64, 64))),
            "vae_encode_512x512": tflop(lambda: vae.encode(meta(1, 3, 512, 512))),
            "perception_forward_512x512": tflop(lambda: seg(meta(1, 3, 512, 512))),
            "dinov2_base_forward_448x448": tflop(lambda: dino(meta(1, 3, 448, 448))),
        }  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=16, help="ControlNet condition channels (layout N)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flops_sd15.json")
    args = ap.parse_args()
    tflops = count(args.channels)
    print(f"SD 1.5-sized models (meta device, {args.channels} condition channels), TFLOP per image:")
    for name, value in tflops.items():
        print(f"  {name:36s} {value:8.4f}")
    result = {"benchmark": "flops_sd15", "condition_channels": args.channels, "tflop_per_image": tflops,
              "counting": "torch.utils.flop_counter.FlopCounterMode, multiply-add = 2 FLOPs"}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
