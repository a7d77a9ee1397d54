"""The file format and checkpoints: round trips, resume, corruption, truncation, wrong model, atomic writes."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from torch import nn

import prunekit
from prunekit import Gradual, Pruner
from prunekit.checkpoint import load, save
from prunekit.fileformat import FileFormatError, read, write


def net(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))


def run(model, pruner, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        pruner.step()


def make(seed=0):
    model = net(seed)
    pruner = Pruner(model, 0.9, schedule=Gradual(start=0, end=20, every=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=40)
    return model, pruner, opt, sched


def test_resume_continues_with_identical_masks_and_weights(tmp_path):
    model, pruner, opt, sched = make()
    run(model, pruner, opt, sched, 9, seed=1)
    path = save(model, tmp_path / "ckpt.safetensors", pruner=pruner, optimizer=opt, scheduler=sched,
                extra={"epoch": 1, "note": "mid-schedule"})
    run(model, pruner, opt, sched, 15, seed=2)  # the uninterrupted run

    model2, _, opt2, sched2 = make(seed=5)  # different init: everything must come from the file
    ckpt = load(path, model2, optimizer=opt2, scheduler=sched2)
    assert ckpt.extra == {"epoch": 1, "note": "mid-schedule"}
    assert ckpt.pruner.step_count == 9
    run(model2, ckpt.pruner, opt2, sched2, 15, seed=2)
    assert ckpt.pruner.masks.equal(pruner.masks)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n


def test_model_state_dict_keeps_original_keys_and_loads_strictly(tmp_path):
    model = net()
    pruner = prunekit.prune(model, 0.5)
    path = save(model, tmp_path / "m.safetensors", pruner=pruner)
    tensors, meta = read(path, kind="checkpoint")
    assert {k.removeprefix("model/") for k in tensors if k.startswith("model/")} == set(model.state_dict())
    fresh = net(seed=3)
    fresh.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")},
                          strict=True)
    assert all(tensors[f"mask/{k}"].dtype == torch.bool for k in pruner.masks)


def test_no_pickle_in_file(tmp_path):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = save(model, tmp_path / "m.safetensors", pruner=prunekit.prune(model, 0.5), optimizer=opt)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])  # plain JSON header, tensors after it: nothing to unpickle
    assert header["__metadata__"]["prunekit.format"] == "prunekit"
    assert b"\x80\x04\x95" not in raw[: 8 + n]  # no pickle protocol-4 frame in the header


def test_wrong_model_names_the_tensors(tmp_path):
    path = save(net(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"'0.weight: file \(32, 12\) vs model \(16, 12\)'"):
        load(path, net(hidden=16))
    with pytest.raises(ValueError, match="missing"):
        load(path, nn.Sequential(nn.Linear(12, 3)))


def test_truncated_and_corrupted_files(tmp_path):
    model = net()
    path = save(model, tmp_path / "m.safetensors", pruner=prunekit.prune(model, 0.5))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(FileFormatError, match="truncated or corrupted"):
        load(tmp_path / "trunc.safetensors", net())
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match="checksum"):
        load(tmp_path / "flip.safetensors", net())
    with pytest.raises(FileFormatError, match="no such file"):
        load(tmp_path / "missing.safetensors", net())


def test_wrong_version_and_kind(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "v9.safetensors"),
              metadata={"prunekit.format": "prunekit", "prunekit.version": "9", "prunekit.kind": "checkpoint"})
    with pytest.raises(FileFormatError, match="version 9"):
        read(tmp_path / "v9.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FileFormatError, match="not a prunekit file"):
        read(tmp_path / "plain.safetensors")
    write(tmp_path / "other.safetensors", {"w": torch.ones(2)}, {}, kind="report")
    with pytest.raises(FileFormatError, match="expected a 'checkpoint'"):
        load(tmp_path / "other.safetensors", net())


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = write(tmp_path / "f.safetensors", {"w": torch.ones(3)}, {"v": 1}, kind="x")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("prunekit.fileformat.save", boom)
    with pytest.raises(OSError, match="disk full"):
        write(path, {"w": torch.zeros(3)}, {"v": 2}, kind="x")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]  # no temporary left behind


def test_shared_and_strided_tensors_are_stored(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "a_alias": base, "col": base[:, 1], "t": base.t()}
    path = write(tmp_path / "s.safetensors", tensors, {}, kind="x")
    out, _ = read(path, kind="x")
    for k, v in tensors.items():
        assert torch.equal(out[k], v)


def test_custom_criterion_must_be_passed_again(tmp_path):
    model = net()
    pruner = prunekit.prune(model, 0.5, criterion=lambda name, w: w.abs() + 1)
    path = save(model, tmp_path / "c.safetensors", pruner=pruner)
    with pytest.raises(ValueError, match="custom criterion"):
        load(path, net())
    assert load(path, net(), criterion="magnitude").pruner.masks.equal(pruner.masks)


def test_missing_optimizer_state(tmp_path):
    path = save(net(), tmp_path / "m.safetensors")
    model = net()
    with pytest.raises(FileFormatError, match="no optimizer state"):
        load(path, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_bool_masks_survive_and_file_is_small(tmp_path):
    model = nn.Linear(1000, 1000, bias=False)
    pruner = prunekit.prune(model, 0.9)
    path = save(model, tmp_path / "m.safetensors", pruner=pruner)
    # 4 MB of fp32 weights + 1 MB of bool masks (+ header)
    assert os.path.getsize(path) < 5_000_000 + 10_000


@pytest.mark.parametrize("compress", [False, True])
def test_load_writes_in_place_and_a_file_that_does_not_fit_writes_nothing(tmp_path, compress):
    from prunekit.checkpoint import _plain

    model, pruner, opt, sched = make(0)
    run(model, pruner, opt, sched, steps=25, seed=0)  # masks well under way
    path = save(model, tmp_path / "m.pk", pruner=pruner, compress=compress)
    fresh = net(1)
    assert _plain(fresh)  # Linear + BatchNorm: loaded without load_state_dict's per-module bookkeeping
    params = {k: p for k, p in fresh.named_parameters()}
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    ck = load(path, fresh)
    assert all(p is params[k] for k, p in fresh.named_parameters())  # same Parameter objects (optimizers keep working)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert torch.equal(ck.pruner.masks["0.weight"], pruner.masks["0.weight"])
    # another width: refused before anything is decoded or copied
    other = net(2, hidden=33)
    other_before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatch"):
        load(path, other)
    assert all(torch.equal(v, other_before[k]) for k, v in other.state_dict().items())
    assert not all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("compress", [False, True])
def test_modules_with_their_own_loading_logic_go_through_load_state_dict(tmp_path, compress):
    from prunekit.checkpoint import _plain

    class Scaled(nn.Linear):
        """Stores its weight doubled and halves it again when loading (custom save/load logic)."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "weight"] = destination[prefix + "weight"] * 2

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"] / 2
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(8, 4), nn.ReLU())
    path = save(model, tmp_path / "s.pk", compress=compress)
    fresh = nn.Sequential(Scaled(8, 4), nn.ReLU())
    assert not _plain(fresh)
    load(path, fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    hooked = net(1)
    calls = []
    hooked[0]._register_load_state_dict_pre_hook(lambda *a, **k: calls.append(a[1]))
    assert not _plain(hooked)
    load(save(net(0), tmp_path / "h.pk", compress=compress), hooked)
    assert calls == ["0."] and torch.equal(hooked[0].weight, net(0)[0].weight)

    class Stateful(nn.Linear):
        """Extra (non-tensor) state in its state dict."""

        def get_extra_state(self):
            return {"calls": 3}

        def set_extra_state(self, state):
            self.restored = state

    assert not _plain(nn.Sequential(Stateful(2, 2)))


# --------------------------------------------------------------------------------------------------------------------
# a failed load changes nothing; clear errors for wrong paths and foreign files; file permissions


def _train_steps(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _same_state(a, b):
    """Whether two (nested) state dicts are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def _snapshot(model, opt):
    import copy

    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_untouched(model, opt, snapshot):
    model_state, opt_state = snapshot
    assert _same_state(model.state_dict(), model_state)
    assert _same_state(opt.state_dict(), opt_state)
    _train_steps(model, opt, steps=1, seed=9)  # the optimizer still works


def _as_old_file(path, out):
    """``path`` rewritten as a file from before the optimizer's class and shapes were recorded."""
    tensors, meta = read(path, kind="checkpoint")
    meta.pop("optimizer_class")
    meta.pop("optimizer_shapes")
    return write(out, tensors, meta, kind="checkpoint")


@pytest.mark.parametrize("compress", [False, True])
def test_failed_optimizer_load_leaves_model_and_optimizer_as_they_were(tmp_path, compress):
    model = net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, sgd)
    path = save(model, tmp_path / "sgd.pk", optimizer=sgd, compress=compress)
    assert read(path, kind="checkpoint")[1]["optimizer_class"] == "SGD"
    old = _as_old_file(path, tmp_path / "old.safetensors")

    cases = [  # (file, optimizer factory, message)
        (path, lambda m: torch.optim.Adam(m.parameters()), r"class SGD, but the optimizer given is torch\.optim\.Adam"),
        (old, lambda m: torch.optim.Adam(m.parameters()), r"does not load into this Adam \(KeyError: 'step'\)"),
        (path, lambda m: torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), r"groups of sizes \[6\].*\[2\]"),
        (old, lambda m: torch.optim.SGD([{"params": m[0].parameters()}, {"params": m[3].parameters()}], lr=0.1),
         r"state for 1 parameter group\(s\), but the given SGD has 2"),
        (path, lambda m: torch.optim.SGD(net(hidden=16).parameters(), lr=0.1, momentum=0.9),
         r"group 0 parameter 0: file \(32, 12\) vs optimizer \(16, 12\)"),
        (old, lambda m: torch.optim.SGD(net(hidden=16).parameters(), lr=0.1, momentum=0.9),
         r"parameter 0 momentum_buffer: file \(32, 12\) vs optimizer \(16, 12\)"),
    ]
    for file, make_opt, message in cases:
        model2 = net(seed=4)
        opt2 = make_opt(model2)
        _train_steps(model2, opt2)  # the optimizer has state of its own, which must survive
        snapshot = _snapshot(model2, opt2)
        with pytest.raises(ValueError, match=message):
            load(file, model2, optimizer=opt2)
        _assert_untouched(model2, opt2, snapshot)
    fresh = net(seed=4)
    fine = torch.optim.SGD(fresh.parameters(), lr=0.5)
    load(old, fresh, optimizer=fine)  # old files still load
    assert fine.param_groups[0]["momentum"] == 0.9 and torch.equal(fresh[0].weight, model[0].weight)


