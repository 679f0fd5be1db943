"""Metrics out of a run: `output_dir/metrics.jsonl` always, wandb as well (rank 0 only).

metrics.jsonl holds one JSON object a line, `{"step": 10, "loss": 0.5, ...}`; it is the run's own
record and survives any wandb trouble. wandb is offline by default (sync later with `wandb sync
output_dir/wandb/offline-run-*`), online when asked, or disabled (then never imported). Tracking
never stops a training run: a wandb failure is logged as a warning and wandb is switched off.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

import configs

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
RUN_ID = "wandb_run_id.txt"
INIT_TIMEOUT_S = 60
"""How long wandb.init may wait for its service (and, online, the server) before giving up."""


class Tracker:
    """Writes a run's metrics; use as a context manager or call `close()`.

    On resume from step S (`resume_step=S`) metrics.jsonl first loses its lines with step > S (a run
    killed after logging past its last checkpoint would otherwise log those steps twice) and wandb
    continues the run whose id is stored in `output_dir/wandb_run_id.txt`. A fresh start
    (`resume_step=None`) moves an existing metrics.jsonl aside to metrics.jsonl.bak and starts a new
    wandb run. Ranks other than 0 write nothing."""

    def __init__(self, output_dir: str | os.PathLike, cfg: configs.TrackingConfig, run_config: dict,
                 rank: int = 0, resume_step: int | None = None):
        self.output_dir = Path(output_dir)
        self.active = rank == 0
        self._file = None
        self._run = None
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / METRICS
        if resume_step is None:
            if path.exists() and path.stat().st_size > 0:
                log.warning("fresh run: moving the existing %s to %s.bak", path, path.name)
                os.replace(path, path.with_name(path.name + ".bak"))
        else:
            _truncate(path, resume_step)
        self._file = open(path, "a", buffering=1)  # line-buffered: a killed run loses no line
        if cfg.wandb_mode != "disabled":
            self._run = _init_wandb(self.output_dir, cfg, run_config, resume=resume_step is not None)

    def log(self, step: int, metrics: dict) -> None:
        """Record `metrics` (numbers or 0-d tensors, written as floats) at `step`."""
        if not self.active:
            return
        row = {k: float(v) for k, v in metrics.items()}
        self._write({"step": int(step), **row})
        self._wandb_log(step, row)

    def log_video(self, step: int, name: str, path: str | os.PathLike, fps: int) -> None:
        """Record the mp4 file `path` as `video/<name>` at `step` (the path in metrics.jsonl, the video
        itself in wandb). `fps` is the rate the file was written at; wandb plays a file at its own
        rate (and warns when given one), so it is not passed on."""
        if not self.active:
            return
        key = f"video/{name}"
        self._write({"step": int(step), key: str(path)})
        if self._run is not None:
            try:
                import wandb
                video = wandb.Video(str(path), format="mp4")
            except Exception as e:  # a missing or odd file costs this video, not the run
                log.warning("wandb could not take the video %s: %s", path, e)
                return
            self._wandb_log(step, {key: video})

    def close(self, exit_code: int = 0) -> None:
        """Finish the wandb run (marked failed when `exit_code` != 0) and close metrics.jsonl."""
        self._finish_wandb(exit_code)
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

    def _write(self, row: dict) -> None:
        # NaN / inf are written as JSON's common extension NaN / Infinity (Python's json reads them)
        self._file.write(json.dumps(row) + "\n")

    def _wandb_log(self, step: int, row: dict) -> None:
        if self._run is None:
            return
        try:
            # our step is an ordinary metric (the x-axis of every chart, see _init_wandb), not
            # wandb's own _step: a resumed run may log steps wandb has already seen
            self._run.log({"step": int(step), **row})
        except Exception as e:
            log.warning("wandb.log failed, continuing with %s only: %s", METRICS, e)
            self._finish_wandb(exit_code=1)

    def _finish_wandb(self, exit_code: int) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # tracking never stops the run
            log.warning("wandb.finish failed: %s", e)


def _truncate(path: Path, step: int) -> None:
    """Keep the lines of `path` with step <= `step` (dropping torn or unreadable lines), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            if row["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _init_wandb(output_dir: Path, cfg: configs.TrackingConfig, run_config: dict, resume: bool):
    """A wandb run writing under output_dir/wandb/, or None (with a warning) when wandb fails."""
    id_file = output_dir / RUN_ID
    run_id = id_file.read_text().strip() if resume and id_file.exists() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # wandb's own ids are 8 characters of [a-z0-9]
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    try:
        import wandb
        run = wandb.init(
            dir=str(output_dir), project=cfg.project, name=cfg.run_name or output_dir.resolve().name,
            config=run_config, mode=cfg.wandb_mode, id=run_id, resume="allow",
            settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, console="off", reinit="create_new"))
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run
    except Exception as e:  # no network, no login, no wandb: keep training
        log.warning("wandb (%s) failed to start, logging to %s only: %s", cfg.wandb_mode, METRICS, e)
        return None
