"""Pure tensor functions. This package imports nothing else of fvfunc."""

from fvfunc.ops.attention import BACKENDS, attention
from fvfunc.ops.embed import timestep_embedding
from fvfunc.ops.linear import linear
from fvfunc.ops.norm import layer_norm, modulate, rms_norm
from fvfunc.ops.patch import patchify, unpatchify
from fvfunc.ops.rope import apply_rope, axis_dims, rope_3d

__all__ = ["BACKENDS", "attention", "timestep_embedding", "linear", "layer_norm", "modulate", "rms_norm",
           "patchify", "unpatchify", "apply_rope", "axis_dims", "rope_3d"]
