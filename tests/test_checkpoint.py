"""fvfunc.checkpoint: bitwise round trips, latest/prune/resolve, and that no crash or damaged folder
is ever taken for a checkpoint."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fvfunc import checkpoint, tree
from fvfunc.checkpoint import CheckpointError


def _trees(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g)
    return {
        "student": {
            "blocks.0.attn1.to_q.weight": torch.randn(8, 4, generator=g),
            "blocks.0.attn1.to_q.bias": torch.randn(8, generator=g).to(torch.bfloat16),
            "head/scale_shift_table": torch.randn(1, 2, 4, generator=g).half(),
            "transposed": w.t(),  # not contiguous
            "tied": w,
            "tied_rows": w[1:3],  # shares storage with "tied" (safetensors alone refuses this)
        },
        "student.opt": {"step": torch.tensor(7, dtype=torch.int64),
                        "mu.head.weight": torch.randn(3, generator=g),
                        "lr": torch.tensor(2e-6, dtype=torch.float64)},
        "state": {"key": torch.tensor([1, 2**40], dtype=torch.int64), "mask": torch.tensor([True, False]),
                  "empty": torch.zeros(0, 3), "i8": torch.tensor([-3, 4], dtype=torch.int8)},
        "ema": {},
    }


META = {"step": 5, "key": [0, 5], "data": {"epoch": 0, "index": 40}, "config": {"training": {"lr": 1e-5}}}


def _meta(step: int) -> dict:
    return {**META, "step": step}


def test_round_trip_is_bitwise(tmp_path):
    trees = _trees()
    expected = {n: {k: v.contiguous() for k, v in t.items()} for n, t in trees.items()}
    path = checkpoint.save(tmp_path, 5, trees, META)
    assert path == tmp_path / "checkpoint-5"
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "meta.json", "state.safetensors",
                                                      "student.opt.safetensors", "student.safetensors"]
    loaded, meta = checkpoint.load(path)
    assert meta == META
    assert loaded.keys() == trees.keys()
    for name in trees:
        assert tree.equal(loaded[name], expected[name]), name
    for t in (t for tr in loaded.values() for t in tr.values()):
        assert t.device.type == "cpu" and t.is_contiguous() and t.data_ptr() % 64 == 0
    assert loaded["student.opt"]["step"].shape == ()
    # loaded tensors are independent copies: writing one leaves the file and the others alone
    loaded["student"]["tied"].zero_()
    assert not torch.equal(loaded["student"]["tied_rows"], torch.zeros(2, 4))
    assert tree.equal(checkpoint.load(path)[0]["student"], expected["student"])

    record = json.loads((path / "meta.json").read_text())
    assert record["format_version"] == checkpoint.FORMAT_VERSION and record["step"] == 5
    assert record["files"] == {p.name: p.stat().st_size for p in path.glob("*.safetensors")}


def test_save_leaves_inputs_alone_and_refuses_bad_arguments(tmp_path):
    trees = _trees()
    before = {n: tree.clone(t) for n, t in trees.items()}
    checkpoint.save(tmp_path, 1, trees, _meta(1))
    assert all(tree.equal(trees[n], before[n]) for n in trees)
    with pytest.raises(ValueError, match="meta"):
        checkpoint.save(tmp_path, 2, trees, _meta(3))
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path, 2, trees, {"step": 2, "bad": object()})
    with pytest.raises(ValueError, match="tree name"):
        checkpoint.save(tmp_path, 2, {"a/b": {}}, _meta(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # the refusals wrote nothing


def test_latest_is_newest_by_step_number(tmp_path):
    assert checkpoint.latest(tmp_path) is None and checkpoint.latest(tmp_path / "absent") is None
    for step in (5, 100, 20):
        checkpoint.save(tmp_path, step, {"state": {"s": torch.tensor(step)}}, _meta(step))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-20",
                                                                       "checkpoint-100"]
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-100"
    assert checkpoint.load(checkpoint.latest(tmp_path))[0]["state"]["s"].item() == 100


def test_keep_prunes_oldest_but_never_the_new_save(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {}, _meta(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    # a run resumed from an older checkpoint keeps its own fresh save and the newest other one
    checkpoint.save(tmp_path, 2, {}, _meta(2), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-5"]
    checkpoint.save(tmp_path, 6, {}, _meta(6), keep=0)  # 0 keeps all
    assert len(checkpoint.list_checkpoints(tmp_path)) == 3


def test_resave_of_same_step_replaces_it(tmp_path):
    checkpoint.save(tmp_path, 3, {"a": {"x": torch.zeros(2)}, "b": {}}, _meta(3))
    checkpoint.save(tmp_path, 3, {"a": {"x": torch.ones(2)}}, _meta(3))
    trees, _ = checkpoint.load(tmp_path / "checkpoint-3")
    assert trees.keys() == {"a"} and torch.equal(trees["a"]["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]  # no temporaries left


def _damage(path, how):
    if how == "no_meta":
        (path / "meta.json").unlink()
    elif how == "missing_file":
        (path / "student.safetensors").unlink()
    elif how == "truncated_file":
        f = path / "student.safetensors"
        f.write_bytes(f.read_bytes()[:-7])
    elif how == "bad_json":
        (path / "meta.json").write_text('{"format_version": 1, "files": ')
    elif how == "wrong_step":
        record = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps({**record, "step": 1}))
    elif how == "corrupt_header":  # right size, unreadable content
        f = path / "student.safetensors"
        f.write_bytes(b"\xff" * f.stat().st_size)


@pytest.mark.parametrize("how", ["no_meta", "missing_file", "truncated_file", "bad_json", "wrong_step",
                                 "corrupt_header"])
def test_damaged_folder_is_never_latest_and_load_names_it(tmp_path, how):
    good = checkpoint.save(tmp_path, 1, _trees(), _meta(1))
    bad = checkpoint.save(tmp_path, 2, _trees(), _meta(2))
    _damage(bad, how)
    if how != "corrupt_header":  # caught by the manifest alone, without reading the tensors
        assert checkpoint.latest(tmp_path) == good
        assert checkpoint.list_checkpoints(tmp_path) == [good]
        with pytest.raises(CheckpointError, match="checkpoint-2"):
            checkpoint.resolve(tmp_path, "checkpoint-2")
    with pytest.raises(CheckpointError, match="checkpoint-2"):
        checkpoint.load(bad)
    assert tree.equal(checkpoint.load(good)[0]["student.opt"], _trees()["student.opt"])


def test_temporary_folders_are_ignored_then_cleaned(tmp_path):
    good = checkpoint.save(tmp_path, 1, {}, _meta(1))
    stale = checkpoint.save(tmp_path, 9, {}, _meta(9)).rename(tmp_path / ".checkpoint-9.tmp")
    (tmp_path / "checkpoint-latest").mkdir()  # not a step: ignored
    assert checkpoint.latest(tmp_path) == good
    with pytest.raises(CheckpointError, match="no meta.json"):
        checkpoint.load(tmp_path)  # an output_dir is not a checkpoint
    checkpoint.save(tmp_path, 2, {}, _meta(2))
    assert not stale.exists()


def test_resolve(tmp_path, monkeypatch):
    assert checkpoint.resolve(tmp_path, "") is None
    assert checkpoint.resolve(tmp_path, "latest") is None
    c1 = checkpoint.save(tmp_path, 1, {}, _meta(1))
    c2 = checkpoint.save(tmp_path, 2, {}, _meta(2))
    assert checkpoint.resolve(tmp_path, "latest") == c2
    assert checkpoint.resolve(tmp_path, str(c1)) == c1
    assert checkpoint.resolve(tmp_path, "checkpoint-1") == c1  # relative to output_dir
    monkeypatch.chdir(tmp_path.parent)
    assert checkpoint.resolve("elsewhere", f"{tmp_path.name}/checkpoint-2").resolve() == c2
    with pytest.raises(CheckpointError, match="checkpoint-7"):
        checkpoint.resolve(tmp_path, "checkpoint-7")


# The child saves with a tripwire that SIGKILLs it mid-save; the checkpoints it leaves must be intact.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch, torch
    from fvfunc import checkpoint
    out, step, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls = []
    def tripwire(real):
        def fn(*a, **k):
            calls.append(1)
            if where != "second_file" or len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return fn
    if where == "second_file":
        safetensors.torch.save_file = tripwire(safetensors.torch.save_file)
    else:  # just before the folder is renamed (or swapped) into place
        os.rename = tripwire(os.rename)
        checkpoint._rename_exchange = tripwire(checkpoint._rename_exchange)
    trees = {n: {"x": torch.full((64,), float(step))} for n in ("student", "student.opt", "critic")}
    checkpoint.save(out, step, trees, {"step": step}, keep=1)
    print("not killed")
""")


@pytest.mark.parametrize("where,step", [("second_file", 2), ("rename", 2), ("rename", 1)],
                         ids=["second_file", "before_rename", "resave_before_swap"])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, where, step):
    trees = {n: {"x": torch.full((64,), 1.0)} for n in ("student", "student.opt", "critic")}
    prev = checkpoint.save(tmp_path, 1, trees, {"step": 1})
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(step), where],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert any(p.name.startswith(".checkpoint-") for p in tmp_path.iterdir())  # it died mid-save
    assert checkpoint.latest(tmp_path) == prev
    loaded, meta = checkpoint.load(prev)
    assert meta == {"step": 1} and tree.equal(loaded["critic"], trees["critic"])
    # the next save clears the wreck
    checkpoint.save(tmp_path, 3, trees, {"step": 3}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
