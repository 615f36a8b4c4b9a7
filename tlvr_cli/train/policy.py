"""Per-token log-probs of completions under a TinyLLaVA model, micro-batch by micro-batch.

Each sequence is its prompt (with the 512 visual embeddings spliced in) followed by its completion,
cut after the first eos: positions past it are masked out of the loss anyway (spec §5.2 step 4), so
computing them would be wasted work. The LLM returns hidden states only and the log-probs come from
a vocabulary-chunked log-softmax, so full (sequences × tokens × vocabulary) logits never exist.

Two layouts, the same numbers up to floating-point summation order:

* padded (the reference's): one right-padded row per completion, its prompt copied into each;
* flat (``packed.py``): each distinct prompt of the micro-batch once (``shared_prompt``) and the
  completions without padding (``packing``) or padded to the micro-batch's longest (without it).

The completions and their lengths may live on the host (the GRPO step keeps copies there): every
index tensor of a micro-batch is then built on the host and copied asynchronously, so the host
queues the whole forward and backward without waiting for the GPU once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.attention import SHAPE_ALIGN
from ..runtime import host_to_device, take_rows
from .logprobs import token_logprobs
from .packed import PackedLayout, gather_rows, packed_hidden


def micro_batch_order(lengths: list[int], size: int, group_size: int = 1) -> list[list[int]]:
    """Sequence indices grouped into micro-batches of ``size`` sequences of similar length, so padding
    costs little.

    ``group_size`` G > 1 keeps the G consecutive sequences of a group (one prompt's completions)
    together, so the micro-batch computes their prompt once: ⌊size / G⌋ whole groups per micro-batch
    (groups sorted by their longest completion), or, when ``size`` < G, each group split into parts
    of ``size`` (its prompt computed once per part).
    """
    if group_size <= 1:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + size] for i in range(0, len(order), size)]
    if len(lengths) % group_size:
        raise ValueError(f"{len(lengths)} sequences do not split into groups of {group_size}")
    groups = [sorted(range(g, g + group_size), key=lambda i: -lengths[i]) for g in range(0, len(lengths), group_size)]
    groups.sort(key=lambda rows: -lengths[rows[0]])
    per = size // group_size
    if per == 0:
        return [rows[i:i + size] for rows in groups for i in range(0, group_size, size)]
    return [[i for rows in groups[j:j + per] for i in rows] for j in range(0, len(groups), per)]


def connect_features(connector: nn.Module, tower_feats, rows: list[int]) -> torch.Tensor:
    """Visual tokens (len(rows), Q, D) of the prompts ``rows``: ``tower_feats`` is a (B, N, V) tensor
    or a list of (N_i, V); videos with different frame counts (fps mode) go through one at a time."""
    picked = [tower_feats[i] for i in rows]
    if len({tuple(f.shape) for f in picked}) == 1:
        return connector(torch.stack(picked))
    return torch.cat([connector(f[None]) for f in picked])


def sequence_logprobs(
    model,
    tower_feats: torch.Tensor | list[torch.Tensor],
    prompt_ids: list[list[int]],
    seq_prompt: list[int],
    completions: torch.Tensor,
    lengths: torch.Tensor,
    rows: list[int],
    *,
    chunk_size: int,
    shared_prompt: bool = False,
    packing: bool = False,
    varlen_attention: bool = True,
    compile_layers: bool = False,
) -> torch.Tensor:
    """Log-probs (len(rows), Lc) of ``completions[rows]``; zero past each row's ``lengths``.

    ``tower_feats`` (B, N, V) or [(N_i, V)] are the frozen tower's outputs per prompt; the connector runs here so
    its parameters receive gradients when grad is enabled. ``shared_prompt`` / ``packing`` pick the
    flat layout (module docstring); both off is the padded one. ``varlen_attention`` False keeps the flat
    layout's attention on SDPA where a varlen flash kernel could run (``packed.packed_hidden``);
    ``compile_layers`` compiles the flat layout's layers around attention there (on GPU).
    """
    if shared_prompt or packing:
        return _flat_logprobs(model, tower_feats, prompt_ids, seq_prompt, completions, lengths, rows,
                              chunk_size=chunk_size, shared_prompt=shared_prompt, packing=packing,
                              varlen=None if varlen_attention else False, compile=compile_layers)
    device = model.language_model.get_input_embeddings().weight.device
    n = lengths[rows].tolist()
    uniq = sorted({seq_prompt[r] for r in rows})
    slot = {p: j for j, p in enumerate(uniq)}
    visual = connect_features(model.connector, tower_feats, uniq)  # (U, Q, D)
    ids, vis = [], []
    for r, k in zip(rows, n):
        p = seq_prompt[r]
        ids.append(prompt_ids[p] + completions[r, :k].tolist())
        vis.append(visual[slot[p]])
    # padded to a few lengths: cuDNN's attention plans are per shape (engine.attention.SHAPE_ALIGN)
    batch = model.embed_inputs(ids, torch.stack(vis), pad_to_multiple=SHAPE_ALIGN)
    hidden = model.language_model.model(
        inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
        use_cache=False
    ).last_hidden_state
    lc = completions.shape[1]
    # the spliced prompt is len(ids) - n + (Q - 1) long; hidden at position prompt_len - 1 + t predicts token t
    starts = torch.tensor([batch.lengths[i] - k - 1 for i, k in enumerate(n)])
    pos = (starts[:, None] + torch.arange(lc)[None, :]).clamp(max=hidden.shape[1] - 1)
    pos = host_to_device(pos, device)
    h = torch.gather(hidden, 1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))
    targets = take_rows(completions, rows, device)
    logp = token_logprobs(h, model.language_model.get_output_embeddings().weight, targets, chunk_size=chunk_size)
    valid = torch.arange(lc)[None, :] < torch.tensor(n)[:, None]
    return logp * host_to_device(valid, device)


def _flat_logprobs(model, tower_feats: torch.Tensor | list[torch.Tensor], prompt_ids: list[list[int]],
                   seq_prompt: list[int], completions: torch.Tensor, lengths: torch.Tensor, rows: list[int], *,
                   chunk_size: int, shared_prompt: bool, packing: bool, varlen: bool | None,
                   compile: bool) -> torch.Tensor:
    """``sequence_logprobs`` over the flat layout of ``packed.py``."""
    lm = model.language_model
    device = lm.get_input_embeddings().weight.device
    n = lengths[rows].tolist()  # on the host, or one read for the micro-batch
    # the prompts of the flat batch: each distinct one once, or one copy per completion
    prompts = sorted({seq_prompt[r] for r in rows}) if shared_prompt else [seq_prompt[r] for r in rows]
    slot = {p: j for j, p in enumerate(prompts)}
    owner = [slot[seq_prompt[r]] if shared_prompt else i for i, r in enumerate(rows)]
    uniq = sorted(set(prompts))
    visual = connect_features(model.connector, tower_feats, uniq)  # (U, Q, D), once per distinct prompt
    if prompts != uniq:
        visual = take_rows(visual, [uniq.index(p) for p in prompts], device)
    embeds = model.prompt_embeddings([prompt_ids[p] for p in prompts], visual)
    # a completion's last token predicts nothing: its inputs are the tokens before it
    width = max(n) - 1 if n else 0
    inputs = [max(k - 1, 0) if packing else max(width, 0) for k in n]
    ids = host_to_device(torch.cat([completions[r, :m] for r, m in zip(rows, inputs)]), device)
    layout = PackedLayout([e.shape[0] for e in embeds], inputs, owner)
    hidden = packed_hidden(lm.model, torch.cat([*embeds, lm.get_input_embeddings()(ids)]), layout, varlen=varlen,
                           compile=compile)

    # the hidden state predicting token t: the prompt's last position for t = 0, else the completion's
    # token t - 1 (indices built on the host)
    lc = completions.shape[1]
    cols = max(n) if n else 0
    t = torch.arange(cols)[None].expand(len(rows), -1)
    prompt_last = torch.tensor([layout.prompt_starts[o] + layout.prompt_lens[o] - 1 for o in owner], dtype=torch.long)
    first = torch.tensor(layout.completion_starts, dtype=torch.long)
    src = torch.where(t == 0, prompt_last[:, None], first[:, None] + t - 1)
    valid = t < torch.tensor(n)[:, None]
    targets = take_rows(completions[:, :cols], rows, device)  # only the columns read are copied
    weight = lm.get_output_embeddings().weight
    if packing:
        # only real tokens reach the LM head, then land in their (row, position) slot
        r_idx, t_idx = (host_to_device(i, device) for i in valid.nonzero(as_tuple=True))
        logp = token_logprobs(gather_rows(hidden, host_to_device(src[valid], device)), weight, targets[r_idx, t_idx],
                              chunk_size=chunk_size)
        return logp.new_zeros(len(rows), lc).index_put((r_idx, t_idx), logp)
    src = torch.where(valid, src, prompt_last[:, None])  # padding reads any real position, then is zeroed
    logp = token_logprobs(gather_rows(hidden, host_to_device(src, device)), weight, targets, chunk_size=chunk_size)
    return F.pad(logp * host_to_device(valid, device), (0, lc - cols))


class PolicyLogprobs(nn.Module):
    """``sequence_logprobs`` as a module, so DistributedDataParallel can wrap the policy's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return sequence_logprobs(self.model, *args, **kwargs)
