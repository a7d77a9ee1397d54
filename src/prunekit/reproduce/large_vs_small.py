"""Reproduction: large-sparse vs small-dense at equal non-zero weights (Zhu & Gupta 2017), a report.

Zhu & Gupta (https://arxiv.org/abs/1710.01878) found that a large model pruned gradually beats a small dense model
with the same number of non-zero weights, for CNNs, stacked-LSTM language models and seq2seq models. Two sections:

**MLP** (:func:`run_mlp`): LeNet-300-100 (width 1) pruned gradually to 90/95/98/99% with prunekit's default recipe
(:func:`prunekit.recipes.small_classifier`, 20 epochs) vs a dense LeNet-300-100 of reduced width whose Linear-weight
count (biases not counted; the JSON lists both) is closest to the sparse model's non-zero weights
(:func:`matching_width`). Same epochs, optimizer, learning-rate schedule, label smoothing; MNIST and Fashion-MNIST,
trained on ``train_full`` (60k), test accuracy, 2 seeds.

**LSTM** (:func:`run_lstm`): the paper's Penn Treebank experiment on the data we have, Jane Austen's novels:

- *Data*: word-level tokens (:func:`prunekit.data.text.words`: lower-case words, ``<eos>`` at sentence ends, other
  punctuation dropped). Train on five novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma,
  Northanger Abbey: 671,830 tokens); *Persuasion* is held out: validation is its first half (up to the first
  sentence end after the middle), test the rest (43,695 and 43,631 tokens). Vocabulary: the 10,000 most frequent
  training words plus ``<unk>`` (:class:`prunekit.data.text.Vocabulary`); ``<unk>`` is 0.5% of the training
  tokens and 3.7%/3.2% of validation/test (names that appear only in *Persuasion*).
- *Model*: :class:`prunekit.models.LSTMLanguageModel`, embedding -> 2-layer LSTM -> untied decoder, embedding size =
  hidden size, dropout 0.3. The large model has 650 units (Zaremba et al.'s "medium", which the paper also prunes;
  its 1500-unit "large" does not fit 2 CPU cores): 19.76M weights, 4 epochs of truncated BPTT (35 steps, batch 32,
  2,400 steps) take about 30 minutes on 2 quiet cores (measured: 0.68 s per step with 2 threads on a quiet machine,
  0.93 s with 1 thread on a busy one; a validation pass about 18 s with 1 thread).
- *Pruning*, as in the paper: every weight matrix is pruned (embedding, ``lstm.weight_ih_l*``/``weight_hh_l*``,
  decoder), each to the same sparsity (``allocation="uniform"``), by magnitude, with the Zhu & Gupta cubic ramp from
  5% to 55% of the steps (50 mask updates); biases stay dense. Non-zeros are counted over those matrices.
- *Small dense*: the same architecture with the hidden size whose weight count ``2*V*H + 16*H*H`` is closest to the
  large model's non-zero weights at each budget (:func:`matching_hidden`): 80/90/95% -> H = 174/92/48.
- *Training*: Adam (lr 2e-3, cosine decay to 5%), gradient-norm clipping 1.0, the same number of steps (tokens) for
  every model; perplexity on the test split (validation after every epoch). Hyper-parameters are common choices
  for LSTM language models, not tuned here (no run was tuned on the test split).

Results go to ``<stem>.json/.md/.png`` (MLP) and ``<stem>_lstm.json/.md/.png`` (LSTM); finished configurations are
skipped on a rerun.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.data.text import EOS, NOVELS, Vocabulary, austen, words
from prunekit.fileformat import write_text
from prunekit.models import LSTMLanguageModel, get_model
from prunekit.pruner import Pruner
from prunekit.recipes import small_classifier
from prunekit.reproduce.common import markdown_table, mean_spread, new_figure, open_store, save_figure, torch_threads
from prunekit.reproduce.runs import method_schedule, train_and_prune
from prunekit.schedules import Gradual
from prunekit.targets import check_sparsity

__all__ = [
    "LM_SETUP",
    "LM_SPARSITIES",
    "QUICK_LM_SETUP",
    "LMCorpus",
    "LMSetup",
    "batchify",
    "lm_corpus",
    "lm_steps",
    "lm_weight_count",
    "matching_hidden",
    "matching_width",
    "perplexity",
    "run",
    "run_lstm",
    "run_mlp",
    "train_lm",
    "weight_count",
]

SECTIONS = ("mlp", "lstm")

# ---------------------------------------------------------------------------------------------------------------------
# MLP section

MLP_DATASETS = ("mnist", "fashion-mnist")
MLP_SPARSITIES = (0.9, 0.95, 0.98, 0.99)
MLP_SEEDS = (0, 1)
MLP_EPOCHS = 20


def _lenet300_count(h1: int, h2: int) -> int:
    return 784 * h1 + h1 * h2 + 10 * h2


def weight_count(width: float) -> int:
    """Linear weights of LeNet-300-100 at ``width`` (counted on the model itself).

    Examples:
        >>> weight_count(1.0)
        266200
    """
    model = get_model("lenet300", width=width)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def matching_width(target: int) -> float:
    """The width (a multiple of 1e-4, at most 1) whose dense LeNet-300-100 weight count is closest to ``target``.

    Hidden sizes are ``round(300 * width)`` and ``round(100 * width)`` (as in :mod:`prunekit.models`), so counts move
    in jumps; every width on the 1e-4 grid is scanned with the closed form ``784*h1 + h1*h2 + 10*h2`` (ties: the
    smaller width) and the winner is checked on the model.

    Raises:
        ValueError: ``target`` is not a positive integer.

    Examples:
        >>> matching_width(26_620)  # hidden 33 and 11: 784*33 + 33*11 + 11*10 = 26,345 weights
        0.1084
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"target must be a positive number of weights, got {target!r}")

    def count(w: float) -> int:
        return _lenet300_count(max(1, round(300 * w)), max(1, round(100 * w)))

    best = min((k / 10_000 for k in range(1, 10_001)), key=lambda w: (abs(count(w) - target), w))
    if weight_count(best) != count(best):  # the closed form must agree with the model's own layer sizes
        raise RuntimeError(f"weight count formula disagrees with the model at width {best}")
    return best


