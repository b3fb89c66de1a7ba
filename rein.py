"""Rein: a frozen vision foundation model refined by a few million trainable parameters.

"Stronger, Fewer, & Superior: Harnessing Vision Foundation Models for Domain Generalized
Semantic Segmentation" (Wei et al., CVPR 2024). The file reads in three parts:

1. `Rein`, the layer: learnable tokens per block that refine the block's patch features,
   and the link from those tokens to the segmentation head's object queries.
2. `ReinViT`, a frozen DINOv2 whose blocks run one by one with Rein after each, giving
   the four feature maps and the queries the head needs.
3. `Segmenter`, backbone + mask head + loss, for the three methods the paper compares
   (Table 2): `rein` (only Rein and the head train), `freeze` (only the head trains) and
   `full` (everything trains, the backbone at 0.1x the learning rate).

    model = build_model(method="rein", backbone="vitl14", weights="vitl14")
    losses = model.loss(images, labels)     # images (B, 3, H, W) normalised, labels (B, H, W)
    scores = model.predict(images)          # (B, num_classes, H, W)
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import vit
from mask_head import MaskHead, SetCriterion, semantic_inference

METHODS = ("rein", "freeze", "full")
# The official configs take ViT-L's blocks 7, 11, 15, 23: a third, half, two thirds and all
# of the depth. Other depths use the same fractions.
FEATURE_DEPTHS = (1 / 3, 1 / 2, 2 / 3, 1)
# Under `full`, the backbone learns at this fraction of the head's learning rate, as in the
# official configs; without it, full fine-tuning collapses (FACTS.md section 4).
FULL_BACKBONE_LR_MULT = 0.1
# Parameters trained without weight decay, by name (FACTS.md section 4); the head's query
# features and positions and its level embedding are embeddings in Mask2Former's sense.
NO_WEIGHT_DECAY = ("norm", "learnable_tokens", "query_feat", "query_embed", "level_embed")


# ---------------------------------------------------------------------------------------------
# 1. The Rein layer (FACTS.md section 1)
# ---------------------------------------------------------------------------------------------


class Rein(nn.Module):
    """Per-block learnable tokens that refine a frozen ViT's patch features.

    Notation of the paper: N blocks of width c, m tokens per block of rank r, queries of
    width q. Parameter names are those of the official release, so its weights load as
    they are (see `load_official_rein`).
    """

    def __init__(self, num_layers: int, dim: int, *, num_tokens: int = 100, rank: int = 16,
                 query_dim: int = 256, patch_size: int = 16):
        super().__init__()
        N, c, m, r, q = num_layers, dim, num_tokens, rank, query_dim
        self.dim = c
        # T_i = A_i @ B_i: low-rank tokens, A_i (m x r) and B_i (r x c), one pair per block.
        self.learnable_tokens_a = nn.Parameter(torch.empty(N, m, r))
        self.learnable_tokens_b = nn.Parameter(torch.empty(N, r, c))
        # token2feat and delta_f are shared by all blocks.
        self.mlp_token2feat = nn.Linear(c, c)
        self.mlp_delta_f = nn.Linear(c, c)
        # The refinement starts nearly switched off, so training starts from the frozen model.
        self.scale = nn.Parameter(torch.tensor(1e-3))
        # The link from tokens to object queries.
        self.transform = nn.Linear(c, q)
        self.merge = nn.Linear(3 * q, q)
        # The official initialisation, a uniform range set by the patch size and the rank;
        # the linears keep PyTorch's default (Kaiming-uniform, a = sqrt(5)).
        v = math.sqrt(6 / (3 * patch_size * patch_size + math.sqrt(c * r)))
        nn.init.uniform_(self.learnable_tokens_a, -v, v)
        nn.init.uniform_(self.learnable_tokens_b, -v, v)

    def tokens(self, layer: int) -> Tensor:
        """T_i = A_i @ B_i, (m, c)."""
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def forward(self, f: Tensor, layer: int) -> Tensor:
        """Refines the patch tokens f_i (B, n, c) leaving block `layer`; returns (B, n, c)."""
        T = self.tokens(layer)
        # S_i = softmax(f_i @ T_i^T / sqrt(c)): how much each patch attends to each token.
        S = torch.softmax(torch.einsum("bnc,mc->bnm", f, T) / math.sqrt(self.dim), dim=-1)
        # dF_bar = S_i[:, 1:] @ token2feat(T_i[1:]): token 0 joins the softmax
        # normalisation but sends no value, so a patch can attend "to nothing".
        dF_bar = torch.einsum("bnm,mc->bnc", S[..., 1:], self.mlp_token2feat(T[1:]))
        # dF_i = delta_f(dF_bar + f_i)
        dF = self.mlp_delta_f(dF_bar + f)
        # f_i <- f_i + scale * dF_i
        return f + self.scale * dF

    def queries(self) -> Tensor:
        """The head's object queries Q, (m, q), made from the tokens of every block."""
        T = self.learnable_tokens_a @ self.learnable_tokens_b  # (N, m, c): T_i for every block
        Qi = self.transform(T)  # (N, m, q): Q_i = transform(T_i)
        pooled = torch.stack([Qi.amax(dim=0), Qi.mean(dim=0), Qi[-1]], dim=-1)  # (m, q, 3)
        # Flattening (m, q, 3) interleaves the channels: q0 max, q0 mean, q0 last, q1 max, ...
        return self.merge(pooled.flatten(-2))  # (m, 3q) -> (m, q)


