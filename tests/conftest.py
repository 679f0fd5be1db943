"""Shared fixtures: tiny Wan folders and tiny FastVideo-schema datasets, made by the tests."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # the suite runs under pytest-xdist on 2 cores


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """{"model": a tiny Wan pipeline folder with a VAE, "data": T2V parquet, "text": text-only parquet}."""
    from fvfunc import data
    from fvfunc.testing import tiny

    root = tmp_path_factory.mktemp("world")
    tiny.write_pipeline(root / "model", vae=True)
    g = torch.Generator().manual_seed(0)
    rows = [dict(id=f"s{i}", text_embedding=torch.randn(3 + i % 4, 32, generator=g),
                 latent=torch.randn(16, 2, 4, 4, generator=g), caption=f"clip {i}") for i in range(8)]
    data.write_parquet(root / "data" / "part-0.parquet", rows)
    data.write_parquet(root / "text" / "part-0.parquet", [{k: v for k, v in r.items() if k != "latent"}
                                                          for r in rows])
    return {"model": root / "model", "data": root / "data", "text": root / "text", "root": root}
