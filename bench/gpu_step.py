"""GPU benchmark: fvfunc's Wan2.1-1.3B forward, finetune step, DMD2 step and 4-step SDE sampling,
against diffusers' WanTransformer3DModel measured in the same run.

    python bench/gpu_step.py            # one H100: the whole benchmark (about 5 minutes)
    python bench/gpu_step.py --tiny     # the same code paths on a tiny model (CPU or GPU smoke test)
    python bench/gpu_step.py --only forward,finetune,dmd2,vsa --skip-small --skip-diffusers   # VSA vs dense

The vsa section (issue 20) measures, at each --vsa sparsity on the large latents: fvfunc's VSA op alone
(fastvideo-kernel on CUDA, fvfunc.ops.vsa's reference on the CPU, where --tiny runs it on 8 ragged cubes),
the forward, the finetune step and the DMD2 step (a VSA student with a dense teacher and critic, FastVideo's
DMD2, or --vsa-roles all), with VSA's gates in the params; the dense rows (FA4) of the same run compare.

Random-init weights at the 1.3B config (dim 1536, 30 layers, 12 heads, FFN 8960, text 4096, freq
256), batch 1, latents 16x21x60x104 (32,760 tokens) and 16x21x30x52, text 512x4096. Every figure is
the median of timed repeats after warm-up, timed with CUDA events; peak memory is the allocator's
high-water mark over the timed repeats; TFLOP/s counts model FLOPs (a backward pass as twice its
forward, recomputation not counted). fvfunc runs bf16 compute, FlashAttention-4 self-attention where
the flash-attn-4 package and a Hopper/Blackwell GPU are there (cuDNN otherwise), remat="attention",
compiled blocks and donated optimizer buffers; diffusers runs its defaults (SDPA's own backend
choice), with gradient checkpointing wherever it trains. The DMD2 rows run both implementations over
the same steps (same keys, so the same rollout lengths k) and report the mean step.
Prints one table and appends it to bench/RESULTS.md (unless --tiny or --no-append).
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))



import configs  # noqa: E402
from fvfunc import lora, optim, random, runner  # noqa: E402
from fvfunc.autodiff import value_and_grad  # noqa: E402
from fvfunc.losses import dmd2, flow_matching  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.ops import vsa  # noqa: E402
from fvfunc.ops.attention import attention, fa4_problem  # noqa: E402
from fvfunc.samplers import sample, timesteps_to_sigmas  # noqa: E402
from fvfunc.testing import dmd2_reference, tiny  # noqa: E402

WAN_1_3B = wan.WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                         text_dim=4096, freq_dim=256, in_channels=16, out_channels=16)
WAN22_TI2V_5B = wan.WanConfig(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30,
                              text_dim=4096, freq_dim=256, in_channels=48, out_channels=48, expand_timesteps=True)
"""Wan2.2-TI2V-5B's transformer config (its 704x1280x121 videos are 48 x 31 x 44 x 80 latents)."""
STEPS = (1000, 750, 500, 250)
GIB = 2**30


# ------------------------------------------------------------------------------------ measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Clock:
    """Seconds of device work between start() and stop(): CUDA events, or the host clock on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def stop(self):
        """An object whose .seconds() is read after the device finished."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            begin = self.begin
            return lambda: begin.elapsed_time(end) / 1e3
        t = time.perf_counter() - self.t0
        return lambda: t


def measure(fn, device, warmup: int, reps: int):
    """(median seconds, every time, peak GiB over the timed repeats) of fn()."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        c = Clock(device).start()
        fn()
        times.append(c.stop())
        sync(device)
    times = [t() for t in times]
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    return statistics.median(times), times, peak


class Calls:
    """Wraps a Model's apply to time every call (role, grad mode, batch) with device events."""

    def __init__(self, device):
        self.device, self.records = device, []

    def wrap(self, role, apply):
        def timed(params, x, t, context):
            c = Clock(self.device).start()
            out = apply(params, x, t, context)
            self.records.append((role, torch.is_grad_enabled(), x.shape[0], c.stop()))
            return out
        return timed

    def take(self):
        records = [(role, grad, batch, t()) for role, grad, batch, t in self.records]
        self.records = []
        return records


def forward_flops(cfg: wan.WanConfig, tokens: int, text_len: int, kept: float = 1.0) -> float:
    """Model FLOPs of one forward of one sample (2 per multiply-add); `kept`: the share of the key cubes
    VSA's fine attention runs on (its gate projection and cube-mean attention counted too)."""
    D, F_, S, L = cfg.dim, cfg.ffn_dim, tokens, text_len
    patch = cfg.in_channels * 4
    vsa_extra = 0 if kept == 1.0 else 2 * S * D * D + 4 * (S / 64) ** 2 * D  # gate; coarse attention
    layer = (8 * S * D * D            # self-attention q, k, v, o
             + vsa_extra
             + 4 * S * S * D * kept   # softmax(q k^T) v
             + 4 * S * D * D          # cross-attention q, o
             + 4 * L * D * D          # cross-attention k, v (text tokens)
             + 4 * S * L * D          # cross-attention scores and values
             + 4 * S * D * F_)        # FFN
    embed = 2 * S * patch * D + 2 * L * (cfg.text_dim * D + D * D) + 2 * S * D * patch
    return cfg.num_layers * layer + embed


