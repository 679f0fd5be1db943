"""Every typed config of an fvfunc run.

Frozen dataclasses, each field documented where it is declared (tyro shows the docstrings in
`--help`). A run is one dataclass per method (`FinetuneRun`, `DMD2Run`) holding the shared sections
(roles, training, data, validation, tracking) and the method's own config; each method's spec
(fvfunc/losses/<method>.py) names its run type, and train.py builds one subcommand per spec. The same config loads
from a schema-v2 YAML/JSON file (see `fvfunc/config_file.py`); CLI flags override the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# ----------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class LoraConfig:
    """A role's low-rank adapters (fvfunc/lora.py): trained ones (rank > 0) and frozen LoRA files."""

    rank: int = 0
    """Rank r of the adapters trained instead of the role's params; 0 trains the params themselves.
    Only the adapters get gradients, optimizer state, EMA and checkpoints; the base stays frozen in
    roles.<role>.dtype and is shared with the run's other roles of the same folder and dtype."""
    alpha: float = 0.0
    """The adapters add (alpha / rank) B A x; 0 means alpha = rank (a scale of 1)."""
    targets: tuple[str, ...] = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
    """The linears that get adapters: a pattern names a layer by its whole name, its trailing part
    (attn1.to_q: in every block) or a glob (blocks.1?.ffn.*). Default: attention q/k/v/out and FFN."""
    init: str = "zeros"
    """'zeros': PEFT's init (A random, B = 0: training starts at the base model); or a LoRA file or
    folder (diffusers / PEFT, ComfyUI, kohya / musubi) to continue training from. An expert pair
    (Wan2.2 A14B) takes a folder of one LoRA per expert: <expert>/ or <expert>.safetensors (transformer,
    transformer_2), as a pair's run exports them (RUN/export/lora)."""
    frozen: tuple[str, ...] = ()
    """LoRA files merged into this role's weights before training, each FILE or FILE:STRENGTH (e.g. a
    teacher plus a style LoRA); diffusers / PEFT, ComfyUI or kohya / musubi layouts. For an expert pair
    each is a folder of one LoRA per expert, as for `init` (e.g. a high-noise and a low-noise file)."""


@dataclass(frozen=True)
class RoleConfig:
    """One named model of a run."""

    family: str = "wan"
    """Model family (a key of fvfunc.models.FAMILIES)."""
    path: str = ""
    """A diffusers model folder: the transformer folder, or a pipeline folder with transformer/.
    Empty means the role is absent."""
    trainable: bool = False
    """Whether the method updates this role. A teacher is never trainable."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the params are held in: float32 for trainable masters, bfloat16 saves memory for a
    frozen teacher."""
    sharding: Literal["replicated", "sharded"] = "replicated"
    """Across data-parallel ranks (torchrun): 'replicated' keeps the whole params (and optimizer state)
    on every rank; 'sharded' splits them over the ranks (ZeRO-3 / FSDP style: each rank holds 1/W,
    a block is gathered whole just before use). One process ignores it."""
    ema_decay: float = 0.0
    """Keep an EMA of this trainable role's params with this decay (e.g. 0.98); 0 keeps none. The
    student's EMA is what validation samples (validation.use_ema) and what is exported."""
    variant: str = ""
    """Weight variant of the folder to load, diffusers' naming: 'fp16' reads
    diffusion_pytorch_model.fp16.safetensors (or its shards and index); empty reads the plain files."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train low-rank adapters instead of the full params (--roles.student.lora.rank 32), and LoRA files
    merged in frozen."""


def _role(trainable: bool, dtype: str = "float32") -> RoleConfig:
    return RoleConfig(trainable=trainable, dtype=dtype)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RolesConfig:
    """The models a method uses; each method says which it needs."""

    student: RoleConfig = field(default_factory=lambda: _role(True))
    """The model being trained (and exported)."""
    teacher: RoleConfig = field(default_factory=lambda: _role(False, "bfloat16"))
    """A frozen many-step model (DMD2's real score)."""
    critic: RoleConfig = field(default_factory=lambda: _role(True))
    """DMD2's fake score, trained on the student's samples; usually initialised from the teacher."""


