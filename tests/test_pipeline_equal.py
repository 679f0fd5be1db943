"""fvfunc samples what diffusers' WanPipeline samples: the same pipeline folder (tiny random Wan, umT5,
tokenizer, VAE, Wan2.1's scheduler), prompts, negative prompt and initial latents give the same latents,
through the Python API and through `train.py sample`, with UniPC as shipped and with Euler."""

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from configs import SamplerConfig, SampleRun
from fvfunc import cli, random, text
from fvfunc import samplers as S
from fvfunc.testing import tiny
from fvfunc.testing.pipeline import fvfunc_latents as pipeline_latents
from fvfunc.testing.pipeline import rel, wan_pipeline_latents

PROMPTS = ["a cat runs on the beach", "a red bird flies over the sea at night"]
NEGATIVE = "blurry low quality static"
LATENT = (2, 16, 2, 4, 6)  # [B, C, T, H, W]
STEPS, SCALE = 5, 4.5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.write_pipeline(tmp_path_factory.mktemp("pipe") / "wan", vae=True, text_encoder=True)


@pytest.fixture(scope="module")
def noise():
    return random.normal(random.key(11), LATENT)


def wan_pipeline(folder, scheduler):
    """diffusers' latents of PROMPTS / NEGATIVE from given initial latents."""
    return lambda latents: wan_pipeline_latents(folder, scheduler, PROMPTS, NEGATIVE, latents, STEPS, SCALE)


def sampler(kind):
    schedule = "flow_match_euler" if kind == "ode" else "unipc"
    return SamplerConfig(kind=kind, schedule=schedule, num_steps=STEPS, shift=3.0, guidance_scale=SCALE)


def fvfunc_latents(folder, noise, sampler_cfg, timesteps=None):
    return pipeline_latents(folder, PROMPTS, NEGATIVE, noise, sampler_cfg, timesteps)


@pytest.fixture(scope="module")
def reference(folder, noise):
    return {kind: wan_pipeline(folder, "flow_match_euler" if kind == "ode" else "unipc")(noise)
            for kind in ("unipc", "ode")}


@pytest.mark.parametrize("kind", ["unipc", "ode"])
def test_python_api_equals_wan_pipeline(folder, noise, reference, kind):
    got = fvfunc_latents(folder, noise, sampler(kind))
    assert rel(got, reference[kind]) <= 1e-5, rel(got, reference[kind])


def test_unipc_needs_diffusers_integer_timesteps(folder, noise, reference):
    # the old behaviour, the model at 1000 * sigma, drifts from WanPipeline: the integers make it equal
    walk = S.schedule(sampler("unipc"))
    assert walk.timesteps.tolist()[0] == 999 and all(t == int(t) for t in walk.timesteps.tolist())
    old = fvfunc_latents(folder, noise, sampler("unipc"), timesteps=walk.sigmas[:-1] * 1000)
    assert rel(old, reference["unipc"]) > 1e-4, rel(old, reference["unipc"])


@pytest.mark.parametrize("kind", ["unipc", "ode"])
def test_train_py_sample_equals_wan_pipeline(folder, noise, reference, kind, tmp_path):
    save_file({"noise": noise}, tmp_path / "noise.safetensors")
    s = sampler(kind)
    argv = ["sample", "--model", str(folder), "--prompt", *PROMPTS, "--negative-prompt", NEGATIVE,
            "--noise", str(tmp_path / "noise.safetensors"), "--sampler.kind", kind, "--sampler.schedule", s.schedule,
            "--sampler.num-steps", str(STEPS), "--sampler.shift", "3", "--sampler.guidance-scale", str(SCALE),
            "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--precision", "float32", "--fps", "4"]
    assert cli.main(argv) == 0
    for i in range(len(PROMPTS)):
        got = load_file(tmp_path / "out" / f"sample-{i}.safetensors")["latents"]
        assert rel(got, reference[kind][i]) <= 1e-5, (i, rel(got, reference[kind][i]))
        assert (tmp_path / "out" / f"sample-{i}.mp4").is_file()
        frames = sorted((tmp_path / "out" / f"sample-{i}").glob("frame-*.png"))
        assert [f.name for f in frames] == ["frame-0000.png", "frame-0001.png"]