# ----------------------------------------------------------------------------------- the models


def fvfunc_apply(cfg, opts, sparsity=None):
    """fvfunc's bf16 forward with the bench's options; with `sparsity`, VSA self-attention at it
    (fastvideo-kernel on CUDA, the reference on the CPU), cross-attention on the dense backend."""
    return functools.partial(_apply, cfg, opts, sparsity)


def _apply(cfg, opts, sparsity, params, x, t, context):
    vsa_options = {} if sparsity is None else {"attention": "vsa", "vsa_sparsity": sparsity,
                                               "vsa_dense": opts.attention}
    return runner.apply(wan.FAMILY, params, cfg, x, t, context, dtype=torch.bfloat16,
                        **{"attention": opts.attention, **vsa_options}, remat=opts.remat,
                        remat_fraction=opts.remat_fraction, compile=opts.compile)


def kept_share(latent, sparsity) -> float:
    """The share of key cubes VSA's fine attention keeps at `sparsity` on `latent`'s token grid (1 dense)."""
    if sparsity is None:
        return 1.0
    n = vsa.num_cubes((latent[1], latent[2] // 2, latent[3] // 2))
    return vsa.topk(sparsity, n) / n


def vsa_name(sparsity) -> str:
    return "" if sparsity is None else f"VSA {sparsity:g} "


def diffusers_module(cfg, params, dtype, device):
    """A WanTransformer3DModel holding `params`; in bf16 it keeps diffusers' fp32 modules in fp32,
    as `from_pretrained(..., torch_dtype=torch.bfloat16)` does."""
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in wan.config_to_dict(cfg).items() if not k.startswith("_")}
    with torch.device(device):
        module = WanTransformer3DModel(**kwargs)
    module.load_state_dict(params)
    if dtype != torch.float32:
        keep = module._keep_in_fp32_modules or []
        for name, p in module.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
    return module


def peft_lora(module, rank):
    """peft LoRA layers (rank `rank`, alpha = rank, B = 0) on fvfunc's default LoRA targets, only they
    trainable, kept in fp32 as fvfunc keeps its adapters."""
    from peft import LoraConfig

    module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(configs.LoraConfig().targets)))
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def inputs(cfg, latent, text_len, device, batch=1, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, *latent, generator=g, device=device)
    text = torch.randn(batch, text_len, cfg.text_dim, generator=g, device=device)
    return x, text


# ------------------------------------------------------------------------------------- sections


