"""The fast generation path: same images as the stock diffusers pipelines, FLOP counting, settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import PRESET

from pipeline.conditions import box_blur
from pipeline.lumen.base import build_tiny_components
from pipeline.lumen.controlnet import build_controlnet
from pipeline.lumen.generate import LumenGenerator, compute_dtype, count_generation_flops
from pipeline.lumen.tokenizer import build_tokenizer

RES, N = 16, 5
PROMPTS = ["a red sphere on a floor", "a blue box under the sky", "a red sphere on a floor"]
SEEDS = [7, 8, 9]


def _models(seed: int = 0) -> tuple:
    """Tiny seeded base + ControlNet whose zero convolutions (residual outputs and the condition
    embedding's last layer) are made non-zero, so the condition matters."""
    base = build_tiny_components(build_tokenizer(PROMPTS, max_length=16), RES, seed=seed, preset=PRESET)
    cn = build_controlnet(base, N, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for conv, std in [(c, 0.3) for c in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]] + [
            (cn.controlnet_cond_embedding.conv_out, 3.0)
        ]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
    return base.to("cpu"), cn.eval()


@pytest.fixture(scope="module")
def models() -> tuple:
    return _models()


@pytest.fixture(scope="module")
def conds() -> np.ndarray:
    return np.random.default_rng(0).random((3, N, RES, RES)).astype(np.float32)


def _stock_one_by_one(
    gen: LumenGenerator, conds: np.ndarray | None, steps: int, guidance: float
) -> np.ndarray:
    """The stock pipeline called once per image, as a user would."""
    out = []
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        kwargs = {} if conds is None else {"image": torch.from_numpy(conds[i : i + 1])}
        img = gen.pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
            height=RES, width=RES, output_type="np", **kwargs,
        ).images[0]  # fmt: skip
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize(
    ("scheduler", "guidance", "order"),
    [
        ("ddim", 2.0, "rgb"),
        ("ddim", 1.0, "rgb"),
        ("dpm", 3.0, "rgb"),
        ("euler", 2.0, "bgr"),
        ("pndm", 2.0, "rgb"),
    ],
)
def test_fast_path_matches_the_stock_pipeline_image_by_image(
    scheduler: str, guidance: float, order: str
) -> None:
    base, cn = _models()
    cn.register_to_config(controlnet_conditioning_channel_order=order)
    conds = np.random.default_rng(0).random((3, N, RES, RES)).astype(np.float32)
    fast = LumenGenerator(base, cn, scheduler=scheduler)
    assert fast.fast
    ours = fast.generate(
        conds, PROMPTS, SEEDS, steps=4, guidance_scale=guidance, batch_size=2
    )  # 2 + 1 images
    stock = _stock_one_by_one(LumenGenerator(base, cn, scheduler=scheduler, fast=False), conds, 4, guidance)
    assert ours.shape == (3, RES, RES, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - stock.astype(int)).max() <= 2


def test_the_condition_changes_the_image(models, conds: np.ndarray) -> None:
    """Guards the test above: with these weights the ControlNet (and its cached embedding) matters."""
    gen = LumenGenerator(*models)
    a = gen.generate(conds[:1], PROMPTS[:1], SEEDS[:1], steps=3)
    b = gen.generate(1 - conds[:1], PROMPTS[:1], SEEDS[:1], steps=3)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 10


def test_fast_path_without_controlnet_matches_stock_pipeline(models) -> None:
    base, _ = models
    ours = LumenGenerator(base, None).generate(
        None, PROMPTS, SEEDS, steps=3, guidance_scale=2.0, batch_size=2
    )
    stock = _stock_one_by_one(LumenGenerator(base, None, fast=False), None, 3, 2.0)
    assert np.abs(ours.astype(int) - stock.astype(int)).max() <= 2


