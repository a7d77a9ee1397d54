"""Structured pruning beyond classification: torchvision detection, segmentation, video and optical-flow models,
prunekit vs Torch-Pruning 1.6.1 with its own torchvision recipe.

The issue's coverage bar names classifiers; users also bring detectors, segmenters and video models, whose heads
read the backbone's channels through FPNs, RoI pooling, anchors and 3-D convolutions. Each model is built with
random weights (``weights=None``; BatchNorm statistics taken from one random batch, as the coverage tests do, so that
no ReLU is dead and the comparisons below are not vacuous), then half of the channels are removed by both tools, each
in a child process of its own (memory cap ``--memory-gb``, time limit ``--timeout``):

* ``ours``: ``prunekit.structured.plan(model, inputs, 0.5)`` (L2, no ignore list) and ``plan.apply``; then the
  checks of the coverage tests: the pruned model runs end to end (detectors: the same output keys, boxes of shape
  (N, 4)); its *heads* — the outputs whose size pruning must not change: the class and box logits of every head on
  the model's own features (R-CNNs: of the RPN, and of the box, mask and keypoint heads on fixed boxes), the
  segmentation map, the video logits, the last flow field — keep their shape and stay finite; 0% pruning leaves
  them bit-identical; soft-pruned == physically pruned on the groups where that holds.
* ``tp``: Torch-Pruning's recipe for torchvision models (``examples/torchvision_models/torchvision_pruning.py``):
  ``MetaPruner(model, x, MagnitudeImportance(p=1), pruning_ratio=0.5)`` with the recipe's ignore list per family
  (Faster R-CNN: the RPN's logits and box deltas, the FPN and the RoI heads; Mask R-CNN: the RPN's logits and box
  deltas and the box and mask predictors; Keypoint R-CNN: the RPN's, the FPN's layer blocks, the box head and the
  box and keypoint predictors; RetinaNet: the class logits and box regression convs; FCOS: those and the centerness
  conv; SSD: the whole head; RAFT: the correlation block, update block and mask predictor) applied to every model
  of the family (the recipe names one version of some), and its input conventions (a batch tensor for detectors, a
  dict for RAFT, ``out`` for segmentation). Beyond the recipe, which ignores only Linear layers with 1000 outputs,
  the layer that produces the class logits of segmentation and video models is ignored too (else their number of
  classes would halve). Checked: the pruned model runs end to end and its heads keep their shape and stay finite.

MACs are counted for all by ``prunekit.flops.count_macs`` on the same input, end to end — except for the R-CNNs,
whose box, mask and keypoint heads run once per proposal or detection, and how many survive depends on the weights
(a random model and its pruned self keep different numbers). Their MACs are those of the backbone, FPN and RPN on
the image plus the box head on 1,000 proposals and the mask and keypoint heads on 100 detections: torchvision's
evaluation defaults (``rpn_post_nms_top_n_test``, ``box_detections_per_img``), for dense and pruned alike.
"ok" means every check passed.

Run (results are written after every model, a rerun skips finished ones; one process per core):
    .venv/bin/python benchmarks/task_coverage.py --shard 0/2 & .venv/bin/python benchmarks/task_coverage.py --shard 1/2
    .venv/bin/python benchmarks/task_coverage.py --models r3d_18 ssdlite320_mobilenet_v3_large   # a few
    .venv/bin/python benchmarks/task_coverage.py --tools ours   # prunekit again, Torch-Pruning's records kept
Needs ``torch-pruning==1.6.1`` (``.venv/bin/pip install torch-pruning==1.6.1 --no-deps``), a benchmark-only
dependency.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402
from _coverage import add_arguments, child, run, run_stages, tally  # noqa: E402

from prunekit.flops import count_macs  # noqa: E402

NAME = "task_coverage"
SMALL = {"min_size": 320, "max_size": 320}  # ResNet-50 detectors resize to 800 px by default: 320 keeps it quick

#: name -> (family, torchvision module, builder keyword arguments)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("rcnn", "detection", {}),
    "fasterrcnn_mobilenet_v3_large_fpn": ("rcnn", "detection", SMALL),
    "fasterrcnn_resnet50_fpn": ("rcnn", "detection", SMALL),
    "fasterrcnn_resnet50_fpn_v2": ("rcnn", "detection", SMALL),
    "maskrcnn_resnet50_fpn": ("rcnn", "detection", SMALL),
    "maskrcnn_resnet50_fpn_v2": ("rcnn", "detection", SMALL),
    "keypointrcnn_resnet50_fpn": ("rcnn", "detection", SMALL),
    "retinanet_resnet50_fpn": ("dense", "detection", SMALL),
    "retinanet_resnet50_fpn_v2": ("dense", "detection", SMALL),
    "fcos_resnet50_fpn": ("dense", "detection", SMALL),
    "ssd300_vgg16": ("ssd", "detection", {}),
    "ssdlite320_mobilenet_v3_large": ("ssd", "detection", {}),
    "fcn_resnet50": ("seg", "segmentation", {}),
    "deeplabv3_resnet50": ("seg", "segmentation", {}),
    "deeplabv3_mobilenet_v3_large": ("seg", "segmentation", {}),
    "lraspp_mobilenet_v3_large": ("seg", "segmentation", {}),
    "r3d_18": ("video", "video", {}),
    "mc3_18": ("video", "video", {}),
    "r2plus1d_18": ("video", "video", {}),
    "s3d": ("video", "video", {}),
    "raft_small": ("flow", "optical_flow", {}),
}
IMAGE = {"ssd300_vgg16": 300}  # detectors' image side (default 320)
CLIP = {"s3d": (16, 224)}  # video clips: (frames, side); S3D's final pooling needs 16 x 224 x 224 (default 4 x 64)
BOXES = torch.tensor([[10.0, 20.0, 200.0, 220.0], [50.0, 60.0, 120.0, 300.0], [0.0, 0.0, 319.0, 319.0]])


def _boxes(n: int, side: int = 320) -> torch.Tensor:
    """``n`` fixed boxes inside a ``side`` x ``side`` image (corners sorted, at least 8 px wide and high)."""
    xy = torch.rand(n, 2, 2, generator=torch.Generator().manual_seed(n)) * (side - 9)
    low, high = xy.min(dim=1).values, xy.max(dim=1).values + 8
    return torch.cat([low, high], dim=1)


def inputs_for(name: str) -> tuple[Any, Any]:
    """``(ours, tp)``: the model's input as prunekit's ``plan`` takes it (positional arguments) and as Torch-Pruning's
    recipe passes it."""
    family = MODELS[name][0]
    g = torch.Generator().manual_seed(0)
    if family in ("rcnn", "dense", "ssd"):
        side = IMAGE.get(name, 320)
        image = torch.rand(3, side, side, generator=g)
        return ([image],), image[None]
    if family == "seg":
        x = torch.randn(1, 3, 128, 128, generator=g)
        return (x,), x
    if family == "video":
        frames, side = CLIP.get(name, (4, 64))
        x = torch.randn(1, 3, frames, side, side, generator=g)
        return (x,), x
    a, b = torch.randn(1, 3, 128, 128, generator=g), torch.randn(1, 3, 128, 128, generator=g)
    return (a, b), {"image1": a, "image2": b}


def build(name: str) -> nn.Module:
    family, module, kwargs = MODELS[name]
    builder = getattr(importlib.import_module(f"torchvision.models.{module}"), name)
    torch.manual_seed(0)
    if family == "video" or family == "flow":
        model = builder(weights=None, **kwargs)
    else:
        model = builder(weights=None, weights_backbone=None, **kwargs)
    # BatchNorm statistics of one random batch instead of the initial (0, 1), which leave some heads' ReLUs dead
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and family != "flow":
        for m in norms:
            m.momentum = None
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            if family in ("rcnn", "dense", "ssd"):
                side = IMAGE.get(name, 320)
                model.backbone.train()(torch.rand(2, 3, side, side, generator=g))
            elif family == "seg":
                model.train()(torch.randn(2, 3, 128, 128, generator=g))
            else:
                frames, side = CLIP.get(name, (4, 64))
                model.train()(torch.randn(2, 3, frames, side, side, generator=g))
    return model.eval()


def heads(name: str, model: nn.Module, inputs: tuple[Any, ...], proposals: torch.Tensor = BOXES,
          detections: torch.Tensor = BOXES) -> torch.Tensor:
    """The outputs whose size pruning must keep, flattened into one tensor (see the module docstring); R-CNNs' box
    head runs on ``proposals``, their mask and keypoint heads on ``detections``."""
    family = MODELS[name][0]
    with torch.no_grad():
        if family in ("seg", "video", "flow"):
            out = model(*inputs)
            return (out["out"] if family == "seg" else out[-1] if family == "flow" else out).flatten()
        images, _ = model.transform(inputs[0])
        features = model.backbone(images.tensors)
        if family != "rcnn":  # one-stage detectors: the head's outputs on every feature level
            levels = list(features.values()) if isinstance(features, dict) else [features]
            return torch.cat([t.flatten() for t in model.head(levels).values()])
        objectness, deltas = model.rpn.head(list(features.values()))
        parts = [*objectness, *deltas]
        rh, sizes, found = model.roi_heads, images.image_sizes, [detections]
        parts += rh.box_predictor(rh.box_head(rh.box_roi_pool(features, [proposals], sizes)))
        if getattr(rh, "mask_predictor", None) is not None:
            parts.append(rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(features, found, sizes))))
        if getattr(rh, "keypoint_predictor", None) is not None:
            parts.append(rh.keypoint_predictor(rh.keypoint_head(rh.keypoint_roi_pool(features, found, sizes))))
        return torch.cat([t.flatten() for t in parts])


def check_end_to_end(name: str, model: nn.Module, inputs: tuple[Any, ...], dense_heads: torch.Tensor) -> None:
    """The pruned model runs on the full input; its heads keep their size and stay finite."""
    with torch.no_grad():
        out = model(*inputs)
    if MODELS[name][0] in ("rcnn", "dense", "ssd"):
        if not (isinstance(out, list) and len(out) == 1 and {"boxes", "labels", "scores"} <= set(out[0])
                and out[0]["boxes"].shape[1:] == (4,)):
            raise AssertionError(f"detections are not one dict with boxes (N, 4): {type(out).__name__}")
    h = heads(name, model, inputs)
    if h.shape != dense_heads.shape or not bool(torch.isfinite(h).all()):
        raise AssertionError(f"heads' size {tuple(h.shape)} (dense {tuple(dense_heads.shape)}) or not finite")


class _RCNNCost(nn.Module):
    """An R-CNN's work for a fixed number of proposals and detections (see the module docstring)."""

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__()
        self.name, self.model = name, model

    def forward(self, *inputs: Any) -> torch.Tensor:
        return heads(self.name, self.model, inputs, _boxes(1000), _boxes(100))


