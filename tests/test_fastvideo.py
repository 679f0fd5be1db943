"""FastVideo semantics: what a FastVideo run file means, checked against FastVideo's formulas written out
here (fastvideo/distillation at the Phase-3 commit, and fastvideo/train)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import configs
from fvfunc import config_file, distributed, random, text, trainer, validation
from fvfunc.losses import METHODS, dmd2
from fvfunc.testing import tiny


def fastvideo_score_sigma(t0: torch.Tensor, shift: float, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """FastVideo's DMD2 score noise level of integer timesteps t0, step by step as its code does it:
    training_utils.shift_timestep, the adapter's clamp to int(ratio * 1000), and
    FlowMatchEulerDiscreteScheduler(shift).add_noise, which looks the timestep up in its grid."""
    t = t0 / 1000  # shift_timestep
    t = 1000 * (shift * t / (1 + (shift - 1) * t))
    t = t.clamp(int(min_ratio * 1000), int(max_ratio * 1000))
    grid_t = torch.from_numpy(np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy())
    sigmas = grid_t / 1000
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    return sigmas[(timesteps[None, :] - t[:, None]).abs().argmin(dim=1)]


def test_score_sigma_of_every_timestep_is_fastvideos():
    cfg = configs.DMD2Config(flow_shift=8.0, min_timestep_ratio=0.02, max_timestep_ratio=0.98)
    t0 = torch.arange(1000)
    ours = dmd2.score_sigmas(t0, cfg)
    theirs = fastvideo_score_sigma(t0, 8.0, 0.02, 0.98)
    assert torch.equal(ours, theirs)
    assert abs(ours.min().item() - 0.0236) < 1e-4  # a clamp of shift(u) would stop at 0.140
    for shift, lo, hi in ((3.0, 0.2, 0.98), (1.0, 0.0, 1.0), (5.0, 0.1, 0.9)):
        cfg = configs.DMD2Config(flow_shift=shift, min_timestep_ratio=lo, max_timestep_ratio=hi)
        assert torch.equal(dmd2.score_sigmas(t0, cfg), fastvideo_score_sigma(t0, shift, lo, hi))


def test_score_sigma_distribution_over_many_draws_equals_fastvideos():
    """The draws themselves: t0 uniform over {0..999} per sample, so the sigma distribution is the
    formula's image of the uniform one (checked bin by bin against FastVideo's torch.randint draws)."""
    cfg = configs.DMD2Config(flow_shift=8.0)
    n = 6000
    _, _, t0, k = dmd2.draw(random.key(3), range(n), (1, 1, 1, 1), 4, "cpu")
    assert t0.dtype == torch.int64 and 0 <= t0.min() and t0.max() <= 999
    ours = dmd2.score_sigmas(t0, cfg)
    theirs = fastvideo_score_sigma(torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0)),
                                   8.0, 0.02, 0.98)
    edges = torch.linspace(0, 1, 21)
    h_ours = torch.histogram(ours, edges).hist / n
    h_theirs = torch.histogram(theirs, edges).hist / n
    assert (h_ours - h_theirs).abs().max() < 0.025  # ~4 standard errors of a bin's share
    assert abs((ours == ours.max()).float().mean().item() - 0.14) < 0.015  # clamped at 980: 14 % of the mass
    # k: each sample draws its own, uniform over the 4 steps
    counts = torch.bincount(k, minlength=4).float() / n
    assert (counts - 0.25).abs().max() < 0.025


def test_step_index_k_is_per_sample_and_independent_of_the_split():
    key = random.key(0)
    _, _, t_all, k_all = dmd2.draw(key, range(8), (1, 1, 1, 1), 4, "cpu")
    assert len(set(k_all.tolist())) > 1  # one global batch covers several k
    _, _, t_a, k_a = dmd2.draw(key, range(0, 4), (1, 1, 1, 1), 4, "cpu")  # rank 0 of 2
    _, _, t_b, k_b = dmd2.draw(key, range(4, 8), (1, 1, 1, 1), 4, "cpu")  # rank 1 of 2
    assert torch.equal(torch.cat([k_a, k_b]), k_all) and torch.equal(torch.cat([t_a, t_b]), t_all)


# ------------------------------------------------------------------------------- run files


PHASE_34_DMD2 = {  # FastVideo's examples/distillation/phase3_4/distill_wan2.1_t2v_1.3B_dmd2_8steps_phase3.4.yaml
    "recipe": {"family": "wan", "method": "dmd2"},
    "roles": {"student": {"family": "wan", "path": "S", "trainable": True},
              "teacher": {"family": "wan", "path": "T", "trainable": False, "disable_custom_init_weights": True},
              "critic": {"family": "wan", "path": "S", "trainable": True, "disable_custom_init_weights": True}},
    "training": {"num_gpus": 8, "sp_size": 1, "tp_size": 1, "data_path": "data/Wan-Syn", "dataloader_num_workers": 4,
                 "train_batch_size": 1, "train_sp_batch_size": 1, "gradient_accumulation_steps": 1,
                 "num_latent_t": 20, "num_height": 448, "num_width": 832, "num_frames": 77, "output_dir": "out",
                 "max_train_steps": 4000, "seed": 1000, "checkpoints_total_limit": 3, "learning_rate": 2.0e-6,
                 "mixed_precision": "bf16", "betas": "0.0,0.999", "weight_decay": 0.01, "lr_scheduler": "constant",
                 "lr_warmup_steps": 0, "max_grad_norm": 1.0, "fake_score_learning_rate": 8.0e-6,
                 "fake_score_betas": "0.0,0.999", "fake_score_lr_scheduler": "constant", "training_cfg_rate": 0.0,
                 "min_timestep_ratio": 0.02, "max_timestep_ratio": 0.98, "enable_gradient_checkpointing_type": "full",
                 "tracker_project_name": "p", "wandb_run_name": "r", "log_validation": True,
                 "validation_dataset_file": "validation_4.json", "validation_steps": 50,
                 "validation_sampling_steps": "8", "validation_guidance_scale": "6.0"},
    "pipeline_config": {"flow_shift": 8, "sampler_kind": "sde"},
    "method_config": {"rollout_mode": "simulate", "generator_update_interval": 5, "real_score_guidance_scale": 3.5,
                      "dmd_denoising_steps": [1000, 850, 700, 550, 350, 275, 200, 125]},
}


def test_phase3_dmd2_file_trains_what_fastvideo_trains(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fvfunc.config_file"):
        _, cfg = config_file.from_dict(PHASE_34_DMD2, "dmd2")
    m, t = cfg.method, cfg.training
    assert m.real_score_guidance_scale == 4.5  # FastVideo's cond + 3.5 (cond - uncond)
    assert (m.critic_lr, m.critic_betas, m.critic_weight_decay) == (8e-6, (0.0, 0.999), 0.01)
    assert (m.min_timestep_ratio, m.flow_shift, m.generator_update_interval) == (0.02, 8.0, 5)
    assert m.negative_prompt == config_file.FASTVIDEO_NEGATIVE_PROMPT == cfg.validation.negative_prompt
    assert cfg.data.num_latent_t == 20 and m.latent_shape == (20, 56, 104) and t.max_grad_norm == 1.0
    assert cfg.validation.dataset_file == "validation_4.json" and cfg.validation.sampler.kind == "sde"
    assert "training.tp_size, training.train_sp_batch_size" in caplog.text
    # the run's config.yaml holds what it trains: fvfunc's standard form, read back unchanged
    written = yaml.safe_load(config_file.write(tmp_path / "config.yaml", "dmd2", cfg).read_text())
    assert written["method_config"]["real_score_guidance_scale"] == 4.5
    assert config_file.load(tmp_path / "config.yaml")[1].method == m


def test_keys_a_fastvideo_file_omits_take_fastvideos_defaults():
    fastvideo = {"training": {"learning_rate": 1e-5, "data_path": "d"}}  # FastVideo's vocabulary
    _, d = config_file.from_dict(fastvideo, "dmd2")
    assert (d.training.max_grad_norm, d.training.weight_decay, d.training.betas) == (0.0, 0.0, (0.9, 0.999))
    assert (d.method.critic_lr, d.method.critic_betas, d.method.critic_weight_decay) == (1e-5, (0.9, 0.999), 0.0)
    assert (d.method.min_timestep_ratio, d.method.generator_update_interval) == (0.2, 5)
    assert d.method.real_score_guidance_scale == 4.5  # FastVideo's default 3.5 in its form
    assert config_file.from_dict(fastvideo, "finetune")[1].method.cfg_rate == 0.0
    kd = config_file.from_dict(fastvideo, "kd")[1].method
    assert kd.guidance_scale == 1.0 and kd.negative_prompt == config_file.FASTVIDEO_NEGATIVE_PROMPT
    own = {"training": {"lr": 1e-5}}  # fvfunc's vocabulary: fvfunc's defaults
    _, o = config_file.from_dict(own, "dmd2")
    assert (o.training.max_grad_norm, o.method.critic_lr, o.method.negative_prompt) == (1.0, 8e-6, "")
    assert config_file.from_dict(own, "finetune")[1].method.cfg_rate == 0.1


def test_fastvideo_lora_keys_make_each_trained_role_a_lora_of_fastvideos_modules(caplog):
    """FastVideo's lora_training: every trainable transformer (student; DMD2's critic too) gets adapters of
    lora_rank with alpha lora_alpha or the rank, on FastVideo's default modules (to_q / to_k / to_v / to_out of
    both attentions, to_gate_compress under VSA) or on lora_target_modules by FastVideo's module names."""
    attention = ("attn1.to_q", "attn2.to_q", "attn1.to_k", "attn2.to_k", "attn1.to_v", "attn2.to_v", "attn1.to_out.0",
                 "attn2.to_out.0")
    _, d = config_file.from_dict({"training": {"lora_training": True, "lora_rank": 32, "data_path": "x"}}, "dmd2")
    for role in (d.roles.student, d.roles.critic):
        assert (role.lora.rank, role.lora.alpha, role.lora.targets) == (32, 32.0, attention)
    assert d.roles.teacher.lora.rank == 0
    _, v = config_file.from_dict({"training": {"lora_training": True, "lora_rank": 8, "lora_alpha": 16,
                                               "VSA_sparsity": 0.9}}, "finetune")
    assert (v.roles.student.lora.alpha, v.roles.student.lora.targets) == (16.0, (*attention, "to_gate_compress"))
    _, f = config_file.from_dict({"training": {"lora_training": True, "lora_rank": 4,
                                               "lora_target_modules": ["to_q", "fc_in", "q_proj"]}}, "finetune")
    assert f.roles.student.lora.targets == ("attn1.to_q", "attn2.to_q", "ffn.net.0.proj")
    with pytest.raises(config_file.ConfigError, match="training.lora_training needs training.lora_rank"):
        config_file.from_dict({"training": {"lora_training": True}}, "finetune")
    with pytest.raises(config_file.ConfigError, match="training.lora_target_modules: 'mlp' names no linear"):
        config_file.from_dict({"training": {"lora_training": True, "lora_rank": 4, "lora_target_modules": ["mlp"]}},
                              "finetune")
    with caplog.at_level("WARNING", logger="fvfunc.config_file"):
        _, n = config_file.from_dict({"training": {"lora_rank": 4}}, "finetune")
    assert n.roles.student.lora.rank == 0 and "training.lora_rank without training.lora_training" in caplog.text


