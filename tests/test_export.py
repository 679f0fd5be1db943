"""RUN/export: a whole diffusers pipeline folder that WanPipeline loads as is, written atomically."""

import json
import logging
import os
import shutil

import pytest
import torch
from diffusers import WanPipeline
from safetensors import safe_open
from test_trainer import final_trees, make_cfg

from fvfunc import cli, export, random, trainer, tree
from fvfunc.models import wan
from fvfunc.testing import tiny

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach"]


def write_text_parts(folder, text_dim: int, seed: int = 0) -> None:
    """A tiny random umT5 encoder (text_encoder/), a word-level tokenizer (tokenizer/) and Wan's UniPC
    flow scheduler (scheduler/): the rest of a WanPipeline folder."""
    from diffusers import UniPCMultistepScheduler
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder / "tokenizer")
    state = torch.get_rng_state()  # transformers initialises from the global RNG: restore it after
    try:
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=text_dim, d_kv=8, d_ff=32, num_layers=1,
                                              num_heads=2, relative_attention_num_buckets=8,
                                              relative_attention_max_distance=16))
    finally:
        torch.set_rng_state(state)
    encoder.save_pretrained(folder / "text_encoder")
    UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                            flow_shift=3.0).save_pretrained(folder / "scheduler")


def model_index(**changes) -> dict:
    """A Wan2.1 T2V model_index.json, as the Wan-AI diffusers folders have it."""
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.33.0.dev0", "boundary_ratio": None,
             "expand_timesteps": False, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    index.update(changes)
    return index


def write_full_pipeline(folder, dtype=torch.bfloat16, seed=0):
    """A tiny WanPipeline folder: transformer (stored in `dtype`), vae, text_encoder, tokenizer, scheduler."""
    cfg = tiny.tiny_config()
    params = {k: v.to(dtype) for k, v in wan.init(cfg, random.key(seed)).items()}
    tiny.write_pipeline(folder, cfg, seed=seed, vae=True, params=params)
    write_text_parts(folder, cfg.text_dim, seed)
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2))
    return folder