def load_official_rein(rein: Rein, path: str) -> Rein:
    """Loads the `backbone.reins.*` weights of an official Rein release checkpoint, strictly."""
    ckpt = vit.load_file(path, what="an official Rein checkpoint")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    prefix = "backbone.reins."
    reins = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not reins:
        raise ValueError(f"{path} holds no {prefix}* weights; expected an official Rein release checkpoint")
    own = rein.state_dict()
    missing, unexpected = sorted(own.keys() - reins.keys()), sorted(reins.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: the Rein weights do not match the low-rank Rein layer: missing {missing}, "
                         f"unexpected {unexpected}")
    for k, v in own.items():
        if reins[k].shape != v.shape:
            raise ValueError(
                f"{path} holds Rein weights for another backbone: {prefix}{k} has shape {tuple(reins[k].shape)}, "
                f"this model needs {tuple(v.shape)} (checkpoint: {reins['learnable_tokens_b'].shape[0]} blocks "
                f"of width {reins['learnable_tokens_b'].shape[-1]}; model: {own['learnable_tokens_b'].shape[0]} "
                f"blocks of width {own['learnable_tokens_b'].shape[-1]})")
    rein.load_state_dict(reins, strict=True)
    return rein


# ---------------------------------------------------------------------------------------------
# 2. The frozen ViT refined by Rein
# ---------------------------------------------------------------------------------------------