def mlp_budgets(sparsities: Sequence[float]) -> list[dict[str, Any]]:
    """Per sparsity: the sparse model's non-zero weights and the matching dense width, hidden sizes and counts."""
    full = weight_count(1.0)
    out = []
    for s in sparsities:
        nonzero = full - round(check_sparsity(s) * full)
        w = matching_width(nonzero)
        m = get_model("lenet300", width=w)
        out.append({"sparsity": s, "nonzero_weights": nonzero, "width": w,
                    "hidden": [m.fc1.out_features, m.fc2.out_features], "dense_weights": weight_count(w),
                    "dense_params": sum(q.numel() for q in m.parameters())})
    return out


def run_mlp(out_dir: str | Path, *, quick: bool = False, progress: bool = True, stem: str = "large_vs_small",
            seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """The MLP section: write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``; returns the results document.

    ``quick``: MNIST only, 90% and 99%, one seed, 1 epoch on 2,000 training images.
    """
    out = Path(out_dir)
    datasets, sparsities, epochs, subset = list(MLP_DATASETS), list(MLP_SPARSITIES), MLP_EPOCHS, None
    seed_list = list(MLP_SEEDS)
    if quick:
        datasets, sparsities, seed_list, epochs, subset = ["mnist"], [0.9, 0.99], [0], 1, 2000
    if seeds is not None:
        seed_list = [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must name at least one seed, e.g. seeds=(0,)")
    recipe = small_classifier(epochs)
    budgets = mlp_budgets(sparsities)
    store = open_store(out / f"{stem}.json", stem, {
        "quick": quick, "train_split": "train_full", "eval_split": "test", "epochs": epochs,
        "recipe": recipe.to_dict(), "budgets": budgets, "subset": subset, "datasets": datasets})
    for seed in seed_list:
        for data in datasets:
            for b in budgets:
                for kind in ("large_sparse", "small_dense"):
                    key = f"{data}/{kind}/{b['sparsity']}/seed{seed}"
                    if store.done(key):
                        continue
                    t = time.time()
                    sparse = kind == "large_sparse"
                    rec = train_and_prune(
                        model_name="lenet300", data_name=data, tool="prunekit" if sparse else "dense",
                        sparsity=b["sparsity"] if sparse else 0.0, seed=seed, tcfg=recipe.train_config(seed),
                        schedule_fn=method_schedule("gradual" if sparse else "dense", recipe),
                        allocation=recipe.allocation, width=1.0 if sparse else b["width"],
                        train_split="train_full", eval_splits=("test",), subset=subset)
                    rec.update(kind=kind, budget_sparsity=b["sparsity"])
                    store.put(key, rec)
                    if progress:
                        print(f"{key}: test {rec['test_accuracy']:.2%} non-zero weights {rec['nonzero_weights']} "
                              f"({time.time() - t:.0f}s)", flush=True)
    rows: list[dict[str, Any]] = []
    for data in datasets:
        for b in budgets:
            row: dict[str, Any] = {"data": data, **b}
            for kind in ("large_sparse", "small_dense"):
                recs = [r for r in store.runs.values() if r["data"] == data and r["kind"] == kind
                        and r["budget_sparsity"] == b["sparsity"]]
                if recs:
                    row[kind] = mean_spread([r["test_accuracy"] for r in recs])
                    row[kind + "_nonzero_weights"] = recs[0]["nonzero_weights"]
            rows.append(row)
    store.doc["summary"] = rows
    store.save()
    write_text(out / f"{stem}.md", mlp_table(rows, epochs))
    mlp_plot(rows, datasets, out / f"{stem}.png")
    return store.doc


def _acc(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "—"
    return f"{cell['mean']:.2%}" + (f" ± {cell['std']:.2%}" if cell["n"] > 1 else "")


def mlp_table(rows: list[dict[str, Any]], epochs: int) -> str:
    """Markdown: per data set and budget, the two models' sizes and test accuracies."""
    body = []
    for r in rows:
        ls, sd = r.get("large_sparse"), r.get("small_dense")
        diff = f"{100 * (ls['mean'] - sd['mean']):+.2f}" if ls and sd else "—"
        body.append([r["data"], f"{r['nonzero_weights']:,}", f"{r['sparsity']:.0%}",
                     f"{r['hidden'][0]}-{r['hidden'][1]} ({r['dense_weights']:,})", _acc(ls), _acc(sd), diff])
    return (f"LeNet-300-100 gradually pruned vs a narrow dense LeNet with as many weights, {epochs} epoch(s) each, "
            "test accuracy (mean ± std over seeds):\n\n"
            + markdown_table(["data", "non-zero weights", "sparsity of 300-100", "dense hidden (weights)",
                              "large-sparse", "small-dense", "difference (pt)"], body))


def mlp_plot(rows: list[dict[str, Any]], datasets: Sequence[str], path: Path) -> None:
    """Test accuracy vs non-zero weights per data set, large-sparse vs small-dense (error bars: min-max)."""
    from matplotlib.ticker import NullFormatter

    fig, axes = new_figure(5 * len(datasets), 4, ncols=len(datasets))
    axes = list(axes) if len(datasets) > 1 else [axes]
    for ax, data in zip(axes, datasets):
        for kind, color, label in (("large_sparse", "tab:green", "LeNet-300-100, gradually pruned"),
                                   ("small_dense", "tab:red", "narrow dense LeNet")):
            pts = [(r["nonzero_weights"], r[kind]) for r in rows if r["data"] == data and kind in r]
            if pts:
                ax.errorbar([n for n, _ in pts], [100 * c["mean"] for _, c in pts],
                            yerr=[[100 * (c["mean"] - c["min"]) for _, c in pts],
                                  [100 * (c["max"] - c["mean"]) for _, c in pts]],
                            fmt="o-", color=color, capsize=3, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("non-zero weights")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{data}: equal non-zero weights")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# LSTM section

LM_SPARSITIES = (0.8, 0.9, 0.95)
HELD_OUT = "persuasion"


@dataclass(frozen=True)
class LMSetup:
    """Settings of the LSTM language-model runs (see the module docstring for the reasons)."""

    max_words: int = 10_000  # vocabulary: most frequent training words (+ <unk>)
    hidden: int = 650  # units per LSTM layer (= embedding size) of the large model
    layers: int = 2
    dropout: float = 0.3
    batch_size: int = 32  # parallel streams of truncated BPTT
    bptt: int = 35  # steps of truncated backpropagation through time
    epochs: float = 4.0
    lr: float = 2e-3  # Adam, cosine decay to lr * final_lr
    final_lr: float = 0.05
    clip: float = 1.0  # max gradient norm
    prune_start: float = 0.05  # fraction of the steps where the gradual ramp starts
    prune_end: float = 0.55  # ... and ends
    updates: int = 50  # mask updates during the ramp
    eval_batch_size: int = 10
    max_train_tokens: int | None = None  # quick runs: the first N training tokens only
    max_eval_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_words", "hidden", "layers", "batch_size", "bptt", "updates", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LMSetup.{name} must be a positive integer, got {value!r}")
        if not self.epochs > 0:
            raise ValueError(f"LMSetup.epochs must be > 0, got {self.epochs!r}")
        if not 0.0 <= self.prune_start < self.prune_end <= 1.0:
            raise ValueError(f"need 0 <= prune_start < prune_end <= 1 (fractions of the steps), got "
                             f"{self.prune_start}, {self.prune_end}")
        if not self.lr > 0 or not 0.0 <= self.final_lr <= 1.0 or not self.clip > 0:
            raise ValueError(f"need lr > 0, final_lr in [0, 1], clip > 0; got {self.lr}, {self.final_lr}, {self.clip}")


#: Full mode (about 30 minutes per large-model run on 2 cores; see the module docstring).
LM_SETUP = LMSetup()
#: Quick mode: a tiny vocabulary and model, 100 steps on the first 8,000 training tokens.
QUICK_LM_SETUP = LMSetup(max_words=500, hidden=32, batch_size=8, bptt=10, epochs=1.0, updates=5,
                         max_train_tokens=8_000, max_eval_tokens=2_000)


@dataclass(frozen=True)
class LMCorpus:
    """Token ids of the three splits (1-D ``int64``) and the vocabulary."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def describe(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab), "train_novels": [n for n in NOVELS if n != HELD_OUT],
                "held_out": HELD_OUT, "tokens": {k: int(getattr(self, k).numel()) for k in ("train", "valid", "test")},
                "unk_rate": {k: float((getattr(self, k) == 0).double().mean()) for k in ("train", "valid", "test")}}


def lm_corpus(max_words: int = 10_000, root: str | Path | None = None, *, max_train_tokens: int | None = None,
              max_eval_tokens: int | None = None) -> LMCorpus:
    """The Austen word-level corpus: train on five novels, validate/test on the two halves of *Persuasion*.

    The vocabulary is built from the (possibly truncated) training tokens only.

    Args:
        max_words: Vocabulary size without ``<unk>``.
        root: Folder holding the ``janeaustenr`` files (see :func:`prunekit.data.text.austen`).
        max_train_tokens, max_eval_tokens: Keep only the first N tokens of the splits (quick runs).
    """
    train_words: list[str] = []
    for novel in NOVELS:
        if novel != HELD_OUT:
            train_words += words(austen(novel, root))
    held = words(austen(HELD_OUT, root))
    middle = len(held) // 2
    cut = next((i + 1 for i in range(middle, len(held)) if held[i] == EOS), middle)  # after a sentence end
    valid_words, test_words = held[:cut], held[cut:]
    if max_train_tokens:
        train_words = train_words[:max_train_tokens]
    if max_eval_tokens:
        valid_words, test_words = valid_words[:max_eval_tokens], test_words[:max_eval_tokens]
    vocab = Vocabulary.build(train_words, max_words)
    return LMCorpus(vocab, vocab.encode(train_words), vocab.encode(valid_words), vocab.encode(test_words))


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` contiguous streams: ``(T, B)`` with ``T = len(ids) // B``.

    The tail that does not fill a row is dropped (fewer than ``batch_size`` tokens).

    Examples:
        >>> batchify(torch.arange(7), 2).t().tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    if ids.dim() != 1:
        raise ValueError(f"batchify needs a 1-D token stream, got shape {tuple(ids.shape)}")
    t = ids.numel() // batch_size
    if t < 2:
        raise ValueError(f"{ids.numel()} tokens cannot make {batch_size} streams of at least 2 tokens")
    return ids[: t * batch_size].view(batch_size, t).t().contiguous()  # (T, B)


def lm_weight_count(vocab_size: int, hidden: int, layers: int = 2) -> int:
    """Weights of :class:`~prunekit.models.LSTMLanguageModel` (untied, embedding size = hidden), biases excluded.

    Embedding ``V*H`` + per layer ``4H * (H + H)`` (input and recurrent matrices) + decoder ``V*H``.

    Examples:
        >>> lm_weight_count(10_001, 650)
        19761300
    """
    return 2 * vocab_size * hidden + layers * 8 * hidden * hidden


def matching_hidden(target: int, vocab_size: int, layers: int = 2) -> int:
    """The hidden size whose dense model's weight count (:func:`lm_weight_count`) is closest to ``target``.

    Ties go to the smaller model.

    Raises:
        ValueError: ``target`` or ``vocab_size`` is not a positive integer.

    Examples:
        >>> matching_hidden(lm_weight_count(10_001, 650), 10_001)
        650
    """
    for value, what in ((target, "target"), (vocab_size, "vocab_size"), (layers, "layers")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    h = 1
    while lm_weight_count(vocab_size, h + 1, layers) <= target:
        h += 1
    above = lm_weight_count(vocab_size, h + 1, layers)
    return h if target - lm_weight_count(vocab_size, h, layers) <= above - target else h + 1


def _pruned_tensors(model: LSTMLanguageModel) -> dict[str, torch.Tensor]:
    """The weight matrices the experiment prunes and counts: embedding, LSTM input/recurrent, decoder."""
    return {n: p for n, p in model.named_parameters() if n == "embedding.weight" or n == "decoder.weight"
            or n.startswith(("lstm.weight_ih_l", "lstm.weight_hh_l"))}


def make_pruner(model: LSTMLanguageModel, sparsity: float, steps: int, setup: LMSetup) -> Pruner:
    """A Pruner over every weight matrix, each to ``sparsity`` (uniform), on the Zhu & Gupta ramp of ``setup``."""
    start = round(setup.prune_start * steps)
    every = max(1, round((setup.prune_end - setup.prune_start) * steps / setup.updates))
    schedule = Gradual(start=start, end=start + setup.updates * every, every=every)
    return Pruner(model, sparsity, schedule=schedule, allocation="uniform",
                  types=(nn.Embedding, nn.LSTM, nn.Linear))


def lm_steps(n_tokens: int, setup: LMSetup) -> int:
    """Optimizer steps of ``setup.epochs`` epochs over ``n_tokens`` training tokens (windows of ``setup.bptt``).

    Examples:
        >>> lm_steps(671_830, LM_SETUP)  # the Austen training split: 20,994 rows per stream, 600 windows per epoch
        2400
    """
    rows = n_tokens // setup.batch_size  # T of batchify
    return max(1, round(setup.epochs * math.ceil((rows - 1) / setup.bptt)))


def _cosine(step: int, total: int, final: float) -> float:
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@torch.no_grad()
def perplexity(model: LSTMLanguageModel, ids: torch.Tensor, *, batch_size: int = 10, bptt: int = 35) -> float:
    """``exp`` of the mean cross-entropy of next-word prediction over ``ids`` (state carried across windows)."""
    data = batchify(ids, batch_size)  # (T, B)
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for pos in range(0, data.shape[0] - 1, bptt):
            seq = min(bptt, data.shape[0] - 1 - pos)
            logits, state = model(data[pos : pos + seq], state)  # (seq, B, V)
            target = data[pos + 1 : pos + 1 + seq]
            total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       reduction="sum"))
            count += target.numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def train_lm(model: LSTMLanguageModel, train_ids: torch.Tensor, setup: LMSetup, *, pruner: Pruner | None = None,
             steps: int | None = None, valid_ids: torch.Tensor | None = None, seed: int = 0,
             progress: bool = False) -> dict[str, Any]:
    """Truncated-BPTT training: Adam, cosine learning rate, gradient clipping, ``pruner.step()`` after each step.

    The training stream is cut into ``setup.batch_size`` parallel streams; windows of ``setup.bptt`` tokens are taken
    in order and the LSTM state is carried from one window to the next (detached), reset at each epoch.

    Args:
        model: The language model (trained in place).
        train_ids: 1-D training token ids.
        setup: Hyper-parameters.
        pruner: Stepped after every optimizer step (None: dense).
        steps: Optimizer steps (default ``setup.epochs`` epochs).
        valid_ids: If given, validation perplexity is measured at the end of every epoch.
        seed: Seed of dropout.
        progress: Show a progress bar.

    Returns:
        ``{"steps", "seconds", "seconds_per_step", "final_train_loss" (mean of the last 50 steps),
        "valid_ppl_by_epoch"}``.
    """
    data = batchify(train_ids, setup.batch_size)  # (T, B)
    per_epoch = math.ceil((data.shape[0] - 1) / setup.bptt)
    total = steps if steps is not None else lm_steps(train_ids.numel(), setup)
    opt = torch.optim.Adam(model.parameters(), lr=setup.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: _cosine(t, total, setup.final_lr))
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    valid_by_epoch: list[float] = []
    state = None
    pos = 0
    t0 = time.perf_counter()
    bar = tqdm(range(total), desc=f"LSTM H={model.hidden}", disable=not progress, leave=False)
    for step in bar:
        if pos >= data.shape[0] - 1:  # a new epoch: restart the streams with a fresh state
            if valid_ids is not None:
                valid_by_epoch.append(perplexity(model, valid_ids, batch_size=setup.eval_batch_size,
                                                 bptt=setup.bptt))
            pos, state = 0, None
        seq = min(setup.bptt, data.shape[0] - 1 - pos)
        x, y = data[pos : pos + seq], data[pos + 1 : pos + 1 + seq]  # (seq, B)
        if state is not None:
            state = (state[0].detach(), state[1].detach())
        logits, state = model(x, state)  # (seq, B, V)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), setup.clip)
        opt.step()
        sched.step()
        if pruner is not None:
            pruner.step()
        pos += seq
        losses.append(loss.item())
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    if valid_ids is not None:
        valid_by_epoch.append(perplexity(model, valid_ids, batch_size=setup.eval_batch_size, bptt=setup.bptt))
    tail = losses[-50:]
    return {"steps": total, "steps_per_epoch": per_epoch, "seconds": round(seconds, 1),
            "seconds_per_step": seconds / total, "final_train_loss": sum(tail) / len(tail),
            "valid_ppl_by_epoch": valid_by_epoch}


def lm_run(corpus: LMCorpus, setup: LMSetup, *, hidden: int, sparsity: float, seed: int = 0,
           progress: bool = False) -> dict[str, Any]:
    """Train one model (gradually pruned to ``sparsity`` if > 0) and measure it; a JSON-able record."""
    torch.manual_seed(seed)
    model = LSTMLanguageModel(len(corpus.vocab), hidden, setup.layers, dropout=setup.dropout)
    tensors = _pruned_tensors(model)
    weights = sum(p.numel() for p in tensors.values())
    if weights != lm_weight_count(len(corpus.vocab), hidden, setup.layers):  # the sizing formula must hold
        raise RuntimeError(f"LSTM weight count {weights} disagrees with lm_weight_count at hidden={hidden}")
    steps = lm_steps(corpus.train.numel(), setup)
    pruner = make_pruner(model, sparsity, steps, setup) if sparsity > 0 else None
    history = train_lm(model, corpus.train, setup, pruner=pruner, steps=steps, valid_ids=corpus.valid, seed=seed,
                       progress=progress)
    zeros = sum(int((p == 0).sum()) for p in tensors.values())
    record: dict[str, Any] = {
        "hidden": hidden, "layers": setup.layers, "vocab_size": len(corpus.vocab), "sparsity": sparsity,
        "seed": seed, "weights": weights, "nonzero_weights": weights - zeros, "achieved_sparsity": zeros / weights,
        "params": sum(p.numel() for p in model.parameters()),
        "params_nonzero": sum(int((p != 0).sum()) for p in model.parameters()),
        **history,
        "valid_ppl": history["valid_ppl_by_epoch"][-1],
        "test_ppl": perplexity(model, corpus.test, batch_size=setup.eval_batch_size, bptt=setup.bptt),
    }
    if pruner is not None:
        masks = pruner.masks
        record["per_tensor_sparsity"] = masks.sparsities()
        record["schedule"] = pruner.schedule.to_dict()
        # pruned weights must be exactly zero on the model (the masks are applied in place after every step)
        record["pruned_but_nonzero"] = sum(int((model.get_parameter(n)[~m] != 0).sum()) for n, m in masks.items())
    return record


def lm_budgets(vocab_size: int, setup: LMSetup, sparsities: Sequence[float]) -> list[dict[str, Any]]:
    """Per sparsity: the large model's non-zero weights and the small dense model that matches them."""
    full = lm_weight_count(vocab_size, setup.hidden, setup.layers)
    out = []
    for s in sparsities:
        nonzero = full - round(check_sparsity(s) * full)
        h = matching_hidden(nonzero, vocab_size, setup.layers)
        out.append({"sparsity": s, "nonzero_weights": nonzero, "small_hidden": h,
                    "small_weights": lm_weight_count(vocab_size, h, setup.layers)})
    return out


def run_lstm(out_dir: str | Path, *, quick: bool = False, progress: bool = True, stem: str = "large_vs_small_lstm",
             setup: LMSetup | None = None, sparsities: Sequence[float] = LM_SPARSITIES, seed: int = 0,
             root: str | Path | None = None) -> dict[str, Any]:
    """The LSTM section: write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``; returns the results document.

    Runs the large dense model, the large model pruned to each sparsity and the matching small dense models; each
    finished run is saved at once and skipped on a rerun (an interrupted run restarts from scratch).

    Args:
        out_dir: Output directory.
        quick: Use :data:`QUICK_LM_SETUP` (seconds, a pipeline check).
        progress: Progress bar per run and a line per finished run.
        stem: File name stem.
        setup: Override the settings (default :data:`LM_SETUP` or :data:`QUICK_LM_SETUP`).
        sparsities: Budgets, as sparsities of the large model.
        seed: Seed of the initialisation and dropout.
        root: Folder holding the Austen files (default: cache / download).
    """
    setup = setup or (QUICK_LM_SETUP if quick else LM_SETUP)
    sparsities = [check_sparsity(s) for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities must name at least one budget, e.g. (0.8, 0.9, 0.95)")
    if any(s == 0 for s in sparsities):
        raise ValueError("a budget of sparsity 0 is the large dense model, which always runs; drop it")
    corpus = lm_corpus(setup.max_words, root, max_train_tokens=setup.max_train_tokens,
                       max_eval_tokens=setup.max_eval_tokens)
    budgets = lm_budgets(len(corpus.vocab), setup, sparsities)
    out = Path(out_dir)
    store = open_store(out / f"{stem}.json", stem, {
        "quick": quick, "setup": asdict(setup), "corpus": corpus.describe(), "budgets": budgets, "seed": seed})
    jobs = [("large_dense", setup.hidden, 0.0, 0.0)]
    for b in budgets:
        jobs += [("large_sparse", setup.hidden, b["sparsity"], b["sparsity"]),
                 ("small_dense", b["small_hidden"], 0.0, b["sparsity"])]
    for kind, hidden, sparsity, budget in jobs:
        key = f"{kind}/{budget}/seed{seed}"
        if store.done(key):
            continue
        rec = lm_run(corpus, setup, hidden=hidden, sparsity=sparsity, seed=seed, progress=progress)
        rec.update(kind=kind, budget_sparsity=budget)
        store.put(key, rec)
        if progress:
            print(f"{key}: H={hidden} non-zero weights {rec['nonzero_weights']:,} test perplexity "
                  f"{rec['test_ppl']:.2f} ({rec['seconds']:.0f}s, {rec['seconds_per_step'] * 1000:.0f} ms/step)",
                  flush=True)
    rows = lm_summary(store.runs, budgets, seed)
    store.doc["summary"] = rows
    store.save()
    write_text(out / f"{stem}.md", lm_table(rows, setup, corpus))
    lm_plot(rows, out / f"{stem}.png")
    return store.doc


def lm_summary(runs: dict[str, Any], budgets: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """One row per budget (and one for the large dense model) with the two models' non-zeros and perplexities."""
    rows: list[dict[str, Any]] = []
    dense = runs.get(f"large_dense/0.0/seed{seed}")
    if dense:
        rows.append({"budget_sparsity": 0.0, "large_dense": _lm_cell(dense)})
    for b in budgets:
        row: dict[str, Any] = {"budget_sparsity": b["sparsity"], **b}
        for kind in ("large_sparse", "small_dense"):
            rec = runs.get(f"{kind}/{b['sparsity']}/seed{seed}")
            if rec:
                row[kind] = _lm_cell(rec)
        rows.append(row)
    return rows


def _lm_cell(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ("hidden", "nonzero_weights", "achieved_sparsity", "valid_ppl", "test_ppl",
                                "seconds")}


def lm_table(rows: list[dict[str, Any]], setup: LMSetup, corpus: LMCorpus) -> str:
    """Markdown: per budget, large-sparse vs small-dense non-zeros and test perplexity."""
    def ppl(cell: dict[str, Any] | None) -> str:
        return f"{cell['test_ppl']:.2f}" if cell else "—"

    def nnz(cell: dict[str, Any] | None) -> str:
        return f"{cell['nonzero_weights']:,}" if cell else "—"

    body = []
    for r in rows:
        if "large_dense" in r:
            d = r["large_dense"]
            body.append(["dense", f"{d['hidden']} dense", nnz(d), ppl(d), "", "", ""])
            continue
        ls, sd = r.get("large_sparse"), r.get("small_dense")
        body.append([f"{r['budget_sparsity']:.0%}", f"{setup.hidden} at {r['budget_sparsity']:.0%}", nnz(ls), ppl(ls),
                     f"{r['small_hidden']} dense", nnz(sd), ppl(sd)])
    info = corpus.describe()
    return (f"2-layer LSTM language model on Jane Austen (train {info['tokens']['train']:,} tokens of five novels, "
            f"test {info['tokens']['test']:,} tokens of *Persuasion*, vocabulary {info['vocab_size']:,}); "
            f"{setup.epochs:g} epoch(s) each; test perplexity (lower is better):\n\n"
            + markdown_table(["budget", "large model", "non-zero weights", "perplexity", "small model",
                              "non-zero weights", "perplexity"], body))


def lm_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test perplexity vs non-zero weights: large-sparse vs small-dense, large dense as a reference point."""
    from matplotlib.ticker import NullFormatter

    fig, ax = new_figure(6, 4.5)
    for kind, color, label in (("large_sparse", "tab:green", "large LSTM, gradually pruned"),
                               ("small_dense", "tab:red", "small dense LSTM")):
        pts = sorted((r[kind]["nonzero_weights"], r[kind]["test_ppl"]) for r in rows if kind in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
    dense = [r["large_dense"] for r in rows if "large_dense" in r]
    if dense:
        ax.plot([dense[0]["nonzero_weights"]], [dense[0]["test_ppl"]], "k*", ms=10, label="large dense")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("non-zero weights")
    ax.set_ylabel("test perplexity")
    ax.set_title("Austen word LM: equal non-zero weights")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------------

def run(out_dir: str | Path, *, quick: bool = False, progress: bool = True,
        sections: Sequence[str] = SECTIONS) -> dict[str, Any]:
    """Run (or resume) the sections (``"mlp"``, ``"lstm"``) into ``out_dir``; returns ``{section: document}``.

    Raises:
        ValueError: Unknown section.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"sections must be a non-empty subset of {list(SECTIONS)}, got {list(sections)}")
    out: dict[str, Any] = {}
    with torch_threads(1 if quick else None):
        if "mlp" in sections:
            out["mlp"] = run_mlp(out_dir, quick=quick, progress=progress)
        if "lstm" in sections:
            out["lstm"] = run_lstm(out_dir, quick=quick, progress=progress)
    return out

