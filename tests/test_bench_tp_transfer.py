"""benchmarks/structured_latency.py: the pickle-free transfer of a pruned model from the Torch-Pruning child process
(``save_pruned`` / ``load_pruned``), on a model pruned by hand (Torch-Pruning itself is not needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("structured_latency", ROOT / "benchmarks" / "structured_latency.py")
sl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sl)


class Tiny(nn.Module):
    """Conv + BN, a free parameter, LayerNorm, MultiheadAttention and a Linear head; ``width`` is read in forward."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.width = width
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.token = nn.Parameter(torch.randn(1, 1, width))
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).reshape(x.shape[0], self.width, -1).transpose(1, 2)
        h = self.norm(torch.cat([self.token.expand(x.shape[0], -1, -1), h], 1))
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h[:, 0])


def prune_by_hand(model: Tiny) -> Tiny:
    """Keep embedding channels 0, 1, 4, 5 (two per head), as Torch-Pruning would: slice tensors, update attributes."""
    keep = torch.tensor([0, 1, 4, 5])
    qkv = torch.cat([keep + i * model.width for i in range(3)])
    with torch.no_grad():
        m = model
        m.conv.weight = nn.Parameter(m.conv.weight[keep].clone())
        m.conv.bias = nn.Parameter(m.conv.bias[keep].clone())
        m.conv.out_channels = 4
        for k in ("weight", "bias"):
            setattr(m.bn, k, nn.Parameter(getattr(m.bn, k)[keep].clone()))
            setattr(m.norm, k, nn.Parameter(getattr(m.norm, k)[keep].clone()))
        m.bn.running_mean, m.bn.running_var = m.bn.running_mean[keep].clone(), m.bn.running_var[keep].clone()
        m.bn.num_features = 4
        m.norm.normalized_shape = (4,)
        m.token = nn.Parameter(m.token[..., keep].clone())
        a = m.attn
        a.in_proj_weight = nn.Parameter(a.in_proj_weight[qkv][:, keep].clone())
        a.in_proj_bias = nn.Parameter(a.in_proj_bias[qkv].clone())
        a.out_proj.weight = nn.Parameter(a.out_proj.weight[keep][:, keep].clone())
        a.out_proj.bias = nn.Parameter(a.out_proj.bias[keep].clone())
        a.embed_dim = a.kdim = a.vdim = 4
        a.head_dim = 2
        a.out_proj.in_features = a.out_proj.out_features = 4
        m.head.weight = nn.Parameter(m.head.weight[:, keep].clone())
        m.head.in_features = 4
        m.width = 4
    return model


@pytest.fixture
def saved(tmp_path):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    pruned = prune_by_hand(Tiny())
    path = str(tmp_path / "pruned.safetensors")
    sl.save_pruned(pruned, Tiny(), x, path, prune_seconds=1.5)
    return pruned, x, path


def test_changed_attrs_names_exactly_what_pruning_changed():
    attrs = sl.changed_attrs(prune_by_hand(Tiny()), Tiny())
    assert attrs == {"": {"width": 4}, "conv": {"out_channels": 4}, "bn": {"num_features": 4},
                     "norm": {"normalized_shape": (4,)},
                     "attn": {"embed_dim": 4, "kdim": 4, "vdim": 4, "head_dim": 2},
                     "attn.out_proj": {"in_features": 4, "out_features": 4}, "head": {"in_features": 4}}


def test_round_trip_rebuilds_the_pruned_model(saved):
    pruned, x, path = saved
    model, info = sl.load_pruned(Tiny(), path)
    assert info == {"prune_seconds": 1.5}
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), pruned(x), rtol=0, atol=0)
    assert model.norm.normalized_shape == (4,) and model.width == 4 and model.attn.head_dim == 2
    assert model.attn._qkv_same_embed_dim  # not recorded, because pruning did not change it
    assert isinstance(model.token, nn.Parameter) and isinstance(model.attn.in_proj_weight, nn.Parameter)
    assert "running_mean" in model.bn._buffers and "running_mean" not in model.bn._parameters
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_the_file_holds_no_pickle_and_no_colliding_keys(saved):
    _, _, path = saved
    assert Path(path).read_bytes()[:1] != b"\x80"  # not a pickle stream (nor a torch zip)
    keys = set(load_file(path))
    assert {"__reference_input__", "__reference_output__"} <= keys
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["attrs"])[""] == {"width": 4}


@pytest.mark.parametrize("tamper", ["weight", "buffer", "attrs"])
def test_a_rebuilt_model_that_differs_is_refused(saved, tamper):
    _, _, path = saved
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    if tamper == "weight":
        tensors["attn.out_proj.weight"] = tensors["attn.out_proj.weight"] * 1.01
    elif tamper == "buffer":
        tensors["bn.running_mean"] = tensors["bn.running_mean"] + 0.01
    else:
        meta = {**meta, "attrs": json.dumps({k: v for k, v in json.loads(meta["attrs"]).items() if k != ""})}
    save_file(tensors, path, metadata=meta)
    with pytest.raises(RuntimeError):
        sl.load_pruned(Tiny(), path)