def macs(name: str, model: nn.Module, inputs: tuple[Any, ...]) -> int:
    if MODELS[name][0] == "rcnn":
        model = _RCNNCost(name, model)
    return count_macs(model, inputs, per_module=False).total


def prune_ours(name: str, model: nn.Module, inputs: tuple[Any, ...], rec: dict[str, Any]) -> Iterator[str]:
    """prunekit's steps; yields the name of each stage as it starts and fills ``rec``."""
    from prunekit.structured import plan, trace

    dense = heads(name, model, inputs)
    yield "trace"
    t0 = time.perf_counter()
    graph = trace(model, inputs)
    yield "plan"
    half = plan(model, inputs, 0.5, graph=graph)
    yield "apply"
    small = half.apply(copy.deepcopy(model))
    rec["prune_seconds"] = time.perf_counter() - t0
    yield "run"
    check_end_to_end(name, small, inputs, dense)
    rec.update(macs=macs(name, small, inputs), groups=len(half.groups), notes=list(half.notes))
    del small
    yield "zero"
    zero = plan(model, inputs, 0.0, graph=graph).apply(copy.deepcopy(model))
    if not torch.equal(heads(name, zero, inputs), dense):
        raise AssertionError("0% pruning changed the heads' outputs")
    yield "soft"
    exact = plan(model, inputs, lambda g: 0.5 if g.soft_exact else 0.0, graph=graph)
    if exact.slices:
        phys = heads(name, exact.apply(copy.deepcopy(model)), inputs)
        soft = heads(name, exact.apply(copy.deepcopy(model), soft=True), inputs)
        mismatch, scale = float((phys - soft).abs().max()), float(dense.abs().max())
        rec["soft_mismatch"] = mismatch / max(scale, 1e-12)
        rec["soft_change"] = float((phys - dense).abs().max()) / max(scale, 1e-12)  # > mismatch: not vacuous
        if mismatch > 1e-4 * scale:
            raise AssertionError(f"soft and physical pruning differ by {mismatch:.3g} (output scale {scale:.3g})")


