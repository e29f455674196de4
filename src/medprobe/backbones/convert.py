"""Key conversions between released checkpoint layouts of the same architecture."""
from __future__ import annotations

import re

import torch


def hf_dinov2_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model``/``Dinov2WithRegistersModel`` state dict (in-memory names of
    transformers 5) in the layout of facebookresearch/dinov2 checkpoints.

    q/k/v projections are concatenated into ``qkv``; SwiGLU ``gate_proj``/``up_proj`` into ``w12``
    (gate first, as the original ``chunk``), ``down_proj`` becomes ``w3``.
    """
    out: dict[str, torch.Tensor] = {}
    plain = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
             "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    layer = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "mlp.down_proj": "mlp.w3"}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    w12: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in plain:
            out[plain[k]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", k)
        if m is None:
            out[k] = v  # left for the strict check to report
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if kind == "lambda1":
            out[f"blocks.{i}.ls{name[-1]}.gamma"] = v
        elif name in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            qkv.setdefault((i, kind), {})[name[10]] = v
        elif name in ("mlp.gate_proj", "mlp.up_proj"):
            w12.setdefault((i, kind), {})[name[4:]] = v
        elif name in layer:
            out[f"blocks.{i}.{layer[name]}.{kind}"] = v
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for (i, kind), parts in w12.items():
        out[f"blocks.{i}.mlp.w12.{kind}"] = torch.cat([parts["gate_proj"], parts["up_proj"]])
    return out