def test_tied_parameters_are_saved_and_stay_tied(tmp_path):
    def tied() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).eval()
        model[2].weight = model[0].weight
        return model

    path = str(tmp_path / "tied.safetensors")
    sl.save_pruned(tied(), tied(), torch.randn(3, 4), path, prune_seconds=0.0)
    model, _ = sl.load_pruned(tied(), path)
    assert model[0].weight is model[2].weight


class Versioned(nn.Module):
    """Loads only with its module version in the state dict's metadata, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_a_model_whose_loading_needs_its_version_metadata_is_rebuilt(tmp_path):
    path = str(tmp_path / "versioned.safetensors")
    pruned = Versioned()
    with torch.no_grad():
        pruned.fc.weight.mul_(2)
    sl.save_pruned(pruned, Versioned(), torch.randn(2, 4), path, prune_seconds=0.0)
    model, _ = sl.load_pruned(Versioned(), path)
    torch.testing.assert_close(model.fc.weight, pruned.fc.weight, rtol=0, atol=0)


def test_latency_passes_are_summarised_by_their_median_and_the_bars_judged_on_it():
    def lat(dense, fast, matched, theirs):
        return {"16": {"dense": {"median": dense}, "ours_2x": {"median": fast}, "ours_matched": {"median": matched},
                       "theirs": {"median": theirs}}}

    record = {"dense": {"macs": 400}, "ours_2x": {"macs": 200}, "ours_matched": {"macs": 100},
              "theirs": {"macs": 100}}
    # ratio of ours_2x per pass = (dense / fast) / 2: 0.70, 0.85, 0.90 -> median 0.85 (one pass alone would fail)
    passes = [lat(1.0, 1 / 1.4, 0.50, 0.40), lat(1.0, 1 / 1.7, 0.30, 0.40), lat(1.0, 1 / 1.8, 0.31, 0.30)]
    summaries = [sl.summarize_model({**record, "latency": p}) for p in passes]
    assert [s["bars"]["ratio_b16_0.8"] for s in summaries] == [False, True, True]
    median = sl.median_summary(record, summaries)
    assert median["ours_2x"]["ratio_b16"] == pytest.approx(0.85)
    assert median["ours_2x"]["passes"]["ratio_b16"] == pytest.approx([0.70, 0.85, 0.90])
    # matched vs Torch-Pruning: speed-ups 2.0/3.33/3.23 vs 2.5/2.5/3.33 -> medians 3.23 vs 2.5
    assert median["ours_matched"]["speedup_b16"] == pytest.approx(1 / 0.31)
    assert median["theirs"]["speedup_b16"] == pytest.approx(2.5)
    assert median["bars"] == {"ratio_b16_0.8": True, "vs_tp_b16": True}
    # the bar is paired within passes: Torch-Pruning's time over ours, 0.8, 1.33, 0.97 -> median 0.97
    assert median["ours_matched"]["vs_tp_b16"] == pytest.approx(0.30 / 0.31)
    assert median["ours_matched"]["passes"]["vs_tp_b16"] == pytest.approx([0.8, 0.40 / 0.30, 0.30 / 0.31])
    assert sl.median_summary(record, summaries[:1]) is summaries[0]


def test_the_torch_pruning_bar_pairs_the_two_models_within_each_pass():
    """resnet18, where ours_matched and Torch-Pruning's model have the same widths (ms, 3 passes at batch 16): the
    median speed-ups differ by 5% (2.84 vs 2.99), the paired ratios are 1.02, 0.95, 0.99."""
    def lat(dense, matched, theirs):
        return {"16": {"dense": {"median": dense}, "ours_matched": {"median": matched}, "theirs": {"median": theirs}}}

    record = {"dense": {"macs": 375}, "ours_matched": {"macs": 100}, "theirs": {"macs": 100}}
    passes = [{"latency": lat(315.9, 95.3, 96.9)}, {"latency": lat(336.2, 118.5, 112.3)},
              {"latency": lat(337.2, 124.1, 122.8)}]
    summaries = [sl.summarize_model({**record, **p}) for p in passes]
    median = sl.median_summary(record, summaries)
    assert median["ours_matched"]["speedup_b16"] / median["theirs"]["speedup_b16"] < sl.TOLERANCE
    assert median["ours_matched"]["vs_tp_b16"] == pytest.approx(122.8 / 124.1)
    assert median["bars"] == {"vs_tp_b16": True}
    # --resummarize recomputes the same summaries from the stored timings
    stored = {**record, "latency": passes[-1]["latency"], "passes": [{**p, "ours_2x": None} for p in passes]}
    sl.resummarize(stored)
    assert stored["summary"] == median
    assert [p["summary"] for p in stored["passes"]] == summaries


def test_a_model_whose_measuring_process_fails_is_recorded_with_the_reason():
    record = sl.model_in_child("no_such_model", ["--quick", "--no-torch-pruning"])
    assert record["model"] == "no_such_model"
    assert record["error"].startswith("the measuring process failed: AttributeError")
    assert "no_such_model" in record["error"] and "summary" not in record
