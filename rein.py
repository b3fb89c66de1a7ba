"""Rein: a frozen vision foundation model refined by a few million trainable parameters.

"Stronger, Fewer, & Superior: Harnessing Vision Foundation Models for Domain Generalized
Semantic Segmentation" (Wei et al., CVPR 2024). The file reads in five parts:

1. `Rein`, the layer: learnable tokens per block that refine the block's patch features,
   and the link from those tokens to the segmentation head's object queries.
2. The refinements the paper compares Rein with in Table 5: `LoRA`, AdaptFormer's
   `Adapter` and VPT's `Prompts`.
3. `ReinViT`, a frozen foundation model (DINOv2, DINOv3, EVA02, CLIP, SAM, MAE) whose blocks
   run one by one with Rein (or a part 2 refinement) between them, giving the four feature
   maps and the queries the head needs.
4. `Segmenter`, backbone + mask head + loss, for every method: `rein` (only Rein and the
   head train), the baselines of Table 2, `freeze` (only the head trains) and `full`
   (everything trains, the backbone at 0.1x the learning rate), and Table 5's `lora`,
   `adaptformer` and `vpt` (their tensors and the head train).
5. `from_official`, which runs the official release checkpoints (mmseg files) here.

    model = build_model(method="rein", backbone="vitl14", weights="vitl14")
    losses = model.loss(images, labels)     # images (B, 3, H, W) normalised, labels (B, H, W)
    scores = model.predict(images)          # (B, num_classes, H, W)
    model = from_official("iter_40000_published.pth", "vitl14")   # the paper's released GTAV model
"""

import hashlib
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import vit
from mask_head import MaskHead, SetCriterion, mask_logits, semantic_inference
from mask_head import official_name as head_official_name

# rein, and the paper's comparisons: the frozen backbone, full fine-tuning (Table 2), and the
# parameter-efficient methods of Table 5 (`BASELINES`), all with the same head and recipe.
METHODS = ("rein", "freeze", "full", "lora", "adaptformer", "vpt")
BASELINES = ("lora", "adaptformer", "vpt")
# The official configs take ViT-L's blocks 7, 11, 15, 23: a third, half, two thirds and all
# of the depth. Other depths use the same fractions; SAM gives its four global blocks.
FEATURE_DEPTHS = (1 / 3, 1 / 2, 2 / 3, 1)
# Where Rein sits: after every block (the paper), or after SAM's four global blocks only (the
# official SAM-H release).
REIN_BLOCKS = ("every", "global")
# Under `full`, the backbone learns at this fraction of the head's learning rate, as in the
# official configs; without it, full fine-tuning collapses (users of the official code saw the
# mean mIoU fall to about 32).
FULL_BACKBONE_LR_MULT = 0.1
# Parameters trained without weight decay, by name (the official configs' custom keys); the head's query
# features and positions and its level embedding are embeddings in Mask2Former's sense.
NO_WEIGHT_DECAY = ("norm", "learnable_tokens", "prompts", "query_feat", "query_embed", "level_embed")


# ----------- 1. The Rein layer (the paper's Section 3, low-rank tokens as in its official release)