def tp_ignored(name: str, model: nn.Module) -> list[nn.Module]:
    """Torch-Pruning's ignore list for ``name``: its recipe's, per family, and the class-logit layer."""
    family = MODELS[name][0]
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    if name.startswith("fasterrcnn"):
        ignored += [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.backbone.fpn, model.roi_heads]
    elif name.startswith("maskrcnn"):
        ignored += [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor,
                    model.roi_heads.mask_predictor]
    elif name.startswith("keypointrcnn"):
        ignored += [model.rpn.head.cls_logits, model.backbone.fpn.layer_blocks, model.rpn.head.bbox_pred,
                    model.roi_heads.box_head, model.roi_heads.box_predictor, model.roi_heads.keypoint_predictor]
    elif name.startswith("retinanet"):
        ignored += [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
    elif name.startswith("fcos"):
        ignored += [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg,
                    model.head.regression_head.bbox_ctrness]
    elif family == "ssd":
        ignored.append(model.head)
    elif family == "flow":
        ignored += [m for m in (model.corr_block, model.update_block, getattr(model, "mask_predictor", None))
                    if m is not None]
    elif family == "seg":  # beyond the recipe: the convs that produce the class logits
        c = model.classifier
        ignored += [c.low_classifier, c.high_classifier] if hasattr(c, "low_classifier") else [c[-1]]
    elif family == "video":  # beyond the recipe: the classifier (400 classes)
        ignored.append(model.fc if hasattr(model, "fc") else model.classifier[-1])
    return ignored


def prune_tp(name: str, model: nn.Module, inputs: tuple[Any, ...], rec: dict[str, Any]) -> Iterator[str]:
    """Torch-Pruning's torchvision recipe; yields the name of each stage as it starts and fills ``rec``."""
    import torch_pruning as tp

    dense = heads(name, model, inputs)
    _, example = inputs_for(name)
    yield "prune"
    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(True)
    transform: Callable[[Any], Any] | None = (lambda out: out["out"]) if MODELS[name][0] == "seg" else None
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=tp_ignored(name, model),
                                  output_transform=transform)
    pruner.step()
    rec["prune_seconds"] = time.perf_counter() - t0
    yield "run"
    check_end_to_end(name, model, inputs, dense)
    rec["macs"] = macs(name, model, inputs)