def test_sampler_kind_and_rollout_mode_mean_fastvideos():
    d = {"pipeline_config": {"sampler_kind": "ode"}, "method_config": {"rollout_mode": "data_latent"}}
    _, cfg = config_file.from_dict(d, "dmd2")
    assert cfg.validation.sampler.kind == "unipc" and cfg.method.rollout_mode == "data"
    with pytest.raises(config_file.ConfigError, match="method_config.rollout_mode: expected simulate or data"):
        config_file.from_dict({"method_config": {"rollout_mode": "both"}}, "dmd2")


TRAIN_DMD2 = {  # FastVideo's examples/train/configs/distribution_matching/wan/dmd2_t2v.yaml (fastvideo/train)
    "models": {"student": {"_target_": "fastvideo.train.models.wan.WanModel", "init_from": "S", "trainable": True},
               "teacher": {"_target_": "fastvideo.train.models.wan.WanModel", "init_from": "T", "trainable": False,
                           "disable_custom_init_weights": True},
               "critic": {"_target_": "fastvideo.train.models.wan.WanModel", "init_from": "S", "trainable": True,
                          "disable_custom_init_weights": True}},
    "method": {"_target_": "fastvideo.train.methods.distribution_matching.dmd2.DMD2Method",
               "rollout_mode": "simulate", "generator_update_interval": 5, "real_score_guidance_scale": 4.5,
               "dmd_denoising_steps": [1000, 750, 500, 250], "fake_score_learning_rate": 8.0e-6,
               "fake_score_betas": [0.0, 0.999], "fake_score_lr_scheduler": "constant"},
    "training": {"distributed": {"num_gpus": 4, "sp_size": 1, "tp_size": 1, "hsdp_replicate_dim": 1,
                                 "hsdp_shard_dim": 4},
                 "data": {"data_path": "data/Wan-Syn", "dataloader_num_workers": 4, "train_batch_size": 1,
                          "training_cfg_rate": 0.0, "seed": 1000, "num_latent_t": 20, "num_height": 448,
                          "num_width": 832, "num_frames": 77},
                 "optimizer": {"learning_rate": 2.0e-6, "betas": [0.0, 0.999], "weight_decay": 0.01,
                               "lr_scheduler": "constant", "lr_warmup_steps": 0},
                 "loop": {"max_train_steps": 4000, "gradient_accumulation_steps": 1},
                 "checkpoint": {"output_dir": "outputs/x", "training_state_checkpointing_steps": 20,
                                "checkpoints_total_limit": 3},
                 "tracker": {"project_name": "distillation_wan", "run_name": "wan2.1_dmd2_4steps"},
                 "model": {"enable_gradient_checkpointing_type": "full"}},
    "callbacks": {"grad_clip": {"max_grad_norm": 1.0},
                  "validation": {"pipeline_target": "fastvideo.pipelines.basic.wan.wan_dmd_pipeline.WanDMDPipeline",
                                 "dataset_file": "validation_4.json", "every_steps": 50, "sampling_steps": [4],
                                 "sampling_timesteps": [1000, 750, 500, 250], "guidance_scale": 6.0},
                  "ema": {"_target_": "fastvideo.train.callbacks.ema.EMACallback", "decay": 0.98, "start_iter": 0}},
    "pipeline": {"flow_shift": 8},
}