# -------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplerConfig:
    """How to turn noise into a video with a flow model."""

    kind: Literal["ode", "sde", "unipc"] = "unipc"
    """ode: Euler on the flow; sde: predict x0 then re-noise to the next sigma (DMD-style few-step);
    unipc: second-order UniPC multistep (bh2, x0-prediction)."""
    num_steps: int = 50
    """Number of steps of a shifted schedule (ignored when `timesteps` is given)."""
    shift: float = 5.0
    """Flow shift s of the schedule, sigma' = s*sigma / (1 + (s-1)*sigma) (Wan uses 3 to 8)."""
    schedule: Literal["unipc", "flow_match_euler"] = "unipc"
    """The num_steps sigmas, named for the diffusers scheduler whose set_timesteps(num_steps) they equal
    (a named rule rather than a pasted list: it depends on num_steps and shift). unipc: the Wan2.1
    checkpoints' UniPCMultistepScheduler(flow_shift=shift), shift(linspace(1, 1/1000, n + 1)[:-1]);
    flow_match_euler: FlowMatchEulerDiscreteScheduler(shift=shift), n sigmas between its largest and
    smallest shifted training sigma, shifted again. Any kind runs on either; the model's timestep per
    step follows the kind (unipc: floor(1000 * sigma), as diffusers' UniPC; ode, sde: 1000 * sigma)."""
    timesteps: tuple[float, ...] = ()
    """Explicit timesteps in (0, 1000], strictly descending, e.g. 1000 750 500 250 for a few-step
    student (floats allowed, e.g. a FlowMatchEuler pipeline's). Overrides num_steps, shift, schedule."""
    guidance_scale: float = 1.0
    """Classifier-free guidance w: v = v_uncond + w * (v_cond - v_uncond); 1 disables it."""
    guidance_scale_2: float | None = None
    """For an expert pair (Wan2.2 A14B): the w of the low-noise expert's steps (WanPipeline's
    guidance_scale_2); None: guidance_scale for both. As in WanPipeline, guidance_scale 1 turns guidance
    off for both experts."""
    seed: int = 0
    """Seed of the initial noise and of the SDE's noise."""


