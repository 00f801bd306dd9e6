"""Progressive distillation on tiny seeded models: the guidance input, the rounds, resume, and the saved
student in the stock diffusers pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.lumen.distill import (
    STUDENT_CARD,
    Distiller,
    DistillSettings,
    Student,
    add_guidance_input,
    load_student,
    round_plan,
)
from pipeline.lumen.generate import LumenGenerator, guidance_embedding
from tests.test_generation_fast import PROMPTS, RES, N, _models

IMAGES = np.random.default_rng(0).integers(0, 255, (6, RES, RES, 3)).astype(np.uint8)
CONDS = np.random.default_rng(1).random((6, N, RES, RES)).astype(np.float32)
CAPTIONS = [PROMPTS[i % len(PROMPTS)] for i in range(6)]


def _distiller(out: Path, **settings: object) -> Distiller:
    base, cn = _models()
    kwargs: dict = {
        "teacher_steps": 8,
        "batch_size": 8,
        "lr": 3e-4,
        "warmup_steps": 1,
        "guidance_range": (1.0, 3.0),
    }
    d = Distiller(base, cn, out, DistillSettings(**(kwargs | settings)))  # type: ignore[arg-type]
    d.prepare(IMAGES, CONDS, CAPTIONS)
    return d


def _v_teacher(d: Distiller, guidance_input: bool) -> Student:
    """A v-prediction teacher (a student of an earlier round): the next student starts as an exact copy."""
    unet = add_guidance_input(d.base.unet, 8) if guidance_input else d.base.unet
    return Student(unet, d.teacher0.controlnet, "v_prediction")


def _mean_loss(d: Distiller, student: Student, teacher: Student, steps: int | None) -> float:
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(np.mean([d.loss(student, teacher, steps, gen).item() for _ in range(4)]))


def test_guidance_embedding_is_the_stock_pipelines() -> None:
    from diffusers import StableDiffusionControlNetPipeline

    w = torch.tensor([0.0, 1.5, 4.0])
    for dim in (8, 255):
        stock = StableDiffusionControlNetPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)  # type: ignore[arg-type]
        assert torch.allclose(guidance_embedding(w, dim), stock, atol=1e-6)


def test_the_guidance_input_starts_as_a_no_op() -> None:
    base, _ = _models()
    student = add_guidance_input(base.unet, 8)
    z, t = torch.randn(2, 4, RES // 2, RES // 2), torch.tensor([10, 500])
    emb = torch.randn(2, 16, 16)
    with torch.no_grad():
        ref = base.unet(z, t, encoder_hidden_states=emb).sample
        out = student(z, t, encoder_hidden_states=emb, timestep_cond=torch.randn(2, 8)).sample
    assert torch.equal(ref, out)
    assert student.config.time_cond_proj_dim == 8 and base.unet.config.time_cond_proj_dim is None


def test_round_plan_and_settings() -> None:
    assert round_plan(DistillSettings(teacher_steps=32, min_steps=2)) == [
        ("guidance", 32), ("steps-016", 16), ("steps-008", 8), ("steps-004", 4), ("steps-002", 2),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="powers of two"):
        DistillSettings(teacher_steps=20)
    with pytest.raises(ValueError, match="guidance_range"):
        DistillSettings(guidance_range=(0.5, 2.0))


def test_a_round_lowers_the_two_step_matching_loss(tmp_path: Path) -> None:
    d = _distiller(tmp_path, round_train_steps=150)
    teacher = _v_teacher(d, guidance_input=True)
    before = _mean_loss(d, d._student_from(teacher), teacher, 4)
    student, losses = d.run_round("steps-004", teacher, 4, progress=False)
    after = _mean_loss(d, student, teacher, 4)
    assert len(losses) == 150 and before > 0
    assert after < 0.7 * before, (before, after)
    log = (tmp_path / "steps-004" / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,seconds" and len(log) == 151


def test_a_resumed_round_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = _distiller(tmp_path / "a", round_train_steps=6, checkpoint_every=3)
    ref, ref_losses = whole.run_round("steps-004", _v_teacher(whole, True), 4, progress=False)

    first = _distiller(tmp_path / "b", round_train_steps=6, checkpoint_every=3)
    _, part = first.run_round("steps-004", _v_teacher(first, True), 4, progress=False, stop_after=3)
    again = _distiller(tmp_path / "b", round_train_steps=6, checkpoint_every=3)  # a new process, in effect
    resumed, rest = again.run_round("steps-004", _v_teacher(again, True), 4, progress=False)

    assert part + rest == ref_losses
    for name, module in ref.modules().items():
        other = resumed.modules()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items()), name
    log = (tmp_path / "b" / "steps-004" / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in log] == [
        line.split(",")[:2]
        for line in (tmp_path / "a" / "steps-004" / "train_log.csv").read_text().splitlines()
    ]


def test_the_saved_student_loads_in_the_stock_pipeline_and_matches_our_generator(tmp_path: Path) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    d = _distiller(tmp_path, round_train_steps=3)
    teacher = _v_teacher(d, guidance_input=True)
    student, _ = d.run_round("steps-004", teacher, 4, progress=False)
    folder = d.save_student(student, 4, "steps-004", {"teacher": "tiny"})
    card = json.loads((folder / STUDENT_CARD).read_text())
    assert (card["steps"], card["prediction_type"], card["teacher"]) == (4, "v_prediction", "tiny")

    stock = StableDiffusionControlNetPipeline.from_pretrained(folder, safety_checker=None)
    assert stock.unet.config.time_cond_proj_dim == 8
    assert stock.scheduler.config.prediction_type == "v_prediction"
    assert stock.scheduler.config.timestep_spacing == "trailing"
    images = []
    for i, seed in enumerate((3, 4)):
        out = stock(
            PROMPTS[i], image=torch.from_numpy(CONDS[i : i + 1]), num_inference_steps=4, guidance_scale=2.5,
            generator=torch.Generator().manual_seed(seed), height=RES, width=RES, output_type="np",
        ).images[0]  # fmt: skip
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    base, controlnet, _ = load_student(folder)
    ours = LumenGenerator(base, controlnet).generate(
        CONDS[:2], PROMPTS[:2], [3, 4], steps=4, guidance_scale=2.5
    )
    assert np.abs(ours.astype(int) - np.stack(images).astype(int)).max() <= 2
    # the guidance weight is an input: another w gives another image from the same noise
    other = LumenGenerator(base, controlnet).generate(
        CONDS[:1], PROMPTS[:1], [3], steps=4, guidance_scale=1.0
    )
    assert not np.array_equal(other[0], ours[0])


def test_the_guidance_distilled_student_matches_the_two_pass_teacher(tmp_path: Path) -> None:
    d = _distiller(tmp_path, guidance_train_steps=150)
    teacher = _v_teacher(d, guidance_input=False)  # two passes per step: classifier-free guidance

    gen = torch.Generator().manual_seed(7)
    z0, emb, empty, cond, _ = d._batch(gen)
    t = d.grid(8)[torch.randint(0, 8, (len(z0),), generator=gen)]
    a = d._alpha(t)
    z = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=gen)
    w = torch.full((len(z0),), 2.5)

    weight = (a / (1 - a)).clamp(min=1.0)  # the loss's truncated-SNR weight

    def error(student: Student) -> float:
        """Weighted squared x0 error at w = 2.5, as a share of the guidance's own effect on x0."""
        with torch.no_grad():
            want = teacher.x0(z, t, emb, empty, cond, w, d.alphas)
            got = student.x0(z, t, emb, empty, cond, w, d.alphas)
            unguided = teacher.x0(z, t, emb, empty, cond, torch.ones_like(w), d.alphas)
        return float((weight * (got - want) ** 2).mean() / (weight * (want - unguided) ** 2).mean())

    before = error(d._student_from(teacher))  # the new input starts at zero: the unguided prediction
    student, _ = d.run_round("guidance", teacher, None, progress=False)
    after = error(student)
    assert before == pytest.approx(1.0, abs=1e-4)
    assert after < 0.5, (before, after)