def test_fastvideo_train_layout_is_read():
    method, cfg = config_file.from_dict(TRAIN_DMD2)
    t, m, v = cfg.training, cfg.method, cfg.validation
    assert method == "dmd2" and (cfg.roles.student.path, cfg.roles.teacher.path) == ("S", "T")
    assert m.real_score_guidance_scale == 4.5  # this layout writes the standard form already
    assert (m.critic_lr, m.critic_betas, m.critic_weight_decay, m.flow_shift) == (8e-6, (0.0, 0.999), 0.01, 8.0)
    assert (m.min_timestep_ratio, m.max_timestep_ratio) == (0.0, 1.0)  # fastvideo/train's defaults
    assert (t.lr, t.betas, t.weight_decay, t.max_steps, t.batch_size) == (2e-6, (0.0, 0.999), 0.01, 4000, 4)
    assert (t.checkpoint_every, t.keep_checkpoints, t.remat, t.max_grad_norm) == (20, 3, "full", 1.0)
    assert (cfg.tracking.project, cfg.roles.student.ema_decay, cfg.data.path) == ("distillation_wan", 0.98,
                                                                                ("data/Wan-Syn",))
    assert (v.every, v.dataset_file, v.sampler.timesteps) == (50, "validation_4.json", (1000, 750, 500, 250))
    no_clip = {**TRAIN_DMD2, "callbacks": {}}
    assert config_file.from_dict(no_clip)[1].training.max_grad_norm == 0.0
    finetune = {**TRAIN_DMD2, "models": {"student": TRAIN_DMD2["models"]["student"]},
                "method": {"_target_": "fastvideo.train.methods.fine_tuning.finetune.FineTuneMethod"}}
    method, cfg = config_file.from_dict(finetune)
    assert method == "finetune" and cfg.method.cfg_rate == 0.0 and cfg.validation.sampler.guidance_scale == 6.0


