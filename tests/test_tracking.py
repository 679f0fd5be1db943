"""fvfunc.tracking: metrics.jsonl contents, resume truncation, and wandb offline / disabled / failing."""

import json
import logging
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import configs
from fvfunc.tracking import Tracker

DISABLED = configs.TrackingConfig(wandb_mode="disabled")


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_one_object_a_line(tmp_path):
    with Tracker(tmp_path, DISABLED, {"x": 1}) as t:
        t.log(1, {"loss": torch.tensor(0.5), "grad_norm": 2, "lr": 1e-5})
        t.log(2, {"loss": float("nan")})
        t.log_video(2, "prompt0", tmp_path / "v.mp4", fps=16)
    rows = _rows(tmp_path)
    assert rows[0] == {"step": 1, "loss": 0.5, "grad_norm": 2.0, "lr": 1e-5}
    assert all(isinstance(v, float) for k, v in rows[0].items() if k != "step")
    assert rows[1]["step"] == 2 and rows[1]["loss"] != rows[1]["loss"]  # NaN survives
    assert rows[2] == {"step": 2, "video/prompt0": str(tmp_path / "v.mp4")}
    assert not (tmp_path / "wandb").exists()


def test_resume_drops_lines_past_the_checkpoint(tmp_path):
    with Tracker(tmp_path, DISABLED, {}) as t:
        for step in range(1, 6):
            t.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn by a kill mid-write
    with Tracker(tmp_path, DISABLED, {}, resume_step=3) as t:
        t.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # rewrite left no temporary


def test_fresh_run_moves_old_metrics_aside(tmp_path):
    with Tracker(tmp_path, DISABLED, {}) as t:
        t.log(1, {"loss": 1.0})
    with Tracker(tmp_path, DISABLED, {}) as t:
        t.log(1, {"loss": 2.0})
    assert _rows(tmp_path) == [{"step": 1, "loss": 2.0}]
    assert json.loads((tmp_path / "metrics.jsonl.bak").read_text()) == {"step": 1, "loss": 1.0}


def test_other_ranks_write_nothing(tmp_path):
    out = tmp_path / "run"
    with Tracker(out, configs.TrackingConfig(), {}, rank=1, resume_step=3) as t:
        t.log(1, {"loss": 1.0})
        t.log_video(1, "v", "v.mp4", fps=16)
    assert not out.exists()


def test_wandb_offline_run_lives_in_output_dir_and_resumes_its_id(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")  # wandb copies the file; it does not decode it
    out = tmp_path / "run"
    with Tracker(out, configs.TrackingConfig(), {"training": {"lr": 1e-5}}) as t:
        t.log(1, {"loss": 1.0})
        t.log_video(1, "prompt0", video, fps=16)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    first = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1 and list(first[0].glob("*.wandb"))
    assert list(first[0].rglob("*.mp4"))
    time.sleep(1.1)  # wandb names a run's folder by the second it starts: two in one second would share it
    with Tracker(out, configs.TrackingConfig(), {}, resume_step=1) as t:
        t.log(2, {"loss": 0.5})
    assert (out / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # same run, resumed
    assert [r["step"] for r in _rows(out)] == [1, 1, 2]


def test_disabled_mode_never_imports_wandb(tmp_path):
    code = textwrap.dedent(f"""
        import sys, configs
        from fvfunc.tracking import Tracker
        with Tracker({str(tmp_path)!r}, configs.TrackingConfig(wandb_mode="disabled"), {{}}) as t:
            t.log(1, {{"loss": 1.0}})
            t.log_video(1, "v", "v.mp4", fps=16)
        assert "wandb" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_wandb_failures_never_stop_the_run(tmp_path, monkeypatch, caplog):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    with caplog.at_level(logging.WARNING, logger="fvfunc.tracking"), \
            Tracker(tmp_path, configs.TrackingConfig(wandb_mode="online"), {}) as t:
        t.log(1, {"loss": 1.0})
    assert "failed to start" in caplog.text and "no network" in caplog.text
    assert _rows(tmp_path) == [{"step": 1, "loss": 1.0}]

    class BrokenRun:
        finished = None

        def define_metric(self, *a, **k):
            pass

        def log(self, row):
            raise OSError("disk full under wandb/")

        def finish(self, exit_code=0):
            BrokenRun.finished = exit_code

    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    with caplog.at_level(logging.WARNING, logger="fvfunc.tracking"), \
            Tracker(tmp_path, configs.TrackingConfig(wandb_mode="online"), {}, resume_step=1) as t:
        t.log_video(2, "missing", tmp_path / "missing.mp4", fps=16)  # wandb refuses it: warned
        t.log(2, {"loss": 2.0})  # wandb breaks here: warned, then switched off
        t.log(3, {"loss": 3.0})
    assert BrokenRun.finished == 1
    assert "could not take the video" in caplog.text and "disk full" in caplog.text
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 2, 3]
