"""Per-token log-probs of completions under a TinyLLaVA model, micro-batch by micro-batch.

Each sequence is its prompt (with the 512 visual embeddings spliced in) followed by its completion,
cut after the first eos: positions past it are masked out of the loss anyway (spec §5.2 step 4), so
computing them would be wasted work. Sequences of a micro-batch are right-padded; the LLM returns
hidden states only and the log-probs come from a vocabulary-chunked log-softmax, so full
(sequences × tokens × vocabulary) logits never exist.
"""

from __future__ import annotations

import torch
from torch import nn

from .logprobs import token_logprobs


def micro_batch_order(lengths: list[int], size: int) -> list[list[int]]:
    """Sequence indices grouped into micro-batches of similar length (sorted), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


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
) -> torch.Tensor:
    """Log-probs (len(rows), Lc) of ``completions[rows]``; zero past each row's ``lengths``.

    ``tower_feats`` (B, N, V) or [(N_i, V)] are the frozen tower's outputs per prompt; the connector runs here so
    its parameters receive gradients when grad is enabled.
    """
    uniq = sorted({seq_prompt[r] for r in rows})
    slot = {p: j for j, p in enumerate(uniq)}
    visual = connect_features(model.connector, tower_feats, uniq)  # (U, Q, D)
    ids, vis = [], []
    for r in rows:
        p = seq_prompt[r]
        n = int(lengths[r])
        ids.append(prompt_ids[p] + completions[r, :n].tolist())
        vis.append(visual[slot[p]])
    batch = model.embed_inputs(ids, torch.stack(vis))
    hidden = model.language_model.model(
        inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    lc = completions.shape[1]
    # the spliced prompt is len(ids) - n + (Q - 1) long; hidden at position prompt_len - 1 + t predicts token t
    starts = torch.tensor([batch.lengths[i] - int(lengths[r]) - 1 for i, r in enumerate(rows)], device=hidden.device)
    pos = (starts[:, None] + torch.arange(lc, device=hidden.device)[None, :]).clamp(max=hidden.shape[1] - 1)
    h = torch.gather(hidden, 1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))
    targets = completions[rows]
    logp = token_logprobs(h, model.language_model.get_output_embeddings().weight, targets, chunk_size=chunk_size)
    valid = torch.arange(lc, device=logp.device)[None, :] < lengths[rows][:, None].to(logp.device)
    return logp * valid


class PolicyLogprobs(nn.Module):
    """``sequence_logprobs`` as a module, so DistributedDataParallel can wrap the policy's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return sequence_logprobs(self.model, *args, **kwargs)