@pytest.mark.parametrize("change, message", [
    ({"method": {"_target_": "x.SelfForcingMethod"}}, "method._target_: 'x.SelfForcingMethod' is not a method"),
    ({"models": {"student": {"_target_": "x.LTX2Model", "init_from": "S"}}}, "models.student._target_: 'x.LTX2Model'"),
    ({"callbacks": {"validation": {"sampling_stepz": [4]}}}, "unknown key callbacks.validation.sampling_stepz"),
    ({"extra": 1}, "unknown key extra"),
])
def test_bad_fastvideo_train_files_name_the_key(change, message):
    with pytest.raises(config_file.ConfigError, match=message):
        config_file.from_dict({**TRAIN_DMD2, **change})


# --------------------------------------------------------------------------- negative prompt


def test_teacher_uncond_is_the_negative_prompts_embedding(tmp_path):
    """DMD2's real score guides with the negative prompt's umT5 embedding (encoded once, before
    training, with the teacher folder's own encoder), as FastVideo does; zeros only without one."""
    folder = tiny.write_pipeline(tmp_path / "p", text_encoder=True)
    run = tiny.run_of(dmd2.SPEC, configs.DMD2Config(negative_prompt="a dog"),
                      data=configs.DataConfig(text_len=16))
    teacher = tiny.role(None, name="teacher")._replace(folder=str(folder / "transformer"))
    io = trainer.data_io(run, distributed.init("cpu"))
    got = dmd2.prepare(run, {"teacher": teacher}, io).batch["negative_text"]
    assert torch.equal(got, text.encode_prompts(folder, ["a dog"], 16))
    # and real_score guides with it: uncond + w (cond - uncond) with the teacher's uncond on that text
    apply = lambda p, x, t, c: x * c.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1) / 1000  # noqa: E731
    x, sigma, cond = torch.randn(1, 2, 1, 2, 2), torch.tensor([0.5]), torch.randn(1, 16, got.shape[-1])
    real = dmd2.real_score(teacher._replace(apply=apply), None, x, sigma, cond, got, 4.5)
    v = lambda c: apply(None, x, sigma * 1000, c)  # noqa: E731
    assert torch.allclose(real, x - 0.5 * (v(got) + 4.5 * (v(cond) - v(got))))
    assert not torch.allclose(real, dmd2.real_score(teacher._replace(apply=apply), None, x, sigma, cond, None, 4.5))


