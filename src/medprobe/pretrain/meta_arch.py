"""The meta-architecture of DINOv2-style pretraining (DINOv2's ``SSLMetaArch``).

Student and EMA teacher (the ViT, a DINO head and optionally a separate iBOT head), the
target centring, the losses of one step and the parameter groups of the optimiser.

One step: the teacher (no gradients) embeds the 2 global crops; its CLS prototype scores
(views swapped) and its masked-patch scores become targets after Sinkhorn-Knopp or softmax
centring at the current teacher temperature. The student embeds the masked global crops and
the local crops; the loss is the DINO cross-entropy over all (student view, other teacher
view) pairs, the iBOT cross-entropy on masked patches and the KoLeo regulariser on the
student's global CLS tokens. After the optimiser step the teacher moves towards the student.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from medprobe.errors import ConfigError, WeightsError
from medprobe.pretrain.config import PretrainConfig
from medprobe.pretrain.heads import DINOHead, SSLNetwork, vit_blocks, vit_width
from medprobe.pretrain.losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp


def build_networks(cfg: PretrainConfig) -> tuple[Any, SSLNetwork, SSLNetwork]:
    """(backbone wrapper, student, teacher) with identical initial weights."""
    from medprobe.backbones import create_backbone
    from medprobe.backbones.weights import parse_weights, read_state_dict
    b = cfg.backbone
    overrides = dict(b.overrides)
    if cfg.train.drop_path > 0:
        overrides["drop_path_rate"] = cfg.train.drop_path
    try:
        backbone = create_backbone(b.name, b.weights, tiny=b.tiny, overrides=overrides or None)
    except ConfigError as e:  # a bad constructor override
        raise ConfigError(f"backbone.overrides: {e}") from None
    vit = backbone.model
    hf = backbone.spec.family == "hf"
    if not hf and (getattr(vit, "cls_token", None) is None or not hasattr(vit, "_pos_embed")):
        raise ConfigError(f"backbone {b.name!r} is not a timm VisionTransformer with a class token")
    dim = vit_width(vit)
    lc = cfg.loss
    dino_head = DINOHead(dim, lc.prototypes, lc.head_hidden, lc.bottleneck, lc.head_layers)
    ibot_head = (DINOHead(dim, lc.ibot_prototypes, lc.head_hidden, lc.bottleneck, lc.head_layers)
                 if lc.separate_ibot_head and lc.ibot_weight > 0 else None)
    if cfg.heads.weights is not None:
        from medprobe.pretrain.head_weights import load_heads
        load_heads(cfg.heads.weights, cfg.heads.which, dino_head, ibot_head)
    student = SSLNetwork(vit, dino_head, ibot_head)
    source = parse_weights(b.weights)
    if source.kind == "file" and not hf:  # a DINOv2-format checkpoint (e.g. an earlier run) keeps its mask token
        try:
            token = read_state_dict(source.path).get("mask_token")
        except WeightsError:
            token = None
        if token is not None and token.numel() == dim:
            student.mask_token.data.copy_(token.reshape(1, dim))
    teacher = SSLNetwork(_clone(vit), _clone(dino_head), _clone(ibot_head) if ibot_head is not None else None)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return backbone, student, teacher


def _clone(module: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(module)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def param_groups(student: SSLNetwork, layer_decay: float, patch_embed_mult: float) -> list[dict[str, Any]]:
    """AdamW groups with DINOv2's multipliers: layer-wise lr decay, patch-embed lr, no decay on biases/norms/layer scales.

    Block ``i`` is ``blocks.i`` of a timm ViT or ``encoder.layer.i`` of a transformers Dinov2Model;
    the embeddings (patch, position, class, register and mask tokens) are layer 0.
    """
    depth = len(vit_blocks(student.backbone))
    groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            m = re.match(r"(?:blocks|encoder\.layer)\.(\d+)\.", sub)
            if m:
                layer = int(m.group(1)) + 1
            elif sub.startswith(("pos_embed", "patch_embed", "cls_token", "reg_token", "embeddings.")):
                layer = 0
            else:
                layer = depth + 1
        elif name == "mask_token":
            layer = 0
        else:
            layer = depth + 1
        lr_mult = layer_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= patch_embed_mult
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name or "lambda" in name else 1.0
        last = name.endswith(("prototypes.weight", "head.gain"))
        groups.setdefault((lr_mult, wd_mult, last), []).append(p)
    return [{"params": ps, "lr_mult": k[0], "wd_mult": k[1], "last_layer": k[2]} for k, ps in groups.items()]


class MetaArch:
    """Student, teacher and target centres of one run, on ``device``; the losses of a step."""

    def __init__(self, cfg: PretrainConfig, precision: str, device: torch.device) -> None:
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.backbone, self.student, self.teacher = build_networks(cfg)
        self.student.to(device).train()
        self.teacher.to(device).eval()
        lc = cfg.loss
        self.dino_center = SoftmaxCenter(lc.prototypes, lc.center_momentum).to(device)
        self.ibot_center = SoftmaxCenter(lc.ibot_prototypes if self.student.ibot_head is not None
                                         else lc.prototypes, lc.center_momentum).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "dino_center": self.dino_center.state_dict(), "ibot_center": self.ibot_center.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.dino_center.load_state_dict(state["dino_center"])
        self.ibot_center.load_state_dict(state["ibot_center"])

    def param_groups(self) -> list[dict[str, Any]]:
        t = self.cfg.train
        return param_groups(self.student, t.layer_decay, t.patch_embed_lr_mult)

    def _autocast(self) -> Any:
        from medprobe.runtime import autocast
        return autocast(self.precision, self.device)

    def compute_losses(self, globals_: torch.Tensor, locals_: torch.Tensor, masks: torch.Tensor,
                       teacher_temp: float) -> dict[str, torch.Tensor]:
        """The step's losses (scalars, this process's share) for one batch; builds the student graph."""
        lc, t = self.cfg.loss, self.cfg.train
        b = globals_.shape[0] // 2
        n_local = locals_.shape[0] // b if b else 0
        use_ibot = lc.ibot_weight > 0
        masks = masks if use_ibot else torch.zeros_like(masks)
        with torch.no_grad(), self._autocast():
            t_cls, t_patch = self.teacher.tokens(globals_)
            t_dino = self.teacher.dino_head(t_cls).float()
            t_dino = torch.cat([t_dino[b:], t_dino[:b]])  # student view 1 learns from teacher view 2 and back
            t_ibot = self.teacher.patch_head(t_patch[masks]).float() if use_ibot else None
        if lc.centering == "sinkhorn_knopp":
            dino_targets = sinkhorn_knopp(t_dino, teacher_temp, lc.sinkhorn_iterations)
            ibot_targets = (sinkhorn_knopp(t_ibot, teacher_temp, lc.sinkhorn_iterations) if use_ibot else None)
        else:
            dino_targets = self.dino_center.targets(t_dino, teacher_temp)
            self.dino_center.update(t_dino)
            ibot_targets = None
            if use_ibot:
                ibot_targets = self.ibot_center.targets(t_ibot, teacher_temp)
                self.ibot_center.update(t_ibot)

        with self._autocast():
            s_cls, s_patch = self.student.tokens(globals_, masks if use_ibot else None)
            s_dino = self.student.dino_head(s_cls).float()
            s_local = (self.student.dino_head(self.student.tokens(locals_)[0]).float() if n_local else None)
            s_ibot = self.student.patch_head(s_patch[masks]).float() if use_ibot else None

        n_terms = 2 + 2 * n_local  # (student view, other teacher view) pairs per image
        zero = torch.zeros((), device=globals_.device)
        dino = zero
        if lc.dino_weight > 0:
            dino = dino_loss([s_dino], [dino_targets], t.student_temp) * 2 / n_terms
            if n_local:
                dino = dino + dino_loss(s_local.chunk(n_local), dino_targets.chunk(2), t.student_temp) / n_terms
        ibot = ibot_loss(s_ibot, ibot_targets, masks, t.student_temp) if use_ibot else zero
        koleo = (sum(koleo_loss(c) for c in s_cls.float().chunk(2)) if lc.koleo_weight > 0 else zero)
        total = lc.dino_weight * dino + lc.ibot_weight * ibot + lc.koleo_weight * koleo
        return {"total": total, "dino": dino, "ibot": ibot, "koleo": koleo}

    def clip_gradients(self) -> None:
        c = self.cfg.train.clip_grad
        if c <= 0:
            return
        s = self.student
        backbone = list(s.backbone.parameters())
        modules = [backbone + ([s.mask_token] if all(p is not s.mask_token for p in backbone) else []),
                   list(s.dino_head.parameters())]
        if s.ibot_head is not None:
            modules.append(list(s.ibot_head.parameters()))
        for ps in modules:
            ps = [p for p in ps if p.grad is not None]
            if ps:
                torch.nn.utils.clip_grad_norm_(ps, c)

    def update_teacher(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)