class Bench:
    def __init__(self, args, cfg, device):
        self.args, self.cfg, self.device = args, cfg, device
        self.rows = []  # (section, name, seconds, peak GiB, TFLOP/s, note)
        self.started = time.perf_counter()
        self.notes = []

    def row(self, section, name, seconds, peak=float("nan"), flops=None, note=""):
        tflops = flops / seconds / 1e12 if flops and seconds else float("nan")
        self.rows.append((section, name, seconds, peak, tflops, note))
        print(f"  {name}: {seconds:.4f} s, peak {peak:.2f} GiB, {tflops:.0f} TFLOP/s {note}", flush=True)

    def run(self, title, fn, *a):
        """fn(*a), its failure recorded as a row of the section a[-1] (the label)."""
        print(f"== {title}", flush=True)
        if time.perf_counter() - self.started > self.args.budget:
            self.rows.append((a[-1], f"{title}: SKIPPED", float("nan"), float("nan"), float("nan"),
                              f"over the --budget of {self.args.budget:.0f} s"))
            return
        t0 = time.perf_counter()
        try:
            fn(*a)
        except Exception as e:  # one failing section must not hide the others
            msg = "OOM" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
            self.rows.append((a[-1], f"{title}: FAILED", float("nan"), float("nan"), float("nan"), msg))
        finally:
            free(self.device)
        print(f"   ({time.perf_counter() - t0:.0f} s wall)", flush=True)

    # -- attention kernels alone

    def attention_kernels(self, tokens, keys, label):
        """Each SDPA backend alone on the model's layout, [B, S, H, Dh] seen as [B, H, S, Dh]:
        self-attention (keys = tokens) or the cross-attention to `keys` text tokens."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        heads, hd = self.cfg.num_attention_heads, self.cfg.attention_head_dim
        q, k, v = (torch.randn(1, n, heads, hd, device=self.device, dtype=torch.bfloat16).transpose(1, 2)
                   .requires_grad_() for n in (tokens, keys, keys))
        what = "self-attention" if keys == tokens else f"cross-attention to {keys}"
        flops = 4 * tokens * keys * heads * hd
        for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]:
            if name == "math" and keys == tokens:
                continue  # S x S scores in memory: tens of GB
            try:
                with sdpa_kernel([backend]):
                    with torch.no_grad():
                        fwd, _, _ = measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                            self.device, 2, 5)
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    grad = torch.randn_like(out)

                    def fb(grad=grad):
                        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                        torch.autograd.grad(o, (q, k, v), grad)
                    both, _, _ = measure(fb, self.device, 2, 5)
                self.row("attention", f"SDPA {name} {what}: forward x30 layers", fwd * 30, flops=flops * 30)
                self.row("attention", f"SDPA {name} {what}: backward x30 layers", (both - fwd) * 30,
                         flops=2.5 * flops * 30, note="(bwd FLOPs counted as 2.5x fwd, as FlashAttention)")
            except Exception as e:
                print(f"  {name}: unavailable ({type(e).__name__}: {str(e)[:120]})")
        if fa4_problem(self.device):
            print(f"  fa4: unavailable ({fa4_problem(self.device)})")
            return
        # FlashAttention-4 through fvfunc's op, on the model's own [B, S, H, Dh] layout
        q, k, v = (a.detach().transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))
        with torch.no_grad():
            fwd, _, _ = measure(lambda: attention(q, k, v, "fa4"), self.device, 2, 5)
            err = (attention(q, k, v, "fa4").float() - attention(q, k, v, "cudnn").float()).abs().max().item()
        grad = torch.randn_like(q)
        both, _, _ = measure(lambda: torch.autograd.grad(attention(q, k, v, "fa4"), (q, k, v), grad),
                             self.device, 2, 5)
        self.row("attention", f"FlashAttention-4 {what}: forward x30 layers", fwd * 30, flops=flops * 30,
                 note=f"max abs diff vs cudnn {err:.1e}")
        self.row("attention", f"FlashAttention-4 {what}: backward x30 layers", (both - fwd) * 30,
                 flops=2.5 * flops * 30)

    def vsa_kernel(self, latent, label):
        """fvfunc's VSA op alone (fastvideo-kernel, with fvfunc's tiling of the raster-order tokens) at each
        --vsa sparsity, forward and backward, on the model's [B, S, H, Dh] layout, x30 layers."""
        grid = (latent[1], latent[2] // 2, latent[3] // 2)
        heads, hd = self.cfg.num_attention_heads, self.cfg.attention_head_dim
        tokens = grid[0] * grid[1] * grid[2]
        q, k, v, g = (torch.randn(1, tokens, heads, hd, device=self.device, dtype=torch.bfloat16).requires_grad_()
                      for _ in range(4))
        path = "fastvideo-kernel" if vsa.uses_kernel(q) else "reference (no kernel here)"
        for sparsity in self.args.vsa:
            flops = 4 * tokens * tokens * heads * hd * kept_share(latent, sparsity)
            with torch.no_grad():
                fwd, _, _ = measure(lambda sp=sparsity: vsa.attend(q, k, v, g, grid, sp), self.device, 2, 5)
            grad = torch.randn_like(q)
            both, _, peak = measure(lambda sp=sparsity, dy=grad: torch.autograd.grad(
                vsa.attend(q, k, v, g, grid, sp), (q, k, v, g), dy), self.device, 2, 5)
            self.row(label, f"VSA {sparsity:g} self-attention ({path}): forward x30 layers", fwd * 30, peak,
                     flops * 30)
            self.row(label, f"VSA {sparsity:g} self-attention ({path}): forward + backward x30 layers", both * 30,
                     peak, 3.5 * flops * 30)

    # -- diffusers

    def diffusers_forward_and_grad(self, latent, label):
        cfg, dev, a = self.cfg, self.device, self.args
        tokens = latent[1] * latent[2] * latent[3] // 4
        flops = forward_flops(cfg, tokens, a.text_len)
        params = wan.init(cfg, random.key(0), device=dev)
        module = diffusers_module(cfg, params, torch.bfloat16, dev)
        del params
        x, text = (v.to(torch.bfloat16) for v in inputs(cfg, latent, a.text_len, dev))  # as its pipeline does
        t = torch.tensor([500.0], device=dev)
        with torch.no_grad():
            s, _, peak = measure(lambda: module(x, t, text, return_dict=False)[0], dev, a.warmup, a.reps)
        self.row(label, "diffusers forward (bf16)", s, peak, flops)
        module.enable_gradient_checkpointing()
        module.train()

        def fwd_bwd():
            out = module(x, t, text, return_dict=False)[0]
            out.float().square().mean().backward()
            module.zero_grad(set_to_none=True)
        s, _, peak = measure(fwd_bwd, dev, a.warmup, a.reps)
        self.row(label, "diffusers forward + backward (bf16, gradient checkpointing)", s, peak, 3 * flops)

    def diffusers_train_step(self, latent, label):
        """fp32 master weights, autocast bf16, gradient checkpointing, torch.optim.AdamW(fused)."""
        cfg, dev, a = self.cfg, self.device, self.args
        tokens = latent[1] * latent[2] * latent[3] // 4
        params = wan.init(cfg, random.key(0), device=dev)
        module = diffusers_module(cfg, params, torch.float32, dev)
        del params
        module.enable_gradient_checkpointing()
        module.train()
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5, weight_decay=0.01, fused=dev.type == "cuda")
        x0, text = inputs(cfg, latent, a.text_len, dev)
        noise = torch.randn_like(x0)
        sigma = torch.tensor([0.6], device=dev)

        def step():
            x_t = (1 - sigma) * x0 + sigma * noise
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                v = module(x_t, sigma * 1000, text, return_dict=False)[0]
            loss = torch.mean((v.float() - (noise - x0)) ** 2)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        s, _, peak = measure(step, dev, a.warmup, a.reps)
        self.row(label, "diffusers finetune step (fp32 master, autocast bf16, GC, AdamW fused)", s, peak,
                 3 * forward_flops(cfg, tokens, a.text_len))

    # -- fvfunc

    def fvfunc_forward_and_sampling(self, latent, label, with_sampling, sparsity=None):
        cfg, dev, a = self.cfg, self.device, self.args
        tokens = latent[1] * latent[2] * latent[3] // 4
        flops = forward_flops(cfg, tokens, a.text_len, kept_share(latent, sparsity))
        params = wan.init(self.model_cfg(sparsity), random.key(0), dtype=torch.bfloat16, device=dev)
        apply = fvfunc_apply(cfg, a, sparsity)
        x, text = inputs(cfg, latent, a.text_len, dev)
        t = torch.tensor([500.0], device=dev)
        with torch.no_grad():
            t0 = time.perf_counter()
            apply(params, x, t, text)
            sync(dev)
            print(f"  first call (compiles): {time.perf_counter() - t0:.1f} s")
            s, _, peak = measure(lambda: apply(params, x, t, text), dev, a.warmup, a.reps)
        self.row(label, f"{vsa_name(sparsity)}fvfunc forward (bf16)", s, peak, flops)
        if a.profile:
            self.profile(lambda: apply(params, x, t, text), f"{vsa_name(sparsity)}fvfunc forward {label}",
                         no_grad=True)
        if not with_sampling:
            return
        sigmas = timesteps_to_sigmas(STEPS)

        def sde():
            return sample(lambda xx, tt: apply(params, xx, tt, text), x, sigmas, "sde", random.key(1))
        with torch.no_grad():
            s4, _, peak = measure(sde, dev, 1, a.reps)
        self.row(label, f"fvfunc 4-step SDE sampling ({s4 / s:.2f}x forward)", s4, peak, 4 * flops)
        self.sampling_ratio = s4 / s

    def fvfunc_forward_with(self, backend, latent, label):
        """The fvfunc forward row again with another attention backend."""
        cfg, dev, a = self.cfg, self.device, self.args
        flops = forward_flops(cfg, latent[1] * latent[2] * latent[3] // 4, a.text_len)
        params = wan.init(cfg, random.key(0), dtype=torch.bfloat16, device=dev)
        apply = fvfunc_apply(cfg, argparse.Namespace(**{**vars(a), "attention": backend}))
        x, text = inputs(cfg, latent, a.text_len, dev)
        t = torch.tensor([500.0], device=dev)
        with torch.no_grad():
            s, _, peak = measure(lambda: apply(params, x, t, text), dev, a.warmup, a.reps)
        self.row(label, f"  fvfunc forward (bf16) with attention={backend}", s, peak, flops)

    def model_cfg(self, sparsity):
        """The model's config, with FastVideo's VSA gates (to_gate_compress) when it runs VSA."""
        return self.cfg if sparsity is None else wan.vsa_gated(self.cfg)

    def fvfunc_finetune(self, latent, label, sparsity=None):
        cfg, dev, a = self.cfg, self.device, self.args
        tokens = latent[1] * latent[2] * latent[3] // 4
        flops = forward_flops(cfg, tokens, a.text_len, kept_share(latent, sparsity))
        name = vsa_name(sparsity)
        training = configs.TrainingConfig(lr=1e-5, max_steps=1000, precision="bfloat16",
                                          attention=a.attention, remat=a.remat,
                                          remat_fraction=a.remat_fraction, donate=True)
        method_cfg = configs.FinetuneConfig()
        calls = Calls(dev)
        apply = calls.wrap("student", fvfunc_apply(cfg, a, sparsity))
        run = tiny.run_of(flow_matching.SPEC, method_cfg, training)
        method = flow_matching.make(run, {"student": tiny.role(apply, cfg.in_channels)})
        x0, text = inputs(cfg, latent, a.text_len, dev)
        batch = {"latents": x0, "text": text, "sample_index": torch.arange(1)}
        holder = {"state": method.init({"student": wan.init(self.model_cfg(sparsity), random.key(0), device=dev)},
                                       random.key(1))}

        def step():
            holder["state"], _ = method.step(holder["state"], batch)
        t0 = time.perf_counter()
        step()
        sync(dev)
        print(f"  first step (compiles): {time.perf_counter() - t0:.1f} s")
        calls.take()
        s, _, peak = measure(step, dev, a.warmup, a.reps)
        fwd = statistics.median(t for _, grad, _, t in calls.take() if grad)
        self.row(label, f"{name}fvfunc finetune step (fp32 master, bf16, fwd + bwd + AdamW)", s, peak, 3 * flops)
        self.row(label, "  of which forward (with grad)", fwd, flops=flops)

        # the step's parts alone: forward + backward, then clip + AdamW
        student = holder["state"].params["student"]
        noise, sigma, keep = flow_matching.draw(random.key(2), batch["sample_index"], x0.shape[1:],
                                                method_cfg, dev)
        loss_batch = dict(batch, noise=noise, sigma=sigma, keep_text=keep)
        grad_fn = value_and_grad(flow_matching.loss, training.grad_transform)
        out = {}

        def fwd_bwd():
            out["grads"] = grad_fn(student, loss_batch, apply, method_cfg)[0]
        s_fb, _, peak_fb = measure(fwd_bwd, dev, 1, a.reps)
        self.row(label, "  of which forward + backward", s_fb, peak_fb, 3 * flops)
        grads = out.pop("grads")
        opt, _ = optim.for_role(training, training.lr, training.betas, training.weight_decay, training.max_steps)
        opt_state = holder["state"].opt["student"]
        box = {"p": student, "s": opt_state}

        def adamw():
            box["p"], box["s"], _ = optim.apply_gradients(opt, box["p"], grads, box["s"], training.max_grad_norm)
        s_u, _, _ = measure(adamw, dev, 1, a.reps)
        self.row(label, "  of which clip + AdamW (fused, donated)", s_u)
        if a.profile:
            self.profile(step, f"{name}fvfunc finetune step {label}")

    def dmd2_roles(self, sparse=()):
        """fp32 student and critic (trainable masters), a bf16 teacher, the roles in `sparse` with VSA's gates;
        with --dmd2-lora R, a bf16 base (the teacher) and fresh rank-R adapters of the student and the critic
        (the default targets)."""
        dev, rank = self.device, self.args.dmd2_lora
        cfg = {r: self.model_cfg(0.0 if r in sparse else None) for r in ("student", "teacher", "critic")}
        teacher = wan.init(cfg["teacher"], random.key(1), dtype=torch.bfloat16, device=dev)
        if rank:
            if sparse:
                raise ValueError("--dmd2-lora with VSA rows is not measured (a LoRA student trains no gate)")
            shapes = wan.FAMILY.param_shapes(self.cfg)
            names = lora.select(shapes, configs.LoraConfig().targets, rank, "lora")
            return {"student": lora.init(shapes, names, rank, random.key(0), dev), "teacher": teacher,
                    "critic": lora.init(shapes, names, rank, random.key(2), dev)}
        return {"student": wan.init(cfg["student"], random.key(0), device=dev), "teacher": teacher,
                "critic": wan.init(cfg["critic"], random.key(2), device=dev)}

    def dmd2_apply(self, role, base, sparsity=None):
        """fvfunc's apply of a DMD2 role (VSA at `sparsity`): the whole params, or (--dmd2-lora) the adapters on
        `base`."""
        apply = fvfunc_apply(self.cfg, self.args, sparsity)
        return lora.make_apply(apply, base, 1.0) if self.args.dmd2_lora and role != "teacher" else apply

    def dmd2_configs(self, latent):
        a = self.args
        method_cfg = configs.DMD2Config(dmd_denoising_steps=STEPS, rollout_mode="simulate",
                                        generator_update_interval=1, latent_shape=tuple(latent[1:]))
        training = configs.TrainingConfig(lr=2e-6, betas=(0.0, 0.999), max_steps=1000, precision="bfloat16",
                                          attention=a.attention, remat=a.remat,
                                          remat_fraction=a.remat_fraction, donate=True)
        return method_cfg, training

    def fvfunc_dmd2(self, latent, label, sparsity=None):
        cfg, dev, a = self.cfg, self.device, self.args
        tokens = latent[1] * latent[2] * latent[3] // 4
        method_cfg, training = self.dmd2_configs(latent)
        calls = Calls(dev)
        # VSA: the student sparse, teacher and critic dense (FastVideo's DMD2), or every role (--vsa-roles all)
        sparse = () if sparsity is None else (("student",) if a.vsa_roles == "student" else dmd2.SPEC.roles(None))
        params = self.dmd2_roles(sparse)
        models = {r: tiny.role(calls.wrap(r, self.dmd2_apply(r, params["teacher"], sparsity if r in sparse else None)),
                               cfg.in_channels) for r in dmd2.SPEC.roles(None)}
        flops_of = {r: forward_flops(cfg, tokens, a.text_len, kept_share(latent, sparsity if r in sparse else None))
                    for r in models}
        method = dmd2.make(tiny.run_of(dmd2.SPEC, method_cfg, training), models)
        _, text = inputs(cfg, latent, a.text_len, dev)
        batch = {"text": text, "sample_index": torch.arange(1)}
        holder = {"state": method.init(params, random.key(7))}
        del params
        for _ in range(a.dmd2_warmup):
            t0 = time.perf_counter()
            holder["state"], _ = method.step(holder["state"], batch)
            sync(dev)
            print(f"  warm-up step: {time.perf_counter() - t0:.1f} s")
        calls.take()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        totals, parts, step_flops = [], [], []
        for _ in range(a.dmd2_reps):
            c = Clock(dev).start()
            holder["state"], _ = method.step(holder["state"], batch)
            total = c.stop()
            sync(dev)
            records = calls.take()
            totals.append(total())
            parts.append(records)
            step_flops.append(sum(flops_of[r] * n * (3 if grad else 1) for r, grad, n, _ in records))
        peak = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else float("nan")
        mean = statistics.mean(totals)
        rollouts = [sum(1 for r, g, _, _ in rec if r == "student" and not g) - 1 for rec in parts]
        which = "" if sparsity is None else f"{vsa_name(sparsity)}({'student' if len(sparse) == 1 else 'all roles'}) "
        kind = f", LoRA rank {a.dmd2_lora} student + critic on one bf16 base" if a.dmd2_lora else ""
        self.row(label, f"{which}fvfunc DMD2 step (3 roles, simulate, interval 1{kind}), mean", mean, peak,
                 statistics.mean(step_flops), note=f"student rollout forwards per step {rollouts}")
        if sparsity is None:
            self.dmd2_fvfunc = (mean, rollouts)

        def part(role, grad):
            return statistics.mean(sum(t for r, g, _, t in rec if r == role and g == grad) for rec in parts)
        applies = {("student", False): "student forwards, no grad (rollouts + x0')",
                   ("student", True): "student forward with grad",
                   ("teacher", False): "teacher forward (cond + uncond, batch 2)",
                   ("critic", False): "critic forward, no grad (fake score)",
                   ("critic", True): "critic forward with grad"}
        spent = 0.0
        for (role, grad), name in applies.items():
            s = part(role, grad)
            spent += s
            self.row(label, f"  of which {name}", s)
        self.row(label, "  of which 2 backward passes + 2 clip/AdamW + draws", mean - spent)
        # the step's cost rides on the draws (k uniform in 0..n-1 per rollout; this bench: batch 1, interval 1, so
        # two rollouts a step):
        # the step at the expected rollout count, from this run's own cost of one no-grad student forward
        expected, drawn = len(STEPS) - 1, statistics.mean(rollouts)
        per_forward = part("student", False) / (drawn + 1)
        self.row(label, f"  step at the expected {expected} rollout forwards (this run's mean {drawn:.2f}; "
                 f"{per_forward:.3f} s a forward)", mean + (expected - drawn) * per_forward)

    def reference_dmd2(self, latent, label):
        cfg, dev, a = self.cfg, self.device, self.args
        method_cfg, training = self.dmd2_configs(latent)
        if a.dmd2_lora:  # three bf16 modules of the teacher's weights, peft adapters on student and critic
            base = self.dmd2_roles()["teacher"]
            modules = {r: diffusers_module(cfg, base, torch.bfloat16, dev) for r in ("student", "teacher", "critic")}
            del base
            for r in ("student", "critic"):
                peft_lora(modules[r], a.dmd2_lora)
        else:
            roles = self.dmd2_roles()
            modules = {r: diffusers_module(cfg, p, torch.bfloat16 if r == "teacher" else torch.float32, dev)
                       for r, p in roles.items()}
            del roles
        for m in modules.values():
            m.train()
        step = dmd2_reference.make(modules, method_cfg, training, random.key(7))
        _, text = inputs(cfg, latent, a.text_len, dev)
        batch = {"text": text, "sample_index": torch.arange(1)}
        for i in range(a.dmd2_warmup):
            step(i, batch)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        totals, rollouts = [], []
        for i in range(a.dmd2_warmup, a.dmd2_warmup + a.dmd2_reps):
            c = Clock(dev).start()
            m = step(i, batch)
            total = c.stop()
            sync(dev)
            totals.append(total())
            rollouts.append(sum(m.get("generator_k", [])) + sum(m["critic_k"]))
        peak = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else float("nan")
        mean = statistics.mean(totals)
        kind = f", peft LoRA rank {a.dmd2_lora} on 3 bf16 modules" if a.dmd2_lora else ""
        self.row(label, f"diffusers-module DMD2 reference step (bench/dmd2_reference.py{kind}), mean", mean, peak,
                 note=f"student rollout forwards per step {rollouts}")
        self.dmd2_reference = (mean, rollouts)

    # -- profile

    def profile(self, fn, title, no_grad=False):
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof, torch.set_grad_enabled(not no_grad):
            fn()
            sync(self.device)
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
        text = f"### profile: {title}\n\n```\n{table}\n```\n"
        if self.device.type == "cuda":  # where the GPU waits ("Command Buffer Full" is not kernel time)
            import gzip
            import re
            import shutil
            import tempfile

            import trace_gaps
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                prof.export_chrome_trace(f.name)
                text += f"\n{trace_gaps.analyse(f.name, top=25)}\n"
                if self.args.trace_dir:  # the trace itself, gzipped, for a look at it elsewhere
                    name = re.sub(r"[^A-Za-z0-9.]+", "_", title).strip("_") + ".json.gz"
                    os.makedirs(self.args.trace_dir, exist_ok=True)
                    with open(f.name, "rb") as src, gzip.open(os.path.join(self.args.trace_dir, name), "wb") as dst:
                        shutil.copyfileobj(src, dst)
        print(text, flush=True)
        self.notes.append(text)


# ------------------------------------------------------------------------------------------ main


def versions(device):
    v = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("diffusers", "fastvideo-kernel"):  # (without diffusers its rows fail and the rest runs)
        try:
            v[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device.type == "cuda":
        v["cuda"] = torch.version.cuda
        v["cudnn"] = str(torch.backends.cudnn.version())
        try:
            import triton
            v["triton"] = triton.__version__
        except ImportError:
            pass
        try:
            v["flash-attn-4"] = importlib.metadata.version("flash-attn-4")
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


def table(rows):
    lines = ["| section | measurement | median s | peak GiB | TFLOP/s | note |", "|---|---|---|---|---|---|"]
    for section, name, s, peak, tf, note in rows:
        def f(x, fmt):
            return "" if x != x else format(x, fmt)  # NaN -> empty
        lines.append(f"| {section} | {name} | {f(s, '.3f')} | {f(peak, '.1f')} | {f(tf, '.0f')} | {note} |")
    return "\n".join(lines)


def targets(b: Bench) -> list[str]:
    """The issue's done-when checks, from this run's rows."""
    def find(prefix, section):
        for sec, name, s, peak, _, _ in b.rows:
            if sec == section and name.startswith(prefix):
                return s, peak
        return float("nan"), float("nan")
    big = b.labels[0]
    out = []
    fwd, _ = find("fvfunc forward", big)
    out.append(f"1. fvfunc forward {fwd:.3f} s (target <= 0.50 s): {'met' if fwd <= 0.50 else 'MISSED'}")
    ft, ft_peak = find("fvfunc finetune step", big)
    ok = ft <= 1.9 and ft_peak < 40
    out.append(f"2. fvfunc finetune step {ft:.3f} s at {ft_peak:.1f} GiB (target <= 1.9 s, < 40 GiB): "
               f"{'met' if ok else 'MISSED'}")
    ours = getattr(b, "dmd2_fvfunc", (float("nan"), None))[0]
    ref = getattr(b, "dmd2_reference", (float("nan"), None))[0]
    speedup = ref / ours
    out.append(f"3. fvfunc DMD2 step {ours:.3f} s vs diffusers-module reference {ref:.3f} s: {speedup:.2f}x "
               f"(target >= 1.5x, on one card): {'met' if speedup >= 1.5 else 'MISSED'}")
    ratio = getattr(b, "sampling_ratio", float("nan"))
    out.append(f"4. 4-step SDE sampling {ratio:.2f}x the forward (target <= 4.2x): "
               f"{'met' if ratio <= 4.2 else 'MISSED'}")
    return out + vsa_targets(b)


def vsa_targets(b: Bench) -> list[str]:
    """Issue 20's checks, at sparsity 0.9 on the 32,760 tokens, from this run's VSA rows."""
    if 0.9 not in b.args.vsa:
        return []
    big, out = b.labels[0], []
    for prefix, target in (("VSA 0.9 fvfunc forward", 0.30), ("VSA 0.9 fvfunc finetune step", 1.0),
                           ("VSA 0.9 (", 4.0)):  # the DMD2 row: "(student)" or "(all roles)"
        found = [(n, s) for sec, n, s, *_ in b.rows if sec == big and n.startswith(prefix)]
        if not found:  # its section did not run (--only) or failed: no verdict
            continue
        name, s = found[0]
        out.append(f"VSA: {name.removeprefix('VSA 0.9 ').split(', mean')[0]} at sparsity 0.9 {s:.3f} s (target <= "
                   f"{target} s): {'met' if s <= target else 'MISSED'}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and latents: smoke-test every path")
    ap.add_argument("--model", default="wan2.1-1.3b", choices=("wan2.1-1.3b", "wan2.2-ti2v-5b"),
                    help="wan2.2-ti2v-5b: its config at 704x1280x121 (27,280 tokens; text-to-video use, one "
                         "timestep a sample), and a quarter of that")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default=None, help="fvfunc's attention backend (default on CUDA: fa4 where "
                    "it runs, else cudnn)")
    ap.add_argument("--also-attention", default="", help="comma-separated backends whose fvfunc forward is also "
                    "measured (e.g. cudnn), for a same-run comparison")
    ap.add_argument("--remat", default="attention", choices=runner.REMAT)
    ap.add_argument("--remat-fraction", type=float, default=1.0, help="share of blocks that remat")
    ap.add_argument("--compile", default=None, help="inductor | aot_eager | none (default: inductor on CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dmd2-warmup", type=int, default=2)
    ap.add_argument("--dmd2-reps", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated sections to run: attention, forward, "
                    "finetune, dmd2, vsa (or one of its parts: vsa-kernel, vsa-forward, vsa-finetune, vsa-dmd2) "
                    "(default: all)")
    ap.add_argument("--vsa", default="0.9,0.8", help="comma-separated VSA sparsities of the vsa section (forward, "
                    "finetune step, DMD2 step, the kernel alone, on the large latents); empty: none")
    ap.add_argument("--vsa-roles", default="student", choices=("student", "all"),
                    help="DMD2's VSA roles: the student (FastVideo's choice; teacher and critic dense) or all")
    ap.add_argument("--skip-small", action="store_true", help="only the 32,760-token latents")
    ap.add_argument("--skip-diffusers", action="store_true", help="no diffusers rows (fvfunc's dense and VSA only)")
    ap.add_argument("--dmd2-lora", type=int, default=0, metavar="RANK",
                    help="DMD2 rows with LoRA student and critic of this rank on one bf16 base (the teacher's); "
                    "the diffusers reference then has peft adapters on three bf16 modules")
    ap.add_argument("--budget", type=float, default=float("inf"),
                    help="seconds after which the remaining sections are skipped (the table still prints)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of a forward and a step")
    ap.add_argument("--trace-dir", default="", help="with --profile: also write each chrome trace there, gzipped")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--save", default="", help="also write the results section to this file")
    args = ap.parse_args()
    args.vsa = [float(x) for x in args.vsa.split(",") if x.strip()]
    device = torch.device(args.device)
    if device.type != "cuda":
        args.attention = args.attention or "auto"
    elif not args.attention:
        args.attention = "cudnn" if fa4_problem(device) else "fa4"
        print(f"attention: {args.attention} ({fa4_problem(device) or 'FlashAttention-4 runs here'})")
    compile_ = args.compile or ("inductor" if device.type == "cuda" else "none")
    args.compile = {"none": False, "inductor": True}.get(compile_, compile_)
    torch._dynamo.config.cache_size_limit = 64
    if args.tiny:
        cfg = tiny.tiny_config()
        args.text_len = 16
        latents = [(16, 5, 12, 12), (16, 3, 4, 4)]  # the large one: 8 ragged 4x4x4 cubes, for VSA
    elif args.model == "wan2.2-ti2v-5b":
        cfg = WAN22_TI2V_5B
        args.text_len = 512
        latents = [(48, 31, 44, 80), (48, 31, 22, 40)]
    else:
        cfg = WAN_1_3B
        args.text_len = 512
        latents = [(16, 21, 60, 104), (16, 21, 30, 52)]
    b = Bench(args, cfg, device)
    b.labels = [f"{x[1] * x[2] * x[3] // 4} tokens" for x in latents]
    big, small = latents
    only = set(filter(None, args.only.split(",")))

    def want(name):
        return not only or name in only
    started = time.perf_counter()
    print(f"config: {cfg}\nlatents {latents}, text {args.text_len}, device {device}, "
          f"attention {args.attention}, remat {args.remat} x{args.remat_fraction:g}, compile {compile_}", flush=True)
    if want("attention") and device.type == "cuda":
        tokens = big[1] * big[2] * big[3] // 4
        b.run("attention kernels", b.attention_kernels, tokens, tokens, "attention")
        b.run("attention kernels", b.attention_kernels, tokens, args.text_len, "attention")
    sizes = [(big, b.labels[0])] + ([(small, b.labels[1])] if not args.skip_small else [])
    for latent, label in sizes:
        if want("forward"):
            b.run(f"fvfunc forward {label}", b.fvfunc_forward_and_sampling, latent, label, latent is big)
            for other in filter(None, args.also_attention.split(",")):
                b.run(f"fvfunc forward {label}, attention {other}", b.fvfunc_forward_with, other, latent, label)
            if not args.skip_diffusers:
                b.run(f"diffusers forward/backward {label}", b.diffusers_forward_and_grad, latent, label)
        if want("finetune"):
            b.run(f"fvfunc finetune {label}", b.fvfunc_finetune, latent, label)
            if not args.skip_diffusers:
                b.run(f"diffusers finetune {label}", b.diffusers_train_step, latent, label)
        if want("dmd2") and latent is big:
            b.run(f"fvfunc DMD2 {label}", b.fvfunc_dmd2, big, label)
            if not args.skip_diffusers:
                b.run(f"diffusers DMD2 reference {label}", b.reference_dmd2, big, label)
        if latent is big and args.vsa:  # dense FA4 rows above, in the same run
            if want("vsa") or want("vsa-kernel"):
                b.run(f"VSA kernel {label}", b.vsa_kernel, big, label)
            for sp in args.vsa:
                if want("vsa") or want("vsa-forward"):
                    b.run(f"VSA {sp:g} fvfunc forward {label}", b.fvfunc_forward_and_sampling, big, label, False, sp)
                if want("vsa") or want("vsa-finetune"):
                    b.run(f"VSA {sp:g} fvfunc finetune {label}", b.fvfunc_finetune, big, label, sp)
                if want("vsa") or want("vsa-dmd2"):
                    b.run(f"VSA {sp:g} fvfunc DMD2 {label}", b.fvfunc_dmd2, big, label, sp)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    v = versions(device)
    command = "python bench/gpu_step.py " + " ".join(sys.argv[1:])
    checks = targets(b) if not only else (vsa_targets(b) if any(o.startswith("vsa") for o in only) else [])
    section = "\n".join([
        f"## {'Wan2.2-TI2V-5B' if args.model == 'wan2.2-ti2v-5b' else 'Wan2.1-1.3B'} forward / finetune / DMD2 / "
        "sampling on GPU vs diffusers"
        + (" (tiny smoke test)" if args.tiny else ""),
        "",
        f"- Card: {card}; date {datetime.date.today().isoformat()}; "
        + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        f"- Command: `{command}` ({time.perf_counter() - started:.0f} s wall, compile included).",
        f"- fvfunc: bf16 compute, attention={args.attention}, remat={args.remat} (fraction "
        f"{args.remat_fraction:g}), compile={compile_}, "
        "donate=True; diffusers: default attention, gradient checkpointing when training, AdamW(fused=True) "
        "on fp32 masters.",
        f"- Batch 1, latents {' and '.join('x'.join(map(str, x)) for x in latents)}, text {args.text_len}; "
        f"median of {args.reps} after {args.warmup} warm-up; DMD2: mean of {args.dmd2_reps} steps after "
        f"{args.dmd2_warmup}, the same steps (same rollout lengths) for both.",
        "",
        table(b.rows),
        "",
        *[f"- {c}" for c in checks],
        "",
    ])
    print("\n" + section, flush=True)
    if args.profile:
        section += "\n" + "\n".join(b.notes)
    if args.save:
        Path(args.save).write_text(section)
    if not (args.tiny or args.no_append or only):
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