def test_validation_captions_file(tmp_path):
    f = tmp_path / "v.json"
    f.write_text(json.dumps({"data": [{"caption": "a cat"}, {"caption": "a dog"}]}))
    assert validation.captions_of(f) == ["a cat", "a dog"]
    f.write_text(json.dumps({"data": [{"caption": "a cat"}, {"prompt": "x"}]}))
    with pytest.raises(ValueError, match=r"validation.dataset_file: .*v.json, entry 1 has no caption"):
        validation.captions_of(f)


def test_validation_encodes_the_caption_file_and_negative_prompt_with_the_students_umt5(tmp_path):
    folder = tiny.write_pipeline(tmp_path / "p", text_encoder=True)
    f = tmp_path / "v.json"
    f.write_text(json.dumps({"data": [{"caption": "a cat"}, {"caption": "a dog"}]}))
    v = configs.ValidationConfig(dataset_file=str(f), num_prompts=2)
    run = tiny.run_of(METHODS["finetune"], validation=v, data=configs.DataConfig(text_len=16))
    dataset = [{"text": torch.zeros(16, 32)}]  # only its spec and first sample's shapes are read
    ds = type("DS", (), {"spec": (), "__getitem__": lambda self, i: dataset[i]})()
    emb, captions, _, _ = validation.prompts_from(run, ds, str(folder / "transformer"))
    assert captions == ["a cat", "a dog"] and torch.equal(emb, text.encode_prompts(folder, captions, 16))
    with pytest.raises(ValueError, match="validation.dataset_file: .* has no text_encoder"):
        validation.prompts_from(run, ds, str(tmp_path / "elsewhere"))
    neg = text.negative_embedding("a cat", "", str(folder / "transformer"), 16, "validation.negative_prompt")
    assert torch.equal(neg, emb[:1])
    with pytest.raises(ValueError, match="validation.negative_prompt: .* has no text_encoder"):
        text.negative_embedding("a cat", "", str(tmp_path / "elsewhere"), 16, "validation.negative_prompt")
