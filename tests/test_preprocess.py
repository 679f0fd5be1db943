"""`train.py preprocess` against plain references: clips the test writes with imageio and decodes itself,
its own resize, diffusers' AutoencoderKLWan.encode and transformers' UMT5EncoderModel, on tiny random
models; FastVideo's schemas written out field by field (fastvideo/dataset/dataloader/schema.py)."""

import json
import math

import imageio.v2 as imageio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import configs
from fvfunc import cli, data, text
from fvfunc.preprocess import inputs, run
from fvfunc.testing import tiny

H, W, FRAMES, FPS = 16, 24, 5, 4.0
BYTES, SHAPE = pa.binary(), pa.list_(pa.int64())
TEXT_FIELDS = [("text_embedding_bytes", BYTES), ("text_embedding_shape", SHAPE), ("text_embedding_dtype", pa.string())]
FASTVIDEO_T2V = pa.schema([
    ("id", pa.string()), ("vae_latent_bytes", BYTES), ("vae_latent_shape", SHAPE), ("vae_latent_dtype", pa.string()),
    *TEXT_FIELDS, ("file_name", pa.string()), ("caption", pa.string()), ("media_type", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("num_frames", pa.int64()), ("duration_sec", pa.float64()),
    ("fps", pa.float64())])
FASTVIDEO_TEXT_ONLY = pa.schema([("id", pa.string()), *TEXT_FIELDS, ("caption", pa.string())])


def smooth_frames(n, h, w, seed):
    """Frames that survive H.264 reasonably: a moving gradient plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 9 + t * 7) % 256, (y * 11 + t * 5) % 256, (x + y + 40 * t) % 256], -1)
              + rng.integers(0, 20, (h, w, 3)) for t in range(n)]
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_mp4(path, frames, fps):
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as w:
        for f in frames:
            w.append_data(f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline whose VAE halves time and space, clips (good, too short, broken, an image, one
    missing) and a caption file naming them."""
    from diffusers import AutoencoderKLWan

    root = tmp_path_factory.mktemp("prep")
    model = tiny.write_pipeline(root / "model", text_encoder=True)
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[True], latents_mean=[0.1] * 16,
                     latents_std=[1.5] * 16).save_pretrained(model / "vae")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKLWan"]}))
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    write_mp4(videos / "wide.mp4", smooth_frames(12, 20, 36, 0), 8)       # wider: cropped left and right
    write_mp4(videos / "sub" / "tall.mp4", smooth_frames(6, 32, 24, 1), 4)  # taller, at the target fps
    write_mp4(videos / "short.mp4", smooth_frames(4, 16, 24, 2), 8)       # 4 frames at 8 fps: 2 at 4 fps
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    imageio.imwrite(videos / "still.png", smooth_frames(1, 18, 30, 3)[0])
    entries = [("wide.mp4", "a red cat runs on the beach"), ("sub/tall.mp4", "a dog in the snow"),
               ("short.mp4", "a bird"), ("broken.mp4", "a fish"), ("still.png", "a horse near the river"),
               ("gone.mp4", "a boat")]
    captions = root / "videos2caption.json"
    captions.write_text(json.dumps([{"path": p, "cap": [c, "unused"]} for p, c in entries]))
    cfg = configs.PreprocessRun(model=str(model), videos=str(videos), captions=str(captions), height=H, width=W,
                                num_frames=FRAMES, fps=FPS, device="cpu")
    enc = run.load_encoders(model, "cpu", "float32", vae=True)
    return dict(root=root, model=model, videos=videos, captions=captions, cfg=cfg, enc=enc, entries=entries)


def with_(world, tmp_path, **changes):
    import dataclasses

    return dataclasses.replace(world["cfg"], output=str(tmp_path / "out"), **changes)