class ReinViT(nn.Module):
    """A DINOv2 ViT whose blocks run one by one, with Rein (if any) after every block.

    The ViT is frozen unless `train_vit` (the `full` method). A frozen ViT stays in eval
    mode and holds no gradients; the backward pass still flows through its blocks to the
    Rein layers before them, but computes no weight gradients. `grad_ckpt` recomputes the
    blocks in the backward pass instead of storing their activations.
    """

    def __init__(self, vit_model: vit.VisionTransformer, rein: Rein | None, *, train_vit: bool = False,
                 grad_ckpt: bool = False):
        super().__init__()
        self.vit = vit_model
        self.rein = rein
        self.train_vit = train_vit
        self.grad_ckpt = grad_ckpt
        depth = len(vit_model.blocks)
        self.feature_blocks = tuple(round(depth * f) - 1 for f in FEATURE_DEPTHS)
        self.vit.requires_grad_(train_vit)
        # Two parts of DINOv2 are never used here: the mask token (pre-training only) and the
        # final norm (the head reads the blocks' outputs). They never train, also because DDP
        # stops at a trainable parameter that gets no gradient.
        self.vit.mask_token.requires_grad_(False)
        self.vit.norm.requires_grad_(False)

    def train(self, mode: bool = True) -> "ReinViT":
        super().train(mode)
        if not self.train_vit:
            self.vit.eval()
        return self

    def forward(self, images: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Images (B, 3, H, W) -> four maps (B, c, 4h, 4w), (B, c, 2h, 2w), (B, c, h, w),
        (B, c, h/2, w/2) for a patch grid h x w, and the queries (m, q) or None without Rein."""
        prefix = self.vit.num_prefix_tokens
        maps = []
        # Under `freeze` nothing before the head trains, so no graph is needed at all.
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.rein is not None or self.train_vit)):
            x, (h, w) = self.vit.prepare_tokens(images)
            for i, block in enumerate(self.vit.blocks):
                if self.grad_ckpt and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
                if self.rein is not None:
                    # Class and register tokens pass unchanged; only the patches are refined.
                    x = torch.cat([x[:, :prefix], self.rein(x[:, prefix:], i)], dim=1)
                if i in self.feature_blocks:
                    patches = x[:, prefix:].transpose(1, 2)  # (B, c, h*w)
                    maps.append(patches.reshape(x.shape[0], -1, h, w))  # (B, c, h, w)
        # Strides 4, 8, 16, 32 for patch 16: bilinear x4, x2, x1, x0.5.
        maps = [F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else m
                for m, s in zip(maps, (4, 2, 1, 0.5))]
        return maps, self.rein.queries() if self.rein is not None else None


# ---------------------------------------------------------------------------------------------
# 3. The segmenter and the paper's three methods
# ---------------------------------------------------------------------------------------------


class Segmenter(nn.Module):
    """Backbone + mask head + set criterion.

    `config` holds the `build_model` arguments that rebuild this model; a checkpoint is
    `config` plus `trainable_state_dict()`.
    """

    def __init__(self, *, backbone: ReinViT, head: MaskHead, criterion: SetCriterion, config: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.criterion = criterion
        self.config = dict(config)

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The training losses for images (B, 3, H, W) and labels (B, H, W); 'loss' is the total."""
        maps, queries = self.backbone(images)
        return self.criterion(self.head(maps, queries), labels)

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Same as calling the model; kept as a name for readers and for DDP, which wraps forward."""
        return self(images, labels)

    def predict(self, images: Tensor) -> Tensor:
        """Per-class scores (B, K, H, W) at the input resolution."""
        maps, queries = self.backbone(images)
        class_logits, mask_logits = self.head(maps, queries)[-1]
        # As in Mask2Former: the mask logits are resized to the input before the sigmoid.
        mask_logits = F.interpolate(mask_logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return semantic_inference(class_logits, mask_logits)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What trains, and so what a checkpoint stores: Rein and the head for `rein`."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor], origin: str = "checkpoint") -> None:
        """Loads `trainable_state_dict()` output back, strictly: every key and shape must match."""
        own = dict(self.named_parameters())
        wanted = {k for k, p in own.items() if p.requires_grad}
        missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
        if missing or unexpected:
            raise ValueError(f"{origin} does not fit this {self.config['method']} model: missing "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                             f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"{origin} was trained with another model (checkpoint vs this model): {bad[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def param_groups(self, *, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on norms, Rein's tokens and scale, and the head's
        query and level embeddings; under `full` the ViT learns at 0.1x `lr`."""
        groups: dict[tuple[float, float], list[Tensor]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = any(key in name for key in NO_WEIGHT_DECAY) or name == "backbone.rein.scale"
            mult = FULL_BACKBONE_LR_MULT if name.startswith("backbone.vit.") else 1.0
            groups.setdefault((lr * mult, 0.0 if no_decay else weight_decay), []).append(p)
        return [dict(params=ps, lr=g_lr, weight_decay=wd) for (g_lr, wd), ps in groups.items()]


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parse_backbone(name: str) -> tuple[str, int]:
    """'vitl14_reg4' -> ('vitl14', 4); 'vitl14' -> ('vitl14', 0)."""
    arch, _, reg = name.partition("_reg")
    if arch not in vit.ARCHS or reg not in ("", "4"):
        raise ValueError(f"unknown backbone {name!r}; expected one of "
                         f"{', '.join(a + s for a in vit.ARCHS for s in ('', '_reg4'))}")
    return arch, int(reg or 0)


def build_model(*, method: str = "rein", backbone: str = "vitl14", weights: str | None = None,
                num_classes: int = 19, patch_size: int = 16, num_queries: int = 100, head_dim: int = 256,
                head_layers: int = 9, num_points: int = 12544, grad_ckpt: bool = False) -> Segmenter:
    """Builds the segmenter for `method` (rein, freeze or full) on a DINOv2 `backbone`.

    `weights`: where the DINOv2 weights come from (see vit.load_dinov2); None gives a
    random backbone, always the same one (tests and the CPU demo). `model.config` keeps
    every argument except `grad_ckpt`, so that a checkpoint can rebuild the model.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    arch, registers = parse_backbone(backbone)
    if weights is None:
        # A fixed random backbone: a checkpoint trained on it can be evaluated later.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vit_model = vit.build_vit(arch, patch_size, registers)
    else:
        # Built without memory and then given the checkpoint's tensors: no second copy.
        with torch.device("meta"):
            vit_model = vit.build_vit(arch, patch_size, registers)
        vit.load_dinov2(vit_model, weights)
    rein = None
    if method == "rein":
        rein = Rein(len(vit_model.blocks), vit_model.dim, num_tokens=num_queries, query_dim=head_dim,
                    patch_size=patch_size)
    backbone_module = ReinViT(vit_model, rein, train_vit=method == "full", grad_ckpt=grad_ckpt)
    head = MaskHead(in_dim=vit_model.dim, num_classes=num_classes, num_queries=num_queries, dim=head_dim,
                    num_layers=head_layers, rein_queries=rein is not None)
    config = dict(method=method, backbone=backbone, weights=weights, num_classes=num_classes,
                  patch_size=patch_size, num_queries=num_queries, head_dim=head_dim, head_layers=head_layers,
                  num_points=num_points)
    criterion = SetCriterion(num_classes=num_classes, num_points=num_points)
    model = Segmenter(backbone=backbone_module, head=head, criterion=criterion, config=config)
    if not (dist.is_initialized() and dist.get_rank() > 0):
        frozen = sum(p.numel() for p in vit_model.parameters() if not p.requires_grad)
        print(f"{method} on {backbone}: {count_trainable(backbone_module):,} trainable parameters in the "
              f"backbone, {count_trainable(head):,} in the head; {frozen:,} frozen")
    return model