# -------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation loop shared by every method."""

    output_dir: str = "runs/fvfunc"
    """Folder for the resolved config, metrics.jsonl, checkpoints, exports, videos and wandb."""
    max_steps: int = 1000
    """Number of optimiser steps (of the method's step function)."""
    batch_size: int = 1
    """Global batch size per step (all ranks, all micro-batches)."""
    micro_batches: int = 1
    """Gradient accumulation: the batch is split into this many micro-batches per step."""
    lr: float = 1e-5
    """Peak learning rate of the student (DMD2's critic has its own in the method config)."""
    lr_schedule: Literal["constant", "linear_warmup", "cosine"] = "constant"
    """Shape of the learning rate over steps."""
    warmup_steps: int = 0
    """Linear warmup steps (linear_warmup and cosine)."""
    min_lr_ratio: float = 0.0
    """Cosine decays to lr * min_lr_ratio at max_steps."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas of the student."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip each role's gradient to this global norm; 0 disables clipping."""
    seed: int = 0
    """Seed of the run: its key is split once into a data-order key and a step key; noise, sigmas and
    dropout derive from the step key and the step."""
    precision: Literal["float32", "bfloat16"] = "bfloat16"
    """Compute dtype of the forward passes; params stay in their role dtype (fp32 masters)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    attention: Literal["auto", "math", "flash", "efficient", "cudnn", "fa4", "vsa"] = "auto"
    """Attention backend; auto lets torch's SDPA pick. On an H100 'fa4' (FlashAttention-4, the optional
    flash-attn-4 package) is the fastest, then 'cudnn' (bench/RESULTS.md). 'vsa': FastVideo's Video
    Sparse Attention on the self-attention of the roles vsa_roles names (the fastvideo-kernel package on
    CUDA, pip install 'fvfunc[vsa]'; fvfunc.ops.vsa's plain-torch reference elsewhere), with the gate
    blocks.{i}.to_gate_compress created as zeros (FastVideo's init) in a model that has none; the
    rest of the attention runs on vsa_dense."""
    vsa_sparsity: float = 0.9
    """Under attention 'vsa': the target share of key cubes each query cube skips (FastVideo's
    VSA_sparsity; 0.9 keeps ceil(0.1 n) of the n 4x4x4 cubes)."""
    vsa_decay_rate: float = 0.0
    """Sparsity warm-up (FastVideo's VSA_decay_rate): the sparsity climbs by this much every
    vsa_decay_interval_steps steps up to vsa_sparsity (fvfunc.ops.vsa.sparsity_at)."""
    vsa_decay_interval_steps: int = 0
    """Steps between warm-up increments (FastVideo's VSA_decay_interval_steps); <= 1: the target
    sparsity from the first step."""
    vsa_roles: Literal["student", "all"] = "student"
    """Which roles run VSA: 'student' (FastVideo's DMD2: a sparse student scored by a dense teacher and
    critic), or 'all' (every role sparse, each with its own gates)."""
    vsa_dense: Literal["auto", "math", "flash", "efficient", "cudnn", "fa4"] = "auto"
    """Under attention 'vsa': the backend of cross-attention and of the roles that run dense."""
    grad_transform: Literal["autograd", "func"] = "autograd"
    """How a loss becomes gradients: torch.func.grad ('func'), or torch.autograd.grad on the same
    pure loss ('autograd': same gradients, lower peak memory, works with remat)."""
    remat: Literal["none", "full", "attention"] = "none"
    """Activation rematerialisation (needs grad_transform='autograd'): 'full' recomputes each
    transformer block in the backward pass (activation checkpointing); 'attention' keeps each block's
    attention outputs and recomputes the cheap rest (selective checkpointing: near 'none''s speed at
    a fraction of its memory)."""
    remat_fraction: float = 1.0
    """The share of transformer blocks that remat (the first ones); the rest keep all activations.
    Below 1 it buys speed with spare memory (like FastVideo's selective checkpointing ratio)."""
    compile: bool = False
    """torch.compile each role's apply (GPU runs; slow to start, faster steps)."""
    sp_size: int = 1
    """Sequence parallelism (Ulysses): ranks in groups of this many share each sample, each holding 1/N of
    its tokens through the transformer blocks, with two all-to-alls around self-attention (every token,
    1/N of the heads); for videos whose activations do not fit one GPU (720p). It must divide the number
    of processes (the rest is data parallel: W / N groups read different samples), every role's attention
    heads and the tokens of a sample. It changes no result beyond rounding."""
    overlap_comm: bool = True
    """Overlap a sharded role's communication with compute: prefetch the next block's weights while a
    block computes, and let each block's gradient reduce-scatter run during the next block's backward."""
    donate: bool = False
    """Let each step write the new params and optimizer moments into the old ones' buffers (like
    jax.jit's donate_argnums): a step's input state must not be used after the step. Halves the
    optimizer's peak memory; a DMD2 run of two trainable 1.3B roles on one 80 GB card needs it."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep; 0 keeps all."""
    resume: str = ""
    """Resume from 'latest' (the newest intact checkpoint in output_dir, if any; damaged newer ones are
    reported and set aside) or a checkpoint folder path (which must be intact). Empty starts fresh (and
    refuses an output_dir that already holds checkpoints). A resumed run must be the checkpoint's run:
    see allow_changes."""
    allow_changes: tuple[str, ...] = ()
    """Fields (e.g. training.lr data.path) a resumed run may change although the change alters the
    results; `all` allows every change. max_steps, logging, checkpointing, validation, tracking and
    speed settings (device, attention, compile, remat, sharding, sp_size) may always change; moved model or data
    folders with the same content pass too."""
    log_every: int = 1
    """Write metrics every N steps."""
    export: bool = True
    """At the end, export the student (its EMA when kept) to output_dir/export: a diffusers pipeline folder
    (the trained transformer plus the student pipeline's other components), or transformer/ alone when
    the student's folder is a bare transformer."""
    export_dtype: Literal["source", "float32", "bfloat16"] = "source"
    """Dtype of the exported transformer: 'source' keeps each tensor's dtype in the student's folder (a
    bf16 model exports bf16 even when trained in fp32), or cast all to float32 / bfloat16."""


VSA_FIELDS = ("training.vsa_sparsity", "training.vsa_decay_rate", "training.vsa_decay_interval_steps",
              "training.vsa_roles")
"""The VSA settings: they matter to a resume only when the checkpoint's run or the new one has
training.attention 'vsa' (and then training.attention itself is no longer free: dense and sparse
attention compute different things)."""

RESUME_FREE = (
    "training.max_steps", "training.checkpoint_every", "training.keep_checkpoints", "training.resume",
    "training.allow_changes", "training.log_every", "training.export", "training.export_dtype",
    "training.output_dir", "training.device", "training.attention", "training.vsa_dense", "training.grad_transform",
    "training.remat",
    "training.remat_fraction", "training.compile", "training.donate", "training.micro_batches", "data.num_workers",
    "training.sp_size", "training.overlap_comm",
    "validation.", "tracking.", "roles.student.sharding", "roles.teacher.sharding", "roles.critic.sharding",
)
"""Fields a resumed run may change without changing what it computes (a trailing '.': a whole section):
how long it runs, what it logs, checkpoints and validates, and how fast (micro-batches split the same
batch). Every other field must equal the checkpoint's (fvfunc/resume.py) unless training.allow_changes
names it."""


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataConfig:
    """FastVideo-preprocessed parquet datasets (read as is)."""

    path: tuple[str, ...] = ()
    """Dataset folders of *.parquet files, each 'DIR' or 'DIR:N' to repeat it N times."""
    text_len: int = 512
    """Text embeddings are padded with zeros (or refused when longer) to this many tokens."""
    num_workers: int = 2
    """Background threads that read and decode rows ahead of the step."""
    normalize_latents: bool = True
    """Normalise latents with the VAE latents_mean/latents_std of the student's folder (vae/config.json)."""
    shuffle: Literal["auto", "rows", "groups"] = "auto"
    """Sample order of an epoch. rows: a uniform shuffle. groups: the parquet row groups in a shuffled
    order, shuffle_window at a time, their samples shuffled together, so each group is read once an
    epoch (FastVideo writes each file as one row group: under 'rows' every sample decodes its whole
    file). auto: rows when every row group holds one row, else groups."""
    shuffle_window: int = 4
    """Row groups shuffled together under 'groups'; twice as many stay cached in memory (a FastVideo
    group of 64 Wan-1.3B samples is about 1 GB)."""
    num_latent_t: int = 0
    """Keep the first N latent frames of each sample (FastVideo's num_latent_t); 0 keeps them all. A
    sample with fewer frames is an error naming its row."""


@dataclass(frozen=True)
class ValidationConfig:
    """Videos sampled from the student during training."""

    every: int = 0
    """Validate every N steps (and at the end); 0 disables validation."""
    prompts: str = ""
    """A text-only parquet folder of prompts; empty takes the first rows of the training data."""
    dataset_file: str = ""
    """FastVideo's validation JSON ({"data": [{"caption": ...}, ...]}) or a .txt of one prompt a line,
    encoded once with the student folder's own umT5 (text_encoder/ + tokenizer/); overrides prompts."""
    negative_prompt: str = ""
    """The negative prompt of classifier-free guidance, encoded with the student folder's umT5."""
    negative_prompt_embedding: str = ""
    """Or its embedding: a .safetensors (one tensor) or .pt file of [L, D] or [1, L, D]. With neither,
    a guided sampler's uncond is zero text (with a warning)."""
    num_prompts: int = 2
    """How many prompts to sample."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """The sampler; its defaults come from the method (dmd2: sde over its own dmd_denoising_steps
    when no timesteps are given; kd: ode over its t_list)."""
    num_frames: int = 0
    """Latent frames of the sampled videos; 0 takes the shape of the training data's latents."""
    height: int = 0
    """Latent height; 0 takes it from the training data."""
    width: int = 0
    """Latent width; 0 takes it from the training data."""
    fps: int = 16
    """Frame rate of the written mp4 files."""
    use_ema: bool = True
    """Sample with the student's EMA weights when an EMA is kept."""
    vsa_sparsity: float = -1.0
    """Under training.attention 'vsa': the sparsity the student samples at; negative takes the target
    training.vsa_sparsity (as FastVideo's validation does), whatever the warm-up has reached."""


@dataclass(frozen=True)
class TrackingConfig:
    """Where metrics go. metrics.jsonl is always written; wandb on rank 0."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline never touches the network (sync later with `wandb sync`)."""
    project: str = "fvfunc"
    """wandb project."""
    run_name: str = ""
    """wandb run name; empty uses the output folder's name."""


# --------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class FinetuneConfig:
    """Flow-matching finetuning (Wan / FastVideo conventions)."""

    weighting_scheme: Literal["uniform", "logit_normal", "mode"] = "uniform"
    """How u in [0, 1] is drawn before the shift: uniform, sigmoid(N(logit_mean, logit_std)), or
    the SD3 'mode' scheme 1 - u - mode_scale*(cos(pi u/2)^2 - 1 + u)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal scheme."""
    logit_std: float = 1.0
    """Std of the logit-normal scheme."""
    mode_scale: float = 1.29
    """Scale of the mode scheme."""
    flow_shift: float = 3.0
    """Shift applied to the training sigmas, sigma = s*u / (1 + (s-1)*u)."""
    precondition_outputs: bool = False
    """Compare x0 predictions (x_t - sigma*v vs x0) instead of flow predictions."""
    cfg_rate: float = 0.1
    """Probability of replacing a sample's text embedding with zeros (for classifier-free guidance)."""
    expert: str = ""
    """For an expert-pair student (a Wan2.2 A14B pipeline folder): train only this expert ('transformer',
    the high-noise one, or 'transformer_2'), every sample's noise level drawn from the scheme within its
    range; the other stays frozen (and gets no optimizer state). Empty: each sample trains the expert its
    noise level routes to."""


@dataclass(frozen=True)
class DMD2Config:
    """Distribution Matching Distillation 2 (Yin et al. 2024), FastVideo's defaults."""

    dmd_denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    """The student's few-step timestep list, strictly descending in (0, 1000]."""
    rollout_mode: Literal["simulate", "data"] = "simulate"
    """Where the student's input comes from: 'simulate' runs its own few-step SDE from pure noise
    (data-free, text only); 'data' noises a dataset latent to the chosen step."""
    generator_update_interval: int = 5
    """Update the student every N steps; the critic updates every step."""
    real_score_guidance_scale: float = 4.5
    """Teacher CFG w in the standard form uncond + w*(cond - uncond) (FastVideo's older
    cond + w*(cond - uncond) with 3.5 equals 4.5 here)."""
    real_score_guidance_scale_2: float | None = None
    """For an expert-pair teacher (Wan2.2 A14B): the w at its low-noise expert's timesteps (as
    WanPipeline's guidance_scale_2, standard form); None: real_score_guidance_scale for both."""
    flow_shift: float = 8.0
    """Shift of the score sigmas (teacher / critic noise levels)."""
    min_timestep_ratio: float = 0.02
    """Lower clamp of the score sigma."""
    max_timestep_ratio: float = 0.98
    """Upper clamp of the score sigma."""
    critic_lr: float = 8e-6
    """Learning rate of the critic."""
    critic_betas: tuple[float, float] = (0.0, 0.999)
    """AdamW betas of the critic."""
    critic_weight_decay: float = 0.01
    """AdamW weight decay of the critic."""
    latent_shape: tuple[int, int, int] = (21, 60, 104)
    """(T, H, W) of the latents the student generates in simulate mode (81x480x832 video for Wan);
    ignored in data mode, where the data's latents set the shape."""
    negative_prompt: str = ""
    """The teacher's unconditional input is this negative prompt, encoded once with the teacher folder's
    umT5 (text_encoder/ + tokenizer/), as FastVideo and diffusers' Wan pipelines do. A FastVideo run
    file gets FastVideo's default negative prompt unless it says otherwise."""
    negative_prompt_embedding: str = ""
    """Or its embedding: a .safetensors (one tensor) or .pt file of [L, D] or [1, L, D]. With neither,
    the uncond is zero text (with a warning)."""


@dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation / ODE initialisation (FastVideo's kd, Self-Forcing's ODE init): the
    student learns to jump from states of a many-step teacher's ODE trajectory straight to its end."""

    t_list: tuple[int, ...] = (1000, 750, 500, 250)
    """The student's timesteps, strictly descending in (0, 1000] (FastVideo's form with its trailing 0,
    e.g. 999 937 833 624 0, means the same). Each sample trains at one of them, drawn per sample."""
    teacher_steps: int = 48
    """Steps of the teacher's UniPC sampler when it generates the trajectories (its schedule also
    passes through every t_list timestep, so the states the student learns from are exact)."""
    flow_shift: float = 5.0
    """Flow shift of the teacher's sampling schedule."""
    guidance_scale: float = 5.0
    """The teacher's classifier-free guidance when generating (1 disables it)."""
    negative_prompt: str = ""
    """The teacher's unconditional input when generating is this negative prompt, encoded once with the teacher folder's
    umT5 (text_encoder/ + tokenizer/), as FastVideo and diffusers' Wan pipelines do. A FastVideo run
    file gets FastVideo's default negative prompt unless it says otherwise."""
    negative_prompt_embedding: str = ""
    """Or its embedding: a .safetensors (one tensor) or .pt file of [L, D] or [1, L, D]. With neither,
    the uncond is zero text (with a warning)."""
    latent_shape: tuple[int, int, int] = (21, 60, 104)
    """(T, H, W) of the generated trajectories (81x480x832 video for Wan)."""
    cache: str = ""
    """Folder of the generated trajectories (FastVideo's ode_trajectory_text_only parquet, one file a
    chunk, written atomically; a rerun continues where a killed one stopped). Empty:
    output_dir/trajectories."""
    chunk: int = 4
    """Prompts the teacher samples together, and rows a cache file holds."""
    seed: int = 0
    """Seed of the trajectories' initial noise (sample i draws from fold_in(key(seed), i))."""


# ------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class FinetuneRun:
    """Finetune the student with the flow-matching loss on a latent dataset."""

    roles: RolesConfig = field(default_factory=RolesConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=lambda: ValidationConfig(
        sampler=SamplerConfig(kind="unipc", num_steps=50, guidance_scale=5.0)))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    method: FinetuneConfig = field(default_factory=FinetuneConfig)
    config: str = ""
    """A schema-v2 YAML/JSON run file; flags given on the command line override it."""


@dataclass(frozen=True)
class DMD2Run:
    """Distil a many-step teacher into a few-step student with DMD2."""

    roles: RolesConfig = field(default_factory=RolesConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        lr=2e-6, betas=(0.0, 0.999), max_steps=4000))
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=lambda: ValidationConfig(
        sampler=SamplerConfig(kind="sde")))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    method: DMD2Config = field(default_factory=DMD2Config)
    config: str = ""
    """A schema-v2 YAML/JSON run file; flags given on the command line override it."""


@dataclass(frozen=True)
class KDRun:
    """Distil a teacher's ODE trajectories into a few-step student (kd / ODE init), from a FastVideo
    trajectory dataset or from trajectories the teacher generates once (--roles.teacher.path)."""

    roles: RolesConfig = field(default_factory=RolesConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(lr=2e-6, max_steps=2000))
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=lambda: ValidationConfig(
        sampler=SamplerConfig(kind="ode")))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    method: KDConfig = field(default_factory=KDConfig)
    config: str = ""
    """A schema-v2 YAML/JSON run file; flags given on the command line override it."""


RUNS = {"finetune": FinetuneRun, "dmd2": DMD2Run, "kd": KDRun}
"""Method name (the subcommand) -> its run config, as the method specs (fvfunc/losses) name them (a test
checks they agree); here so that the command line is parsed and checked before torch is imported."""


@dataclass(frozen=True)
class SampleRun:
    """Sample videos from a model folder or from a training checkpoint."""

    model: str = ""
    """A diffusers model folder (pipeline or transformer), or a run's checkpoint folder (its
    student, or the student's EMA when kept; the model config comes from the run's student folder)."""
    family: str = "wan"
    """Model family of a model folder."""
    lora: tuple[str, ...] = ()
    """LoRA files merged into the model before sampling, each FILE or FILE:STRENGTH, e.g. --lora
    distill.safetensors:1.0; the layouts of roles.<role>.lora.frozen (diffusers / PEFT, ComfyUI with
    LightX2V's diffs, kohya / musubi; for an expert pair a folder of one LoRA per expert)."""
    prompts: str = ""
    """The prompts, from a file: a parquet folder (text-only or T2V schema) of umT5 embeddings, a .txt
    file of one prompt a line (blank lines skipped) encoded with the pipeline's umT5 as diffusers'
    WanPipeline does, or a .safetensors file of embeddings [N, L, D] (one tensor, or "text")."""
    prompt: tuple[str, ...] = ()
    """Prompts as text instead, e.g. --prompt "a cat" "a dog" (needs the pipeline's text_encoder/ and
    tokenizer/ beside its transformer)."""
    negative_prompt: str = ""
    """The negative prompt: its umT5 embedding is the uncond of guidance ("" as WanPipeline's default
    still encodes the eos). Without a text encoder and without negative_prompt_embedding the uncond is zeros
    (a warning says so)."""
    negative_prompt_embedding: str = ""
    """A .safetensors file of the negative prompt's embedding, [L, D], [1, L, D] or [N, L, D];
    overrides negative_prompt."""
    noise: str = ""
    """A .safetensors file of the initial noise [N, C, T, H, W] (or [C, T, H, W] for every prompt),
    normalised latents at sigma = 1; sets the latent shape. Empty: drawn from sampler.seed."""
    image: tuple[str, ...] = ()
    """Image-to-video: the conditioning image files (PNG, JPEG, ...), one for every prompt or one per
    prompt, e.g. --image cat.png. Each is resized to the video's size and encoded once with the
    pipeline's own vae/ (Wan2.1 I2V: also its image_encoder/ CLIP with image_processor/), as
    WanImageToVideoPipeline does. Without it, an image-to-video model takes the image condition of the
    rows of a parquet folder of prompts (FastVideo's i2v schema); Wan2.2 TI2V samples text-to-video."""
    last_image: tuple[str, ...] = ()
    """First-and-last-frame-to-video (Wan2.1 FLF2V): the last frame's image files, as many as --image,
    encoded with them as WanImageToVideoPipeline does with last_image."""
    num_prompts: int = 0
    """How many prompts to sample, from the first; 0: every prompt given as text, in a .txt or tensor
    file, and the first 2 rows of a parquet folder."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """The sampler."""
    latent_shape: tuple[int, int, int] = (21, 60, 104)
    """(T, H, W) of the sampled latents (81x480x832 video for Wan)."""
    output_dir: str = "samples"
    """Where the outputs go: per prompt i, sample-i.mp4, the lossless sample-i.safetensors (the sampled
    latents [C, T, H, W], normalised as WanPipeline's output_type="latent", prompt in the metadata) and
    the decoded frames as sample-i/frame-0000.png, ..."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    precision: Literal["float32", "bfloat16"] = "bfloat16"
    """Compute dtype."""
    fps: int = 16
    """Frame rate of the mp4 files."""
    use_ema: bool = True
    """From a checkpoint, sample with the EMA weights when it has them."""
    vsa_sparsity: float = -1.0
    """Sample with VSA (fvfunc.ops.vsa) at this sparsity, with the model's to_gate_compress gates (none:
    no coarse branch, as zero gates); negative: dense attention, or for a checkpoint of a training.attention
    'vsa' run, VSA at that run's target training.vsa_sparsity."""
    text_len: int = 512
    """Prompt embeddings are padded to this many tokens."""




@dataclass(frozen=True)
class ExportRun:
    """Export a run's checkpoint as a diffusers pipeline folder, as a run exports its last step."""

    checkpoint: str = ""
    """A run's checkpoint folder (RUN/checkpoint-N), checked against its checksums before it is read."""
    output: str = ""
    """The folder to write: the student (its EMA when kept) as a pipeline folder of its source's kind
    (WanPipeline.from_pretrained loads it), a LoRA student merged with its adapters in lora/. A folder
    already there is replaced only when it is an export (it holds transformer/)."""
    use_ema: bool = True
    """Export the student's EMA when the run kept one (--no-use-ema: the trained weights)."""
    dtype: Literal["", "source", "float32", "bfloat16"] = ""
    """The transformer's dtype: '' the run's training.export_dtype, 'source' the student folder's."""


@dataclass(frozen=True)
class PreprocessRun:
    """Encode clips and captions (or prompts) into FastVideo's parquet with a pipeline's own VAE and umT5."""

    model: str = ""
    """The diffusers pipeline folder whose vae/ (AutoencoderKLWan: Wan2.1's, or Wan2.2's for TI2V),
    text_encoder/ (umT5) and tokenizer/ encode the data. An image-to-video folder's clips also get
    FastVideo's i2v columns, as its pipeline makes them from the clip's first frame: first_frame_latent
    (Wan2.1 I2V, Wan2.2 I2V-A14B and TI2V) and, with the image_encoder/ and image_processor/ of Wan2.1
    I2V, clip_feature; FLF2V's of the clip's first and last frames."""
    videos: str = ""
    """The folder of the clips (videos, or images as one-frame clips) the caption file names."""
    captions: str = ""
    """The captions: FastVideo's videos2caption.json ([{"path": ..., "cap": [...]}], the first caption
    used), a .jsonl of {"video": ..., "caption": ...} or a .csv with a video,caption header; paths
    relative to videos. Writes FastVideo's t2v schema."""
    prompts: str = ""
    """Prompts instead of clips, for data-free DMD2: a .txt file of one prompt a line or a JSON list;
    writes FastVideo's text-only schema."""
    negative_prompt: str | None = None
    """Also write this prompt's umT5 embedding to OUTPUT/negative_prompt.safetensors, for
    --method.negative-prompt-embedding and sample's --negative-prompt-embedding ("" is WanPipeline's
    default). Alone (no clips, no prompts) it writes only that file."""
    output: str = ""
    """The output folder: data-r<rank>-<n>.parquet files, preprocess.json (the settings; a rerun continues
    only with the same ones), skipped.jsonl (the clips skipped, with why)."""
    height: int = 480
    """Frame height after the resize and centre crop."""
    width: int = 832
    """Frame width after the resize and centre crop."""
    num_frames: int = 81
    """Frames a clip keeps, from its start (1 + a multiple of the VAE's 4); a shorter clip is skipped."""
    fps: float = 16.0
    """The frame rate clips are resampled to (0: each clip's own)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Stored dtype of latents and embeddings (FastVideo's own reader assumes float32; fvfunc reads both)."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the VAE and umT5."""
    image_condition: bool = True
    """Write an image-to-video model's i2v columns (above). --no-image-condition writes the t2v columns
    only: Wan2.2 TI2V then trains text-to-video (the other image-to-video models need the columns)."""
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    """Encode frames in tiles (diffusers' enable_tiling) to bound memory; auto: above 480x832 pixels."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:N."""
    rows_per_group: int = 1
    """Rows per parquet row group (one: a shuffled read decodes only its own row)."""
    file_mb: float = 512.0
    """A file is closed once its tensors reach this many MiB (a killed run loses at most one file's work)."""
    file_rows: int = 0
    """Also close a file after this many rows (0: no limit)."""
