"""Keep a Hugging Face model's ``config`` in step with its physically pruned sizes, where the config can say them.

After :meth:`Plan.apply <prunekit.structured.Plan.apply>` a transformers model has smaller layers but its
``config`` still describes the dense one, so ``save_pretrained`` / ``from_pretrained`` would rebuild the wrong
shapes. :func:`sync_config` (called by ``Plan.apply``) writes the new sizes into the config when every layer has the
same ones and the config has a field for them:

* FFN width: ``intermediate_size`` (Llama, Mistral, Qwen, BERT, ...), ``n_inner`` (GPT-2), ``ffn_dim`` (OPT);
* attention heads, where the config states the head size (``head_dim``, Llama-style): ``num_attention_heads`` and
  ``num_key_value_heads``; and the embedding width ``hidden_size`` (the config's own ``head_dim`` keeps the head
  size).

What the config cannot describe — layers that differ, or heads removed where the head size is derived as
``hidden_size // num_attention_heads`` (BERT, GPT-2 in transformers 5) — is returned as notes, and the config is
left as it was; such a model is saved and reloaded with :func:`prunekit.structured.save` / ``load`` (its plan
replays on the dense architecture).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["sync_config"]

# module-name suffixes (within a block) of the layers whose output width gives each size
_FFN_UP = ("mlp.up_proj", "intermediate.dense", "mlp.c_fc", ".fc1")
_QUERY = ("self_attn.q_proj", "attention.self.query")
_KEY = ("self_attn.k_proj", "attention.self.key")
_FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


def _hf_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        return None
    return config


def _out_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    nf = getattr(module, "nf", None)  # transformers Conv1D (GPT-2)
    return nf if isinstance(nf, int) else None


def _widths(model: nn.Module, suffixes: tuple[str, ...]) -> list[int]:
    out = []
    for name, module in model.named_modules():
        if name.endswith(suffixes) and (w := _out_width(module)) is not None:
            out.append(w)
    return out


def sync_config(model: nn.Module) -> list[str]:
    """Write the pruned sizes of a transformers ``model`` into ``model.config`` where it can describe them.

    Args:
        model: A physically pruned model; anything without a transformers ``config`` is left alone.

    Returns:
        Notes on sizes the config cannot describe (it then keeps the dense values; save with
        :func:`prunekit.structured.save`). Empty when the config now matches the model, or there is no config.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        >>> model.model.layers[0].mlp.up_proj = nn.Linear(16, 8, bias=False)  # as if pruned to 8 units
        >>> sync_config(model), model.config.intermediate_size
        ([], 8)
    """
    config = _hf_config(model)
    if config is None:
        return []
    fields = config.to_dict()
    notes: list[str] = []
    updates: dict[str, Any] = {}

    ffn = _widths(model, _FFN_UP)
    key = next((k for k in _FFN_KEYS if k in fields), None)
    if ffn and key is not None:
        if len(set(ffn)) == 1:
            if ffn[0] != fields[key] and not (key == "n_inner" and fields[key] is None
                                               and ffn[0] == 4 * fields.get("n_embd", -1)):
                updates[key] = ffn[0]
        else:
            notes.append(f"FFN widths differ between layers ({sorted(set(ffn))}); config.{key} cannot describe them")

    heads_key = "num_attention_heads" if "num_attention_heads" in fields else "n_head" if "n_head" in fields else None
    hidden_key = "hidden_size" if "hidden_size" in fields else "n_embd" if "n_embd" in fields else None
    explicit = fields.get("head_dim") if isinstance(fields.get("head_dim"), int) else None
    queries, keys = _widths(model, _QUERY), _widths(model, _KEY)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    width = getattr(embeddings, "embedding_dim", None)
    if heads_key is not None and hidden_key is not None:
        head = explicit or fields[hidden_key] // fields[heads_key]
        dense_q = fields[heads_key] * head
        if explicit is not None:  # Llama-style: the config states the head size, heads can change freely
            if queries and len(set(queries)) == 1 and queries[0] % head == 0:
                updates[heads_key] = queries[0] // head
            elif queries and len(set(queries)) > 1:
                notes.append(f"attention widths differ between layers ({sorted(set(queries))}); "
                             f"config.{heads_key} cannot describe them")
            if keys and "num_key_value_heads" in fields:
                if len(set(keys)) == 1 and keys[0] % head == 0:
                    updates["num_key_value_heads"] = keys[0] // head
                elif len(set(keys)) > 1:
                    notes.append(f"key/value widths differ between layers ({sorted(set(keys))}); "
                                 "config.num_key_value_heads cannot describe them")
            if isinstance(width, int) and width != fields[hidden_key]:
                updates[hidden_key] = width
        else:
            if any(q != dense_q for q in queries):
                notes.append(f"attention heads were removed, but {type(config).__name__} derives the head size as "
                             f"{hidden_key} // {heads_key}, so the config cannot describe them")
            if isinstance(width, int) and width != fields[hidden_key]:
                notes.append(f"the embedding width changed ({fields[hidden_key]} -> {width}), and "
                             f"{type(config).__name__} derives the head size from it")
    if notes:
        return [*notes, "model.config keeps the dense sizes: save the model with prunekit.structured.save(model, "
                        "path, plan) and reload it with prunekit.structured.load, not save_pretrained"]
    for k, v in updates.items():
        setattr(config, k, v)
    return []
