"""Does structured pruning work on the model you bring? 65 timm architectures, prunekit vs Torch-Pruning 1.6.1.

The issue's coverage bar names 15 torchvision models; users bring others. This sweep takes the timm families people
prune (ResNet variants with SE/ECA/SK/split attention, Res2Net, CSP, DPN, HRNet, RepVGG/MobileOne, GhostNet,
EfficientNet/MobileNet/RexNet/LCNet/MixNet, ConvNeXt, PoolFormer, MobileViT, EfficientFormer, FastViT, ViT/DeiT/EVA/
BEiT/CaiT, LeViT, PVT, Twins, Swin, CoaT, CrossViT, TinyViT, MLP-Mixer/ResMLP/gMLP, Sequencer, HaloNet/BoTNet,
MaxViT/CoAtNet, GCViT, Hiera, ...), builds each with random weights and ``num_classes=10`` (layer-scale parameters set
to 1 so that every block matters) and removes half of the channels with both tools, each in a child process of its
own (memory cap ``--memory-gb``, time limit ``--timeout``):

* ``ours``: ``prunekit.structured.plan(model, x, 0.5)`` (L2, no ignore list) and ``plan.apply``; then the checks of
  the coverage tests: the pruned model runs, its output shape is unchanged and finite; 0% pruning is output-identical;
  soft-pruned == physically pruned on the groups where that holds. ``notes`` counts plans that had to keep some
  channels whole to make the pruned model run (the plan says which and why).
* ``tp``: Torch-Pruning's own recipe for timm models (``examples/timm_models/prune_timm_models.py``):
  ``MetaPruner(model, x, GroupMagnitudeImportance(p=2), pruning_ratio=0.5)``, the classifier ignored (beyond the
  recipe's Linear layers with 10 outputs, also timm's ``get_classifier()``: DLA's is a 1x1 conv), ``num_heads``
  passed for every module with ``num_heads`` and ``qkv``, and ``num_heads``/``head_dim`` (and, beyond the recipe,
  timm's newer ``attn_dim``) set afterwards. Checked: the pruned model runs, output shape unchanged and finite.

MACs are counted for both by ``prunekit.flops.count_macs`` on the same input. "ok" means the checks pass; a MAC
reduction below 2x is reported, not failed (the issue's 2x bar is for its 15 models).

Run (results are written after every model, a rerun skips finished ones; one process per core):
    .venv/bin/python benchmarks/timm_coverage.py --shard 0/2 & .venv/bin/python benchmarks/timm_coverage.py --shard 1/2
    .venv/bin/python benchmarks/timm_coverage.py --models vit_tiny_patch16_224 resnet26d   # a few
    .venv/bin/python benchmarks/timm_coverage.py --tools ours --shard 0/2 & ...   # prunekit again, TP's kept
Needs ``timm`` and ``torch-pruning==1.6.1`` (``.venv/bin/pip install timm torch-pruning==1.6.1 --no-deps``); both are
benchmark-only dependencies.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402
from _coverage import add_arguments, child, run, run_stages, tally  # noqa: E402

from prunekit.flops import count_macs  # noqa: E402

NAME = "timm_coverage"

#: (timm name, input size): 64x64 where the architecture allows it, else its smallest natural size.
MODELS: list[tuple[str, int]] = [
    ("resnet26d", 64), ("seresnext26d_32x4d", 64), ("ecaresnet26t", 64), ("skresnet18", 64),
    ("res2net50_26w_4s", 64), ("resnest14d", 64), ("dpn68", 64), ("dla34", 64), ("hrnet_w18_small", 64),
    ("cspresnet50", 64), ("cspdarknet53", 64), ("gernet_s", 64), ("selecsls42b", 64), ("nf_resnet26", 64),
    ("repvgg_a0", 64), ("mobileone_s0", 64), ("ghostnet_100", 64), ("repghostnet_050", 64),
    ("efficientnet_b0", 64), ("tinynet_a", 64), ("mobilenetv3_large_100", 64), ("mobilenetv4_conv_small", 64),
    ("mixnet_s", 64), ("lcnet_050", 64), ("rexnet_100", 64), ("regnety_002", 64), ("hgnetv2_b0", 64),
    ("ese_vovnet19b_dw", 64), ("inception_v3", 96), ("xception41", 64), ("convnext_atto", 64),
    ("convnextv2_atto", 64), ("inception_next_tiny", 64), ("poolformer_s12", 64), ("poolformerv2_s12", 64),
    ("edgenext_xx_small", 64), ("efficientvit_b0", 64), ("fastvit_t8", 64), ("mobilevit_xxs", 64),
    ("mobilevitv2_050", 64), ("efficientformer_l1", 224), ("efficientformerv2_s0", 224),
    ("vit_tiny_patch16_224", 64), ("deit_tiny_distilled_patch16_224", 64), ("vit_small_patch16_224", 64),
    ("eva02_tiny_patch14_224", 56), ("beit_base_patch16_224", 64), ("cait_xxs24_224", 64), ("levit_128s", 224),
    ("pvt_v2_b0", 64), ("twins_svt_small", 64), ("swin_tiny_patch4_window7_224", 224), ("coat_lite_tiny", 64),
    ("crossvit_tiny_240", 240), ("tiny_vit_5m_224", 224), ("resmlp_12_224", 64), ("mixer_s16_224", 64),
    ("gmlp_s16_224", 64), ("sequencer2d_s", 224), ("halonet26t", 256), ("botnet26t_256", 256),
    ("maxvit_nano_rw_256", 256), ("coatnet_nano_rw_224", 224), ("gcvit_xxtiny", 224), ("hiera_tiny_224", 224),
]


def build(name: str, size: int) -> nn.Module:
    import timm

    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
    except TypeError:  # CNNs take no img_size
        model = timm.create_model(name, pretrained=False, num_classes=10)
    for m in model.modules():  # layer scales start near 0: blocks would barely touch the output
        for attr in ("gamma", "layer_scale", "gamma_1", "gamma_2", "ls1", "ls2"):
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter):
                nn.init.constant_(p, 1.0)
    return model.eval()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _check_output(out: torch.Tensor, dense: torch.Tensor) -> None:
    if out.shape != dense.shape or not bool(torch.isfinite(out).all()):
        raise AssertionError(f"output shape {tuple(out.shape)} (dense {tuple(dense.shape)}) or not finite")


def prune_ours(model: nn.Module, x: torch.Tensor, dense: torch.Tensor, rec: dict[str, Any]) -> Iterator[str]:
    """prunekit's steps; yields the name of each stage as it starts and fills ``rec``."""
    from prunekit.structured import plan, trace

    yield "trace"
    t0 = time.perf_counter()
    graph = trace(model, x)
    yield "plan"
    half = plan(model, x, 0.5, graph=graph)
    yield "apply"
    small = half.apply(copy.deepcopy(model))
    rec["prune_seconds"] = time.perf_counter() - t0
    yield "run"
    _check_output(_run(small, x), dense)
    rec.update(macs=count_macs(small, x).total, groups=len(half.groups), notes=list(half.notes))
    yield "zero"
    zero = plan(model, x, 0.0, graph=graph).apply(copy.deepcopy(model))
    if not torch.equal(_run(zero, x), dense):
        raise AssertionError("0% pruning changed the output")
    yield "soft"
    exact = plan(model, x, lambda g: 0.5 if g.soft_exact else 0.0, graph=graph)
    if exact.slices:
        phys = _run(exact.apply(copy.deepcopy(model)), x)
        soft = _run(exact.apply(copy.deepcopy(model), soft=True), x)
        mismatch, scale = float((phys - soft).abs().max()), float(dense.abs().max())
        rec["soft_mismatch"] = mismatch / max(scale, 1e-12)
        if mismatch > 1e-4 * scale:
            raise AssertionError(f"soft and physical pruning differ by {mismatch:.3g} (output scale {scale:.3g})")