def test_optimizer_state_lacking_settings_is_refused_and_undone(tmp_path):
    model = net()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train_steps(model, adam)
    old = _as_old_file(save(model, tmp_path / "adam.safetensors", optimizer=adam), tmp_path / "old.safetensors")
    model2 = net(seed=4)
    sgd = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model2, sgd)
    snapshot = _snapshot(model2, sgd)
    with pytest.raises(ValueError, match=r"lacks the settings \['dampening', 'momentum'\]"):
        load(old, model2, optimizer=sgd)  # torch itself would load it and fail at the next step
    _assert_untouched(model2, sgd, snapshot)


def test_failed_scheduler_or_pruner_load_changes_nothing(tmp_path):
    model, pruner, opt, sched = make()
    run(model, pruner, opt, sched, 3, seed=1)
    path = save(model, tmp_path / "m.safetensors", pruner=pruner, optimizer=opt, scheduler=sched)
    model2, _, opt2, _ = make(seed=5)
    step_lr = torch.optim.lr_scheduler.StepLR(opt2, step_size=3)
    snapshot = _snapshot(model2, opt2)
    with pytest.raises(ValueError, match="class OneCycleLR, but the scheduler given is .*StepLR"):
        load(path, model2, optimizer=opt2, scheduler=step_lr)
    assert step_lr.state_dict()["step_size"] == 3
    _assert_untouched(model2, opt2, snapshot)

    custom = net()
    path = save(custom, tmp_path / "c.safetensors", pruner=prunekit.prune(custom, 0.5, criterion=lambda n, w: w.abs()))
    model3 = net(seed=6)
    before = {k: v.clone() for k, v in model3.state_dict().items()}
    with pytest.raises(ValueError, match="custom criterion"):
        load(path, model3)
    assert _same_state(model3.state_dict(), before)


