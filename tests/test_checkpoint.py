"""fvfunc.checkpoint: bitwise round trips, latest/prune/resolve, and that no crash or damaged folder
is ever taken for a checkpoint."""

import errno
import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import xxhash

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
    assert record["files"] == {p.name: {"bytes": p.stat().st_size,
                                        "xxh3_128": xxhash.xxh3_128(p.read_bytes()).hexdigest()}
                               for p in path.glob("*.safetensors")}


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
    # a run resumed from an older checkpoint keeps its fresh save and never touches the newer ones
    checkpoint.save(tmp_path, 2, {}, _meta(2), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4",
                                                                       "checkpoint-5"]
    checkpoint.save(tmp_path, 3, {}, _meta(3), keep=2)  # the fresh one and one older: nothing goes yet
    assert len(checkpoint.list_checkpoints(tmp_path)) == 4
    checkpoint.save(tmp_path, 4, {}, _meta(4), keep=2)  # replaces 4; of the older ones 3 stays
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4",
                                                                       "checkpoint-5"]
    checkpoint.save(tmp_path, 6, {}, _meta(6), keep=0)  # 0 keeps all
    assert len(checkpoint.list_checkpoints(tmp_path)) == 4


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


def _flip(f, at=0.5, n=4):
    """Flip n bytes of a file in place (its size unchanged)."""
    data = bytearray(f.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    f.write_bytes(bytes(data))


DAMAGE = ["no_meta", "missing_file", "truncated_file", "bad_json", "wrong_step", "corrupt_header"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_folder_is_never_latest_and_load_names_it(tmp_path, how):
    good = checkpoint.save(tmp_path, 1, _trees(), _meta(1))
    bad = checkpoint.save(tmp_path, 2, _trees(), _meta(2))
    _damage(bad, how)
    if how != "corrupt_header":  # caught by the manifest alone, without reading the tensors
        assert checkpoint.latest(tmp_path) == good
        assert checkpoint.list_checkpoints(tmp_path) == [good]
    with pytest.raises(CheckpointError, match="checkpoint-2"):  # an explicit path never falls back
        checkpoint.resolve(tmp_path, "checkpoint-2")
    found = checkpoint.resolve(tmp_path, "latest")  # latest passes over it, and says so
    assert found.path == good and [p for p, _ in found.skipped] == [bad]
    with pytest.raises(CheckpointError, match="checkpoint-2"):
        checkpoint.load(bad)
    assert tree.equal(checkpoint.load(good)[0]["student.opt"], _trees()["student.opt"])


@pytest.mark.parametrize("name", ["student", "student.opt", "state", "ema"])
@pytest.mark.parametrize("at", [0.0, 0.5, 0.999])
def test_flipped_bytes_in_any_file_are_caught_by_the_checksum(tmp_path, name, at):
    good = checkpoint.save(tmp_path, 1, _trees(), _meta(1))
    bad = checkpoint.save(tmp_path, 2, _trees(1), _meta(2))
    _flip(bad / f"{name}.safetensors", at)
    message = f"checkpoint-2/{name}.safetensors: checksum mismatch"
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(bad)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.verify(bad)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.resolve(tmp_path, str(bad))
    found = checkpoint.resolve(tmp_path, "latest")
    assert found.path == good and "checksum mismatch" in found.skipped[0][1]
    assert checkpoint.verify(good)["step"] == 1


def test_latest_with_only_damaged_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    assert checkpoint.resolve(tmp_path, "latest").path is None  # nothing there: a fresh start
    bad = checkpoint.save(tmp_path, 3, _trees(), _meta(3))
    _flip(bad / "student.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*checkpoint-3/student.safetensors"):
        checkpoint.resolve(tmp_path, "latest")


def test_format_1_checkpoints_without_checksums_still_load(tmp_path):
    path = checkpoint.save(tmp_path, 4, _trees(), _meta(4))
    record = json.loads((path / "meta.json").read_text())
    record["format_version"] = 1
    record["files"] = {k: v["bytes"] for k, v in record["files"].items()}
    (path / "meta.json").write_text(json.dumps(record))
    assert checkpoint.resolve(tmp_path, "latest").path == path
    assert tree.equal(checkpoint.load(path)[0]["student.opt"], _trees()["student.opt"])


def test_disk_full_mid_save_leaves_no_temporary_and_keeps_the_older(tmp_path, monkeypatch):
    good = checkpoint.save(tmp_path, 1, _trees(), _meta(1))
    real, calls = checkpoint.safetensors.torch.save_file, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"\.checkpoint-2\.tmp: cannot write the checkpoint of step 2 "
                                              r"\(the disk is full\)"):
        checkpoint.save(tmp_path, 2, _trees(), _meta(2), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert checkpoint.verify(good)["step"] == 1


def test_temporary_folders_are_ignored_then_cleaned(tmp_path):
    good = checkpoint.save(tmp_path, 1, {}, _meta(1))
    nine, eight = checkpoint.save(tmp_path, 9, {}, _meta(9)), checkpoint.save(tmp_path, 8, {}, _meta(8))
    stale, trash = nine.rename(tmp_path / ".checkpoint-9.tmp"), eight.rename(tmp_path / ".checkpoint-8.trash")
    (tmp_path / "checkpoint-latest").mkdir()  # not a step: ignored
    assert checkpoint.latest(tmp_path) == good
    with pytest.raises(CheckpointError, match="no meta.json"):
        checkpoint.load(tmp_path)  # an output_dir is not a checkpoint
    assert sorted(checkpoint.clean(tmp_path)) == [trash, stale]
    assert not stale.exists() and not trash.exists() and good.is_dir()


def test_resolve(tmp_path, monkeypatch):
    assert checkpoint.resolve(tmp_path, "") == (None, [])
    assert checkpoint.resolve(tmp_path, "latest") == (None, [])
    c1 = checkpoint.save(tmp_path, 1, {}, _meta(1))
    c2 = checkpoint.save(tmp_path, 2, {}, _meta(2))
    assert checkpoint.resolve(tmp_path, "latest") == (c2, [])
    assert checkpoint.resolve(tmp_path, str(c1)).path == c1
    assert checkpoint.resolve(tmp_path, "checkpoint-1").path == c1  # relative to output_dir
    monkeypatch.chdir(tmp_path.parent)
    assert checkpoint.resolve("elsewhere", f"{tmp_path.name}/checkpoint-2").path.resolve() == c2
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


# A save with keep=1 prunes two older checkpoints (each: a rename to trash, two file deletions, one rmdir);
# the child is SIGKILLed at the k-th of those 8 operations. Whatever the point, every `checkpoint-<step>`
# left is complete, the fresh one among them, and `clean` leaves nothing else.
PRUNE_CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    import torch
    from fvfunc import checkpoint
    out, kill_at = sys.argv[1], int(sys.argv[2])
    calls, armed = [], [False]
    def tripwire(real):
        def fn(*a, **k):
            if armed[0]:
                calls.append(1)
                if len(calls) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return fn
    real_prune = checkpoint.prune
    def prune(*a, **k):
        armed[0] = True
        return real_prune(*a, **k)
    checkpoint.prune = prune
    for name in ("rename", "unlink", "rmdir"):
        setattr(os, name, tripwire(getattr(os, name)))
    checkpoint.save(out, 3, {"student": {"x": torch.full((64,), 3.0)}}, {"step": 3}, keep=1)
    print("not killed")
""")


@pytest.mark.parametrize("kill_at", range(1, 9))
def test_sigkill_at_every_point_of_pruning_leaves_a_clean_folder(tmp_path, kill_at):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, {"student": {"x": torch.full((64,), float(step))}}, {"step": step})
    child = subprocess.run([sys.executable, "-c", PRUNE_CHILD, str(tmp_path), str(kill_at)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    folders = checkpoint.steps_in(tmp_path)
    assert folders == checkpoint.list_checkpoints(tmp_path)  # nothing half-deleted looks like a checkpoint
    assert tmp_path / "checkpoint-3" in folders
    for p in folders:
        checkpoint.verify(p)
    checkpoint.clean(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in folders]