def run_tool(tool: str, name: str, size: int = 0) -> dict[str, Any]:
    """Build the model, run one tool's stages on it and record ``ok`` or the stage that failed and why (``size`` is
    unused: each model's inputs are fixed by :func:`inputs_for`)."""
    model = build(name)
    inputs, _ = inputs_for(name)
    rec: dict[str, Any] = {}
    return run_stages((prune_ours if tool == "ours" else prune_tp)(name, model, inputs, rec), rec)


def summarize(runs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rows, counts = tally(runs, lambda name, r: [name, MODELS.get(name, ("?",))[0]])
    text = table(rows, ["model", "family", "prunekit (MACs fewer)", "Torch-Pruning 1.6.1 (MACs fewer)"])
    text += (f"\n{counts['ours_ok']}/{counts['models']} models pruned and checked by prunekit "
             f"({counts['ours_2x']} with >= 2x fewer MACs; * = {counts['ours_kept_whole']} plans kept some modules "
             f"or channels whole to make the pruned model run), {counts['tp_ok']}/{counts['models']} by "
             f"Torch-Pruning with its recipe's ignore lists ({counts['tp_2x']} with >= 2x fewer MACs)")
    return text, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap, "torchvision", timeout=1800.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if child(args, run_tool):
        return
    import importlib.metadata

    def dense(name: str) -> dict[str, Any]:
        return {"family": MODELS[name][0], "dense_macs": macs(name, build(name), inputs_for(name)[0])}

    run(args, name=NAME, script=__file__, models=MODELS, dense=dense, size=lambda name: 0, summarize=summarize,
        meta={"torchvision": importlib.metadata.version("torchvision"),
              "torch_pruning": importlib.metadata.version("torch-pruning")})


if __name__ == "__main__":
    main()
