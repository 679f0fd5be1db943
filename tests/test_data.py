"""fvfunc.data against parquet files written the way FastVideo writes them (pyarrow by hand)."""

import json
import logging
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fvfunc import data
from fvfunc.data import T2V, TEXT_ONLY, DataError, Loader, ParquetDataset, epoch_order, parquet, write_parquet
from fvfunc.models import wan
from fvfunc.testing import tiny

C, T, H, W, D = 4, 2, 3, 5, 8
FASTVIDEO_T2V = ["id", "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype",
                 "text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype",
                 "file_name", "caption", "media_type", "width", "height", "num_frames", "duration_sec", "fps"]


def bf16_bytes(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes with round-to-nearest-even, in numpy (independent of torch)."""
    u = x.astype("<f4").view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype.removeprefix("torch.") == "bfloat16":
        return bf16_bytes(x)
    return x.astype("<f4" if dtype.removeprefix("torch.") == "float32" else "<f2").tobytes()


def expected(x: np.ndarray, dtype: str) -> torch.Tensor:
    """What the reader must return: the stored values, rounded the same way, as float32."""
    t = torch.from_numpy(x.astype(np.float32))
    rounded = {"float32": t, "float16": t.half().float(), "bfloat16": t.bfloat16().float()}
    return rounded[dtype.removeprefix("torch.")]


def make_rows(n, seed=0, prefix="s", text_dtype="torch.bfloat16", latent_dtype="float32"):
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "latent": rng.standard_normal((C, T, H, W)).astype(np.float32),
             "text": rng.standard_normal((int(rng.integers(1, 12)), D)).astype(np.float32),
             "caption": f"caption {prefix}{i}", "text_dtype": text_dtype, "latent_dtype": latent_dtype}
            for i in range(n)]


INT64, FLOAT64, BINARY = pa.int64(), pa.float64(), pa.binary()


def write_fastvideo(path, rows, latents=True, row_group_size=2, drop=(), int_type=INT64, float_type=FLOAT64,
                    binary=BINARY, **override):
    """A parquet file with FastVideo's columns, built column by column (not via write_parquet). The
    types default to the documented schema; FastVideo's preprocessing actually writes int32 / float32
    for shapes and metadata, which must read the same."""
    shape_type = pa.list_(int_type)
    cols = {"id": pa.array([r["id"] for r in rows], pa.string())}
    if latents:
        cols["vae_latent_bytes"] = pa.array([encode(r["latent"], r["latent_dtype"]) for r in rows], binary)
        cols["vae_latent_shape"] = pa.array([list(r["latent"].shape) for r in rows], shape_type)
        cols["vae_latent_dtype"] = pa.array([r["latent_dtype"] for r in rows], pa.string())
    cols["text_embedding_bytes"] = pa.array([encode(r["text"], r["text_dtype"]) for r in rows], binary)
    cols["text_embedding_shape"] = pa.array([list(r["text"].shape) for r in rows], shape_type)
    cols["text_embedding_dtype"] = pa.array([r["text_dtype"] for r in rows], pa.string())
    n = len(rows)
    cols |= {"file_name": pa.array([f"{r['id']}.mp4" for r in rows]),
             "caption": pa.array([r["caption"] for r in rows]),
             "media_type": pa.array(["video"] * n), "width": pa.array([8 * W] * n, int_type),
             "height": pa.array([8 * H] * n, int_type), "num_frames": pa.array([4 * T - 3] * n, int_type),
             "duration_sec": pa.array([1.0] * n, float_type), "fps": pa.array([16.0] * n, float_type)}
    cols |= override
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: v for k, v in cols.items() if k not in drop})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def t2v(tmp_path):
    """Two files (one in a subfolder, with the int32 / float32 / large_binary types), 7 rows,
    bf16 / fp16 / fp32 tensors, row groups of 2."""
    a = make_rows(4, seed=1, prefix="a", text_dtype="torch.bfloat16", latent_dtype="float32")
    b = make_rows(3, seed=2, prefix="b", text_dtype="float32", latent_dtype="torch.bfloat16")
    b[0]["text_dtype"] = "float16"
    write_fastvideo(tmp_path / "ds" / "0.parquet", a)
    write_fastvideo(tmp_path / "ds" / "sub" / "1.parquet", b, int_type=pa.int32(), float_type=pa.float32(),
                    binary=pa.large_binary())
    return tmp_path / "ds", a + b


def test_reads_fastvideo_files(t2v):
    folder, rows = t2v
    ds = ParquetDataset(str(folder), T2V, text_len=16)
    assert len(ds) == len(rows) and ds.text_dim == D
    for i, r in enumerate(rows):  # files sorted, rows in file order
        s = ds[i]
        L = len(r["text"])
        assert s["id"] == r["id"] and s["caption"] == r["caption"] and s["text_len"] == L
        assert s["text"].dtype == torch.float32 and s["text"].shape == (16, D)
        assert torch.equal(s["text"][:L], expected(r["text"], r["text_dtype"]))
        assert torch.equal(s["text"][L:], torch.zeros(16 - L, D))
        assert s["latents"].dtype == torch.float32
        assert torch.equal(s["latents"], expected(r["latent"], r["latent_dtype"]))


def test_text_only_and_latents_ignored(tmp_path, t2v):
    rows = make_rows(3)
    write_fastvideo(tmp_path / "text" / "t.parquet", rows, latents=False)
    s = ParquetDataset(tmp_path / "text", TEXT_ONLY, text_len=16)[2]
    assert s["id"] == "s2" and "latents" not in s
    with pytest.raises(DataError, match=r"t\.parquet: no column vae_latent_bytes \(the VAE latents\), which this "
                       "run reads"):
        ParquetDataset(tmp_path / "text", T2V)
    assert "latents" not in ParquetDataset(t2v[0], TEXT_ONLY, text_len=16)[0]


def test_write_parquet_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [{"id": f"r{i}", "caption": f"c{i}", "latent": torch.randn(C, T, H, W, generator=g).to(dt),
             "text_embedding": torch.randn(i + 1, D, generator=g).to(dt), "fps": 16.0}
            for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16])]
    path = write_parquet(tmp_path / "out", rows, rows_per_group=2)
    assert path.name == "part-00000.parquet" and pq.read_metadata(path).num_row_groups == 2
    assert pq.read_schema(path).names == FASTVIDEO_T2V
    assert write_parquet(tmp_path / "out", rows[:1]).name == "part-00001.parquet"
    ds = ParquetDataset(tmp_path / "out", T2V, text_len=4)
    for r, s in zip(rows, (ds[i] for i in range(3)), strict=True):
        assert s["id"] == r["id"] and s["caption"] == r["caption"]
        assert torch.equal(s["latents"], r["latent"].float())
        assert torch.equal(s["text"][: s["text_len"]], r["text_embedding"].float())
    text_rows = [{k: v for k, v in r.items() if k != "latent"} for r in rows]
    text_only = write_parquet(tmp_path / "t.parquet", text_rows)
    assert pq.read_schema(text_only).names == ["id", "text_embedding_bytes", "text_embedding_shape",
                                               "text_embedding_dtype", "caption"]  # FastVideo's text-only
    with pytest.raises(DataError, match="every row must have the same ones"):
        write_parquet(tmp_path / "mixed.parquet", [rows[0], {"id": "x", "text_embedding": torch.zeros(1, D)}])


def _bad_row(rows, **changes):
    rows[1].update(changes)
    return rows


@pytest.mark.parametrize("case, build, match", [
    ("missing column", lambda p, r: write_fastvideo(p, r, drop=("text_embedding_dtype",)),
     r"bad\.parquet: no column text_embedding_dtype \(the text embeddings\)"),
    ("bytes vs shape", lambda p, r: write_fastvideo(p, r, vae_latent_shape=pa.array(
        [[C, T, H, W], [C, T, H, W + 1], [C, T, H, W], [C, T, H, W]], pa.list_(pa.int64()))),
     r"bad\.parquet, row 1 \(id 's1'\): vae_latent_shape \[4, 2, 3, 6\] in float32 is 576 bytes, "
     r"vae_latent_bytes holds 480"),
    ("rank", lambda p, r: write_fastvideo(p, _bad_row(r, text=r[1]["text"][None, None])),
     r"bad\.parquet, row 1 \(id 's1'\): text_embedding_shape \[1, 1, \d+, 8\] has rank 4, expected 2"),
    ("null bytes", lambda p, r: write_fastvideo(p, r, vae_latent_bytes=pa.array(
        [encode(x["latent"], "float32") if i != 1 else None for i, x in enumerate(r)], pa.binary())),
     r"bad\.parquet, row 1 \(id 's1'\): null vae_latent_bytes"),
    ("unknown dtype", lambda p, r: write_fastvideo(p, _bad_row(r, latent_dtype="float64")),
     r"bad\.parquet, row 1 \(id 's1'\): unknown vae_latent_dtype 'float64'"),
    ("empty triplet", lambda p, r: write_fastvideo(p, r, vae_latent_bytes=pa.array(
        [encode(x["latent"], "float32") if i != 1 else b"" for i, x in enumerate(r)], pa.binary()),
        vae_latent_shape=pa.array([[C, T, H, W], [], [C, T, H, W], [C, T, H, W]], pa.list_(pa.int64())),
        vae_latent_dtype=pa.array(["float32", "", "float32", "float32"])),
     r"bad\.parquet, row 1 \(id 's1'\): empty vae_latent \(FastVideo writes an empty triplet"),
    ("text width", lambda p, r: write_fastvideo(p, _bad_row(r, text=np.zeros((3, D + 1), np.float32))),
     r"bad\.parquet, row 1 \(id 's1'\): text embedding width 9"),
    ("too few frames", lambda p, r: write_fastvideo(p, _bad_row(r, latent=np.zeros((C, 1, H, W), np.float32))),
     r"bad\.parquet, row 1 \(id 's1'\): vae_latent has 1 latent frames, fewer than data.num_latent_t 2"),
])
def test_bad_inputs_name_the_file_and_row(tmp_path, case, build, match):
    build(tmp_path / "d" / "bad.parquet", make_rows(4))
    if case == "missing column":  # schemas are checked when the dataset opens
        with pytest.raises(DataError, match=match):
            ParquetDataset(tmp_path / "d", T2V, text_len=16)
        return
    ds = ParquetDataset(tmp_path / "d", T2V, text_len=16, num_latent_t=2)  # rows are checked when read
    ds[0]
    with pytest.raises(DataError, match=match):
        ds[1]
    with Loader(ds, batch_size=4, seed=0) as loader, pytest.raises(DataError, match=match):
        next(loader)  # a worker thread's error reaches the training loop


def test_fastvideo_crops_long_text_and_trims_latent_frames(tmp_path, caplog):
    """FastVideo's reader crops text to its length and keeps num_latent_t frames; fvfunc does the same
    (one note for the text) and names image-to-video columns it does not read."""
    rows = make_rows(3)
    rows[1]["text"] = np.arange(20 * D, dtype=np.float32).reshape(20, D)
    clip = pa.array([encode(np.ones((4, D), np.float32), "float32")] * 3, BINARY)
    write_fastvideo(tmp_path / "d" / "a.parquet", rows, clip_feature_bytes=clip)
    with caplog.at_level(logging.WARNING, logger="fvfunc"):
        ds = ParquetDataset(tmp_path / "d", T2V, text_len=16, num_latent_t=1)
        b = ds.batch([0, 1, 2])
    assert torch.equal(b["text"][1], torch.from_numpy(rows[1]["text"][:16])) and b["text_len"][1] == 16
    assert torch.equal(b["latents"][2], torch.from_numpy(rows[2]["latent"][:, :1]))
    assert caplog.text.count("cropped to data.text_len 16") == 1
    assert "image-to-video columns (clip_feature)" in caplog.text


def test_bad_folders(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no parquet here")
    with pytest.raises(DataError, match=r"empty: no \*\.parquet files"):
        ParquetDataset(tmp_path / "empty", TEXT_ONLY)
    with pytest.raises(DataError, match=r"nowhere: dataset folder does not exist"):
        ParquetDataset(f"{tmp_path / 'nowhere'}:2", TEXT_ONLY)
    with pytest.raises(DataError, match="repeat count"):
        ParquetDataset(f"{tmp_path / 'empty'}:0", TEXT_ONLY)


def test_latent_normalisation(tmp_path, t2v, caplog):
    folder, rows = t2v
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 4.0]
    (tmp_path / "pipe" / "vae").mkdir(parents=True)
    (tmp_path / "pipe" / "transformer").mkdir()
    config = {"latents_mean": mean, "latents_std": std, "z_dim": C}
    (tmp_path / "pipe" / "vae" / "config.json").write_text(json.dumps(config))
    cfg = tiny.tiny_config(in_channels=C, out_channels=C)
    facts = wan.latents(cfg, tmp_path / "pipe" / "transformer")
    stats = facts.mean, facts.std
    assert torch.equal(stats[0], torch.tensor(mean)) and torch.equal(stats[1], torch.tensor(std))
    assert torch.equal(wan.latents(cfg, tmp_path / "pipe").std, torch.tensor(std))
    x = expected(rows[5]["latent"], rows[5]["latent_dtype"])
    with caplog.at_level(logging.WARNING, logger="fvfunc.data"):
        normed = ParquetDataset(folder, T2V, text_len=16, latent_stats=stats)
    assert not caplog.records
    want = (x - torch.tensor(mean).view(C, 1, 1, 1)) / torch.tensor(std).view(C, 1, 1, 1)
    assert torch.equal(normed[5]["latents"], want)

    assert wan.latents(cfg, tmp_path / "no_vae" / "transformer").mean is None
    with caplog.at_level(logging.WARNING, logger="fvfunc.data"):
        plain = ParquetDataset(folder, T2V, text_len=16, latent_stats=None)
        plain[0], plain[5]
    assert len(caplog.records) == 1 and "latents_mean" in caplog.records[0].getMessage()
    assert torch.equal(plain[5]["latents"], x)


def test_repeats(tmp_path):
    write_fastvideo(tmp_path / "a" / "x.parquet", make_rows(3, prefix="a"))
    write_fastvideo(tmp_path / "b" / "x.parquet", make_rows(2, prefix="b"))
    ds = ParquetDataset([f"{tmp_path / 'a'}:3", str(tmp_path / "b")], T2V, text_len=16)
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert ids == ["a0", "a1", "a2"] * 3 + ["b0", "b1"]
    same = ParquetDataset(f"{tmp_path / 'a'}:3,{tmp_path / 'b'}", T2V, text_len=16)
    assert [same[i]["id"] for i in range(len(same))] == ids
    with Loader(ds, batch_size=11, seed=0, num_workers=0) as loader:  # repeats expand before the shuffle
        assert sorted(next(loader)["ids"]) == sorted(ids)
    # for the group order, each repeat's row groups are groups of their own: a's groups {a0, a1}, {a2}
    # in 3 copies, then b's one
    assert ds.sample_groups().tolist() == [0, 0, 1, 3, 3, 4, 5, 5, 6, 2, 2]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=2)
    assert torch.equal(a, epoch_order(100, seed=3, epoch=2))
    assert torch.equal(a.sort().values, torch.arange(100)) and a.dtype == torch.long
    assert not torch.equal(a, epoch_order(100, seed=3, epoch=3))
    assert not torch.equal(a, epoch_order(100, seed=4, epoch=2))


def ids(loader, k):
    return [next(loader)["ids"] for _ in range(k)]


@pytest.fixture
def ds10(tmp_path):
    write_fastvideo(tmp_path / "d" / "x.parquet", make_rows(10), row_group_size=3)
    return ParquetDataset(tmp_path / "d", T2V, text_len=16, cache_groups=2)


def test_epochs_roll_over_and_reshuffle(ds10):
    with Loader(ds10, batch_size=3, seed=0, num_workers=0) as loader:
        epoch0, epoch1 = ids(loader, 3), ids(loader, 3)
        assert loader.position == (2, 0) and loader.batches_per_epoch == 3
    order0, order1 = epoch_order(10, 0, 0), epoch_order(10, 0, 1)
    assert sum(epoch0, []) == [f"s{i}" for i in order0[:9].tolist()]
    assert sum(epoch1, []) == [f"s{i}" for i in order1[:9].tolist()]


@pytest.mark.parametrize("shuffle", ["rows", "groups"])
@pytest.mark.parametrize("k", [0, 2, 3, 5])
def test_resume_continues_the_exact_sequence(ds10, k, shuffle):
    with Loader(ds10, batch_size=3, seed=7, shuffle=shuffle) as loader:
        ids(loader, k)
        saved = loader.position
        rest = ids(loader, 4)
    with Loader(ds10, batch_size=3, seed=7, position=saved, shuffle=shuffle) as resumed:
        assert ids(resumed, 4) == rest


@pytest.mark.parametrize("window", [1, 2, 5])
def test_group_order_reads_each_group_within_one_window(window):
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 0])  # group 0's last row comes late
    order = epoch_order(len(groups), seed=1, epoch=0, groups=groups, window=window)
    assert torch.equal(order.sort().values, torch.arange(len(groups)))
    assert torch.equal(order, epoch_order(len(groups), 1, 0, groups, window))
    assert not torch.equal(order, epoch_order(len(groups), 1, 1, groups, window))
    # number the groups by first appearance: their window index (number // window) never goes back,
    # so each window's rows form one run and every group lies inside its window
    seen = list(dict.fromkeys(groups[order].tolist()))
    windows = [seen.index(g) // window for g in groups[order].tolist()]
    assert windows == sorted(windows)


def test_group_shuffle_reads_each_group_once_an_epoch(ds10, monkeypatch):
    reads = []
    read = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: reads.append(g) or read(self, g, **kw))
    ds10.cache_groups = 2  # = 2 x window
    with Loader(ds10, batch_size=3, seed=3, num_workers=0, shuffle="groups", window=1) as loader:
        got = sum(ids(loader, 3), [])
    assert len(set(got)) == 9 and len(reads) == len(set(reads))  # (9 of the 10 rows: drop_last)
    reads.clear()
    with Loader(ds10, batch_size=3, seed=3, num_workers=0, shuffle="rows") as loader:
        ids(loader, 3)
    assert len(reads) > 4  # a uniform order over 4 groups keeps going back to evicted ones


def test_auto_shuffle_picks_groups_only_for_multi_row_groups(ds10, tmp_path):
    assert Loader(ds10, 2, seed=0, num_workers=0, shuffle="auto").shuffle == "groups"
    write_fastvideo(tmp_path / "one" / "x.parquet", make_rows(4), row_group_size=1)
    single = ParquetDataset(tmp_path / "one", T2V, text_len=16)
    assert Loader(single, 2, seed=0, num_workers=0, shuffle="auto").shuffle == "rows"
    with pytest.raises(ValueError, match="shuffle"):
        Loader(single, 2, seed=0, shuffle="files")


def test_position_is_an_offset_in_the_epoch_order(ds10):
    with Loader(ds10, batch_size=2, seed=7, num_workers=0) as loader:
        ids(loader, 3)
        assert loader.position == (0, 6)
    with Loader(ds10, batch_size=3, seed=7, position=(0, 6)) as other:  # a new batch size resumes too
        assert next(other)["ids"] == [f"s{i}" for i in epoch_order(10, 7, 0)[6:9].tolist()]
        assert other.position == (1, 0)  # no full batch of 3 starts at 9


@pytest.mark.parametrize("shuffle", ["rows", "groups"])
def test_ranks_partition_each_global_batch(ds10, shuffle):
    with Loader(ds10, batch_size=4, seed=1, num_workers=0, shuffle=shuffle) as whole:
        want = ids(whole, 4)
    loaders = [Loader(ds10, batch_size=2, seed=1, rank=r, world_size=2, shuffle=shuffle) for r in range(2)]
    for batch in want:
        assert sum((next(lo)["ids"] for lo in loaders), []) == batch
    for lo in loaders:
        lo.close()


def test_drop_last_false_fills_the_last_batch(ds10):
    with Loader(ds10, batch_size=4, seed=2, drop_last=False, num_workers=0) as loader:
        got = ids(loader, 3)
        assert loader.position == (1, 0)
    order = [f"s{i}" for i in epoch_order(10, 2, 0).tolist()]
    assert sum(got, []) == order + order[:2]


def test_threads_do_not_change_the_sequence(ds10):
    with Loader(ds10, 2, seed=5, num_workers=0) as a, Loader(ds10, 2, seed=5, num_workers=2) as b:
        for _ in range(8):
            x, y = next(a), next(b)
            assert x["ids"] == y["ids"] and x["captions"] == y["captions"]
            for key in ("text", "text_len", "latents"):
                assert torch.equal(x[key], y[key])
    assert x["text"].shape == (2, 16, D) and x["latents"].shape == (2, C, T, H, W)
    assert x["text_len"].dtype == torch.long


def test_close_leaves_no_threads(ds10):
    before = set(threading.enumerate())
    with Loader(ds10, batch_size=2, seed=0, num_workers=2) as loader:
        ids(loader, 3)
    assert set(threading.enumerate()) <= before
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_too_few_samples_for_a_global_batch(ds10):
    with pytest.raises(DataError, match="cannot fill one global batch"):
        Loader(ds10, batch_size=6, seed=0, world_size=2)
    assert data.schema(data.T2V).names == FASTVIDEO_T2V


def test_binary_cells_are_sliced_without_copies():
    values = [b"ab", None, b"", b"cdef", b"g"]
    for typ in (pa.binary(), pa.large_binary()):
        column = pa.chunked_array([pa.array(values[:2], typ), pa.array(values[1:], typ).slice(1)])
        got = [parquet._bytes(column, r) for r in range(len(values))]
        assert [None if g is None else g.to_pybytes() for g in got] == values