def test_sample_inputs_as_files(folder, noise, reference, tmp_path, caplog):
    """Prompts from a .txt file, the negative prompt as an embedding file, the noise as [C, T, H, W]; and
    without any negative, WanPipeline's "" (not zeros) as the uncond."""
    from fvfunc import sample

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    encoder = text.load_encoder(folder)
    save_file({"text": text.encode(encoder, [NEGATIVE])[0, :7].clone()}, tmp_path / "neg.safetensors")  # trimmed
    save_file({"a": noise[0], "b": noise[1]}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"holds \['a', 'b'\]; expected one tensor or one named noise"):
        text.read_tensor(tmp_path / "two.safetensors", ("noise",))
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        text.read_tensor(tmp_path / "noise.pt")
    save_file({"noise": noise[0].clone()}, tmp_path / "noise.safetensors")  # one noise for both prompts
    cfg = SampleRun(model=str(folder), prompts=str(tmp_path / "prompts.txt"),
                    negative_prompt_embedding=str(tmp_path / "neg.safetensors"),
                    noise=str(tmp_path / "noise.safetensors"),
                    sampler=sampler("unipc"), output_dir=str(tmp_path / "a"), device="cpu", precision="float32")
    sample.sample_command(cfg)
    got = torch.stack([load_file(tmp_path / "a" / f"sample-{i}.safetensors")["latents"] for i in range(2)])
    want = wan_pipeline(folder, "unipc")(noise[:1].expand_as(noise).clone())
    assert rel(got, want) <= 1e-5
    with safe_open(tmp_path / "a" / "sample-1.safetensors", "pt") as f:
        assert f.metadata() == {"prompt": PROMPTS[1]}

    empty = text.encode(encoder, [""])
    assert empty.abs().sum() > 0
    assert torch.equal(sample.read_uncond(SampleRun(model=str(folder)), encoder, 2), empty)
    with caplog.at_level(logging.WARNING, logger="fvfunc"):  # no encoder, no file: zeros, said once
        assert sample.read_uncond(SampleRun(), None, 2) is None
    assert "guidance uses zeros as the uncond" in caplog.text
    with pytest.raises(ValueError, match="negative_prompt_embedding: 3 embeddings for 2 prompts"):
        save_file({"text": torch.zeros(3, 4, 32)}, tmp_path / "three.safetensors")
        sample.read_uncond(SampleRun(negative_prompt_embedding=str(tmp_path / "three.safetensors")), None, 2)
    with pytest.raises(ValueError, match=r"noise: .* has shape \[1, 16, 2, 4, 6\]; expected \[2, 16, T, H, W\]"):
        save_file({"noise": noise[:1].clone()}, tmp_path / "one.safetensors")
        sample.read_noise(SampleRun(noise=str(tmp_path / "one.safetensors")), 2, 16)


def test_sample_check_errors(folder, tmp_path, capsys):
    bare = tiny.write_pipeline(tmp_path / "bare")
    cases = [
        (["--model", str(folder)], "one of the two"),
        (["--model", str(folder), "--prompt", "a cat", "--prompts", str(tmp_path)], "one of the two"),
        (["--model", str(bare), "--prompt", "a cat"], "text prompts need the pipeline's umT5"),
        (["--model", str(folder), "--prompt", "a cat", "--noise", str(tmp_path / "nope.pt")], "noise: "),
        (["--model", str(bare), "--prompt", "a cat", "--negative-prompt", "x"], "text prompts need"),
        (["--model", str(bare), "--prompts", str(tmp_path / "bare"), "--negative-prompt", "x"],
         "negative_prompt: text needs the pipeline's umT5"),
        (["--model", str(folder), "--prompts", str(tmp_path / "p.csv")], "does not exist"),
    ]
    for args, message in cases:
        assert cli.main(["sample", *args]) == 2, args
        assert message in capsys.readouterr().err, args