def reference_pixels(path, indices):
    """The test's own frames: every frame decoded, those at `indices` kept, scaled to cover H x W
    (bilinear, antialiased, back to 8 bits), centre-cropped, to [-1, 1] as [3, F, H, W]."""
    frames = np.stack(imageio.mimread(path)) if path.suffix == ".mp4" else imageio.imread(path)[None]
    x = torch.from_numpy(frames[indices][..., :3]).permute(0, 3, 1, 2).float()
    s = max(H / x.shape[2], W / x.shape[3])
    size = (max(H, round(x.shape[2] * s)), max(W, round(x.shape[3] * s)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).round().clamp(0, 255)
    top, left = (size[0] - H) // 2, (size[1] - W) // 2
    return (x[:, :, top:top + H, left:left + W] / 255 * 2 - 1).permute(1, 0, 2, 3)


def reference_text(model, caption):
    """transformers' umT5 on the caption, cut to its tokens (eos included)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    t = tok([caption], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = UMT5EncoderModel.from_pretrained(model / "text_encoder")(t.input_ids, t.attention_mask).last_hidden_state
    return h[0, : int(t.attention_mask.sum())]


def rows_of(folder):
    table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.rglob("*.parquet"))])
    return {r["id"]: r for r in table.to_pylist()}


def tensor(row, name):
    raw = np.frombuffer(row[f"{name}_bytes"], {"float32": np.float32, "bfloat16": np.uint16}[row[f"{name}_dtype"]])
    t = torch.from_numpy(raw.copy())
    t = t.view(torch.bfloat16) if row[f"{name}_dtype"] == "bfloat16" else t
    return t.reshape(row[f"{name}_shape"])


def test_t2v_rows_equal_the_references_and_finetune_trains_on_them(world, tmp_path, capsys, caplog):
    from diffusers import AutoencoderKLWan

    out = tmp_path / "out"
    code = cli.main(["preprocess", "--model", str(world["model"]), "--videos", str(world["videos"]), "--captions",
                     str(world["captions"]), "--output", str(out), "--height", str(H), "--width", str(W),
                     "--num-frames", str(FRAMES), "--fps", str(FPS), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["data-r0-00000.parquet"]
    assert pq.read_schema(files[0]).equals(FASTVIDEO_T2V, check_metadata=False)
    assert pq.read_metadata(files[0]).num_row_groups == 3  # one row a group
    rows = rows_of(out)
    assert sorted(rows) == ["still", "sub/tall", "wide"]
    vae = AutoencoderKLWan.from_pretrained(world["model"] / "vae").eval()
    indices = {"wide": [0, 2, 4, 6, 8], "sub/tall": [0, 1, 2, 3, 4], "still": [0]}  # 8 fps -> 4, 4 -> 4, image
    for sid, row in rows.items():
        file = next(p for p, _ in world["entries"] if p.rsplit(".", 1)[0] == sid)
        pixels = reference_pixels(world["videos"] / file, indices[sid])
        with torch.no_grad():
            want = vae.encode(pixels[None]).latent_dist.mean[0]
        got = tensor(row, "vae_latent")
        assert row["vae_latent_dtype"] == "float32" and got.shape == want.shape
        assert torch.equal(got, want), (sid, (got - want).abs().max())
        caption = dict(world["entries"])[file]
        torch.testing.assert_close(tensor(row, "text_embedding"), reference_text(world["model"], caption),
                                   rtol=1e-6, atol=1e-6)
        assert row["caption"] == caption and row["file_name"] == file  # the first of "cap"
        assert (row["width"], row["height"], row["num_frames"]) == (W, H, got.shape[1])
    assert rows["wide"]["vae_latent_shape"] == [16, 3, H // 2, W // 2]  # 5 frames -> 3: 1 + 4 / 2
    assert rows["still"]["vae_latent_shape"] == [16, 1, H // 2, W // 2] and rows["still"]["media_type"] == "image"
    assert rows["wide"]["fps"] == 8.0 and rows["wide"]["duration_sec"] == pytest.approx(1.5, abs=0.2)
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {r["file"]: r["reason"].split(" ")[0] for r in report} == {"short.mp4": "too", "broken.mp4": "cannot",
                                                                      "gone.mp4": "no"}
    assert "skipped short.mp4: too short: 4 frames at 8 fps give 2 of the 5 frames at 4 fps" in caplog.text
    assert json.loads((out / "preprocess.json").read_text())["num_frames"] == FRAMES

    # fvfunc's reader normalises them with the VAE's latents_mean / std as it does FastVideo's files
    ds = data.ParquetDataset(out, data.T2V, text_len=512,
                             latent_stats=(torch.full((16,), 0.1), torch.full((16,), 1.5)))
    s = next(ds[i] for i in range(len(ds)) if ds[i]["id"] == "wide")
    torch.testing.assert_close(s["latents"], (tensor(rows["wide"], "vae_latent") - 0.1) / 1.5)

    run_dir = tmp_path / "run"
    code = cli.main(["finetune", "--roles.student.path", str(world["model"]), "--data.path", str(out),
                     "--training.output-dir", str(run_dir), "--training.max-steps", "2", "--training.device", "cpu",
                     "--training.precision", "float32", "--tracking.wandb-mode", "disabled"])
    assert code == 0, capsys.readouterr().err
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_killed_run_resumes_without_duplicates(world, tmp_path, monkeypatch):
    cfg = with_(world, tmp_path, file_rows=1)
    calls, real = [], run.encode_video

    def dies_on_the_third(vae, pixels):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(vae, pixels)

    monkeypatch.setattr(run, "encode_video", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run.run(cfg, encoders=world["enc"])
    out = tmp_path / "out"
    assert len(list(out.glob("*.parquet"))) == 2 and len(rows_of(out)) == 2
    monkeypatch.setattr(run, "encode_video", real)
    summary = run.run(cfg, encoders=world["enc"])
    assert (summary.written, summary.done_before, summary.skipped) == (1, 2, 3)
    ids = [i for f in out.glob("*.parquet") for i in pq.read_table(f, columns=["id"]).column(0).to_pylist()]
    assert sorted(ids) == ["still", "sub/tall", "wide"]  # each once
    assert not list(out.glob(".*.partial"))
    assert run.run(cfg, encoders=world["enc"]).written == 0  # a finished run has nothing left to do


def test_ranks_split_the_unfinished_items():
    items = [inputs.Item(str(i), f"{i}.mp4", "c", "video") for i in range(7)]
    shares = [inputs.shard(items, r, 3) for r in range(3)]
    assert sorted(i.id for s in shares for i in s) == sorted(i.id for i in items)  # each exactly once
    assert [len(s) for s in shares] == [3, 2, 2]
    assert inputs.shard(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank 3 is not in"):
        inputs.shard(items, 3, 3)


def test_two_ranks_write_disjoint_files(world, tmp_path):
    cfg = with_(world, tmp_path, file_mb=1e-6)  # every row fills a file
    # one after the other: rank 1 starts when rank 0's files are there, and still does only its own share
    a, b = (run.run(cfg, rank=r, world=2, encoders=world["enc"]) for r in (0, 1))
    out = tmp_path / "out"
    assert a.written + b.written == 3 and a.skipped + b.skipped == 3
    ids = [i for f in out.glob("*.parquet") for i in pq.read_table(f, columns=["id"]).column(0).to_pylist()]
    assert sorted(ids) == ["still", "sub/tall", "wide"]
    assert sorted(f.name for f in out.glob("*.parquet")) == ["data-r0-00000.parquet", "data-r0-00001.parquet",
                                                              "data-r1-00000.parquet"]
    assert (out / "skipped-r0.jsonl").exists() and (out / "skipped-r1.jsonl").exists()


def test_text_only_bf16_and_negative_prompt(world, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs on the beach\n\nthe sun over the sea\na cat runs on the beach\n")
    out = tmp_path / "out"
    code = cli.main(["preprocess", "--model", str(world["model"]), "--prompts", str(prompts), "--output", str(out),
                     "--negative-prompt", "blurry low quality", "--dtype", "bfloat16", "--device", "cpu",
                     "--rows-per-group", "2"])
    assert code == 0, capsys.readouterr().err
    files = list(out.glob("*.parquet"))
    assert pq.read_schema(files[0]).equals(FASTVIDEO_TEXT_ONLY, check_metadata=False)
    assert len(files) == 1 and pq.read_metadata(files[0]).num_row_groups == 1
    rows = rows_of(out)
    assert len(rows) == 2  # the repeated prompt once
    for row in rows.values():
        assert row["id"] == inputs.prompt_id(row["caption"]) and row["text_embedding_dtype"] == "bfloat16"
        want = reference_text(world["model"], row["caption"])
        assert torch.equal(tensor(row, "text_embedding"), want.bfloat16())
    ds = data.ParquetDataset(out, data.TEXT_ONLY, text_len=512)  # what data-free DMD2 and sample read
    assert ds.batch([0, 1])["text"].shape == (2, 512, 32)
    # the negative prompt: a file the trainer and sample take as --*negative-prompt-embedding
    neg = text.negative_embedding("", str(out / inputs.NEGATIVE_FILE), None, 512, "method.negative_prompt")
    want = reference_text(world["model"], "blurry low quality")
    assert neg.shape == (1, 512, 32)
    assert torch.equal(neg[0, : len(want)], want.bfloat16().float()) and not neg[0, len(want):].any()


def test_negative_prompt_alone(world, tmp_path, capsys):
    out = tmp_path / "neg"
    assert cli.main(["preprocess", "--model", str(world["model"]), "--negative-prompt", "", "--output", str(out),
                     "--device", "cpu"]) == 0, capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [inputs.NEGATIVE_FILE]
    emb = text.read_tensor(out / inputs.NEGATIVE_FILE)
    torch.testing.assert_close(emb, reference_text(world["model"], ""), rtol=1e-6, atol=1e-6)  # "" is the eos


def _bad(world, tmp_path, case):
    """(argv changes, expected message) of a bad command line."""
    base = dict(model=world["model"], videos=world["videos"], captions=world["captions"])
    if case == "missing videos":
        return {**base, "videos": tmp_path / "nope"}, "videos: .*nope is not a folder"
    if case == "no cap":
        f = tmp_path / "c.json"
        f.write_text(json.dumps([{"path": "wide.mp4", "cap": ["x"]}, {"path": "sub/tall.mp4"}]))
        return {**base, "captions": f}, r"captions: .*c.json: entry 1: no caption"
    if case == "csv":
        f = tmp_path / "c.csv"
        f.write_text('video,caption\nwide.mp4,"a cat, running"\nsub/tall.mp4\n')
        return {**base, "captions": f}, "captions: .*c.csv: line 3: 1 columns, the header has 2"
    if case == "jsonl":
        f = tmp_path / "c.jsonl"
        f.write_text('{"video": "wide.mp4", "caption": "x"}\n{"video": "wide.mp4", "caption": "y"}\n')
        return {**base, "captions": f}, "captions: .*c.jsonl: line 2: 'wide.mp4' has the id 'wide' of line 1"
    if case in ("no vae", "no text encoder", "i2v", "wan2.2 vae"):
        m = tmp_path / "m"
        import shutil

        shutil.copytree(world["model"], m)
        if case == "no vae":
            shutil.rmtree(m / "vae")
            why = "has no vae/"
        elif case == "no text encoder":
            shutil.rmtree(m / "text_encoder")
            why = "has no text_encoder/"
        elif case == "i2v":  # a Wan2.1 I2V transformer without the CLIP its i2v columns need
            c = json.loads((m / "transformer" / "config.json").read_text())
            (m / "transformer" / "config.json").write_text(json.dumps({**c, "image_dim": 8}))
            why = "has no image_encoder/ and no image_processor/"
        else:
            c = json.loads((m / "vae" / "config.json").read_text())
            (m / "vae" / "config.json").write_text(json.dumps({**c, "z_dim": 48, "is_residual": True}))
            why = "vae makes latents of 48 channels, its transformer predicts 16"
        return {**base, "model": m}, f"model: .*{why}"
    if case == "size":
        return {**base, "height": 18}, "height must be a positive multiple of 4"
    if case == "frames":
        return {**base, "num_frames": 4}, "num_frames must be 1 \\+ a multiple of 2"
    if case == "both":
        return {**base, "prompts": world["captions"]}, "prompts: give either clips"
    if case == "foreign folder":
        (tmp_path / "out").mkdir()
        data.write_parquet(tmp_path / "out" / "x.parquet", [{"id": "a", "text_embedding": torch.zeros(1, 32)}])
        return base, "output: .*holds parquet files that train.py preprocess did not write"
    if case == "other settings":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "preprocess.json").write_text(json.dumps({"schema": "t2v", "height": 8}))
        return base, "output: .*holds rows made with other settings .*height 8 -> 16"
    raise AssertionError(case)


CASES = ["missing videos", "no cap", "csv", "jsonl", "no vae", "no text encoder", "i2v", "wan2.2 vae", "size",
         "frames", "both", "foreign folder", "other settings"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(world, tmp_path, capsys, case):
    args, message = _bad(world, tmp_path, case)
    args = {"output": tmp_path / "out", "height": H, "width": W, "num_frames": FRAMES, **args}
    before = sorted(p.name for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else None
    argv = ["preprocess"] + [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    import re

    assert re.search(message, err), err
    after = sorted(p.name for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else None
    assert after == before  # nothing written, nothing lost


@pytest.mark.slow  # two fresh interpreters: ~13 s on 2 cores
def test_torchrun_ranks_run_at_once(world, tmp_path):
    """Two processes as torchrun starts them (RANK, WORLD_SIZE), at the same time, into one folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "train.py", "preprocess", "--model", str(world["model"]), "--videos",
            str(world["videos"]), "--captions", str(world["captions"]), "--output", str(tmp_path / "out"),
            "--height", str(H), "--width", str(W), "--num-frames", str(FRAMES), "--fps", str(FPS), "--device", "cpu"]
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    procs = [subprocess.Popen(argv, cwd=root, env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    ids = [i for f in (tmp_path / "out").glob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == ["still", "sub/tall", "wide"]
    assert json.loads((tmp_path / "out" / "preprocess.json").read_text())["schema"] == "t2v"