def stored_dtypes(folder):
    with safe_open(str(folder / "transformer" / wan.WEIGHTS), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_export_is_a_pipeline_that_wan_pipeline_loads_and_samples(world, tmp_path, capsys):
    source = write_full_pipeline(tmp_path / "source")
    w = dict(world, model=source)
    out = trainer.run("finetune", make_cfg(w, "finetune", tmp_path / "run", max_steps=2))
    folder = out / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                         "tokenizer", "transformer", "vae"]
    index = json.loads((folder / "model_index.json").read_text())
    import diffusers
    assert index == model_index(_diffusers_version=diffusers.__version__)
    assert stored_dtypes(folder) == {"BF16"}  # the source's dtype, though trained in fp32
    trees, _ = final_trees(out, 2)
    _, exported = wan.load(folder)
    assert tree.equal(exported, {k: v.to(torch.bfloat16) for k, v in trees["student"].items()})
    assert not any(p.is_symlink() for p in folder.rglob("*"))
    shutil.rmtree(source)  # the export needs nothing of its source

    pipe = WanPipeline.from_pretrained(folder)  # as is (diffusers loads in float32 unless given a dtype)
    latents = pipe("a cat runs on the beach", num_frames=5, height=16, width=16, num_inference_steps=2,
                   output_type="latent", max_sequence_length=16).frames
    assert latents.shape == (1, 16, 2, 2, 2) and torch.isfinite(latents).all()
    frames = pipe("a dog", num_frames=5, height=16, width=16, num_inference_steps=2, output_type="np",
                  max_sequence_length=16).frames
    assert frames.shape == (1, 2, 4, 4, 3)
    cfg, params = wan.load(folder, dtype=torch.float32)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([400.0]), torch.randn(1, 7, 32)
    with torch.no_grad():
        ref = pipe.transformer(x, t, ctx).sample
    assert torch.allclose(ref, wan.apply(params, cfg, x, t, ctx), rtol=1e-5, atol=1e-6)

    code = cli.main(["sample", "--model", str(folder), "--prompts", str(world["text"]), "--num-prompts", "1",
                     "--latent-shape", "2", "4", "4", "--sampler.kind", "sde", "--sampler.timesteps", "1000",
                     "500", "--output-dir", str(tmp_path / "samples"), "--device", "cpu",
                     "--precision", "float32"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "samples" / "sample-0.mp4").stat().st_size > 0


def test_export_dtype_option_and_a_second_export_replaces_the_first(tmp_path):
    source = write_full_pipeline(tmp_path / "source")
    cfg, params = wan.load(source, dtype=torch.float32)
    dest = tmp_path / "run" / "export"
    export.export(dest, wan.FAMILY, cfg, params, source, "float32")
    assert stored_dtypes(dest) == {"F32"}
    (dest / "stray.txt").write_text("from the first export")
    moved = {k: v + 1 for k, v in params.items()}
    export.export(dest, wan.FAMILY, cfg, moved, source / "transformer", "bfloat16")  # a component path works too
    assert stored_dtypes(dest) == {"BF16"} and not (dest / "stray.txt").exists()
    assert tree.equal(wan.load(dest)[1], {k: v.to(torch.bfloat16) for k, v in moved.items()})
    assert (dest / "model_index.json").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["export"]  # no temporary left behind


def test_big_files_are_hard_linked_small_ones_copied(tmp_path):
    source = write_full_pipeline(tmp_path / "source")
    cfg, params = wan.load(source)
    weights, config = "vae/diffusion_pytorch_model.safetensors", "vae/config.json"
    size = (source / weights).stat().st_size
    assert (source / config).stat().st_size < size
    dest = export.export(tmp_path / "export", wan.FAMILY, cfg, params, source, link_min_bytes=size)
    assert os.path.samefile(source / weights, dest / weights)
    assert not os.path.samefile(source / config, dest / config)
    assert (dest / config).read_bytes() == (source / config).read_bytes()


def test_a_crash_mid_export_keeps_the_old_export(tmp_path, monkeypatch):
    source = write_full_pipeline(tmp_path / "source")
    cfg, params = wan.load(source)
    dest = export.export(tmp_path / "export", wan.FAMILY, cfg, params, source)
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def dying_carry(src, dst, link_min_bytes):
        raise OSError("disk full")

    monkeypatch.setattr(export, "carry", dying_carry)
    with pytest.raises(OSError, match="disk full"):
        export.export(dest, wan.FAMILY, cfg, {k: v * 2 for k, v in params.items()}, source)
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    export.export(dest, wan.FAMILY, cfg, params, source)  # the next export clears the half one
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_bare_transformer_exports_the_transformer_alone(tmp_path, caplog):
    cfg = tiny.tiny_config()
    params = wan.init(cfg, random.key(0))
    wan.save(tmp_path / "bare", cfg, params)
    with caplog.at_level(logging.INFO, logger="fvfunc"):
        dest = export.export(tmp_path / "export", wan.FAMILY, cfg, params, tmp_path / "bare")
    assert [p.name for p in dest.iterdir()] == ["transformer"]
    assert "is a bare transformer" in caplog.text and "holds the transformer only" in caplog.text
    assert tree.equal(wan.load(dest)[1], params)


def test_missing_components_are_named_in_the_log(tmp_path, caplog):
    source = tiny.write_pipeline(tmp_path / "source", vae=True)  # transformer, vae and scheduler only
    cfg, params = wan.load(source)
    with caplog.at_level(logging.WARNING, logger="fvfunc"):
        dest = export.export(tmp_path / "export", wan.FAMILY, cfg, params, source)
    assert sorted(p.name for p in dest.iterdir()) == ["model_index.json", "scheduler", "transformer", "vae"]
    assert "has no text_encoder, tokenizer:" in caplog.text


def test_train_py_export_writes_any_checkpoint_as_the_run_exports_its_last(world, tmp_path, capsys):
    """train.py export of a checkpoint: the folder the run itself exports at that step (EMA, source dtype),
    --no-use-ema the trained weights, a LoRA student merged with its adapters in lora/; a folder that is
    no export is never replaced, a non-checkpoint is one error."""
    source = write_full_pipeline(tmp_path / "source")
    w = dict(world, model=source)
    run = trainer.run("finetune", make_cfg(w, "finetune", tmp_path / "run", max_steps=4, checkpoint_every=2,
                                           ema_decay=0.9))
    for step in (2, 4):
        assert cli.main(["export", "--checkpoint", str(run / f"checkpoint-{step}"), "--output",
                         str(tmp_path / f"e{step}")]) == 0, capsys.readouterr().err
    trees, _ = final_trees(run, 2)
    _, exported = wan.load(tmp_path / "e2")
    assert tree.equal(exported, {k: v.to(torch.bfloat16) for k, v in trees["student.ema"].items()})
    _, at_the_end = wan.load(run / "export")
    assert tree.equal(wan.load(tmp_path / "e4")[1], at_the_end)  # = the run's own export
    assert sorted(p.name for p in (tmp_path / "e2").iterdir()) == sorted(p.name for p in (run / "export").iterdir())
    WanPipeline.from_pretrained(tmp_path / "e2")
    assert cli.main(["export", "--checkpoint", str(run / "checkpoint-2"), "--output", str(tmp_path / "e2"),
                     "--no-use-ema", "--dtype", "float32"]) == 0  # an old export is replaced
    assert tree.equal(wan.load(tmp_path / "e2")[1], trees["student"])

    # a LoRA student: merged transformer, adapters in lora/, as the run's own export
    import dataclasses

    import configs

    lora_run = make_cfg(w, "finetune", tmp_path / "lora", max_steps=2, export_dtype="float32")
    student = dataclasses.replace(lora_run.roles.student, lora=configs.LoraConfig(rank=4))
    out = trainer.run("finetune", dataclasses.replace(lora_run, roles=dataclasses.replace(lora_run.roles,
                                                                                          student=student)))
    assert cli.main(["export", "--checkpoint", str(out / "checkpoint-2"), "--output", str(tmp_path / "el")]) == 0
    assert tree.equal(wan.load(tmp_path / "el")[1], wan.load(out / "export")[1])
    assert stored_dtypes(tmp_path / "el") == {"F32"}  # the run's training.export_dtype, not the source's bf16
    assert (tmp_path / "el" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    cases = [(["--checkpoint", str(run), "--output", str(tmp_path / "x")], "is not a checkpoint folder (no meta.json)"),
             (["--checkpoint", str(run / "checkpoint-2"), "--output", str(keep)], "holds files and is no export")]
    for args, message in cases:
        assert cli.main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, err
    assert (keep / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()
