"""Bad input through the command line: one `error:` line naming the field, file or row, the right exit
code (2: found before any model loads, 1: later, 130: a second Ctrl-C), no traceback, and nothing already
written lost. Every case runs `fvfunc.cli.main` on the real trainer with tiny models; three also run
`train.py` as a subprocess."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fvfunc import checkpoint, cli, data
from fvfunc.testing import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):
    """conftest's tiny pipeline and data, a model of other weights, a smaller dataset, and finished
    2-step finetune and dmd2 runs to resume."""
    root = tmp_path_factory.mktemp("errors")
    tiny.write_pipeline(root / "other", vae=True, seed=7)  # same architecture, other weights
    data_with(root, "data2", n=6, text_embedding=(5, 32), latent=(16, 2, 4, 4))  # other data, same shapes
    f = {k: str(world[k]) for k in ("model", "data", "text")} | {"other": str(root / "other"),
                                                                  "data2": str(root / "data2"), "root": root}
    assert cli.main(finetune(f, root / "ft")) == 0
    assert cli.main(dmd2(f, root / "dmd")) == 0
    return f


COMMON = ["--training.max-steps", "2", "--training.batch-size", "2", "--training.checkpoint-every", "1",
          "--training.precision", "float32", "--training.device", "cpu", "--tracking.wandb-mode", "disabled",
          "--training.no-export", "--data.num-workers", "0"]


def finetune(f, out, *extra, model=None, data_path=None):
    return ["finetune", "--roles.student.path", model or f["model"], "--data.path", data_path or f["data"],
            "--training.output-dir", str(out), *COMMON, *extra]


def dmd2(f, out, *extra):
    roles = [a for r in ("student", "teacher", "critic") for a in (f"--roles.{r}.path", f["model"])]
    return ["dmd2", *roles, "--data.path", f["text"], "--training.output-dir", str(out), *COMMON,
            "--method.latent-shape", "2", "4", "4", "--method.generator-update-interval", "1", *extra]


def copy_run(f, name, tmp):
    out = tmp / name
    shutil.copytree(f["root"] / name, out)
    return out


def model_copy(f, tmp, edit):
    """A copy of the tiny pipeline with `edit(transformer_folder)` applied."""
    folder = tmp / "model"
    shutil.copytree(f["model"], folder)
    edit(folder / "transformer")
    return str(folder)


def edit_config(**changes):
    def edit(t):
        c = json.loads((t / "config.json").read_text())
        c.update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            del c[k]
        (t / "config.json").write_text(json.dumps(c))
    return edit


def weights(t):
    return t / "diffusion_pytorch_model.safetensors"


def garbage(t):
    weights(t).write_bytes(b"\x07" * 300)


def truncated(t):
    b = weights(t).read_bytes()
    weights(t).write_bytes(b[: len(b) // 2])


def int32_weight(t):
    w = load_file(weights(t))
    k = next(iter(w))
    w[k] = w[k].to(torch.int32)
    save_file(w, weights(t))


def flip(path, n=4):
    b = bytearray(path.read_bytes())
    i = len(b) // 2
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    path.write_bytes(bytes(b))


def data_with(tmp, name, n=4, **tensors):
    g = torch.Generator().manual_seed(1)
    rows = [{"id": f"r{i}", "caption": "c", **{k: torch.randn(*s, generator=g) for k, s in tensors.items()}}
            for i in range(n)]
    data.write_parquet(tmp / name / "part-0.parquet", rows)
    return str(tmp / name)


def damaged_run(f, tmp, steps, tree):
    out = copy_run(f, "ft", tmp)
    for step in steps:
        flip(out / f"checkpoint-{step}" / f"{tree}.safetensors")
    return out


def bad_json_meta(out):
    (out / "checkpoint-2" / "meta.json").write_text("{not json")
    return out


# (id, builder(f, tmp) -> argv, exit code, phrases the one error line holds). Builders may damage copies.
CASES = [
    ("unknown_command", lambda f, t: ["dmd3", "--data.path", f["text"]], 2,
     ["unknown command 'dmd3' (did you mean dmd2?)"]),
    ("unknown_command_typo", lambda f, t: ["finetun"], 2, ["unknown command 'finetun' (did you mean finetune?)"]),
    ("output_dir_is_a_file", lambda f, t: finetune(f, (t / "file").write_text("x") and t / "file"), 2,
     ["training.output_dir:", "is a file, not a folder"]),
    ("output_dir_under_a_file", lambda f, t: finetune(f, (t / "file").write_text("x") and t / "file" / "run"), 2,
     ["training.output_dir:", "cannot be made", "is a file"]),
    ("output_dir_not_writable", lambda f, t: finetune(f, "/sys/fvfunc-run"), 2,
     ["training.output_dir: cannot write into /sys"]),
    ("config_json_wrong_type", lambda f, t: finetune(f, t / "o", model=model_copy(f, t, edit_config(num_layers="two"))),
     2, ["roles.student.path:", "transformer/config.json: num_layers must be int, got 'two'"]),
    ("config_json_without_num_layers", lambda f, t: finetune(f, t / "o", model=model_copy(f, t, edit_config(
        num_layers=None))), 2, ["config.json: no num_layers (the model's shape is never guessed)"]),
    ("config_json_bad_patch", lambda f, t: finetune(f, t / "o", model=model_copy(f, t, edit_config(
        patch_size=[1, 2]))), 2, ["config.json: patch_size must be 3 positive ints, got [1, 2]"]),
    ("weights_garbage", lambda f, t: finetune(f, t / "o", model=model_copy(f, t, garbage)), 2,
     ["roles.student.path:", "diffusion_pytorch_model.safetensors: not a readable safetensors file"]),
    ("weights_truncated", lambda f, t: finetune(f, t / "o", model=model_copy(f, t, truncated)), 2,
     ["roles.student.path:", "diffusion_pytorch_model.safetensors: not a readable safetensors file"]),
    ("weights_int32", lambda f, t: finetune(f, t / "o", model=model_copy(f, t, int32_weight)), 2,
     ["diffusion_pytorch_model.safetensors:", "is stored as I32, not as a floating-point weight"]),
    ("text_width", lambda f, t: finetune(f, t / "o", data_path=data_with(t, "d", text_embedding=(5, 24),
                                                                         latent=(16, 2, 4, 4))), 2,
     ["data.path:", "part-0.parquet holds the text embeddings 24 wide, but the model of roles.student.path takes "
      "text_dim 32"]),
    ("latent_channels", lambda f, t: finetune(f, t / "o", "--data.no-normalize-latents", data_path=data_with(
        t, "d", text_embedding=(5, 32), latent=(8, 2, 4, 4))), 2,
     ["data.path:", "holds the VAE latents of 8 channels, but the model of roles.student.path takes 16"]),
    ("data_missing_column", lambda f, t: finetune(f, t / "o", data_path=f["text"]), 2,
     ["data.path:", "part-0.parquet: no column vae_latent_bytes (the VAE latents)"]),
    ("data_not_parquet", lambda f, t: finetune(f, t / "o", data_path=(
        (t / "junk").mkdir() or (t / "junk" / "a.parquet").write_text("no") and str(t / "junk"))), 2,
     ["data.path:", "junk/a.parquet: not a readable parquet file"]),
    ("batch_larger_than_data", lambda f, t: finetune(f, t / "o", "--training.batch-size", "16"), 2,
     ["training.batch_size 16 is more than the dataset's 8 samples"]),
    ("bad_allow_changes", lambda f, t: finetune(f, t / "o", "--training.allow-changes", "lr"), 2,
     ["training.allow_changes: 'lr' is not a field name"]),
    ("fresh_start_in_a_used_folder", lambda f, t: finetune(f, copy_run(f, "ft", t)), 2,
     ["training.output_dir:", "already holds checkpoints; pass --training.resume latest"]),
    ("resume_corrupted_checkpoint", lambda f, t: finetune(f, damaged_run(f, t, [2], "student"), "--training.resume",
                                                          "checkpoint-2"), 2,
     ["training.resume 'checkpoint-2':", "checkpoint-2/student.safetensors: checksum mismatch"]),
    ("resume_latest_all_damaged", lambda f, t: finetune(f, damaged_run(f, t, [1, 2], "student.opt"),
                                                        "--training.resume", "latest"), 2,
     ["training.resume 'latest':", "no intact checkpoint to resume", "checkpoint-2/student.opt.safetensors: "
      "checksum mismatch"]),
    ("resume_missing_checkpoint", lambda f, t: finetune(f, copy_run(f, "ft", t), "--training.resume",
                                                        "checkpoint-9"), 2,
     ["training.resume 'checkpoint-9':", "checkpoint-9: not a checkpoint (no such folder)"]),
    ("resume_bad_meta_json", lambda f, t: finetune(f, bad_json_meta(copy_run(f, "ft", t)), "--training.resume",
                                                   "checkpoint-2"), 2,
     ["checkpoint-2/meta.json: unreadable meta.json"]),
    ("resume_another_method", lambda f, t: finetune(f, copy_run(f, "dmd", t), "--training.resume", "latest",
                                                    "--training.max-steps", "3"), 2,
     ["training.resume:", "is a dmd2 checkpoint; this is a finetune run"]),
    ("resume_changed_seed", lambda f, t: finetune(f, copy_run(f, "ft", t), "--training.resume", "latest",
                                                  "--training.seed", "5"), 2,
     ["training.seed: was 0, now 5", "--training.allow-changes training.seed"]),
    ("resume_changed_batch_and_lr", lambda f, t: finetune(f, copy_run(f, "ft", t), "--training.resume", "latest",
                                                          "--training.batch-size", "4", "--training.lr", "1e-4"), 2,
     ["training.batch_size: was 2, now 4", "training.lr: was 1e-05, now 0.0001",
      "--training.allow-changes training.batch_size training.lr"]),
    ("resume_other_weights", lambda f, t: finetune(f, copy_run(f, "ft", t), "--training.resume", "latest",
                                                   model=f["other"]), 2,
     ["roles.student.path: other weights than the checkpoint's run read", "/other'"]),
    ("resume_other_model", lambda f, t: finetune(f, copy_run(f, "ft", t), "--training.resume", "latest",
                                                 model=str(tiny.write_pipeline(t / "m3", vae=True, cfg=tiny.tiny_config(
                                                     num_layers=3)))), 2,
     ["roles.student.path: another model: its config differs (num_layers 2 -> 3)"]),
    ("resume_other_data", lambda f, t: finetune(f, copy_run(f, "ft", t), "--training.resume", "latest",
                                                data_path=f["data2"]), 2,
     ["data.path: other data: was 1 file(s), 8 samples", "now 1 file(s), 6 samples"]),
    ("resume_other_dmd2_setting", lambda f, t: dmd2(f, copy_run(f, "dmd", t), "--training.resume", "latest",
                                                    "--method.real-score-guidance-scale", "3"), 2,
     ["method.real_score_guidance_scale: was 4.5, now 3.0"]),
    ("nan_loss_before_any_checkpoint", lambda f, t: finetune(f, t / "o", "--training.lr", "1e30",
                                                             "--training.max-grad-norm", "0", "--training.max-steps",
                                                             "60", "--training.checkpoint-every", "0"), 1,
     ["non-finite loss", "no checkpoint was written yet"]),
    ("missing_run_file", lambda f, t: ["finetune", "--config", str(t / "nope.yaml")], 2, ["nope.yaml"]),
    ("missing_model_folder", lambda f, t: finetune(f, t / "o", model=str(t / "nowhere")), 2,
     ["roles.student.path:", "nowhere: model folder does not exist"]),
]


def _snapshot(tmp: Path) -> dict:
    """Every checkpoint folder under tmp with its meta.json, to show nothing written was lost."""
    return {str(p): p.joinpath("meta.json").read_text() for p in tmp.rglob("checkpoint-*") if p.is_dir()
            and (p / "meta.json").is_file()}


@pytest.mark.parametrize("name, build, code, phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(base, tmp_path, capsys, name, build, code, phrases):
    argv = [str(a) for a in build(base, tmp_path)]
    before = _snapshot(tmp_path)
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing written is lost or rewritten


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_disk_full_while_saving(base, tmp_path, capsys, monkeypatch):
    real, calls = checkpoint.safetensors.torch.save_file, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # the second checkpoint (each has student, student.opt, state)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", full)
    out = tmp_path / "o"
    assert cli.main(finetune(base, out)) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert ".checkpoint-2.tmp: cannot write the checkpoint of step 2 (the disk is full)" in errors[0]
    assert "checkpoint-1, is intact" in errors[0]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    checkpoint.verify(out / "checkpoint-1")


# ------------------------------------------------------------------------------- train.py itself


def train_py(*args, timeout=120):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_train_py_unknown_command_is_one_line_without_the_parser_box():
    r = train_py("dmd3")
    assert r.returncode == 2
    assert r.stderr == ("error: unknown command 'dmd3' (did you mean dmd2?); the commands are finetune, dmd2, kd, "
                        "sample, preprocess, export (train.py --help)\n")


def test_train_py_corrupted_checkpoint(base, tmp_path):
    out = copy_run(base, "ft", tmp_path)
    flip(out / "checkpoint-2" / "student.safetensors")
    r = train_py(*finetune(base, out, "--training.resume", str(out / "checkpoint-2")))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: training.resume")
    assert "checkpoint-2/student.safetensors: checksum mismatch" in r.stderr


# The child sends itself two SIGINTs inside step 2: the first asks for a checkpoint and a stop, the
# second must stop at once, without a traceback.
TWO_SIGINTS = textwrap.dedent("""
    import os, signal, sys
    from fvfunc import cli, trainer
    real, calls = trainer.to_device, []
    def to_device(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    trainer.to_device = to_device
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(base, tmp_path):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-c", TWO_SIGINTS, *finetune(base, out, "--training.max-steps", "4")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: interrupted: stopped at once, without saving; resume with --training.resume latest "
                      "from the last checkpoint"]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]  # what was saved stays