class Rein(nn.Module):
    """Per-block learnable tokens that refine a frozen ViT's patch features.

    Notation of the paper: N blocks of width c, m tokens per block of rank r, queries of
    width q. Parameter names are those of the official release, so its weights load as
    they are (see `from_official`).
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


# ------------------------------------------------ 2. The paper's other refinements (Table 5), to compare


class LoRA(nn.Module):
    """LoRA (Hu et al., ICLR 2022) on a frozen linear map: W x + b + (alpha / r) B A x, with B zero at
    first so that training starts from the frozen model. `parts` > 1 gives each equal slice of the
    output its own A and B: EVA02's q, k and v are separate projections in its own code.

    The placement is ours (the paper does not give it): rank 8 on the qkv projection of every
    block, which reproduces Table 5's counts, 24 x 8 x (1024 + 3072) = 786,432 on DINOv2-L and
    24 x 3 x 8 x (1024 + 1024) = 1,179,648 on EVA02-L. alpha = r (a scale of 1), no dropout.
    """

    def __init__(self, base: nn.Linear, *, rank: int = 8, alpha: float = 8.0, parts: int = 1):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(parts, rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(parts, base.out_features // parts, rank))
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # loralib's initialisation of A

    def forward(self, x: Tensor) -> Tensor:
        low = torch.einsum("...i,pri->...pr", x, self.lora_a)  # (..., parts, r): A x per part
        delta = torch.einsum("...pr,por->...po", low, self.lora_b).flatten(-2)  # (..., out): B A x
        return self.base(x) + self.scale * delta


class Adapter(nn.Module):
    """AdaptFormer's parallel branch (Chen et al., NeurIPS 2022): s * up(relu(down(x))), added beside a
    block's FFN and fed the same residual stream; down to 64 channels, up zero at first, s = 0.1
    fixed, no LayerNorm (AdaptFormer's defaults): 24 x (1024 x 64 + 64 + 64 x 1024 + 1024) =
    3,171,840 on DINOv2-L, Table 5's 3.17M. No dropout, like the frozen blocks it sits in (the
    paper does not give AdaptFormer's 0.1)."""

    def __init__(self, dim: int, *, width: int = 64, scale: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.scale = scale
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(F.relu(self.down(x)))


class Prompts(nn.Module):
    """VPT-deep (Jia et al., ECCV 2022): m learnable tokens per block, put after the class and extra
    tokens in place of the previous block's prompt outputs, so each block reads its own prompts;
    the maps never contain them. 150 per block, as the Rein authors ran it: 24 x 150 x 1024 =
    3,686,400 on DINOv2-L, Table 5's 3.69M. VPT's initialisation, the one Rein's tokens reuse."""

    def __init__(self, num_layers: int, dim: int, *, num_tokens: int = 150, patch_size: int = 16):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(num_layers, num_tokens, dim))
        v = math.sqrt(6 / (3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.prompts, -v, v)

    def insert(self, x: Tensor, layer: int, prefix: int) -> Tensor:
        """x (B, prefix [+ m] + n, C) -> (B, prefix + m + n, C) with block `layer`'s prompts."""
        m = self.prompts.shape[1]
        rest = x[:, prefix + (m if layer else 0):]  # the previous block's prompt outputs are dropped
        return torch.cat([x[:, :prefix], self.prompts[layer].expand(x.shape[0], -1, -1), rest], dim=1)


# ------------------------------------------------------------- 3. The frozen ViT and its refinement


class ReinViT(nn.Module):
    """A foundation-model ViT whose blocks run one by one, with Rein (if any) after its blocks.

    The ViT is frozen unless `train_vit` (the `full` method). A frozen ViT stays in eval
    mode and holds no gradients; the backward pass still flows through its blocks to the
    Rein layers before them, but computes no weight gradients. `rein_blocks`: the blocks Rein
    follows, "every" one or SAM's four "global" ones. `baseline`: one of Table 5's other
    refinements in place of Rein, "lora", "adaptformer" or "vpt". `fpn`: the official CLIP
    model's FPN (`clip_fpn`), which trains with Rein. `grad_ckpt` recomputes the blocks in
    the backward pass instead of storing their activations.
    """

    def __init__(self, vit_model: vit.VisionTransformer, rein: Rein | None = None, *, baseline: str | None = None,
                 rein_blocks: str = "every", fpn: bool = False, train_vit: bool = False, grad_ckpt: bool = False):
        super().__init__()
        self.vit = vit_model
        self.rein = rein
        self.train_vit = train_vit
        self.grad_ckpt = grad_ckpt
        depth = len(vit_model.blocks)
        self.feature_blocks = vit_model.global_blocks or tuple(round(depth * f) - 1 for f in FEATURE_DEPTHS)
        # Block i -> its Rein layer.
        self.rein_layers = {b: i for i, b in enumerate(vit_model.global_blocks if rein_blocks == "global"
                                                       else range(depth))}
        if fpn:
            self.fpn1, self.fpn2, self.fpn3, self.fpn4 = clip_fpn(vit_model.dim)
        self.vit.requires_grad_(train_vit)
        # Two parts of DINOv2 and DINOv3 are never used here: the mask token (pre-training only)
        # and the final norm (the head reads the blocks' outputs). They never train, also because
        # DDP stops at a trainable parameter that gets no gradient.
        self.vit.norm.requires_grad_(False)
        if hasattr(self.vit, "mask_token"):
            self.vit.mask_token.requires_grad_(False)
        # Table 5's other refinements; made after the freezing, so that their tensors train.
        self.adapters = self.prompts = None
        if baseline == "lora":
            for block in vit_model.blocks:
                block.attn.qkv = LoRA(block.attn.qkv, parts=3 if vit_model.family == "eva02" else 1)
        elif baseline == "adaptformer":
            self.adapters = nn.ModuleList(Adapter(vit_model.dim) for _ in range(depth))
        elif baseline == "vpt":
            self.prompts = Prompts(depth, vit_model.dim, patch_size=vit_model.patch_size)

    @property
    def map_scales(self) -> tuple[float, ...]:
        """The resizing that brings the four maps to strides 4, 8, 16 and 32 (see PixelDecoder)."""
        return (1, 1, 1, 1) if hasattr(self, "fpn1") else (4, 2, 1, 0.5)

    def train(self, mode: bool = True) -> "ReinViT":
        super().train(mode)
        if not self.train_vit:
            self.vit.eval()
        return self

    def forward(self, images: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Images (B, 3, H, W) -> four maps (B, c, h, w) at the patch grid h x w (at strides 4 to
        32 with the FPN), from blocks at a third, half, two thirds and all of the depth, and the
        queries (m, q) or None without Rein. The head resizes the maps by `map_scales`."""
        prefix = self.vit.num_prefix_tokens
        skip = prefix + (self.prompts.prompts.shape[1] if self.prompts is not None else 0)  # tokens before the patches
        maps = []
        # Under `freeze` nothing before the head trains, so no graph is needed, unless the images'
        # own gradient is wanted (AdvStyle, train.py).
        trains = images.requires_grad or any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            x, (h, w) = self.vit.prepare_tokens(images)
            rope = self.vit.rope(h, w)  # DINOv3's and EVA02's rotary positions, else None
            for i, block in enumerate(self.vit.blocks):
                if self.prompts is not None:
                    x = self.prompts.insert(x, i, prefix)
                adapter = self.adapters[i] if self.adapters is not None else None
                if self.grad_ckpt and torch.is_grad_enabled():
                    x = checkpoint(block, x, rope, (h, w), adapter, use_reentrant=False)
                else:
                    x = block(x, rope, (h, w), adapter)
                if self.rein is not None and i in self.rein_layers:
                    # Class, register and storage tokens pass unchanged; only the patches are refined.
                    x = torch.cat([x[:, :prefix], self.rein(x[:, prefix:], self.rein_layers[i])], dim=1)
                if i in self.feature_blocks:
                    patches = x[:, skip:].transpose(1, 2)  # (B, c, h*w)
                    maps.append(patches.reshape(x.shape[0], -1, h, w))  # (B, c, h, w)
        if hasattr(self, "fpn1"):
            maps = [fpn(m) for fpn, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]
        return maps, self.rein.queries() if self.rein is not None else None


def clip_fpn(c: int) -> tuple[nn.Module, ...]:
    """The official Rein CLIP model's FPN: maps at the patch grid to strides 4, 8, 16, 32 with
    transposed convolutions and a max-pool, each after a one-group GroupNorm (as in BEiT's
    segmentation code). Module indices match the release file's."""
    return (nn.Sequential(nn.GroupNorm(1, c), nn.ConvTranspose2d(c, c, 2, stride=2), nn.BatchNorm2d(c), nn.GELU(),
                          nn.ConvTranspose2d(c, c, 2, stride=2)),
            nn.Sequential(nn.GroupNorm(1, c), nn.ConvTranspose2d(c, c, 2, stride=2)),
            nn.GroupNorm(1, c),
            nn.Sequential(nn.GroupNorm(1, c), nn.MaxPool2d(2)))


# ---------------------------------------------------------------- 4. The segmenter and the methods


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
        predictions, mask_features = self.head(maps, queries, self.backbone.map_scales)
        return self.criterion(predictions, mask_features, labels)

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Same as calling the model; kept as a name for readers and for DDP, which wraps forward."""
        return self(images, labels)

    def predict(self, images: Tensor) -> Tensor:
        """Per-class scores (B, K, H, W) at the input resolution."""
        maps, queries = self.backbone(images)
        predictions, mask_features = self.head(maps, queries, self.backbone.map_scales)
        class_logits, embedding = predictions[-1]
        # As in Mask2Former: the mask logits are resized to the input before the sigmoid.
        masks = F.interpolate(mask_logits(embedding, mask_features), size=images.shape[-2:], mode="bilinear",
                              align_corners=False)
        return semantic_inference(class_logits, masks)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What trains, and so what a checkpoint stores: Rein and the head for `rein` (and the FPN's
        BatchNorm statistics, which train with it)."""
        state = {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
        for name, module in self.named_modules():
            if isinstance(module, nn.BatchNorm2d) and module.weight.requires_grad:
                state |= {f"{name}.{b}": t for b, t in module.named_buffers()}
        return state

    def backbone_fingerprint(self) -> str:
        """A short digest of the backbone's weights, so that a checkpoint knows which weights it was
        trained on. The vectors (norms, biases, layer scales) and the class token suffice: two
        different pretrained files differ there, and they are a small part of the model."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.backbone.vit.state_dict().items()):
            if tensor.dim() <= 1 or name == "cls_token":
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def load_trainable_state_dict(self, state: dict[str, Tensor], origin: str = "checkpoint", *,
                                  name_in_file=lambda name: name) -> None:
        """Loads `trainable_state_dict()` output back, strictly: every key and shape must match.
        Errors name the missing tensors as `name_in_file` gives them."""
        trainable = self.trainable_state_dict().keys()
        try:
            result = self.load_state_dict(state, strict=False)  # the frozen weights are not in `state`
        except RuntimeError as e:
            raise ValueError(f"{origin} was trained with another model: {e}") from None
        missing = sorted(map(name_in_file, trainable & set(result.missing_keys)))
        unexpected = sorted(result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(f"{origin} does not fit this {self.config['method']} model: missing "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                             f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    def param_groups(self, *, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on norms, Rein's tokens and scale, and the head's
        query and level embeddings; under `full` the ViT learns at 0.1x `lr`."""
        groups: dict[tuple[float, float], list[Tensor]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = any(key in name for key in NO_WEIGHT_DECAY) or name == "backbone.rein.scale"
            full = self.config["method"] == "full" and name.startswith("backbone.vit.")
            mult = FULL_BACKBONE_LR_MULT if full else 1.0
            groups.setdefault((lr * mult, 0.0 if no_decay else weight_decay), []).append(p)
        return [dict(params=ps, lr=g_lr, weight_decay=wd) for (g_lr, wd), ps in groups.items()]


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_model(*, method: str = "rein", backbone: str = "vitl14", weights: str | dict | None = None,
                num_classes: int = 19, patch_size: int = 16, num_queries: int = 100, head_dim: int = 256,
                head_layers: int = 9, encoder_layers: int = 6, num_points: int = 12544, rein_blocks: str = "every",
                fpn: bool = False, replace_query_feat: bool = True, grad_ckpt: bool = False) -> Segmenter:
    """Builds the segmenter for `method` (one of METHODS) on a `backbone` of vit.ARCHS.

    `weights`: where the backbone's weights come from (see vit.load_pretrained); None gives a
    random backbone, always the same one (tests and the CPU demo). `head_layers` and
    `encoder_layers` are the head's transformer decoder and deformable encoder depths (9
    and 6 in the paper). `rein_blocks`, `fpn` and `replace_query_feat` rebuild the official
    releases that differ from the paper's model (see `from_official`). `model.config` keeps
    every argument except `grad_ckpt`, so that a checkpoint can rebuild the model.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if weights is None:
        # A fixed random backbone: a checkpoint trained on it can be evaluated later.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vit_model = vit.build_vit(backbone, patch_size)
    else:
        # Built without memory and then given the checkpoint's tensors: no second copy.
        with torch.device("meta"):
            vit_model = vit.build_vit(backbone, patch_size)
        vit.load_pretrained(vit_model, weights)
    if rein_blocks not in REIN_BLOCKS or (rein_blocks == "global" and not vit_model.global_blocks):
        raise ValueError(f"rein_blocks must be 'every' or, for SAM, 'global'; got {rein_blocks!r} for {backbone}")
    if method == "vpt" and vit_model.global_blocks:
        raise ValueError(f"vpt cannot run on {backbone}: its prompts join the token sequence, but SAM's windowed "
                         f"blocks attend on the patch grid alone")
    rein = None
    if method == "rein":
        num_layers = len(vit_model.global_blocks) if rein_blocks == "global" else len(vit_model.blocks)
        rein = Rein(num_layers, vit_model.dim, num_tokens=num_queries, query_dim=head_dim, patch_size=patch_size)
    backbone_module = ReinViT(vit_model, rein, baseline=method if method in BASELINES else None,
                              rein_blocks=rein_blocks, fpn=fpn, train_vit=method == "full", grad_ckpt=grad_ckpt)
    head = MaskHead(in_dim=vit_model.dim, num_classes=num_classes, num_queries=num_queries, dim=head_dim,
                    decoder_layers=head_layers, encoder_layers=encoder_layers, rein_queries=rein is not None,
                    replace_query_feat=replace_query_feat)
    config = dict(method=method, backbone=backbone, weights=weights, num_classes=num_classes,
                  patch_size=patch_size, num_queries=num_queries, head_dim=head_dim, head_layers=head_layers,
                  encoder_layers=encoder_layers, num_points=num_points, rein_blocks=rein_blocks, fpn=fpn,
                  replace_query_feat=replace_query_feat)
    criterion = SetCriterion(num_classes=num_classes, num_points=num_points)
    model = Segmenter(backbone=backbone_module, head=head, criterion=criterion, config=config)
    if not (dist.is_initialized() and dist.get_rank() > 0):
        frozen = sum(p.numel() for p in vit_model.parameters() if not p.requires_grad)
        parts = [f"Rein {count_trainable(rein):,}"] if rein is not None else []
        if method in BASELINES:
            parts.append(f"{method} {count_trainable(backbone_module):,}")
        if fpn:
            parts.append(f"FPN {sum(count_trainable(getattr(backbone_module, f'fpn{i}')) for i in range(1, 5)):,}")
        print(f"{method} on {backbone}: {count_trainable(backbone_module):,} trainable parameters in the backbone"
              f"{' (' + ', '.join(parts) + ')' if parts else ''}, {count_trainable(head):,} in the head; "
              f"{frozen:,} frozen")
    return model


# ------------------------------------------------------------- 5. The official release checkpoints

def official_name(name: str) -> str:
    """Our parameter name -> its name in an official release checkpoint (mmseg's): Rein under
    backbone.reins., the ViT's own names and CLIP's FPN under backbone., the head's mmdet names
    under decode_head."""
    module, _, rest = name.partition(".")
    if module == "head":
        return "decode_head." + head_official_name(rest)
    part, _, rest = rest.partition(".")
    return {"rein": "backbone.reins.", "vit": "backbone."}.get(part, f"backbone.{part}.") + rest


def read_official(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of an official release file (an mmengine checkpoint: meta + state_dict)."""
    ckpt = vit.read_file(path, what="an official Rein release checkpoint")
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("decode_head.") for k in state):
        found = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an official Rein release checkpoint: expected an mmengine file whose "
                         f"'state_dict' holds decode_head.* (and backbone.reins.*) weights; found {found}")
    return state


def official_config(state: dict[str, Tensor]) -> dict:
    """build_model arguments that rebuild an official model's head, Rein and FPN, read from its
    tensors (`rein_blocks` is settled against the backbone, in `from_official`)."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    cls_embed = state["decode_head.cls_embed.weight"]  # (K + 1, dim)
    rein = "backbone.reins.learnable_tokens_a" in state
    queries = state["backbone.reins.learnable_tokens_a" if rein else "decode_head.query_feat.weight"]
    return dict(method="rein" if rein else "freeze", num_classes=cls_embed.shape[0] - 1, patch_size=16,
                num_queries=queries.shape[-2], head_dim=cls_embed.shape[1],
                head_layers=count("decode_head.transformer_decoder.layers."),
                encoder_layers=count("decode_head.pixel_decoder.encoder.layers."),
                fpn="backbone.fpn1.1.weight" in state, replace_query_feat="decode_head.querys2feat.weight" in state)


def from_official(checkpoint: str | os.PathLike, weights: str | os.PathLike | None = None) -> Segmenter:
    """A segmenter in eval mode from an official Rein release file, giving the official outputs.

    `checkpoint`: the release's .pth (Rein and the head, and CLIP's FPN; or, for the frozen
    baseline of configs/frozen_vfms, the head with the whole converted backbone). `weights`:
    the backbone's weights as `--weights` takes them (name, URL, path): the upstream file or
    the release's converted one (dinov2_converted.pth, eva02_L_converted.pth, ...); optional
    when the checkpoint holds the backbone. Which model it is comes from the weights; the
    release's tensors must fit it.
    """
    state = read_official(checkpoint)
    config = official_config(state)
    source = weights
    if source is None:
        source = {k[len("backbone."):]: v for k, v in state.items()
                  if k.startswith("backbone.") and not k.startswith(("backbone.reins.", "backbone.fpn"))}
        if not source:
            raise ValueError(f"{checkpoint} holds no backbone weights: name the weights it was trained on with "
                             f"--weights (e.g. vitl14, eva02_vitl14, or the release's converted backbone file)")
    backbone_state, family = vit.read_weights(source, origin=f"the backbone in {checkpoint}" if weights is None
                                              else None)
    found, backbone = vit.describe(backbone_state, family)
    depth = vit.num_blocks(backbone_state)
    global_blocks = vit.global_blocks(depth) if family == "sam" else ()
    tokens = state.get("backbone.reins.learnable_tokens_b")  # (N, r, c): N Rein layers of width c
    head_width = state["decode_head.pixel_decoder.input_convs.0.conv.weight"].shape[1]
    layers, width = (tokens.shape[0], tokens.shape[2]) if tokens is not None else (depth, head_width)
    if width != backbone_state["patch_embed.proj.weight"].shape[0] or layers not in (depth, len(global_blocks)):
        raise ValueError(f"{checkpoint} was trained on a backbone of width {width} with {layers} Rein layers, but "
                         f"{weights or checkpoint} holds {backbone} ({found})")
    model = build_model(backbone=backbone, weights=source, rein_blocks="every" if layers == depth else "global",
                        **config)
    model.config["weights"] = None if weights is None else str(weights)
    ours = {official_name(k): k for k in model.trainable_state_dict()}  # Rein, the FPN and the head
    # The backbone weights a frozen-baseline file holds are loaded already; a name we do not
    # know stays as it is, to be named as unexpected.
    release = {ours.get(k, k): v for k, v in state.items() if k in ours or not k.startswith("backbone.")}
    model.load_trainable_state_dict(release, origin=f"{checkpoint} (an official release file)",
                                    name_in_file=official_name)
    return model.eval()
