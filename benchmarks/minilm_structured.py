"""MiniLM heads + FFN neurons pruned to half the encoder MACs: embedding quality before/after distillation, latency.

Model: sentence-transformers all-MiniLM-L6-v2 (``prunekit.data.pretrained.minilm``: a 6-layer BertModel, 12 heads,
FFN 1536) with its mean pooling, as one module (``MeanPooled``) so that pruning, fine-tuning and timing see what a
user embeds with. Protocol (issue 5, MiniLM bar):

* **Pruning**: ``prunekit.structured.plan`` removes half of the attention heads (6 of 12) and half of the FFN hidden
  units (768 of 1536) of every layer; the embedding width (384) is kept. That halves the encoder's MACs at any
  sequence length (projections, attention scores and FFN all scale with heads or FFN units). Criteria:
  ``l2`` (group weight norm), ``activation`` (mean |activation| on calibration sentences) and ``taylor``
  (Molchanov's first-order Taylor on the calibration sentences; the loss is an in-batch contrastive distillation
  loss against the dense model's embeddings — a plain distance to the dense model has zero gradient at the dense
  model, where one-shot pruning starts).
* **Data** (Jane Austen, ``prunekit.data.text.austen``, split into sentences of 6-60 words): evaluation = 1,000
  sentences of *Persuasion* (held out); validation (learning-rate choice) = 500 sentences of *Emma*; calibration
  (32 batches of 16) and fine-tuning = sentences of the other four novels.
* **Fine-tuning** (of the criterion with the best validation cosine after pruning; ``--tune-all`` for every one):
  distillation from the dense model — 1 - cosine of the pooled embeddings plus the relative squared error of every
  layer's hidden states — AdamW, linear decay, ``--steps`` steps of ``--batch`` sentences of similar length; the
  learning rate is chosen on the validation sentences from ``--lrs`` (never on *Persuasion*).
* **Metric**: mean cosine similarity between the pruned and the dense model's mean-pooled, L2-normalised embeddings
  on the evaluation sentences, before and after fine-tuning. Bar: **>= 0.90 after fine-tuning**.
* **Latency** (same protocol as the structured issue): ``prunekit.structured.measure_latency``,
  ``torch.inference_mode``, 2 threads, >= 3 warm-ups, median of ``--repeats`` samples, dense and pruned interleaved;
  batch 1 and 16 of 128-token inputs; MACs counted by ``prunekit.flops.count_macs`` on the same inputs.
* The pruned model is saved with ``prunekit.structured.save`` and reloaded into a fresh MiniLM with
  ``prunekit.structured.load``; the reloaded model must give the same embeddings.

Results go to ``benchmarks/results/minilm_structured[_quick].json`` after every criterion (a rerun skips finished
ones), with a Markdown table and a PNG.

Run (quiet machine for the latency columns; ~45 min):  .venv/bin/python benchmarks/minilm_structured.py
Smoke (~3 min):                                        .venv/bin/python benchmarks/minilm_structured.py --quick
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metadata, png_path, setup_torch, table  # noqa: E402
from _harness import RESULTS, ResultStore  # noqa: E402

from prunekit.data.pretrained import minilm  # noqa: E402
from prunekit.data.text import austen  # noqa: E402
from prunekit.fileformat import write_text  # noqa: E402
from prunekit.flops import count_macs, count_params  # noqa: E402
from prunekit.structured import TaylorScore, measure_latency, plan  # noqa: E402
from prunekit.structured import load as load_structured  # noqa: E402
from prunekit.structured import save as save_structured  # noqa: E402

NAME = "minilm_structured"
CRITERIA = ["l2", "activation", "taylor"]
BAR = 0.90
EVAL_NOVEL, VAL_NOVEL = "persuasion", "emma"
TRAIN_NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "northangerabbey"]


class MeanPooled(nn.Module):
    """A BertModel followed by sentence-transformers' mean pooling over the attention mask (not normalised)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


def sentences(novel: str) -> list[str]:
    """The novel's sentences of 6-60 words (whitespace normalised)."""
    text = re.sub(r"\s+", " ", austen(novel))
    parts = (s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[\"'A-Z])", text))
    return [s for s in parts if 6 <= len(s.split()) <= 60]


def sample(items: list[str], n: int, seed: int) -> list[str]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


