"""prunekit.report on hand-built models whose zeros, masks and MACs are known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prunekit.report import Report, report


def linear_with_six_zeros(bias: bool = False) -> nn.Linear:
    layer = nn.Linear(4, 4, bias=bias)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight.view(-1)[[0, 3, 5, 9, 10, 15]] = 0
        if bias:
            layer.bias.fill_(1.0)
    return layer


def half_mask(shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.arange(math.prod(shape)) % 2 == 0).reshape(shape)


def test_zeros_counted_on_the_weights():
    r = report(linear_with_six_zeros())
    (row,) = r.rows
    assert (row.name, row.kind, row.shape, row.params, row.nonzeros, row.sparsity) == (
        "weight", "Linear", (4, 4), 16, 10, 0.375)
    assert (r.params, r.prunable_params, r.nonzeros, r.sparsity, r.overall_sparsity) == (16, 16, 10, 0.375, 0.375)
    assert (r.dense_macs, r.effective_macs, r.mac_ratio) == (None, None, None)


def test_bias_is_not_prunable_but_counts_in_overall_sparsity():
    r = report(linear_with_six_zeros(bias=True))
    assert (r.params, r.prunable_params, r.sparsity) == (20, 16, 0.375)
    assert r.overall_sparsity == pytest.approx(6 / 20)


def test_sizes_dense_and_sparse_estimate():
    r = report(linear_with_six_zeros())
    assert r.dense_bytes == 16 * 4
    assert r.sparse_bytes == 10 * 4 + 2  # kept fp32 values + 16 mask bits
    half = report(linear_with_six_zeros().half())
    assert (half.dense_bytes, half.sparse_bytes) == (16 * 2, 10 * 2 + 2)


def test_masks_take_precedence_over_weight_values():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    r = report(model, masks={"0.weight": half_mask((8, 8))})
    assert [(row.name, row.nonzeros, row.sparsity) for row in r.rows] == [("0.weight", 32, 0.5), ("2.weight", 32, 0.0)]
    assert r.sparsity == pytest.approx(32 / 96)


def test_effective_macs_halve_when_half_a_layer_is_masked():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    dense = report(model, example_inputs=x)
    masked = report(model, masks={"0.weight": half_mask((8, 8))}, example_inputs=x)
    assert [(row.dense_macs, row.effective_macs) for row in dense.rows] == [(192, 192), (96, 96)]
    assert [(row.dense_macs, row.effective_macs) for row in masked.rows] == [(192, 96), (96, 96)]
    assert (masked.dense_macs, masked.effective_macs, masked.mac_ratio) == (288, 192, pytest.approx(2 / 3))


def test_macs_outside_prunable_weights_stay_dense():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = Block()
    masks = {"attn.in_proj_weight": torch.zeros(48, 16, dtype=torch.bool),
             "attn.out_proj.weight": torch.zeros(16, 16, dtype=torch.bool)}
    r = report(model, masks=masks, example_inputs=torch.randn(2, 5, 16))
    rows = {row.name: row for row in r.rows}
    assert rows["attn.in_proj_weight"].kind == "MultiheadAttention"
    assert (rows["attn.in_proj_weight"].dense_macs, rows["attn.out_proj.weight"].dense_macs) == (7680, 2560)
    assert r.dense_macs == 7680 + 2560 + 1600
    assert r.effective_macs == 1600  # QK^T and AV read no weight
    unmasked = {row.name: row.kind for row in report(model).rows}  # prunable by default, as the Pruner has them
    assert unmasked["attn.in_proj_weight"] == "MultiheadAttention" and "attn.out_proj.weight" in unmasked


def test_tied_weights_appear_once_and_masks_accept_any_name():
    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    r = report(model, masks={"1.weight": half_mask((10, 4))}, example_inputs=torch.tensor([[1, 2, 3]]))
    (row,) = r.rows
    assert (row.name, row.kind, row.nonzeros, row.dense_macs, row.effective_macs) == ("0.weight", "Linear", 20, 120, 60)
    assert (r.params, r.dense_bytes) == (40, 160)
    with pytest.raises(ValueError, match="twice"):
        report(model, masks={"0.weight": half_mask((10, 4)), "1.weight": half_mask((10, 4))})


def test_conv_rows_and_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    r = report(model, example_inputs=torch.randn(1, 3, 10, 10))
    assert [(row.name, row.kind, row.dense_macs) for row in r.rows] == [
        ("0.weight", "Conv2d", 8 * 3 * 9 * 100), ("2.weight", "Conv2d", 8 * 9 * 100)]
    assert r.dense_macs == r.effective_macs == 21600 + 7200


def test_model_without_prunable_tensors_is_finite(tmp_path):
    for model in (nn.Sequential(nn.ReLU()), nn.LayerNorm(4)):
        r = report(model, example_inputs=torch.randn(2, 4))
        assert r.rows == ()
        assert (r.prunable_params, r.sparsity, r.overall_sparsity, r.dense_macs, r.mac_ratio) == (0, 0.0, 0.0, 0, 1.0)
        assert json.loads(r.to_json())["totals"]["sparsity"] == 0.0
        assert "total (prunable)" in str(r)
        r.plot(tmp_path / "empty.png")
        assert (tmp_path / "empty.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_fully_pruned_layer():
    model = nn.Linear(4, 2, bias=False)
    r = report(model, masks={"weight": torch.zeros(2, 4, dtype=torch.bool)}, example_inputs=torch.randn(1, 4))
    assert (r.sparsity, r.effective_macs, r.mac_ratio, r.sparse_bytes) == (1.0, 0, 0.0, 1)


def test_json_round_trip_written_atomically(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    r = report(model, masks={"0.weight": half_mask((8, 8))}, example_inputs=torch.randn(1, 8))
    path = tmp_path / "report.json"
    text = r.to_json(path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data == json.loads(text) == r.to_dict()
    assert data["totals"] == {
        "params": 108, "prunable_params": 96, "nonzeros": 64, "sparsity": pytest.approx(1 / 3),
        "overall_sparsity": pytest.approx(32 / 108), "dense_macs": 96, "effective_macs": 64,
        "mac_ratio": pytest.approx(2 / 3), "dense_bytes": 432, "sparse_bytes": 432 - 32 * 4 + 12,
    }
    assert data["rows"][0] == {"name": "0.weight", "kind": "Linear", "shape": [8, 8], "params": 64, "nonzeros": 32,
                               "sparsity": 0.5, "dense_macs": 64, "effective_macs": 32}


def test_text_table_has_rows_and_totals():
    text = str(report(linear_with_six_zeros(), example_inputs=torch.randn(2, 4)))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "kind", "shape", "params", "nonzeros", "sparsity", "MACs", "dense", "MACs",
                                "effective"]
    assert lines[1].split() == ["weight", "Linear", "4x4", "16", "10", "37.50%", "32", "20"]
    assert lines[2].split() == ["total", "(prunable)", "16", "10", "37.50%", "32", "20"]
    assert len({len(line) for line in lines[:3]}) == 1  # columns aligned
    assert "MACs: 32 dense, 20 effective (0.625 of dense)" in text


def test_plot_is_a_png(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    path = tmp_path / "sparsity.png"
    report(model, masks={"0.weight": half_mask((8, 8))}).plot(path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in tmp_path.iterdir()] == ["sparsity.png"]


def test_report_only_reads_the_model():
    model = linear_with_six_zeros(bias=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report(model, masks={"weight": half_mask((4, 4))}, example_inputs=torch.randn(1, 4))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_is_frozen():
    r = report(nn.Linear(2, 2))
    assert isinstance(r, Report)
    with pytest.raises(AttributeError):
        r.sparsity = 0.5


def test_mask_errors_name_the_key_and_the_fix():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"'0\.weght'.*'0\.weight'"):
        report(model, masks={"0.weght": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"torch\.float32.*bool"):
        report(model, masks={"0.weight": torch.ones(4, 4)})
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 4\)"):
        report(model, masks={"0.weight": torch.ones(4, 2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="list"):
        report(model, masks=[torch.ones(4, 4, dtype=torch.bool)])
    with pytest.raises(TypeError, match="got str"):
        report("model")


def test_accepts_a_prunekit_mask_and_looks_through_wrappers():
    from prunekit.masks import Mask

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = Mask({"0.weight": half_mask((8, 8))})
    r = report(nn.DataParallel(model), masks, torch.randn(1, 8))  # names as in the unwrapped model
    assert [row.name for row in r.rows] == ["0.weight", "2.weight"]
    assert (r.rows[0].sparsity, r.effective_macs) == (0.5, 32 + 32)


def test_wrong_shaped_example_input_names_its_shape_and_what_the_layer_expects():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).train()
    with pytest.raises(ValueError, match=r"shape \(3, 5\) failed in layer '0' \(Linear\), which expects inputs with 8 "
                                         r"features in the last dimension and got \(3, 5\).*mat1 and mat2.*Pass "
                                         r"example_inputs shaped like"):
        report(model, example_inputs=torch.randn(3, 5))
    assert model.training and all(m.training for m in model.modules())  # modes restored, no hooks left
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"\(1, 1, 10, 10\).*'0' \(Conv2d\).*\(N, 3, H, W\): 3 channels"):
        report(conv, example_inputs=torch.randn(1, 1, 10, 10))
    with pytest.raises(ValueError, match=r"\(3, 10, 10\) failed in layer '1' \(BatchNorm2d\), which expects inputs "
                                         r"of shape \(N, 8, H, W\) and got \(8, 8, 8\); the model's first layer '0' "
                                         r"\(Conv2d\) expects inputs of shape \(N, 3, H, W\)"):
        report(conv, example_inputs=torch.randn(3, 10, 10))  # unbatched: the conv runs, BatchNorm2d fails
    with pytest.raises(TypeError, match="got list"):  # a wrong type stays a TypeError naming the accepted types
        report(conv, example_inputs=[torch.randn(1, 3, 10, 10)])


@pytest.mark.slow
def test_report_run_of_a_structured_run_reports_the_physically_pruned_model(tmp_path):
    import copy

    import prunekit
    from prunekit.checkpoint import save
    from prunekit.flops import count_macs
    from prunekit.models import get_model
    from prunekit.report import report_run

    torch.manual_seed(0)
    model = get_model("lenet300").eval()
    x = torch.zeros(1, 1, 28, 28)
    plan = prunekit.structured.plan(model, x, sparsity=0.5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "lenet300", "width": 1.0, "structured": {}}))
    save(plan.apply(copy.deepcopy(model), soft=True), run / "checkpoint.safetensors")
    small = plan.apply(copy.deepcopy(model))
    prunekit.structured.save(small, run / "model.safetensors", plan)

    r = report_run(run)
    assert r.structured and r.source == str(run / "model.safetensors")
    rows = {row.name: row for row in r.model.rows}
    assert rows["fc1.weight"].shape == (150, 784) and rows["fc2.weight"].shape == (50, 150)
    assert r.model.params == sum(p.numel() for p in small.parameters()) == 117_600 + 150 + 7_500 + 50 + 510
    assert r.model.dense_macs == count_macs(small, x).total == 117_600 + 7_500 + 500
    assert (r.reference_params, r.reference_macs) == (266_610, 266_200)
    assert r.full_size is not None and r.full_size.rows[0].shape == (300, 784)
    text = str(r)
    assert text.splitlines()[0].startswith("physically pruned model (structured pruning")
    assert "150x784" in text and "full-size view" in text and "300x784" in text.split("full-size view")[1]
    assert "parameters: 266,610 before pruning -> 125,810 (2.12x fewer)" in text
    doc = json.loads(r.to_json(tmp_path / "r.json"))
    assert doc["totals"]["params"] == 125_810 and doc["structured"]["params_before"] == 266_610
    assert doc["structured"]["full_size"]["rows"][0]["shape"] == [300, 784]
    r.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")

    (run / "model.safetensors").unlink()  # an unfinished structured run: the checkpoint, with a note saying so
    unfinished = report_run(run)
    assert not unfinished.structured and unfinished.model.rows[0].shape == (300, 784)
    assert "has not finished" in str(unfinished)
