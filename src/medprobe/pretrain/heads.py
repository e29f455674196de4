"""The DINO projection head with prototypes, and the student/teacher network around a timm ViT."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP (``layers`` linear layers, GELU) to an L2-normalised bottleneck, then ``out_dim`` prototypes.

    The prototype layer is a linear map whose rows are normalised to unit length at every
    call (weight normalisation with the gain fixed to 1, as DINO/DINOv2), so the logits are
    cosine similarities between the bottleneck feature and the prototypes.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return F.linear(x, F.normalize(self.prototypes.weight, dim=-1, p=2, eps=1e-12).to(x.dtype))


class SSLNetwork(nn.Module):
    """A timm ``VisionTransformer`` plus a learned mask token and the DINO (and iBOT) heads.

    :meth:`tokens` runs the ViT with masked patch embeddings replaced by the mask token
    (DINOv2's ``prepare_tokens_with_masks``) and returns the normalised CLS token and patch
    tokens, exactly what the backbone's ``forward_tokens`` returns without masks.
    """

    def __init__(self, vit: nn.Module, dino_head: DINOHead, ibot_head: DINOHead | None) -> None:
        super().__init__()
        self.backbone = vit
        self.mask_token = nn.Parameter(torch.zeros(1, int(vit.embed_dim)))
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    @property
    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images and optional (B, N) bool masks -> CLS (B, D), patch tokens (B, N, D)."""
        m = self.backbone
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
