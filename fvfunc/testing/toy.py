"""A toy video task in latent space, made by fvfunc itself: the honest proof that its methods work.

Wan weights cannot be downloaded where fvfunc is built and tested, so `bench/toy.py` pretrains a tiny
Wan teacher on this task and distils it with DMD2; this module is the task, shared by the benchmark
and the tests. It imports nothing of the trainer: only the data writer and the keys.

The task. A clip is one Gaussian blob moving in a straight line over a black background: 4 RGB frames
of 16 x 16 pixels (`Task.frames`, `Task.size`). A class (a "prompt") is a colour x a direction: 4 x 4
= 16 classes, captioned "a red blob moving left". Within a class a clip varies in its start position
(the whole track stays 1 px inside the frame), speed (1.5 to 2 px a frame), width (sigma 1 to 1.4 px)
and brightness (0.75 to 1).

Latents. Like Wan's VAE, which folds 4 video frames into one latent frame and keeps 16 channels, a
fixed linear "VAE" folds each pixel's 4 frames x 3 colours (12 numbers, centred and scaled by
`Task.offset` / `Task.scale`) into 16 latent channels: z = Q x with Q [16, 12] orthonormal columns
(seeded). A clip's latent is [16, 1, 16, 16] (`Task.latent_shape`); there is no spatial compression,
so the tiny Wan's 2x2 patches make 8 x 8 tokens. The decoder, `decode`, is the exact inverse on the
12-dimensional subspace the data live in (Q^T, then undo the scaling) and drops the rest. Latents
are stored already in the model's space (no latents_mean/std: train with
`--data.no-normalize-latents`). Why one latent frame: with two (8 video frames) the tiny teacher must
learn to continue the track across latent frames through attention alone, which it had not learnt
after 1200 steps (30% right directions); within a latent frame motion is local and learnt in minutes.

Prompts. Every word has a fixed random embedding (N(0, 1), `Task.text_dim` wide, seeded); a prompt's
embedding is its caption's 5 words, "a <colour> blob moving <direction>", [5, text_dim]; the trainer
pads it with zeros to `--data.text-len` (8). Classes share words, as real prompts do.

Measures, on decoded clips (`track` is the one place that reads a clip):
- the blob: per frame, the weights w = relu(I - max(I) / 2) on the intensity I = sum of the clipped
  RGB; its centroid per frame, a least-squares line through the centroids (start and velocity), its
  mean colour under w.
- adherence (`adherence`): the share of clips, in percent, whose colour is the prompt's (nearest
  palette colour by cosine) AND whose motion is the prompt's (the direction with the largest
  projection of the velocity, which must exceed MIN_SPEED = 0.5 px a frame). 100 on real clips; on
  noise at most chance, 100/16 = 6.25.
- Frechet distance (`frechet_distance`, Heusel et al. 2017's FID formula on `features` instead of
  Inception activations): 11 features a clip -- mean colour (3), start centroid (2), velocity (2),
  peak intensity, blob radius (inside 3 px of the centroid), background energy (mean |RGB| farther
  than 3 px from the centroid), track wobble (RMS distance of the centroids from their line). Both
  sets are standardised with the reference (real) set's mean and std (the std floored at
  `STD_FLOOR`, so a feature that is nearly constant in real clips cannot blow up), so the distance
  is in units of the real data's spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fvfunc import data, random

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)
CLASSES = [(c, d) for c in COLOURS for d in DIRECTIONS]
"""Class i is (colour, direction); its prompt is `caption(i)`."""
WORDS = ["a", "blob", "moving", *COLOURS, *DIRECTIONS]

BLOB = 3.0
"""px: the blob's extent for `track` (radius inside it, background outside it)."""
MIN_SPEED = 0.5
"""px a frame: slower than this is 'not moving' for adherence (real clips move 1.5 to 2)."""
FEATURES = ["red", "green", "blue", "y0", "x0", "vy", "vx", "peak", "radius", "background", "wobble"]
STD_FLOOR = (0.05, 0.05, 0.05, 0.25, 0.25, 0.25, 0.25, 0.05, 0.1, 0.05, 0.25)
"""Least std of each feature when standardising for the Frechet distance, in the feature's units:
about the smallest difference one sees in the upscaled pictures (0.05 in intensity, a quarter pixel
in position, speed and wobble, 0.1 px in radius). Without it a feature that is almost constant
in real clips (background, wobble) would dominate the distance."""


