"""LLaVA-style image-conditioned language model: frozen patch tokens -> MLP projector -> causal LM.

The input sequence is ``[bos] prompt-before <image tokens> prompt-after report [eos]``: the
projected patch tokens replace the image placeholder of the instruction prompt (LLaVA-1.5,
as in RAD-DINO's report-generation evaluation). The loss covers the report and its end
token only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medprobe.errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"


class Projector(nn.Sequential):
    """Two-layer MLP with GELU (LLaVA-1.5's ``mlp2x_gelu``) from encoder width to the LM's embedding width."""

    def __init__(self, d_in: int, d_lm: int) -> None:
        super().__init__(nn.Linear(d_in, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))


def split_prompt(prompt: str) -> tuple[str, str]:
    """The prompt text before and after its single image placeholder."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise ConfigError(f"prompt: must contain the image placeholder {IMAGE_PLACEHOLDER!r} exactly once (where the "
                          f"image tokens go), found {count} in {prompt!r}")
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    return before, after


class ReportModel(nn.Module):
    """Projector + causal LM; ``image_tokens`` are ``(B, T, d_in)`` frozen encoder patch tokens."""

    def __init__(self, lm: Any, tokenizer: Any, d_in: int, prompt: str) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        emb = lm.get_input_embeddings()
        self.projector = Projector(d_in, emb.embedding_dim)
        before, after = split_prompt(prompt)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.register_buffer("ids_before", torch.tensor(bos + self._ids(before), dtype=torch.long), persistent=False)
        self.register_buffer("ids_after", torch.tensor(self._ids(after), dtype=torch.long), persistent=False)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []

    def prefix_length(self, n_image_tokens: int) -> int:
        return len(self.ids_before) + n_image_tokens + len(self.ids_after)

    def prefix(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, P, d_lm)`` embeddings of prompt and projected image tokens."""
        emb = self.lm.get_input_embeddings()
        b = image_tokens.shape[0]
        img = self.projector(image_tokens.to(self.projector[0].weight.dtype))
        parts = [emb(self.ids_before).unsqueeze(0).expand(b, -1, -1), img.to(emb.weight.dtype),
                 emb(self.ids_after).unsqueeze(0).expand(b, -1, -1)]
        return torch.cat(parts, dim=1)

    def loss(self, image_tokens: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the report tokens (``target_mask`` 1 on real tokens)."""
        prefix = self.prefix(image_tokens)
        emb = self.lm.get_input_embeddings()
        inputs = torch.cat([prefix, emb(target_ids)], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=target_mask.dtype, device=target_mask.device)
        attention = torch.cat([ones, target_mask], dim=1)
        labels = torch.cat([torch.full(prefix.shape[:2], -100, dtype=torch.long, device=target_ids.device),
                            target_ids.masked_fill(target_mask == 0, -100)], dim=1)
        return self.lm(inputs_embeds=inputs, attention_mask=attention, labels=labels).loss

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, max_new_tokens: int, num_beams: int = 1) -> list[str]:
        """Greedy (``num_beams=1``) or beam-search reports for a batch (every prefix has the same length)."""
        prefix = self.prefix(image_tokens)
        attention = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        from transformers import GenerationConfig
        tok = self.tokenizer
        config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, early_stopping=num_beams > 1)
        out = self.lm.generate(inputs_embeds=prefix, attention_mask=attention, generation_config=config)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
