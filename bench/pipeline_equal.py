"""How far fvfunc's sampling is from diffusers' WanPipeline, now and with the rules it replaced.

    python bench/pipeline_equal.py        # about a minute on 2 CPU cores

A tiny random pipeline folder (Wan transformer, umT5 + word-level tokenizer, VAE, Wan2.1's UniPC
scheduler), two prompts, a negative prompt, guidance 4.5, fp32, the same initial latents. Rows: UniPC
at diffusers' integer timesteps (now) and at 1000 * sigma (before); Euler on
FlowMatchEulerDiscreteScheduler's own schedule (now) and on the UniPC schedule (before, the only one).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import SamplerConfig  # noqa: E402
from fvfunc import random  # noqa: E402
from fvfunc import samplers as S  # noqa: E402
from fvfunc.testing import tiny  # noqa: E402
from fvfunc.testing.pipeline import fvfunc_latents, rel, wan_pipeline_latents  # noqa: E402

PROMPTS = ["a cat runs on the beach", "a red bird flies over the sea at night"]
NEGATIVE, SCALE = "blurry low quality static", 4.5


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny.write_pipeline(Path(tmp) / "wan", vae=True, text_encoder=True)
        noise = random.normal(random.key(11), (2, 16, 2, 4, 6))
        print("| steps | UniPC now | UniPC at 1000 sigma | Euler, FlowMatch schedule | Euler, UniPC schedule |")
        print("|---|---|---|---|---|")
        for steps in (5, 20, 50):
            row = []
            unipc = SamplerConfig(kind="unipc", num_steps=steps, shift=3.0, guidance_scale=SCALE)
            euler = SamplerConfig(kind="ode", schedule="flow_match_euler", num_steps=steps, shift=3.0,
                                  guidance_scale=SCALE)
            for scheduler, cfg, old in (("unipc", unipc, False), ("unipc", unipc, True),
                                        ("flow_match_euler", euler, False), ("flow_match_euler", euler, True)):
                want = wan_pipeline_latents(folder, scheduler, PROMPTS, NEGATIVE, noise, steps, SCALE)
                if not old:
                    got = fvfunc_latents(folder, PROMPTS, NEGATIVE, noise, cfg)
                elif scheduler == "unipc":
                    walk = S.schedule(cfg)
                    got = fvfunc_latents(folder, PROMPTS, NEGATIVE, noise, cfg, timesteps=walk.sigmas[:-1] * 1000)
                else:
                    walk = S.schedule(SamplerConfig(kind="ode", num_steps=steps, shift=3.0))
                    got = fvfunc_latents(folder, PROMPTS, NEGATIVE, noise, cfg, timesteps=walk.sigmas[:-1] * 1000,
                                         sigmas=walk.sigmas)
                row.append(f"{rel(got, want):.1e}")
            print(f"| {steps} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
