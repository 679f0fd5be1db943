"""A clip's frames, as FastVideo's preprocessing takes them: resampled to the training fps, resized to cover
the target size and centre-cropped, as [-1, 1] pixels [3, F, H, W].

Resampling keeps source frame int(k * src_fps / fps) for k = 0 .. num_frames - 1 (FastVideo's
`arange(0, n, src_fps / fps).astype(int)`, its first num_frames; no random temporal crop), so a clip
slower than the fps repeats frames and a clip with fewer source frames than that is too short. The
resize is bilinear with antialiasing (torch), to the smallest size covering the target, rounded back to
8-bit as a decoded frame is; the crop is centred.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fvfunc.preprocess.inputs import IMAGE_SUFFIXES


class ClipError(ValueError):
    """A clip that cannot be used (undecodable, too short): skipped and listed in the report."""


class Clip(NamedTuple):
    frames: np.ndarray
    """uint8 [F, H, W, 3], the source frames kept (before resizing)."""
    fps: float
    """The source's frame rate (0 for an image)."""
    duration: float
    """The source's duration in seconds (0 for an image)."""


def source_indices(num_frames: int, src_fps: float, fps: float) -> list[int]:
    """The source frame of each of the num_frames output frames (fps 0: the source's own rate)."""
    step = src_fps / fps if fps and src_fps else 1.0
    return [int(k * step) for k in range(num_frames)]


def _rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    return np.ascontiguousarray(frame[..., :3]).astype(np.uint8, copy=False)


def read_clip(path, num_frames: int, fps: float) -> Clip:
    """The frames of a video (num_frames of them, at fps) or an image (one frame). Decodes only as far as
    the last frame needed. ClipError when the file cannot be decoded or is too short."""
    import imageio.v2 as imageio

    path = Path(path)
    if not path.is_file():
        raise ClipError("no such file")
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return Clip(_rgb(np.asarray(imageio.imread(path)))[None], 0.0, 0.0)
        reader = imageio.get_reader(path, format="ffmpeg")
    except Exception as e:  # imageio raises OSError, RuntimeError, ... for a file ffmpeg cannot open
        raise ClipError(f"cannot decode ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''})") \
            from None
    try:
        meta = reader.get_meta_data()
        src_fps = float(meta.get("fps") or 0)
        want, frames, seen = source_indices(num_frames, src_fps, fps), [], 0
        try:
            for i, frame in enumerate(reader):
                seen = i + 1
                while len(frames) < num_frames and want[len(frames)] == i:
                    frames.append(_rgb(frame))
                if len(frames) == num_frames:
                    break
        except Exception as e:
            raise ClipError(f"cannot decode frame {seen} ({type(e).__name__}: {e})") from None
        if len(frames) < num_frames:
            raise ClipError(f"too short: {seen} frames at {src_fps:g} fps give {len(frames)} of the {num_frames} "
                            f"frames at {fps:g} fps")
        duration = float(meta.get("duration") or (seen / src_fps if src_fps else 0.0))
        return Clip(np.stack(frames), src_fps, duration)
    finally:
        reader.close()


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """[-1, 1] float32 pixels [3, F, height, width] of uint8 frames [F, H, W, 3]: scaled (bilinear,
    antialiased) to the smallest size covering height x width, rounded to 8 bits, centre-cropped."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [F, 3, H, W]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).round().clamp(0, 255)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 255 * 2 - 1).permute(1, 0, 2, 3).contiguous()  # FastVideo's pixels / 255, then 2 x - 1