def prune_tp(model: nn.Module, x: torch.Tensor, dense: torch.Tensor, rec: dict[str, Any]) -> Iterator[str]:
    """Torch-Pruning's timm recipe; yields the name of each stage as it starts and fills ``rec``."""
    import torch_pruning as tp

    yield "prune"
    t0 = time.perf_counter()
    # the recipe ignores Linear layers with num_classes outputs; timm's get_classifier() also finds a conv head
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10 or m is head]
    num_heads = {}
    for m in model.modules():
        if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear):
            num_heads[m.qkv] = m.num_heads
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=ignored, num_heads=num_heads)
    pruner.step()
    for m in model.modules():
        if hasattr(m, "num_heads") and getattr(m, "qkv", None) in num_heads:
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
    rec["prune_seconds"] = time.perf_counter() - t0
    yield "run"
    _check_output(_run(model, x), dense)
    rec["macs"] = count_macs(model, x).total


def run_tool(tool: str, name: str, size: int) -> dict[str, Any]:
    """Build the model, run one tool's stages on it and record ``ok`` or the stage that failed and why."""
    model = build(name, size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    dense = _run(model, x)
    rec: dict[str, Any] = {}
    return run_stages((prune_ours if tool == "ours" else prune_tp)(model, x, dense, rec), rec)


def summarize(runs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rows, counts = tally(runs, lambda name, r: [name])
    text = table(rows, ["model", "prunekit (MACs fewer)", "Torch-Pruning 1.6.1 (MACs fewer)"])
    text += (f"\n{counts['ours_ok']}/{counts['models']} models pruned and checked by prunekit "
             f"({counts['ours_2x']} with >= 2x fewer MACs; * = {counts['ours_kept_whole']} plans kept some modules "
             f"or channels whole to make the pruned model run, + = {counts['ours_tied_width']} tied an attention's "
             f"width to its input's), {counts['tp_ok']}/{counts['models']} by Torch-Pruning "
             f"({counts['tp_2x']} with >= 2x fewer MACs)")
    return text, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap, "timm", timeout=900.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if child(args, run_tool):
        return
    import importlib.metadata

    sizes = dict(MODELS)

    def dense(name: str) -> dict[str, Any]:
        size = sizes[name]
        return {"size": size, "dense_macs": count_macs(build(name, size), torch.randn(1, 3, size, size)).total}

    run(args, name=NAME, script=__file__, models=sizes, dense=dense, size=sizes.__getitem__, summarize=summarize,
        meta={"timm": importlib.metadata.version("timm"),
              "torch_pruning": importlib.metadata.version("torch-pruning")})


if __name__ == "__main__":
    main()