def test_torch_pickle_files_are_named_as_such(tmp_path):
    model = net()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("sd.pt", "legacy.pt"):
        with pytest.raises(FileFormatError, match=r"is a torch\.save/pickle file.*weights_only=True.*prunekit\.save"):
            load(tmp_path / name, net())
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("x.txt", "hi")
    with pytest.raises(FileFormatError, match="is a zip archive, not a safetensors file"):
        load(tmp_path / "a.zip", net())
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(300))
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        load(tmp_path / "junk.safetensors", net())
    # a truncated safetensors file whose header length (1152) starts like a pickle's PROTO 4 opcode: not a pickle
    (tmp_path / "cut.safetensors").write_bytes((1152).to_bytes(8, "little") + b'{"w": {"dtype": "F32"')
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        load(tmp_path / "cut.safetensors", net())
    with pytest.raises(FileFormatError, match=f"no such file: {tmp_path / 'nope.safetensors'}"):
        load(tmp_path / "nope.safetensors", net())
    with pytest.raises(FileFormatError, match="is a directory, not a file"):
        load(tmp_path, net())


def test_writing_to_a_directory_or_under_a_file_is_a_clear_error(tmp_path):
    from prunekit.fileformat import write_text

    for call, example in [(lambda: save(net(), tmp_path), "model.safetensors"),
                          (lambda: write_text(tmp_path, '{"a": 1}\n'), "output.json")]:
        with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory.*{tmp_path / example}") as info:
            call()
        assert isinstance(info.value, ValueError)  # the command line reports ValueErrors without a traceback
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'} is a file, not a directory") as info:
        save(net(), tmp_path / "file" / "sub" / "m.safetensors")
    assert isinstance(info.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing left behind


def test_written_files_get_the_usual_permissions(tmp_path, monkeypatch):
    import stat

    from prunekit import fileformat

    current = os.umask(0o022)
    os.umask(current)
    path = save(net(), tmp_path / "m.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current
    monkeypatch.setattr(fileformat, "_UMASK", 0o027)
    assert stat.S_IMODE(fileformat.write_text(tmp_path / "r.json", "{}").stat().st_mode) == 0o640
    monkeypatch.setattr(fileformat, "_UMASK", 0o002)
    assert stat.S_IMODE(save(net(), path).stat().st_mode) == 0o664  # also when replacing a file