@dataclass(frozen=True)
class Task:
    """The shape of the task's clips, latents and prompts."""

    latent_frames: int = 1
    """Latent frames a clip."""
    frames_per_latent: int = 4
    """Video frames folded into one latent frame (Wan's VAE folds 4)."""
    size: int = 16
    """Height and width, of the video and of the latents (no spatial compression)."""
    speed: tuple[float, float] = (1.5, 2.0)
    """Range of the blob's speed, px a video frame."""
    width: tuple[float, float] = (1.0, 1.4)
    """Range of the blob's Gaussian sigma, px."""
    brightness: tuple[float, float] = (0.75, 1.0)
    """Range of the blob's peak brightness."""
    offset: float = 0.015
    """Subtracted from the RGB before projecting: about the mean pixel of the default task."""
    scale: float = 0.072
    """RGB is divided by this before projecting: about the pixel std of the default task, so latents
    have unit spread along the directions they use."""
    channels: int = 16
    """Latent channels (Wan's VAE has 16); at least 3 * frames_per_latent."""
    text_dim: int = 32
    """Width of a word embedding (the model's text_dim)."""
    seed: int = 0
    """Seed of the fixed projection and word embeddings (not of the clips)."""

    @property
    def frames(self) -> int:
        """Video frames a clip."""
        return self.latent_frames * self.frames_per_latent

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.channels, self.latent_frames, self.size, self.size)


def caption(label: int) -> str:
    colour, direction = CLASSES[label]
    return f"a {colour} blob moving {direction}"


# ------------------------------------------------------------------------------ fixed parts


def projection(task: Task) -> torch.Tensor:
    """Q [channels, 3 * frames_per_latent] with orthonormal columns: a pixel's RGB over the video
    frames of one latent frame -> its latent channels."""
    shape = (task.channels, 3 * task.frames_per_latent)
    a = random.normal(random.fold_in(random.key(task.seed), 1), shape, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).float()  # a unique Q: positive diagonal of R


def word_embeddings(task: Task) -> dict[str, torch.Tensor]:
    k = random.fold_in(random.key(task.seed), 2)
    return {w: random.normal(random.fold_in(k, i), (task.text_dim,)) for i, w in enumerate(WORDS)}


def prompt_embedding(label: int, task: Task) -> torch.Tensor:
    """[5, text_dim]: the embeddings of the caption's words."""
    words = word_embeddings(task)
    return torch.stack([words[w] for w in caption(label).split()])


def encode(rgb: torch.Tensor, task: Task) -> torch.Tensor:
    """RGB clips [N, 3, frames, H, W] -> latents [N, channels, latent_frames, H, W]."""
    n, _, _, h, w = rgb.shape
    x = ((rgb - task.offset) / task.scale).unflatten(2, (task.latent_frames, task.frames_per_latent))
    x = x.permute(0, 2, 3, 1, 4, 5).reshape(n, task.latent_frames, -1, h, w)  # [N, T, (frame, rgb), H, W]
    return torch.einsum("cr,ntrhw->ncthw", projection(task), x)


def decode(latents: torch.Tensor, task: Task) -> torch.Tensor:
    """Latents [N, channels, latent_frames, H, W] -> RGB clips [N, 3, frames, H, W]: the projection's
    inverse on the latents it makes (Q^T), the rest of the latent space dropped."""
    n, _, t, h, w = latents.shape
    x = torch.einsum("cr,ncthw->ntrhw", projection(task), latents.float())
    x = x.reshape(n, t, task.frames_per_latent, 3, h, w).permute(0, 3, 1, 2, 4, 5).flatten(2, 3)
    return x * task.scale + task.offset


# ------------------------------------------------------------------------------------ clips


def labels_for(n: int) -> torch.Tensor:
    """n labels, the classes in turn (balanced)."""
    return torch.arange(n) % len(CLASSES)


