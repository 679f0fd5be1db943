"""The toy task's measures, its dataset, and the fast benchmark: DMD2 and kd must improve their students."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvfunc import data, random
from fvfunc.testing import toy

TASK = toy.Task()


def real(seed: int, n: int = 256):
    labels = toy.labels_for(n)
    return toy.render(random.key(seed), labels, TASK), labels


def noise(seed: int, n: int = 256):
    return toy.decode(random.normal(random.key(seed), (n, *TASK.latent_shape)), TASK)


def test_decode_inverts_encode():
    rgb, _ = real(0, 32)
    assert torch.allclose(toy.decode(toy.encode(rgb, TASK), TASK), rgb, atol=1e-5)


def test_latents_have_unit_spread_on_their_subspace():
    latents, _ = toy.real_latents(random.key(0), 512, TASK)
    q = toy.projection(TASK)
    coords = torch.einsum("cr,ncthw->nrthw", q, latents)
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-6)
    assert abs(float(coords.mean())) < 0.1 and 0.7 < float(coords.std()) < 1.3


def test_real_clips_adhere_fully():
    rgb, labels = real(1)
    assert toy.adherence(rgb, labels) == 100.0
    colour, direction = toy.classify(rgb)
    assert torch.equal(colour, labels // 4) and torch.equal(direction, labels % 4)


def test_noise_adheres_at_chance_or_below():
    _, labels = real(2)
    assert toy.adherence(noise(3), labels) <= 2 * 100 / len(toy.CLASSES)


def test_wrong_prompts_do_not_adhere():
    rgb, labels = real(4)
    assert toy.adherence(rgb, (labels + 1) % len(toy.CLASSES)) == 0.0


def test_frechet_distance_is_small_between_real_sets_and_large_for_noise():
    ref = toy.features(real(5, 1024)[0])
    assert toy.frechet_distance(ref, ref) == pytest.approx(0.0, abs=1e-6)
    assert toy.frechet_distance(ref, toy.features(real(6)[0])) < 0.5
    assert toy.frechet_distance(ref, toy.features(noise(7))) > 30  # trained models: 2 to 5


def test_frechet_distance_of_one_feature_is_the_gaussian_formula():
    # standardised by the reference: (mu_a - mu_b)^2 / s_a^2 + (s_a - s_b)^2 / s_a^2 for 1-d Gaussians
    a = random.normal(random.key(8), (4096, 1), dtype=torch.float64) * 2 + 1
    b = random.normal(random.key(9), (4096, 1), dtype=torch.float64) * 3 - 1
    sa, sb = float(a.std()), float(b.std())
    want = ((float(a.mean()) - float(b.mean())) ** 2 + (sa - sb) ** 2) / sa ** 2
    assert toy.frechet_distance(a, b, floor=0.0) == pytest.approx(want, rel=1e-6)


def test_features_are_the_documented_ones():
    rgb, labels = real(10, 64)
    f = toy.features(rgb)
    assert f.shape == (64, len(toy.FEATURES)) and torch.isfinite(f).all()
    tr = toy.track(rgb)
    speed = tr["velocity"].norm(dim=1)
    assert ((speed > 1.4) & (speed < 2.1)).all()  # rendered at 1.5 to 2 px a frame
    assert (tr["wobble"] < 0.1).all() and (tr["background"] < 0.02).all()


def test_dataset_reads_back_through_the_trainers_reader(tmp_path):
    toy.write_dataset(tmp_path / "data", 40, random.key(12), TASK)
    toy.write_prompts(tmp_path / "prompts", TASK)
    ds = data.ParquetDataset(str(tmp_path / "data"), data.T2V, text_len=8)
    latents, labels = toy.real_latents(random.key(12), 40, TASK)
    b = ds.batch(list(range(40)))
    assert torch.equal(b["latents"], latents) and torch.equal(b["text"], toy.prompts(labels, TASK))
    assert b["captions"][5] == toy.caption(5) == "a green blob moving right"
    prompts = data.ParquetDataset(str(tmp_path / "prompts"), data.TEXT_ONLY, text_len=8)
    assert len(prompts) == len(toy.CLASSES)


def test_grid_is_an_image_of_the_clips():
    rgb, _ = real(13, 3)
    image = toy.grid([rgb, rgb])
    t, s = TASK.frames, TASK.size * 4
    assert image.dtype.name == "uint8" and image.shape == (3 * s + 2 * 6, 2 * (t * (s + 1) - 1) + 6, 3)


@pytest.mark.slow
def test_fast_benchmark_distillation_improves_the_student(tmp_path):
    """The whole benchmark, small, as a user runs it (`python bench/toy.py --fast`): pretrain a teacher
    with `train.py finetune`, distil it with `train.py dmd2` and with `train.py kd` (then DMD2 from the
    kd student), measure. The 4-step DMD2 student must end closer to the real clips than it started
    (the teacher's weights sampled with the student's 4-step sampler). The kd student must have
    learnt to jump along the teacher's trajectories from noise it never saw: its loss on held-out
    trajectories must fall well below its start's (to 0.55x on seeds 0 and 1; the weak
    fast teacher gives no Frechet distance gain to measure)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, str(root / "bench" / "toy.py"), "--fast", "--threads", "1", "--out",
                           str(out)], capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    start, end = result["learning"][0], result["learning"][-1]
    assert math.isfinite(end["fd"])
    assert end["fd"] < 0.8 * start["fd"], result["learning"]
    kd_start, kd_end = result["kd_learning"][0], result["kd_learning"][-1]
    assert kd_end["step"] > 0 and math.isfinite(kd_end["heldout_loss"])
    assert kd_end["heldout_loss"] < 0.75 * kd_start["heldout_loss"], result["kd_learning"]
    assert (out / "toy_grid.png").is_file()
