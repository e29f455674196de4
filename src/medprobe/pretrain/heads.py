"""The DINO projection head with prototypes, and the student/teacher network around a ViT
(a timm ``VisionTransformer`` or a transformers ``Dinov2Model``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP (``layers`` linear layers, GELU) to an L2-normalised bottleneck, then ``out_dim`` prototypes.

    The prototype layer is DINOv2's weight-normalised linear map: rows of ``prototypes.weight``
    (``v``) are normalised to unit length at every call and scaled by ``gain`` (``g``, one per
    prototype, initialised to 1), so at initialisation the logits are cosine similarities
    between the bottleneck feature and the prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256, layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Linear(bottleneck, out_dim, bias=False)  # default init, as DINOv2's last layer
        self.gain = nn.Parameter(torch.ones(out_dim, 1))  # weight_norm's g, filled with 1 as DINOv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        w = self.gain * F.normalize(self.prototypes.weight, dim=-1, p=2, eps=1e-12)
        return F.linear(x, w.to(x.dtype))


def is_hf_dinov2(vit: nn.Module) -> bool:
    """A transformers ``Dinov2Model`` (RAD-DINO's class) rather than a timm ``VisionTransformer``."""
    return hasattr(vit, "embeddings") and hasattr(vit, "encoder") and hasattr(vit, "config")


def vit_blocks(vit: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a timm ViT (``blocks``) or a transformers Dinov2Model (``encoder.layer``)."""
    return vit.encoder.layer if is_hf_dinov2(vit) else vit.blocks


def vit_width(vit: nn.Module) -> int:
    return int(vit.config.hidden_size) if is_hf_dinov2(vit) else int(vit.embed_dim)


class SSLNetwork(nn.Module):
    """A ViT plus a learned mask token and the DINO (and iBOT) heads.

    :meth:`tokens` runs the ViT with masked patch embeddings replaced by the mask token
    (DINOv2's ``prepare_tokens_with_masks``) and returns the normalised CLS token and patch
    tokens, exactly what the backbone's ``forward_tokens`` returns without masks. For a
    transformers ``Dinov2Model`` the mask token is the model's own ``embeddings.mask_token``
    (the same parameter under both names) and masking goes through its ``bool_masked_pos``.
    """

    def __init__(self, vit: nn.Module, dino_head: DINOHead, ibot_head: DINOHead | None) -> None:
        super().__init__()
        self.backbone = vit
        self.hf = is_hf_dinov2(vit)
        if self.hf:
            if vit.embeddings.mask_token is None:
                vit.embeddings.mask_token = nn.Parameter(torch.zeros(1, vit_width(vit)))
            self.mask_token = vit.embeddings.mask_token
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, vit_width(vit)))
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    @property
    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    @property
    def num_prefix_tokens(self) -> int:
        m = self.backbone
        return 1 + int(getattr(m.config, "num_register_tokens", 0) or 0) if self.hf else m.num_prefix_tokens

    def tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images and optional (B, N) bool masks -> CLS (B, D), patch tokens (B, N, D)."""
        m = self.backbone
        if self.hf:
            x = m(pixel_values=images, bool_masked_pos=masks).last_hidden_state
            return x[:, 0], x[:, self.num_prefix_tokens:]
        x = m.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
        if masks is not None:
            mk = masks.view(*x.shape[:-1], 1)
            x = torch.where(mk, self.mask_token.to(x.dtype).view(*[1] * (x.ndim - 1), -1), x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        x = m.blocks(x)
        x = m.norm(x)
        return x[:, 0], x[:, m.num_prefix_tokens:]