def render(key: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """RGB clips [N, 3, frames, H, W] of the classes `labels`, their other properties drawn from `key`."""
    n, t_len, size = len(labels), task.frames, task.size
    k = random.split(key, 5)
    speed = random.uniform(k[0], (n,), low=task.speed[0], high=task.speed[1])
    width = random.uniform(k[1], (n,), low=task.width[0], high=task.width[1])
    bright = random.uniform(k[2], (n,), low=task.brightness[0], high=task.brightness[1])
    u_along, u_across = random.uniform(k[3], (n,)), random.uniform(k[4], (n,))
    direction = torch.tensor([DIRECTIONS[CLASSES[i][1]] for i in labels.tolist()])  # [N, 2] (dy, dx)
    colour = torch.tensor([COLOURS[CLASSES[i][0]] for i in labels.tolist()])  # [N, 3]
    # the whole track stays 1 px inside the frame: along the motion, it starts where it has room
    margin, span = 1.0, speed * (t_len - 1)
    along = margin + u_along * (size - 1 - 2 * margin - span)  # distance from the wall it moves away from
    across = margin + u_across * (size - 1 - 2 * margin)
    moving_axis = direction.abs().argmax(1)  # 0: vertical, 1: horizontal
    sign = direction.sum(1)  # +1 down/right, -1 up/left
    start_along = torch.where(sign > 0, along, size - 1 - along)
    start = torch.stack([torch.where(moving_axis == 0, start_along, across),
                         torch.where(moving_axis == 1, start_along, across)], 1)  # [N, 2] (y, x)
    steps = torch.arange(t_len, dtype=torch.float32)
    centre = start[:, None] + steps[None, :, None] * (speed[:, None, None] * direction[:, None])  # [N, T, 2]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2  # [N, T, H, W]
    blob = bright[:, None, None, None] * torch.exp(-d2 / (2 * width[:, None, None, None] ** 2))
    return colour[:, :, None, None, None] * blob[:, None]


def real_latents(key: torch.Tensor, n: int, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [n, *Task.latent_shape], labels [n]) of n fresh real clips, classes balanced."""
    labels = labels_for(n)
    return encode(render(key, labels, task), task), labels


def prompts(labels: torch.Tensor, task: Task, text_len: int = 8) -> torch.Tensor:
    """Prompt embeddings [N, text_len, text_dim], zero-padded as the trainer's loader pads them."""
    out = torch.zeros(len(labels), text_len, task.text_dim)
    for i, label in enumerate(labels.tolist()):
        e = prompt_embedding(label, task)
        out[i, : len(e)] = e
    return out


# ------------------------------------------------------------------------------------ datasets


def _metadata(task: Task) -> dict:
    return {"media_type": "video", "width": task.size, "height": task.size, "num_frames": task.frames,
            "fps": 4.0, "duration_sec": task.frames / 4.0}


def write_dataset(folder, n: int, key: torch.Tensor, task: Task, rows_per_file: int = 32) -> Path:
    """n real clips as a FastVideo T2V parquet dataset in `folder` (latents and prompt embeddings),
    `rows_per_file` rows a file in one row group (small files keep shuffled reads cheap)."""
    latents, labels = real_latents(key, n, task)
    rows = [{"id": f"toy-{i:06d}", "latent": latents[i].contiguous(), "caption": caption(label),
             "text_embedding": prompt_embedding(label, task), "file_name": f"toy-{i:06d}.mp4", **_metadata(task)}
            for i, label in enumerate(labels.tolist())]
    for start in range(0, n, rows_per_file):
        data.write_parquet(folder, rows[start:start + rows_per_file], rows_per_group=rows_per_file)
    return Path(folder)


def write_prompts(folder, task: Task) -> Path:
    """The 16 prompts as a FastVideo text-only parquet dataset (data-free DMD2)."""
    rows = ({"id": f"prompt-{i:02d}", "caption": caption(i), "text_embedding": prompt_embedding(i, task)}
            for i in range(len(CLASSES)))
    return data.write_parquet(folder, rows, rows_per_group=len(CLASSES))


# ------------------------------------------------------------------------------ image-to-video

IMAGE_PATCH = 4
"""px: the toy image encoder (standing in for CLIP) makes one token of each 4 x 4 patch of the first frame."""


def image_dim(task: Task) -> int:
    """Width of a toy image token (the I2V model's image_dim): a patch's RGB."""
    del task
    return 3 * IMAGE_PATCH ** 2


def image_condition(rgb: torch.Tensor, task: Task) -> dict[str, torch.Tensor]:
    """The image condition of clips [N, 3, frames, H, W] given their first frame, in FastVideo's i2v columns
    as Wan2.1 I2V takes it: `first_frame_latent`, the first frame followed by black frames, encoded
    (WanImageToVideoPipeline's "first frame + zeros"), [N, channels, latent_frames, H, W]; and
    `clip_feature`, the first frame's image tokens [N, (H / 4) (W / 4), image_dim] (each 4 x 4 patch's
    RGB, centred and scaled as `encode` does: a fixed exact encoder in CLIP's place)."""
    first = rgb[:, :, :1]
    latent = encode(torch.cat([first, torch.zeros_like(rgb[:, :, 1:])], dim=2), task)
    x = (first[:, :, 0] - task.offset) / task.scale  # [N, 3, H, W]
    p = IMAGE_PATCH
    tokens = x.unfold(2, p, p).unfold(3, p, p)  # [N, 3, H / p, W / p, p, p]
    tokens = tokens.permute(0, 2, 3, 1, 4, 5).reshape(len(rgb), -1, image_dim(task))
    return {"clip_feature": tokens.contiguous(), "first_frame_latent": latent.contiguous()}


def write_i2v_dataset(folder, n: int, key: torch.Tensor, task: Task, rows_per_file: int = 32) -> Path:
    """n real clips as a FastVideo i2v parquet dataset (latents, prompt embeddings and each clip's image
    condition, `image_condition`), `rows_per_file` rows a file in one row group."""
    labels = labels_for(n)
    rgb = render(key, labels, task)
    latents, cond = encode(rgb, task), image_condition(rgb, task)
    rows = [{"id": f"toy-{i:06d}", "latent": latents[i].contiguous(), "caption": caption(label),
             "text_embedding": prompt_embedding(label, task), **{k: v[i] for k, v in cond.items()},
             "file_name": f"toy-{i:06d}.mp4", **_metadata(task)} for i, label in enumerate(labels.tolist())]
    for start in range(0, n, rows_per_file):
        data.write_parquet(folder, rows[start:start + rows_per_file], rows_per_group=rows_per_file)
    return Path(folder)


# ------------------------------------------------------------------------------------ measures


def track(rgb: torch.Tensor) -> dict[str, torch.Tensor]:
    """The blob of each clip [N, 3, T, H, W]: colour [N, 3], start [N, 2], velocity [N, 2] (y, x, px a
    frame), peak [N], radius [N], background [N], wobble [N] (see the module docstring)."""
    rgb = rgb.double()
    n, _, t_len, h, w = rgb.shape
    intensity = rgb.clamp(min=0).sum(1)  # [N, T, H, W]
    peak = intensity.amax(dim=(2, 3), keepdim=True)
    weight = (intensity - peak / 2).clamp(min=0)
    mass = weight.sum(dim=(2, 3)).clamp_min(1e-9)  # [N, T]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=rgb.dtype), torch.arange(w, dtype=rgb.dtype), indexing="ij")
    cy = (weight * yy).sum(dim=(2, 3)) / mass
    cx = (weight * xx).sum(dim=(2, 3)) / mass
    centroid = torch.stack([cy, cx], -1)  # [N, T, 2]
    # least-squares line through the centroids: centroid ~ start + velocity * t
    t = torch.arange(t_len, dtype=rgb.dtype)
    tc = t - t.mean()
    velocity = (tc[None, :, None] * centroid).sum(1) / (tc ** 2).sum()
    start = centroid.mean(1) - velocity * t.mean()
    line = start[:, None] + velocity[:, None] * t[None, :, None]
    wobble = ((centroid - line) ** 2).sum(-1).mean(1).sqrt()
    colour = (rgb * weight[:, None]).sum(dim=(2, 3, 4)) / mass.sum(1)[:, None]
    d2 = (yy - cy[..., None, None]) ** 2 + (xx - cx[..., None, None]) ** 2
    radius = ((intensity.clamp(min=0) * d2 * (d2 <= BLOB ** 2)).sum(dim=(2, 3))
              / (intensity.clamp(min=0) * (d2 <= BLOB ** 2)).sum(dim=(2, 3)).clamp_min(1e-9)).sqrt().mean(1)
    far = (d2 > BLOB ** 2).to(rgb.dtype)
    background = (rgb.abs().sum(1) * far).sum(dim=(1, 2, 3)) / (3 * far.sum(dim=(1, 2, 3)).clamp_min(1))
    return {"colour": colour, "start": start, "velocity": velocity, "peak": peak.flatten(1).mean(1),
            "radius": radius, "background": background, "wobble": wobble}


def classify(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour index [N], direction index [N], -1 when the blob moves slower than MIN_SPEED)."""
    tr = track(rgb)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float64)
    cos = torch.nn.functional.normalize(tr["colour"], dim=1) @ torch.nn.functional.normalize(palette, dim=1).T
    dirs = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float64)
    along = tr["velocity"] @ dirs.T  # [N, 4] speed along each direction
    best, direction = along.max(1)
    return cos.argmax(1), torch.where(best > MIN_SPEED, direction, -1)


def adherence(rgb: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of clips showing their prompt's colour and motion."""
    colour, direction = classify(rgb)
    want_colour, want_direction = labels // len(DIRECTIONS), labels % len(DIRECTIONS)
    return 100.0 * float(((colour == want_colour) & (direction == want_direction)).double().mean())


def features(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 11] float64 features of clips [N, 3, T, H, W], in the order of FEATURES."""
    tr = track(rgb)
    return torch.cat([tr["colour"], tr["start"], tr["velocity"],
                      torch.stack([tr["peak"], tr["radius"], tr["background"], tr["wobble"]], 1)], 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((a + a.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(reference: torch.Tensor, other: torch.Tensor, floor=None) -> float:
    """||mu_r - mu_o||^2 + tr(S_r + S_o - 2 (S_r S_o)^(1/2)) of two feature sets [N, F], both standardised
    with the reference set's mean and std (floored at `floor`, by default STD_FLOOR for `features`)."""
    reference, other = reference.double(), other.double()
    floor = torch.as_tensor(STD_FLOOR if floor is None else floor, dtype=torch.float64)
    mean, std = reference.mean(0), torch.maximum(reference.std(0), floor)
    a, b = (reference - mean) / std, (other - mean) / std
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    root_a = _sqrtm_psd(cov_a)
    # tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric PSD matrix
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


# ------------------------------------------------------------------------------------ pictures


def to_image(rgb: torch.Tensor, scale: int = 4) -> np.ndarray:
    """A clip [3, T, H, W] as one uint8 image [H * scale, T * (W * scale + 1) - 1, 3]: its frames side by
    side, nearest-upscaled, with a 1-px grey line between frames."""
    frames = (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0)  # [T, H, W, 3]
    frames = frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
    sep = np.full((frames.shape[1], 1, 3), 96, np.uint8)
    return np.concatenate([part for f in frames for part in (f, sep)][:-1], axis=1)


def grid(columns: list[torch.Tensor], scale: int = 4, gap: int = 6, headers: list[str] | None = None,
         row_names: list[str] | None = None) -> np.ndarray:
    """uint8 image of clips: columns[j] [N, 3, T, H, W] is column j, row i is clip i of every column;
    optional titles above the columns and names left of the rows."""
    rows = []
    for i in range(len(columns[0])):
        cells = [to_image(col[i], scale) for col in columns]
        blank = np.full((cells[0].shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([part for c in cells for part in (c, blank)][:-1], axis=1))
    hgap = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    image = np.concatenate([part for r in rows for part in (r, hgap)][:-1], axis=0)
    if not headers and not row_names:
        return image
    from PIL import Image, ImageDraw

    top, left = (16 if headers else 0), (6 * max(map(len, row_names)) + 8 if row_names else 0)
    canvas = Image.new("RGB", (image.shape[1] + left, image.shape[0] + top), "white")
    canvas.paste(Image.fromarray(image), (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = to_image(columns[0][0], scale).shape[1], to_image(columns[0][0], scale).shape[0]
    for j, text in enumerate(headers or []):
        draw.text((left + j * (cell_w + gap), 2), text, fill="black")
    for i, text in enumerate(row_names or []):
        draw.text((2, top + i * (cell_h + gap) + cell_h // 2 - 5), text, fill="black")
    return np.asarray(canvas)


__all__ = ["CLASSES", "COLOURS", "DIRECTIONS", "FEATURES", "Task", "adherence", "caption", "classify", "decode",
           "encode", "features", "frechet_distance", "grid", "image_condition", "image_dim", "labels_for", "projection",
           "prompt_embedding", "prompts", "real_latents", "render", "to_image", "track", "write_dataset",
           "write_i2v_dataset", "write_prompts"]