class Data:
    def __init__(self, tokenizer: Any, quick: bool) -> None:
        self.tokenizer = tokenizer
        self.eval = sample(sentences(EVAL_NOVEL), 200 if quick else 1000, 0)
        self.val = sample(sentences(VAL_NOVEL), 100 if quick else 500, 1)
        pool = [s for novel in TRAIN_NOVELS for s in sentences(novel)]
        self.pool = sample(pool, len(pool), 2)
        self.calibration = [self.batch(self.pool[i * 16:(i + 1) * 16]) for i in range(4 if quick else 32)]
        self.train = self.pool[16 * len(self.calibration):]

    def batch(self, items: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
        kw: dict[str, Any] = {"padding": "max_length", "max_length": length} if length else {"padding": True}
        b = self.tokenizer(items, truncation=True, return_tensors="pt", **({"max_length": 128} | kw))
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def embed(model: nn.Module, data: Data, items: list[str]) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([F.normalize(model(**data.batch(items[i:i + 64])), dim=-1) for i in range(0, len(items), 64)])


def mean_cosine(model: nn.Module, data: Data, items: list[str], reference: torch.Tensor) -> float:
    return float((embed(model, data, items) * reference).sum(-1).mean())


def contrastive(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In-batch contrastive distillation: each sentence's embedding must be closest to its own dense embedding."""
    p, t = F.normalize(prediction, dim=-1), F.normalize(target, dim=-1)
    return F.cross_entropy(p @ t.T / 0.05, torch.arange(len(p)))


def is_head_or_ffn(group: Any) -> float:
    """Half of every head group and FFN group; the hidden width (if it forms a group) stays."""
    names = [m.name for m in group.members]
    heads = any(r.startswith("heads") for r in group.rules)
    ffn = any("intermediate.dense" in n for n in names)
    return 0.5 if heads or ffn else 0.0


def prune(dense: MeanPooled, data: Data, criterion: str) -> tuple[nn.Module, Any, float]:
    example = data.batch(data.eval[:1])
    t0 = time.perf_counter()
    if criterion == "taylor":
        kw: dict[str, Any] = {"criterion": TaylorScore(data.calibration, loss=contrastive, teacher=dense)}
    elif criterion == "activation":
        kw = {"criterion": "activation", "data": data.calibration}
    else:
        kw = {"criterion": criterion}
    p = plan(dense, example, is_head_or_ffn, **kw)
    small = p.apply(copy.deepcopy(dense), quiet_config=True)  # BERT's config cannot say the head count: ours can
    return small, p, time.perf_counter() - t0


def _states(model: MeanPooled, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean-pooled embedding and every layer's hidden states (the embeddings' output first)."""
    out = model.encoder(**b, output_hidden_states=True)
    weight = b["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
    return pooled, list(out.hidden_states)


def distillation_loss(student: MeanPooled, teacher: MeanPooled, b: dict[str, torch.Tensor],
                      hidden_weight: float) -> torch.Tensor:
    """1 - cosine of the pooled embeddings, plus ``hidden_weight`` x the mean squared error of every layer's hidden
    states over the real tokens, relative to the teacher's mean square (the pruned model keeps the 6 layers and
    the width, so each layer can be matched, as in TinyBERT/MiniLM distillation)."""
    with torch.no_grad():
        t_pooled, t_hidden = _states(teacher, b)
    s_pooled, s_hidden = _states(student, b)
    loss = (1 - F.cosine_similarity(s_pooled, t_pooled, dim=-1)).mean()
    if hidden_weight:
        mask = b["attention_mask"].bool()
        terms = [((s[mask] - t[mask]) ** 2).mean() / (t[mask] ** 2).mean() for s, t in zip(s_hidden, t_hidden)]
        loss = loss + hidden_weight * torch.stack(terms).mean()
    return loss


def finetune(student: nn.Module, teacher: nn.Module, data: Data, *, lr: float, steps: int, batch: int,
             hidden_weight: float = 1.0, seed: int = 0) -> float:
    """AdamW with linear decay on :func:`distillation_loss`; batches of sentences of similar length (less padding),
    in random order. Returns the seconds taken."""
    torch.manual_seed(seed)
    items = sorted(data.train, key=len)
    chunks = [items[i:i + batch] for i in range(0, len(items) - batch + 1, batch)]
    rng = random.Random(seed)
    order = [rng.randrange(len(chunks)) for _ in range(steps)]
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    t0 = time.perf_counter()
    student.train()
    teacher.eval()
    for i in tqdm(range(steps), desc=f"distillation lr {lr:g}", leave=False, mininterval=5):
        loss = distillation_loss(student, teacher, data.batch(chunks[order[i]]), hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    student.eval()
    return time.perf_counter() - t0


def latency(dense: nn.Module, small: nn.Module, data: Data, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bs in (1, 16):
        x = data.batch(sample(data.eval, bs, 3), length=128)
        macs = (count_macs(dense, x).total, count_macs(small, x).total)
        lat = measure_latency({"dense": dense, "pruned": small}, x, repeats=repeats, warmup=3, threads=2)
        speedup = lat["dense"].median / lat["pruned"].median
        out[f"batch{bs}"] = {"tokens": 128, "macs": list(macs), "mac_reduction": macs[0] / macs[1],
                             "dense_ms": lat["dense"].median * 1e3, "pruned_ms": lat["pruned"].median * 1e3,
                             "speedup": speedup, "speedup_per_mac_reduction": speedup / (macs[0] / macs[1]),
                             "samples_ms": {k: [s * 1e3 for s in v.samples] for k, v in lat.items()}}
    return out


def check_reload(small: nn.Module, p: Any, data: Data) -> float:
    """Save with prunekit.structured.save, reload into a fresh MiniLM; max |difference| of the embeddings."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm-pruned.safetensors"
        save_structured(small, path, p)
        fresh = MeanPooled(minilm()[0])
        back = load_structured(path, fresh, example_inputs=data.batch(data.eval[:2]))
    items = data.eval[:64]
    return float((embed(small, data, items) - embed(back, data, items)).abs().max())


def prune_only(criterion: str, dense: MeanPooled, data: Data, ref_eval: torch.Tensor, ref_val: torch.Tensor,
               ) -> tuple[dict[str, Any], nn.Module, Any]:
    small, p, prune_s = prune(dense, data, criterion)
    record: dict[str, Any] = {
        "criterion": criterion, "prune_seconds": prune_s, "units": list(p.pruned_units),
        "params": [count_params(dense), count_params(small)],
        "kept_heads_per_layer": [g.units - g.pruned for g in p.groups if any(r.startswith("heads") for r in g.rules)],
        "val_cosine_before": mean_cosine(small, data, data.val, ref_val),
        "cosine_before": mean_cosine(small, data, data.eval, ref_eval),
    }
    print(f"{criterion}: pruned in {prune_s:.1f} s; cosine to dense before fine-tuning: validation "
          f"{record['val_cosine_before']:.4f}, evaluation {record['cosine_before']:.4f}", flush=True)
    return record, small, p


def tune(record: dict[str, Any], small: nn.Module, p: Any, dense: MeanPooled, data: Data, ref_eval: torch.Tensor,
         ref_val: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    tried: dict[str, Any] = {}
    best: tuple[float, float, nn.Module] | None = None
    for lr in args.lrs:
        student = copy.deepcopy(small)
        seconds = finetune(student, dense, data, lr=lr, steps=args.steps, batch=args.batch)
        val = mean_cosine(student, data, data.val, ref_val)
        tried[repr(lr)] = {"val_cosine": val, "seconds": seconds}
        print(f"  lr {lr:g}: validation cosine {val:.4f} ({seconds:.0f} s)", flush=True)
        if best is None or val > best[0]:
            best = (val, lr, student)
    assert best is not None
    _, lr, tuned = best
    record = {**record, "lrs": tried, "lr": lr, "cosine_after": mean_cosine(tuned, data, data.eval, ref_eval),
              "finetune_seconds": tried[repr(lr)]["seconds"]}
    record["reload_max_abs_diff"] = check_reload(tuned, p, data)
    record["latency"] = latency(dense, tuned, data, args.repeats)
    record["meets_bar"] = record["cosine_after"] >= BAR
    print(f"  after fine-tuning (lr {lr:g}): cosine {record['cosine_after']:.4f}; reload diff "
          f"{record['reload_max_abs_diff']:.2e}; speedup b1 {record['latency']['batch1']['speedup']:.2f}x, "
          f"b16 {record['latency']['batch16']['speedup']:.2f}x", flush=True)
    return record


def render(runs: dict[str, Any]) -> str:
    header = ["criterion", "val cos before", "cos before", "cos after", f">= {BAR}", "lr", "MACs (b16)",
              "speedup b1", "speedup b16", "ratio b16", "params", "fine-tune s"]
    rows = []
    for c, r in runs.items():
        row = [c, f"{r['val_cosine_before']:.4f}", f"{r['cosine_before']:.4f}"]
        if "cosine_after" in r:
            b1, b16 = r["latency"]["batch1"], r["latency"]["batch16"]
            row += [f"{r['cosine_after']:.4f}", "yes" if r["meets_bar"] else "NO", f"{r['lr']:g}",
                    f"{b16['mac_reduction']:.2f}x", f"{b1['speedup']:.2f}x", f"{b16['speedup']:.2f}x",
                    f"{b16['speedup_per_mac_reduction']:.2f}"]
        else:
            row += ["(not tuned)"] + ["-"] * 6
        row += [f"{r['params'][0] / 1e6:.1f}M -> {r['params'][1] / 1e6:.1f}M",
                f"{r['finetune_seconds']:.0f}" if "finetune_seconds" in r else "-"]
        rows.append(row)
    return table(rows, header)


def plot(runs: dict[str, Any], path: Path) -> None:
    from prunekit.reproduce.common import new_figure, save_figure

    fig, (ax1, ax2) = new_figure(10, 4, ncols=2)
    names = list(runs)
    xs = list(range(len(names)))
    ax1.bar([x - 0.2 for x in xs], [runs[n]["cosine_before"] for n in names], 0.4, label="after pruning")
    ax1.bar([x + 0.2 for x in xs], [runs[n].get("cosine_after", 0.0) for n in names], 0.4,
            label="after distillation")
    ax1.axhline(BAR, color="k", ls="--", lw=1, label=f"bar {BAR}")
    ax1.set_xticks(xs, names)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("mean cosine to dense (Persuasion)")
    ax1.legend(loc="lower right")
    tuned = [n for n in names if "latency" in runs[n]]
    for i, bs in enumerate(("batch1", "batch16")):
        ax2.bar([x + (i - 0.5) * 0.4 for x in range(len(tuned))],
                [runs[n]["latency"][bs]["speedup"] for n in tuned], 0.4,
                label=f"{bs.replace('batch', 'batch ')}, 128 tokens")
    ax2.axhline(1, color="k", lw=0.5)
    ax2.set_xticks(list(range(len(tuned))), tuned)
    ax2.set_ylabel("latency speedup vs dense (2 threads)")
    ax2.legend(loc="lower right")
    fig.suptitle("all-MiniLM-L6-v2, half the heads and FFN units (2x fewer encoder MACs)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke: few sentences, 20 fine-tuning steps, one lr")
    ap.add_argument("--criteria", nargs="*", default=CRITERIA, choices=CRITERIA)
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 600; quick 20)")
    ap.add_argument("--batch", type=int, default=32, help="sentences per fine-tuning step")
    ap.add_argument("--lrs", nargs="*", type=float, default=None, help="learning rates tried on validation")
    ap.add_argument("--repeats", type=int, default=None, help="latency samples per model (default 15; quick 5)")
    ap.add_argument("--threads", type=int, default=2, help="threads for pruning and fine-tuning")
    ap.add_argument("--tune-all", action="store_true",
                    help="fine-tune every criterion (default: only the one with the best validation cosine)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (20 if args.quick else 1000)
    args.lrs = args.lrs or ([3e-4] if args.quick else [3e-4, 1e-3])
    args.repeats = args.repeats or (5 if args.quick else 15)
    setup_torch(args.threads)
    stem = f"{NAME}{'_quick' if args.quick else ''}"
    store = ResultStore(RESULTS / f"{stem}.json", NAME, {"quick": args.quick, "steps": args.steps,
                                                       "batch": args.batch, "lrs": args.lrs})
    encoder, tokenizer = minilm()
    dense = MeanPooled(encoder).eval()
    data = Data(tokenizer, args.quick)
    ref_eval, ref_val = embed(dense, data, data.eval), embed(dense, data, data.val)
    store.doc["data"] = {"eval": f"{len(data.eval)} sentences of {EVAL_NOVEL}",
                         "val": f"{len(data.val)} sentences of {VAL_NOVEL}",
                         "calibration": f"{len(data.calibration)} x 16 sentences of {TRAIN_NOVELS}",
                         "train_pool": len(data.train)}
    before: dict[str, tuple[nn.Module, Any]] = {}
    for criterion in args.criteria:
        if not store.done(criterion):
            record, small, p = prune_only(criterion, dense, data, ref_eval, ref_val)
            store.put(criterion, {**record, "environment": metadata()})
            before[criterion] = (small, p)
    pruned = {c: store.runs[c] for c in args.criteria}
    chosen = max(pruned, key=lambda c: pruned[c]["val_cosine_before"])  # on validation, never on Persuasion
    for criterion in args.criteria if args.tune_all else [chosen]:
        if "cosine_after" in store.runs[criterion]:
            continue
        small, p = before[criterion] if criterion in before else prune(dense, data, criterion)[:2]
        print(f"fine-tuning {criterion}" + ("" if args.tune_all else " (best validation cosine after pruning)"),
              flush=True)
        record = tune(store.runs[criterion], small, p, dense, data, ref_eval, ref_val, args)
        store.put(criterion, {**record, "environment": metadata()})
    runs = {c: store.runs[c] for c in CRITERIA if c in store.runs}
    text = render(runs)
    best = runs[chosen]
    store.doc["summary"] = {"bar": BAR, "chosen_on_val": chosen, "cosine_before": best["cosine_before"],
                            "cosine_after": best.get("cosine_after"), "meets_bar": bool(best.get("meets_bar")),
                            "latency": best.get("latency") and {k: {kk: v[kk] for kk in ("mac_reduction", "speedup",
                                                                                          "speedup_per_mac_reduction")}
                                                                 for k, v in best["latency"].items()}}
    store.save()
    write_text(RESULTS / f"{stem}.md", text + f"\nchosen on validation: {chosen}; summary {store.doc['summary']}\n")
    plot(runs, png_path(NAME, args.quick))
    print(text)
    print(f"summary: {store.doc['summary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