def test_base_model_alone_generates_non_square_sizes(models) -> None:
    """Without a ControlNet, ``size`` sets (H, W) (CamVid's 64x96); both paths agree."""
    base, _ = models
    res = base.unet.config.sample_size * 2 ** (len(base.vae.config.block_out_channels) - 1)
    size = (res, res * 3 // 2)
    fast = LumenGenerator(base, None).generate(None, PROMPTS[:2], SEEDS[:2], steps=2, size=size)
    stock = LumenGenerator(base, None, fast=False).generate(None, PROMPTS[:2], SEEDS[:2], steps=2, size=size)
    assert fast.shape == (2, *size, 3)
    assert np.abs(fast.astype(int) - stock.astype(int)).max() <= 2


def test_output_size_area_downsamples_a_supersampled_generation(models, conds: np.ndarray) -> None:
    """lumen.supersample: generated at the conditions' size, returned at ``output_size`` (2x2 means);
    init images given at the output size are upsampled to the generation size first."""
    from pipeline.lumen.generate import resize_images

    gen = LumenGenerator(*models)
    full = gen.generate(conds, PROMPTS, SEEDS, steps=3)
    small = gen.generate(conds, PROMPTS, SEEDS, steps=3, output_size=(RES // 2, RES // 2))
    assert small.shape == (3, RES // 2, RES // 2, 3)
    blocks = full.astype(np.float64).reshape(3, RES // 2, 2, RES // 2, 2, 3).mean((2, 4))
    assert np.abs(small.astype(np.float64) - blocks).max() <= 0.5 + 1e-9
    assert np.array_equal(resize_images(full, (RES // 2, RES // 2)), small)
    init = np.random.default_rng(1).integers(0, 256, (3, RES // 2, RES // 2, 3), dtype=np.uint8)
    edited = gen.generate(
        conds, PROMPTS, SEEDS, steps=4, init_images=init, strength=0.5, output_size=(RES // 2, RES // 2)
    )
    assert edited.shape == small.shape and not np.array_equal(edited, small)
    with pytest.raises(ValueError, match="init_images are"):
        gen.generate(conds, PROMPTS, SEEDS, steps=4, init_images=init, strength=0.5)


def test_batching_does_not_change_the_images(models, conds: np.ndarray) -> None:
    gen = LumenGenerator(*models)
    one = gen.generate(conds, PROMPTS, SEEDS, steps=3, batch_size=1)
    three = gen.generate(conds, PROMPTS, SEEDS, steps=3, batch_size=3)
    assert np.abs(one.astype(int) - three.astype(int)).max() <= 1


def test_controlnet_is_left_as_it_was(models, conds: np.ndarray) -> None:
    base, cn = models
    keys, embedding = list(cn.state_dict()), cn.controlnet_cond_embedding
    gen = LumenGenerator(base, cn)
    gen.generate(conds[:1], PROMPTS[:1], SEEDS[:1], steps=2)

    def broken_unet(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    gen._unet = broken_unet  # a failure inside the denoising loop also restores it
    with pytest.raises(RuntimeError, match="out of memory"):
        gen.generate(conds[:1], PROMPTS[:1], SEEDS[:1], steps=2)
    assert cn.controlnet_cond_embedding is embedding and list(cn.state_dict()) == keys


def test_flop_counter_attributes_each_model(models, conds: np.ndarray) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    base, cn = models
    fast, stock = LumenGenerator(base, cn), LumenGenerator(base, cn, fast=False)
    f2, f3 = (count_generation_flops(fast, conds[:1], PROMPTS[:1], SEEDS[:1], steps=s) for s in (2, 3))
    s3 = count_generation_flops(stock, conds[:1], PROMPTS[:1], SEEDS[:1], steps=3)
    # one UNet step on the two guidance rows, counted directly
    with FlopCounterMode(display=False) as direct:
        base.unet(torch.zeros(2, 4, RES // 2, RES // 2), 10, encoder_hidden_states=torch.zeros(2, 16, 16))
    assert f3["unet"] - f2["unet"] == direct.get_total_flops() and f3["unet"] == s3["unet"]
    assert f3["vae_decode"] == f2["vae_decode"] == s3["vae_decode"] > 0
    # the stock pipeline embeds the condition at every step and for both guidance halves; ours once
    assert 0 < f3["controlnet"] < s3["controlnet"]
    parts = f3["unet"] + f3["controlnet"] + f3["vae_decode"] + f3["text_encoder"]
    assert parts <= f3["total"] and parts > 0.99 * f3["total"]


def test_settings_threads_timings_and_dtypes(models, conds: np.ndarray) -> None:
    before = torch.get_num_threads()
    gen = LumenGenerator(*models, threads=1)
    fp32 = gen.generate(conds[:2], PROMPTS[:2], SEEDS[:2], steps=2)
    assert torch.get_num_threads() == before
    assert set(gen.timings) == {"text", "denoise", "decode", "total"} and gen.timings["denoise"] > 0
    bf16 = LumenGenerator(*models, dtype="bfloat16").generate(conds[:2], PROMPTS[:2], SEEDS[:2], steps=2)
    assert np.abs(fp32.astype(int) - bf16.astype(int)).mean() < 8
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        compute_dtype("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="prompts but"):
        gen.generate(conds[:2], PROMPTS[:1], SEEDS[:2])


def test_unsupported_controlnet_falls_back_to_the_stock_pipeline() -> None:
    base, cn = _models()
    cn.register_to_config(global_pool_conditions=True)  # guess mode: our loop does not do it
    assert not LumenGenerator(base, cn).fast


def test_sdpa_and_channels_last_are_applied_and_change_nothing(conds: np.ndarray) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    base, cn = _models()
    expected = LumenGenerator(base, cn).generate(conds[:2], PROMPTS[:2], SEEDS[:2], steps=2)
    base.unet.set_attn_processor(AttnProcessor())  # the classic, non-SDPA attention
    gen = LumenGenerator(base, cn, channels_last=True)
    assert all(isinstance(p, AttnProcessor2_0) for p in base.unet.attn_processors.values())
    assert base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ours = gen.generate(conds[:2], PROMPTS[:2], SEEDS[:2], steps=2)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1


def test_strength_starts_from_the_init_images_noised_latents_and_runs_the_rest_of_the_schedule(
    models, conds
) -> None:
    from diffusers import DDIMScheduler

    from pipeline.lumen.train_base import images_to_tensor

    base, cn = models
    init = np.random.default_rng(3).integers(0, 256, (3, RES, RES, 3), dtype=np.uint8)
    gen = LumenGenerator(base, cn)
    inputs: list[torch.Tensor] = []
    hook = base.unet.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    try:
        gen.generate(conds, PROMPTS, SEEDS, steps=10, guidance_scale=1.0, init_images=init, strength=0.35)
    finally:
        hook.remove()
    assert len(inputs) == 3  # int(10 * 0.35) of the 10 steps
    sched = DDIMScheduler.from_config(base.scheduler.config)
    sched.set_timesteps(10)
    t0 = int(sched.timesteps[7])
    with torch.no_grad():
        z0 = base.vae.encode(images_to_tensor(init)).latent_dist.mean * base.vae.config.scaling_factor
    noise = torch.cat(
        [torch.randn((1, *z0.shape[1:]), generator=torch.Generator().manual_seed(s)) for s in SEEDS]
    )
    ab = sched.alphas_cumprod[t0]
    torch.testing.assert_close(inputs[0], ab.sqrt() * z0 + (1 - ab).sqrt() * noise, rtol=1e-4, atol=1e-5)
    # strength 1 ignores the init images: the same images as without them
    full = gen.generate(conds, PROMPTS, SEEDS, steps=3, init_images=init, strength=1.0)
    np.testing.assert_array_equal(full, gen.generate(conds, PROMPTS, SEEDS, steps=3))


def test_strength_is_validated(models, conds) -> None:
    base, cn = models
    init = np.zeros((3, RES, RES, 3), np.uint8)
    gen = LumenGenerator(base, cn)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength must be in"):
            gen.generate(conds, PROMPTS, SEEDS, steps=2, init_images=init, strength=bad)
    with pytest.raises(ValueError, match="one init image per prompt"):
        gen.generate(conds, PROMPTS, SEEDS, steps=2, strength=0.5)
    with pytest.raises(ValueError, match="init_images are"):
        gen.generate(
            conds, PROMPTS, SEEDS, steps=2, init_images=np.zeros((3, 8, 8, 3), np.uint8), strength=0.5
        )
    with pytest.raises(ValueError, match="not pndm"):
        LumenGenerator(base, cn, scheduler="pndm").generate(
            conds, PROMPTS, SEEDS, steps=2, init_images=init, strength=0.5
        )


def test_condition_guidance_matches_the_stock_guess_mode_without_its_ramp(conds: np.ndarray) -> None:
    """condition_guidance runs the ControlNet on the conditional half only, as the stock pipeline's guess
    mode does. Guess mode also ramps the down-block residuals (0.1 .. 1): with those zeroed, only the
    mid residual is left, which it scales by 1, and the two must agree."""
    base, cn = _models()
    with torch.no_grad():
        for conv in cn.controlnet_down_blocks:
            conv.weight.zero_()
            conv.bias.zero_()
    ours = LumenGenerator(base, cn).generate(
        conds, PROMPTS, SEEDS, steps=3, guidance_scale=3.0, conditioning_scale=1.5, condition_guidance=True
    )
    stock = []
    pipe = LumenGenerator(base, cn, fast=False).pipe
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        img = pipe(
            prompt, image=torch.from_numpy(conds[i : i + 1]), num_inference_steps=3, guidance_scale=3.0,
            controlnet_conditioning_scale=1.5, guess_mode=True, generator=torch.Generator().manual_seed(seed),
            height=RES, width=RES, output_type="np",
        ).images[0]  # fmt: skip
        stock.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    assert np.abs(ours.astype(int) - np.stack(stock).astype(int)).max() <= 2
    # and it is not the default guidance: the unconditional half differs
    default = LumenGenerator(base, cn).generate(
        conds, PROMPTS, SEEDS, steps=3, guidance_scale=3.0, conditioning_scale=1.5
    )
    assert np.abs(ours.astype(int) - default.astype(int)).max() > 10


def test_condition_guidance_changes_nothing_without_guidance(models, conds: np.ndarray) -> None:
    gen = LumenGenerator(*models)
    plain = gen.generate(conds, PROMPTS, SEEDS, steps=3, guidance_scale=1.0)
    cg = gen.generate(conds, PROMPTS, SEEDS, steps=3, guidance_scale=1.0, condition_guidance=True)
    np.testing.assert_array_equal(plain, cg)


@pytest.mark.parametrize("condition_guidance", [False, True])
def test_early_conditions_drive_the_first_steps_and_the_conditions_the_rest(
    models, conds: np.ndarray, condition_guidance: bool
) -> None:
    base, cn = models
    gen = LumenGenerator(base, cn)
    early = conds[::-1].copy()
    kw = {"steps": 4, "guidance_scale": 3.0, "condition_guidance": condition_guidance}
    # which condition embedding the ControlNet saw at each step (the fixed embedding ignores its input)
    seen: list[torch.Tensor] = []
    hook = cn.register_forward_pre_hook(
        lambda m, args: seen.append(m.controlnet_cond_embedding(None).clone())
    )
    try:
        mixed = gen.generate(conds, PROMPTS, SEEDS, early_conditions=early, early_fraction=0.5, **kw)
    finally:
        hook.remove()
    with torch.inference_mode():
        emb = {
            name: cn.controlnet_cond_embedding(torch.from_numpy(c))
            for name, c in [("early", early), ("late", conds)]
        }
    rows = len(PROMPTS) * (1 if condition_guidance else 2)
    assert len(seen) == 4 and all(s.shape[0] == rows for s in seen)
    for step, s in enumerate(seen):
        expected = emb["early" if step < 2 else "late"]
        torch.testing.assert_close(s[: len(PROMPTS)], expected, atol=1e-5, rtol=1e-5)
    # the end points are the plain generations
    plain = gen.generate(conds, PROMPTS, SEEDS, **kw)
    np.testing.assert_array_equal(
        gen.generate(conds, PROMPTS, SEEDS, early_conditions=early, early_fraction=0.0, **kw), plain
    )
    np.testing.assert_array_equal(
        gen.generate(conds, PROMPTS, SEEDS, early_conditions=early, early_fraction=1.0, **kw),
        gen.generate(early, PROMPTS, SEEDS, **kw),
    )
    assert np.abs(mixed.astype(int) - plain.astype(int)).max() > 10


def test_late_conditioning_scale_applies_after_the_early_steps(models, conds: np.ndarray) -> None:
    base, cn = models
    gen = LumenGenerator(base, cn)
    early = conds[::-1].copy()
    kw = {"steps": 4, "guidance_scale": 3.0, "conditioning_scale": 1.5, "early_conditions": early}
    scales: list[float] = []
    hook = cn.register_forward_pre_hook(
        lambda m, args, kwargs: scales.append(kwargs["conditioning_scale"]), with_kwargs=True
    )
    try:
        late = gen.generate(conds, PROMPTS, SEEDS, early_fraction=0.5, late_conditioning_scale=3.0, **kw)
    finally:
        hook.remove()
    assert scales == [1.5, 1.5, 3.0, 3.0]
    same = gen.generate(conds, PROMPTS, SEEDS, early_fraction=0.5, late_conditioning_scale=1.5, **kw)
    np.testing.assert_array_equal(same, gen.generate(conds, PROMPTS, SEEDS, early_fraction=0.5, **kw))
    assert not np.array_equal(late, same)  # the tiny models: the last two steps move a few levels
    with pytest.raises(ValueError, match="late_conditioning_scale needs early_conditions"):
        gen.generate(conds, PROMPTS, SEEDS, steps=2, late_conditioning_scale=2.0)


def test_early_conditions_are_validated(models, conds: np.ndarray) -> None:
    base, cn = models
    with pytest.raises(ValueError, match="early_fraction must be in"):
        LumenGenerator(base, cn).generate(
            conds, PROMPTS, SEEDS, steps=2, early_conditions=conds, early_fraction=1.5
        )
    with pytest.raises(ValueError, match="early_conditions must have"):
        LumenGenerator(base, cn).generate(
            conds, PROMPTS, SEEDS, steps=2, early_conditions=conds[:2], early_fraction=0.5
        )
    with pytest.raises(ValueError, match="fast generation path"):
        LumenGenerator(base, cn, fast=False).generate(
            conds, PROMPTS, SEEDS, steps=2, early_conditions=conds, early_fraction=0.5
        )


def test_layout_guidance_sets_the_prompts_and_the_layouts_pull_apart(models, conds: np.ndarray) -> None:
    base, cn = models
    gen = LumenGenerator(base, cn)
    kw = {"steps": 3, "guidance_scale": 3.0, "condition_guidance": True}
    two_rows = gen.generate(conds, PROMPTS, SEEDS, **kw)
    # equal weights: the three-row split is the two-row guidance, term for term
    same = gen.generate(conds, PROMPTS, SEEDS, layout_guidance=3.0, **kw)
    assert np.abs(same.astype(int) - two_rows.astype(int)).max() <= 1
    # no layout weight: the prompt row alone, i.e. the base model with stock guidance and no ControlNet
    no_layout = gen.generate(conds, PROMPTS, SEEDS, layout_guidance=0.0, **kw)
    base_only = LumenGenerator(base, None).generate(
        None, PROMPTS, SEEDS, steps=3, guidance_scale=3.0, size=(RES, RES)
    )
    assert np.abs(no_layout.astype(int) - base_only.astype(int)).max() <= 1
    stronger = gen.generate(conds, PROMPTS, SEEDS, layout_guidance=6.0, **kw)
    assert np.abs(stronger.astype(int) - two_rows.astype(int)).max() > 10
    with pytest.raises(ValueError, match="needs condition_guidance"):
        gen.generate(conds, PROMPTS, SEEDS, steps=2, layout_guidance=2.0)


def test_a_negative_layout_takes_the_middle_guidance_rows_place(models, conds: np.ndarray) -> None:
    base, cn = models
    gen = LumenGenerator(base, cn)
    kw = {"steps": 3, "guidance_scale": 3.0, "condition_guidance": True}
    blurred = box_blur(conds, 2)
    two_rows = gen.generate(conds, PROMPTS, SEEDS, **kw)
    # equal weights: the negative cancels out, e0 + w (e_neg - e0) + w (e_both - e_neg) = e0 + w (e_both - e0)
    same = gen.generate(conds, PROMPTS, SEEDS, layout_guidance=3.0, layout_negative=blurred, **kw)
    assert np.abs(same.astype(int) - two_rows.astype(int)).max() <= 1
    # no layout weight: the negative row alone, i.e. two-row guidance with the blurred layout
    negative_only = gen.generate(conds, PROMPTS, SEEDS, layout_guidance=0.0, layout_negative=blurred, **kw)
    blurred_rows = gen.generate(blurred, PROMPTS, SEEDS, **kw)
    assert np.abs(negative_only.astype(int) - blurred_rows.astype(int)).max() <= 1
    assert np.abs(blurred_rows.astype(int) - two_rows.astype(int)).max() > 10
    stronger = gen.generate(conds, PROMPTS, SEEDS, layout_guidance=6.0, layout_negative=blurred, **kw)
    no_negative = gen.generate(conds, PROMPTS, SEEDS, layout_guidance=6.0, **kw)
    assert np.abs(stronger.astype(int) - no_negative.astype(int)).max() > 10
    with pytest.raises(ValueError, match="needs layout_guidance"):
        gen.generate(conds, PROMPTS, SEEDS, layout_negative=blurred, **kw)
    with pytest.raises(ValueError, match="layout_negative must have"):
        gen.generate(conds, PROMPTS, SEEDS, layout_guidance=5.0, layout_negative=blurred[:2], **kw)
