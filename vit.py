"""The Rein paper's vision foundation models, written by hand, that load the official weights exactly.

    model = build_vit("vitl14", patch_size=16)     # DINOv2-L at the Rein paper's patch 16 (native: 14)
    load_pretrained(model, "vitl14")                # official weights, converted to patch 16
    model = build_vit("eva02_vitl14", patch_size=16)
    load_pretrained(model, "eva02_vitl14")          # eva02_L_pt_m38m_p14to16.pt, downloaded once
    tokens = model(images)                          # (B, prefix + h*w, C): class token, extra tokens, patches

Run `python vit.py eva02_vitl14` for a summary of a model (built on the meta device, so it
is instant and allocates nothing).

Six families, one pre-norm transformer: every block is x + attn(norm1(x)), then
x + mlp(norm2(x)). What sets a family apart is one field of `Family` (below) or one
feed-forward network:
- DINOv2 (Oquab et al. 2023): LayerScale, an absolute position table, optional registers;
- DINOv3 (Simeoni et al. 2025): LayerScale, RoPE in place of a position table, 4 storage
  tokens, no key bias, LayerNorm eps 1e-5;
- EVA02 (Fang et al. 2023): a position table and RoPE, no key bias, SwiGLU with a LayerNorm
  inside, no final norm;
- CLIP (Radford et al. 2021): a LayerNorm before the blocks (`ln_pre`), QuickGELU, no patch
  bias, eps 1e-5;
- SAM's image encoder (Kirillov et al. 2023): no class token, attention in 14 x 14 windows
  but for four global blocks, decomposed relative positions;
- MAE (He et al. 2022): the plain ViT with a fixed sin-cos position table.
Parameter names are DINOv2's (the names of timm's ViT). DINOv2, DINOv3 and MAE files load
as they are; CLIP and SAM files go through their family's name table (`CLIP_NAMES`,
`SAM_NAMES`), and EVA02's separate q, k, v are fused (`fuse_eva02_qkv`), as they load;
`UNUSED` names what an upstream file holds that no model here uses. rein.py runs the blocks one at a time:
`prepare_tokens` gives the input tokens and the patch grid, `rope` the rotation for that
grid, `blocks` are the blocks.
"""

import argparse
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    """How a family departs from the plain pre-norm ViT (MAE's). One field per difference."""

    title: str  # as summaries and errors print it
    eps: float = 1e-6  # LayerNorm eps
    class_token: bool = True
    # The position table: "bicubic" or "bilinear" (a stored grid, resized this way to other grids),
    # "sincos" (computed for each grid, never stored), None (no table: RoPE only).
    positions: str | None = "bicubic"
    rope: str | None = None  # "dinov3" (axial, on [-1, 1]) or "eva02" (on the 16 x 16 pre-training grid)
    layer_scale: bool = False
    key_bias: bool = True  # False: the key third of qkv has no bias
    ln_pre: bool = False  # CLIP's LayerNorm between the embedding and the blocks
    patch_bias: bool = True
    final_norm: bool = True  # the norm after the last block (rein.py never uses it)
    mask_token: bool = False  # kept only so that DINO's files load strictly
    windows: bool = False  # SAM's window attention and relative positions


FAMILIES = {
    "dinov2": Family("DINOv2", layer_scale=True, mask_token=True),
    "dinov3": Family("DINOv3", eps=1e-5, positions=None, rope="dinov3", layer_scale=True, key_bias=False,
                     mask_token=True),
    "eva02": Family("EVA02", rope="eva02", key_bias=False, final_norm=False),
    "clip": Family("CLIP", eps=1e-5, positions="bilinear", ln_pre=True, patch_bias=False, final_norm=False),
    "sam": Family("SAM", class_token=False, final_norm=False, windows=True),
    "mae": Family("MAE", positions="sincos"),
}

# name: (family, width, depth, heads, feed-forward network, native patch)
ARCHS = {
    "vits14": ("dinov2", 384, 12, 6, "mlp", 14),
    "vitb14": ("dinov2", 768, 12, 12, "mlp", 14),
    "vitl14": ("dinov2", 1024, 24, 16, "mlp", 14),
    "vitg14": ("dinov2", 1536, 40, 24, "swiglu_fused", 14),
    "dinov3_vits16": ("dinov3", 384, 12, 6, "mlp", 16),
    "dinov3_vits16plus": ("dinov3", 384, 12, 6, "swiglu", 16),
    "dinov3_vitb16": ("dinov3", 768, 12, 12, "mlp", 16),
    "dinov3_vitl16": ("dinov3", 1024, 24, 16, "mlp", 16),
    "dinov3_vith16plus": ("dinov3", 1280, 32, 20, "swiglu", 16),
    "eva02_vitb14": ("eva02", 768, 12, 12, "swiglu_ln", 14),
    "eva02_vitl14": ("eva02", 1024, 24, 16, "swiglu_ln", 14),
    "clip_vitb16": ("clip", 768, 12, 12, "quick_gelu", 16),
    "clip_vitl14": ("clip", 1024, 24, 16, "quick_gelu", 14),
    "sam_vitb16": ("sam", 768, 12, 12, "mlp", 16),
    "sam_vitl16": ("sam", 1024, 24, 16, "mlp", 16),
    "sam_vith16": ("sam", 1280, 32, 16, "mlp", 16),
    "mae_vitb16": ("mae", 768, 12, 12, "mlp", 16),
    "mae_vitl16": ("mae", 1024, 24, 16, "mlp", 16),
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"
# The files the official Rein release (and each model's own README) names. EVA02's "p14to16"
# files hold the patch-14 model with its kernel already resized to 16.
WEIGHTS_URLS = {
    "eva02_vitb14": "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/pt/eva02_B_pt_in21k_p14to16.pt",
    "eva02_vitl14": "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/pt/eva02_L_pt_m38m_p14to16.pt",
    "clip_vitb16": "https://openaipublic.azureedge.net/clip/models/"
                   "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "clip_vitl14": "https://openaipublic.azureedge.net/clip/models/"
                   "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "sam_vitb16": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "sam_vitl16": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vith16": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "mae_vitb16": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
    "mae_vitl16": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
}
# DINOv3's LVD-1689M files (facebookresearch/dinov3, dinov3/hub/backbones.py); access is gated.
DINOV3_FILES = {
    "dinov3_vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "dinov3_vits16plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    "dinov3_vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    "dinov3_vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "dinov3_vith16plus": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
}
SAM_WINDOW = 14  # SAM attends within 14 x 14 windows, but in its global blocks
SAM_PRETRAIN_GRID = 64  # SAM's 1024-pixel input: its global relative-position tables span 2 * 64 - 1
EVA02_PRETRAIN_GRID = 16  # EVA02's 224-pixel, patch-14 pre-training: RoPE counts positions on this grid


# ------------------------------------------------------------------------------------ the layers


class LinearKMaskedBias(nn.Linear):
    """A qkv projection whose key third has no bias: its bias is multiplied by the stored
    `bias_mask`, 0 on the key third (DINOv3's form; EVA02 loads into it with the same mask)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__(dim, out_dim)
        mask = torch.ones(out_dim)
        mask[out_dim // 3:2 * out_dim // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def rotate(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """RoPE, rotate-half form: x (..., n, D) with its two halves [x1, x2] paired dim j with j + D/2:
    x * cos + [-x2, x1] * sin, in float32 as DINOv3 computes it. (EVA02 pairs neighbouring
    dims; its q and k rows are reordered as they load, see `fuse_eva02_qkv`, to the same scores.)"""
    sin, cos = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, and RoPE on the patches if given."""

    def __init__(self, *, dim: int, num_heads: int, key_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim) if key_bias else LinearKMaskedBias(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, C) -> q, k, v, each (B, heads, N, head_dim)."""
        B, N, C = x.shape
        # Every checkpoint lays the qkv output out as (3, heads, head_dim).
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                grid: tuple[int, int] | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C); rope: sin and cos (h*w, head_dim) for the last h*w tokens."""
        B, N, C = x.shape
        q, k, v = self.split_heads(x)
        if rope is not None:
            # Only the patches turn; the class and storage tokens have no position.
            n = N - rope[0].shape[0]
            q = torch.cat([q[:, :, :n], rotate(q[:, :, n:], rope)], dim=2)
            k = torch.cat([k[:, :, :n], rotate(k[:, :, n:], rope)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def relative_table(table: Tensor, n: int) -> Tensor:
    """SAM's relative positions along one axis of n tokens: (2n - 1, d) -> (n, n, d), entry
    [i, j] for offset i - j. A table of another length is first resized linearly."""
    if table.shape[0] != 2 * n - 1:
        table = F.interpolate(table.T[None], size=2 * n - 1, mode="linear")[0].T  # (2n - 1, d)
    offsets = torch.arange(n, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + n - 1]


class WindowAttention(Attention):
    """SAM's attention: within `window` x `window` windows of the patch grid (0: over the
    whole grid), with decomposed relative positions added to the scores (MViTv2)."""

    def __init__(self, *, dim: int, num_heads: int, window: int, table: int):
        super().__init__(dim=dim, num_heads=num_heads)
        self.window = window
        self.rel_pos_h = nn.Parameter(torch.zeros(table, dim // num_heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(table, dim // num_heads))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                grid: tuple[int, int] | None = None) -> Tensor:
        """x (B, h*w, C), the patches row by row on the grid (h, w) -> (B, h*w, C)."""
        B, N, C = x.shape
        h, w = grid
        x = x.view(B, h, w, C)
        if not self.window:
            return self.attend(x).reshape(B, N, C)
        s = self.window
        # SAM pads the normalised tokens with zeros to whole windows; the padding takes part in
        # the attention as keys (their keys and values are the qkv bias).
        x = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
        H, W = x.shape[1:3]
        x = x.view(B, H // s, s, W // s, s, C).transpose(2, 3).reshape(-1, s, s, C)  # (B * windows, s, s, C)
        x = self.attend(x).view(B, H // s, W // s, s, s, C).transpose(2, 3).reshape(B, H, W, C)
        return x[:, :h, :w].reshape(B, N, C)

    def attend(self, x: Tensor) -> Tensor:
        """Attention over each (a, b) map of x (n, a, b, C)."""
        n, a, b, C = x.shape
        q, k, v = self.split_heads(x.reshape(n, a * b, C))  # (n, heads, a*b, d) each
        rows, cols = relative_table(self.rel_pos_h, a), relative_table(self.rel_pos_w, b)  # (a, a, d), (b, b, d)
        q2d = q.reshape(n, self.num_heads, a, b, -1)
        # The score of query (i, j) for key (k, l) gains q . rows[i, k] + q . cols[j, l].
        bias = (torch.einsum("nhijd,ikd->nhijk", q2d, rows)[..., None]
                + torch.einsum("nhijd,jld->nhijl", q2d, cols)[..., None, :])  # (n, heads, a, b, a, b)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(n, self.num_heads, a * b, a * b))
        return self.proj(x.transpose(1, 2).reshape(n, a, b, C))


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's activation, the sigmoid approximation of GELU it was trained with."""
    return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """The feed-forward network of most models: fc1, GELU (CLIP: QuickGELU), fc2."""

    def __init__(self, *, dim: int, hidden: int, activation=F.gelu):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class SwiGLUFused(nn.Module):
    """DINOv2-g's feed-forward network: one fused projection split into a gate and a value."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x): DINOv3-S+ and H+; EVA02 normalises the product first (`ffn_ln`)."""

    def __init__(self, *, dim: int, hidden: int, inner_norm: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6) if inner_norm else nn.Identity()
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


def feed_forward(ffn: str, dim: int) -> nn.Module:
    """The FFN of a family and size. SwiGLU has two input projections, so it gets 2/3 of the
    hidden width: DINOv2-g and DINOv3 round it up to a multiple of 8 (4096 for DINOv2-g from
    4 * 1536, 1536 and 5120 for DINOv3-S+ and H+ from 6 * width); EVA02 rounds it down (2730
    for L, 2048 for B, from 4 * width)."""
    if ffn in ("mlp", "quick_gelu"):
        return Mlp(dim=dim, hidden=4 * dim, activation=quick_gelu if ffn == "quick_gelu" else F.gelu)
    if ffn == "swiglu_ln":
        return SwiGLU(dim=dim, hidden=int(dim * 4 * 2 / 3), inner_norm=True)
    ratio, module = (4, SwiGLUFused) if ffn == "swiglu_fused" else (6, SwiGLU)
    return module(dim=dim, hidden=(int(ratio * dim * 2 / 3) + 7) // 8 * 8)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch."""

    def __init__(self, *, dim: int):
        super().__init__()
        # DINOv2 and DINOv3 train with LayerScale initialised at 1e-5.
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, *, dim: int, num_heads: int, ffn: str, family: Family, window: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=family.eps)
        if family.windows:
            table = 2 * (SAM_WINDOW if window else SAM_PRETRAIN_GRID) - 1
            self.attn = WindowAttention(dim=dim, num_heads=num_heads, window=window, table=table)
        else:
            self.attn = Attention(dim=dim, num_heads=num_heads, key_bias=family.key_bias)
        self.ls1 = LayerScale(dim=dim) if family.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=family.eps)
        self.mlp = feed_forward(ffn, dim)
        self.ls2 = LayerScale(dim=dim) if family.layer_scale else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, grid: tuple[int, int] | None = None,
                adapter: nn.Module | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope, grid))
        # `adapter`: a branch beside the FFN fed the same residual stream (AdaptFormer, in rein.py).
        return x + self.ls2(self.mlp(self.norm2(x))) + (adapter(x) if adapter is not None else 0)


# ------------------------------------------------------------------------------------- positions


class RopePositions(nn.Module):
    """Axial RoPE: per head, a quarter of the head dims turn with the patch's row, a quarter
    with its column, the whole tiled twice over the head dimension.

    DINOv3: patch (i, j) of an h x w grid sits at ((i + 0.5) / h, (j + 0.5) / w) mapped to
    [-1, 1], at angles 2 pi * coordinate / period, periods base^(k / (head_dim/4)) stored
    in its checkpoint. (DINOv3 jitters the coordinates when training; the backbone here is
    frozen and never does.) EVA02: patch (i, j) sits at (16 i / h, 16 j / w), on the grid of
    its pre-training, at angles coordinate / 10000^(k / (head_dim/4)).
    """

    def __init__(self, *, head_dim: int, family: str, base: float = 100.0):
        super().__init__()
        self.family, self.quarter = family, head_dim // 4
        if family == "dinov3":
            self.register_buffer("periods", base ** (torch.arange(self.quarter) / self.quarter))

    def forward(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """sin and cos, each (h*w, head_dim), float32."""
        if self.family == "dinov3":
            periods = self.periods.float()
            rows = (torch.arange(h, device=device) + 0.5) / h * 2 - 1
            cols = (torch.arange(w, device=device) + 0.5) / w * 2 - 1
        else:
            periods = 2 * math.pi * 10000 ** (torch.arange(self.quarter, device=device) / self.quarter)
            rows = torch.arange(h, device=device) / h * EVA02_PRETRAIN_GRID
            cols = torch.arange(w, device=device) / w * EVA02_PRETRAIN_GRID
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)  # (h*w, 2)
        angles = 2 * math.pi * coords[:, :, None] / periods  # (h*w, 2, head_dim/4)
        angles = angles.flatten(1).tile(2)  # (h*w, head_dim)
        return angles.sin(), angles.cos()


def resize_positions(pos: Tensor, *, prefix: int = 1, mode: str = "bicubic", **size) -> Tensor:
    """A position table (1, prefix + n*n, C), the last n*n rows an n x n grid, resized in float32
    to (1, prefix + h*w, C); `size` takes F.interpolate's size or scale_factor, and antialias."""
    grid = math.isqrt(pos.shape[1] - prefix)
    patch_pos = pos[:, prefix:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, n, n)
    patch_pos = F.interpolate(patch_pos, mode=mode, **size)  # (1, C, h, w)
    return torch.cat([pos[:, :prefix].float(), patch_pos.flatten(2).transpose(1, 2)], dim=1)  # (1, prefix + h*w, C)


def sincos_positions(h: int, w: int, dim: int, device=None) -> Tensor:
    """MAE's fixed table for an h x w grid, (1, 1 + h*w, dim), the class token's row zero: the
    first dim/2 channels encode the column, the last dim/2 the row, each as
    [sin(p * omega) | cos(p * omega)] with omega_k = 10000^(-k / (dim/4))."""
    omega = 10000 ** -(torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    halves = [torch.outer(p.flatten().double(), omega) for p in (cols, rows)]  # 2 x (h*w, dim/4)
    table = torch.cat([f(a) for a in halves for f in (torch.sin, torch.cos)], dim=1)  # (h*w, dim)
    return torch.cat([table.new_zeros(1, dim), table]).float()[None]


# ----------------------------------------------------------------------------------------- model


def global_blocks(depth: int) -> tuple[int, ...]:
    """SAM's four global-attention blocks, evenly spread: 2, 5, 8, 11 of 12; 7, 15, 23, 31 of 32."""
    return tuple(depth // 4 * (k + 1) - 1 for k in range(4))


class VisionTransformer(nn.Module):
    """A ViT of one of the families: patch embedding, [class token, extra tokens, patches], blocks.

    `image_size` is the resolution the position table is stored for: 518 (a 37 x 37 grid) for
    DINOv2's official patch-14 models, else the grid of a 512-pixel crop (32 x 32 at patch 16,
    as the official Rein converts every model). Other input sizes resize the table; DINOv3
    and MAE compute their positions for any grid.
    """

    def __init__(self, *, family: str, dim: int, depth: int, num_heads: int, ffn: str, patch_size: int,
                 num_registers: int = 0, image_size: int = 512):
        super().__init__()
        spec = FAMILIES[family]
        self.family, self.spec, self.patch_size, self.dim = family, spec, patch_size, dim
        self.num_registers = 4 if family == "dinov3" else num_registers
        # The original DINOv2 release resizes its position grid with DINO's historical 0.1
        # offset; the register models were trained with a plain, antialiased resize.
        self.interpolate_offset, self.interpolate_antialias = (0.1, False) if family == "dinov2" and not \
            num_registers else (0.0, family == "dinov2")
        self.grid = image_size // patch_size
        self.global_blocks = global_blocks(depth) if spec.windows else ()
        # Keys and shapes follow the official checkpoints (DINOv2's names).
        if spec.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if family == "dinov3":
            self.storage_tokens = nn.Parameter(torch.zeros(1, 4, dim))
        elif num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        if spec.positions in ("bicubic", "bilinear"):
            self.pos_embed = nn.Parameter(torch.zeros(1, spec.class_token + self.grid**2, dim))
        if spec.rope:
            self.rope_embed = RopePositions(head_dim=dim // num_heads, family=spec.rope)
        if spec.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=spec.patch_bias)
        if spec.ln_pre:
            self.ln_pre = nn.LayerNorm(dim, eps=spec.eps)
        self.blocks = nn.ModuleList(Block(dim=dim, num_heads=num_heads, ffn=ffn, family=spec,
                                          window=0 if i in self.global_blocks else SAM_WINDOW) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=spec.eps) if spec.final_norm else nn.Identity()
        for p in (getattr(self, "cls_token", None), self.extra_tokens, getattr(self, "pos_embed", None)):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    @property
    def extra_tokens(self) -> Tensor | None:
        """DINOv2's registers or DINOv3's storage tokens (1, R, C), or None."""
        return getattr(self, "storage_tokens", getattr(self, "register_tokens", None))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token and the registers or storage tokens."""
        return self.spec.class_token + self.num_registers

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """The position table for an h x w patch grid, (1, 1 + h*w, C) ((1, h*w, C) for SAM).

        Resized from the stored grid bicubically (CLIP: bilinearly, as the official Rein does
        at every forward), in float32. DINOv2 without registers resizes with its historical
        0.1 offset: the scale factor is (h + 0.1) / grid, so the output has h rows but the
        sampling positions differ slightly from a plain resize to h; the register models
        resize with antialiasing. Each checkpoint was trained with exactly its own rule.
        """
        if self.spec.positions == "sincos":
            return sincos_positions(h, w, self.dim, self.patch_embed.proj.weight.device)
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        if self.interpolate_offset:
            offset = self.interpolate_offset
            size = dict(scale_factor=((h + offset) / self.grid, (w + offset) / self.grid))
        else:
            size = dict(size=(h, w))
        if self.spec.positions == "bicubic":
            size["antialias"] = self.interpolate_antialias
        return resize_positions(self.pos_embed, prefix=self.spec.class_token, mode=self.spec.positions,
                                **size).to(self.pos_embed.dtype)

    def prepare_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> input tokens (B, prefix + h*w, C) and the grid (h, w)."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; "
                             f"resize or pad to e.g. {H // p * p or p}x{W // p * p or p}")
        h, w = H // p, W // p
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, h*w, C)
        if self.spec.class_token:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + h*w, C)
        if self.spec.positions:
            pos = self.interpolate_pos_embed(h, w)
            if self.family == "clip":
                # The official Rein's CLIP adds the class embedding to the class token's position
                # as well, so the class token holds it twice; its released weights were trained so.
                pos = torch.cat([pos[:, :1] + self.cls_token, pos[:, 1:]], dim=1)
            x = x + pos
        if self.spec.ln_pre:
            x = self.ln_pre(x)
        if self.num_registers:
            # Registers or storage tokens go between the class token and the patches, with no position.
            x = torch.cat([x[:, :1], self.extra_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x, (h, w)

    def rope(self, h: int, w: int) -> tuple[Tensor, Tensor] | None:
        """The rotation (sin, cos) of an h x w grid for every block (DINOv3, EVA02); else None."""
        return self.rope_embed(h, w, self.patch_embed.proj.weight.device) if self.spec.rope else None

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W), normalised -> tokens (B, prefix + h*w, C), after the final norm if any."""
        x, (h, w) = self.prepare_tokens(images)
        rope = self.rope(h, w)
        for block in self.blocks:
            x = block(x, rope, (h, w))
        return self.norm(x)


def parse_name(name: str) -> tuple[str, int]:
    """'vitl14_reg4' -> ('vitl14', 4); 'vitl14' -> ('vitl14', 0); 'sam_vith16' -> ('sam_vith16', 0)."""
    arch, _, reg = name.partition("_reg")
    if arch not in ARCHS or reg not in ("", "4") or (reg and ARCHS[arch][0] != "dinov2"):
        by_family = {}
        for a, spec in ARCHS.items():
            by_family.setdefault(FAMILIES[spec[0]].title, []).extend([a, a + "_reg4"] if spec[0] == "dinov2" else [a])
        raise ValueError(f"unknown backbone {name!r}; expected one of "
                         + "; ".join(f"{', '.join(names)} ({title})" for title, names in by_family.items()))
    return arch, int(reg or 0)


def build_vit(name: str, patch_size: int | None = None) -> VisionTransformer:
    """Builds the model a backbone name stands for, with random weights: 'vitl14', 'vitl14_reg4'
    (4 registers), 'dinov3_vitl16', 'eva02_vitl14', 'clip_vitl14', 'sam_vith16', 'mae_vitl16'.

    `patch_size`: a model with a learned kernel also runs at another patch than its own (16
    in the Rein paper, for every model); DINOv3 has its own only.
    """
    arch, num_registers = parse_name(name)
    family, dim, depth, heads, ffn, native = ARCHS[arch]
    patch_size = patch_size or native
    if family == "dinov3" and patch_size != native:
        raise ValueError(f"{name} has patch {native} only; got patch size {patch_size}")
    # DINOv2's stored position grid: 37 x 37 at patch 14, else (and for every other family)
    # the grid of a 512-pixel crop.
    image_size = 518 if family == "dinov2" and patch_size == 14 else 512 // patch_size * patch_size
    return VisionTransformer(family=family, dim=dim, depth=depth, num_heads=heads, ffn=ffn, patch_size=patch_size,
                             num_registers=num_registers, image_size=image_size)


# ------------------------------------------------------------------------------------ weights

# Upstream parameter names -> ours (DINOv2's), per family; the first match wins, and a name
# that matches nothing is ours already. EVA02 also fuses its q, k, v (`fuse_eva02_qkv`).
CLIP_NAMES = (
    (r"^conv1\.", "patch_embed.proj."),
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_", r"blocks.\1.attn.qkv."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
)
SAM_NAMES = ((r"\.mlp\.lin1\.", ".mlp.fc1."), (r"\.mlp\.lin2\.", ".mlp.fc2."))
# What the upstream files hold that no backbone here uses: pre-training heads and tokens, final
# norms and projections Rein never reads, SAM's neck, tables this model computes itself.
UNUSED = {
    "eva02": r"mask_token|norm\..*|lm_head\..*|rope\..*|blocks\.\d+\.attn\.rope\..*",
    "clip": r"ln_post\..*|proj",
    "sam": r"neck\..*",
    "mae": r"mask_token|decoder_.*|pos_embed",
}


def resolve_source(source: str) -> str:
    """A short name such as 'vitl14_reg4' or 'sam_vith16' -> its official URL; anything else unchanged.

    DINOv3's files are gated, so a DINOv3 name cannot download: the error says where to
    ask for them and which file to pass.
    """
    if match := re.fullmatch(r"(vit[sblg]14)(_reg4)?", source):
        return DINOV2_URL.format(arch=match[1], reg=match[2] or "")
    if source in DINOV3_FILES:
        raise FileNotFoundError(
            f"DINOv3 weights cannot be downloaded by name: Meta gives them out on request (see the "
            f"facebookresearch/dinov3 README), with download links by e-mail. Download "
            f"{DINOV3_FILES[source]} and pass its path or URL, e.g. --weights checkpoints/{DINOV3_FILES[source]}")
    return WEIGHTS_URLS.get(source, source)


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's CLIP files) is a zip holding its code and constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_file(source: str | os.PathLike, *, what: str, mmap: bool = False):
    """torch.load of a path or an http(s) or file URL, weights only, with errors that name the
    file and `what` it should be. URLs are downloaded once into torch's hub cache
    (`$TORCH_HOME/hub/checkpoints`). Every checkpoint this project reads comes through here;
    a TorchScript archive (OpenAI's CLIP) gives its state dict, in float32."""
    source = str(source)
    path = Path(source)
    if urlparse(source).scheme in ("http", "https", "file"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(source).path).name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading {source} to {path}", file=sys.stderr)
            try:
                torch.hub.download_url_to_file(source, str(path), progress=True)
            except OSError as e:
                raise FileNotFoundError(f"could not download {what} from {source}: {e}") from e
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {what} (a file, or an http(s) or file:// URL)")
    try:
        if is_torchscript(path):
            # OpenAI stores CLIP in float16; its own loader makes it float32 the same way.
            return {k: v.float() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
        # Memory-mapping needs the zip format; older files (torch < 1.6) are read whole.
        return torch.load(path, map_location="cpu", mmap=mmap and zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False, which is not the fix here
        raise ValueError(f"{path} cannot be read as {what}: it is not a PyTorch checkpoint file, or it is "
                         f"truncated ({type(e).__name__})") from e


def rename(state: dict[str, Tensor], table: tuple[tuple[str, str], ...]) -> dict[str, Tensor]:
    """Each key rewritten by the first pattern of `table` it matches."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in table:
            if re.search(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        renamed[key] = value
    return renamed


def fuse_eva02_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """EVA02's separate q, k, v projections (biases for q and v only) as one qkv with a masked
    key bias. EVA02 rotates neighbouring dims (0, 1), (2, 3), ...; `rotate` pairs dim j with
    j + head_dim/2. Putting each head's even q and k rows first, then the odd ones, makes the
    two the same rotation; q.k sums over all dims in any order, so the scores are unchanged."""
    state = dict(state)
    for i in range(num_blocks(state)):
        names = [f"blocks.{i}.attn.{n}" for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_bias",
                                                  "v_bias")]
        if not all(n in state for n in names):
            continue  # the strict load names what is missing
        q, k, v, q_bias, v_bias = (state.pop(n) for n in names)
        heads = q.shape[0] // 64  # EVA02's heads are 64 wide
        pairs = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])
        order = (torch.arange(heads)[:, None] * 64 + pairs).flatten()  # evens, then odds, per head
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q[order], k[order], v])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q_bias[order], torch.zeros_like(q_bias), v_bias])
        state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q_bias), torch.zeros_like(q_bias),
                                                             torch.ones_like(v_bias)])
    return state


def upstream_family(state: dict[str, Tensor]) -> str | None:
    """Which family a state dict in its authors' names is, by a key only that family has."""
    for family, key in (("dinov3", "storage_tokens"), ("dinov2", "blocks.0.ls1.gamma"),
                        ("eva02", "blocks.0.attn.q_proj.weight"), ("clip", "conv1.weight"),
                        ("sam", "blocks.0.attn.rel_pos_h"), ("mae", "blocks.0.attn.qkv.weight")):
        if key in state:
            return family
    return None


def to_our_names(state: dict[str, Tensor], family: str, origin: str) -> dict[str, Tensor]:
    """An upstream state dict of `family` in this file's names, without what no model here uses."""
    if family == "mae" and "pos_embed" in state:
        pos = state["pos_embed"]
        grid = math.isqrt(pos.shape[1] - 1)
        if not torch.allclose(pos.float(), sincos_positions(grid, grid, pos.shape[-1]), atol=1e-4):
            raise ValueError(f"{origin} looks like an MAE file, but its position table is not MAE's fixed "
                             f"sin-cos table, which this model computes itself")
    unused = UNUSED.get(family)
    state = {k: v for k, v in state.items() if not (unused and re.fullmatch(unused, k))}
    if family == "eva02":
        return fuse_eva02_qkv(state)
    if family == "clip":
        state = rename(state, CLIP_NAMES)
        for key, shape in (("cls_token", (1, 1, -1)), ("pos_embed", (1, -1, state["cls_token"].shape[-1]))):
            state[key] = state[key].reshape(shape)  # CLIP's are (C,) and (1 + n*n, C)
    if family == "sam":
        state = rename(state, SAM_NAMES)
        if "pos_embed" in state:
            state["pos_embed"] = state["pos_embed"].flatten(1, 2)  # SAM's grid (1, n, n, C) -> (1, n*n, C)
    return state


def read_weights(source: str | os.PathLike | dict[str, Tensor], origin: str | None = None
                 ) -> tuple[dict[str, Tensor], str]:
    """Pretrained weights of any family, in this file's names, and the family: from a path, a
    URL, a short name (vitl14, eva02_vitl14, sam_vith16, ...) or a dict, in the layout their
    authors publish (EVA02 and MAE under 'model', CLIP as TorchScript, SAM's whole model
    under image_encoder.) or as the official Rein converts them. Files are memory-mapped
    where they can be: the tensors stay in the page cache and are assigned to the model."""
    if isinstance(source, dict):
        state, origin = dict(source), origin or "the given state dict"
    else:
        state = read_file(resolve_source(str(source)), what="pretrained backbone weights", mmap=True)
        origin = str(source)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # EVA02's and MAE's training checkpoints
    if isinstance(state, dict):
        for prefix in ("visual.", "image_encoder."):  # CLIP's image tower, SAM's image encoder
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    family = upstream_family(state) if isinstance(state, dict) else None
    if family is None:
        found = sorted(state)[:5] if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{origin} is not the weights of a DINOv2, DINOv3, EVA02, CLIP, SAM or MAE model: expected "
                         f"keys like blocks.0.attn.qkv.weight (or EVA02's q_proj, CLIP's visual.conv1.weight, SAM's "
                         f"image_encoder.blocks.0.attn.rel_pos_h); found {found}")
    return to_our_names(state, family, origin), family


def num_blocks(state: dict[str, Tensor]) -> int:
    """The number of transformer blocks in a state dict of this file's names."""
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")})


def describe(state: dict[str, Tensor], family: str) -> tuple[str, str]:
    """What a state dict of `family` is: ('EVA02, width 1024, 24 blocks', 'eva02_vitl14')."""
    dim = state["patch_embed.proj.weight"].shape[0]
    depth = num_blocks(state)
    mlp = next((f for f in ("w12", "ffn_ln", "w1", "fc1") if f"blocks.0.mlp.{f}.weight" in state), None)
    ffn = {"w12": "swiglu_fused", "ffn_ln": "swiglu_ln", "w1": "swiglu"}.get(mlp, "mlp")
    names = [a for a, spec in ARCHS.items()
             if spec[:3] == (family, dim, depth) and spec[4].replace("quick_gelu", "mlp") == ffn]
    text = f"{FAMILIES[family].title}, width {dim}, {depth} blocks"
    extra = state.get("storage_tokens", state.get("register_tokens"))
    extra = 0 if extra is None else extra.shape[1]
    if family == "dinov2":
        text, names = f"{text}, {ffn} FFN, {extra} registers", [n + "_reg4" * (extra == 4) for n in names]
    if family == "dinov3":
        text += f", {ffn} FFN"
    return text, names[0] if names else "no official model"


def fit_to_model(state: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """The patch kernel and the position grid of a checkpoint resized to `model`'s, where they
    differ, as the official Rein converts every model for patch 16 and 512-pixel crops:
    kernels bicubically, position tables bicubically (CLIP's bilinearly)."""
    fitted = {}
    kernel, p = state["patch_embed.proj.weight"], model.patch_size
    if kernel.shape[-1] != p:
        fitted["patch_embed.proj.weight"] = F.interpolate(kernel.float(), size=(p, p), mode="bicubic",
                                                          align_corners=False)
    prefix = model.spec.class_token
    if "pos_embed" in state and state["pos_embed"].shape[1] != prefix + model.grid**2:
        fitted["pos_embed"] = resize_positions(state["pos_embed"], prefix=prefix, mode=model.spec.positions,
                                               size=(model.grid, model.grid))
    return fitted


def load_pretrained(model: VisionTransformer, source: str | os.PathLike | dict[str, Tensor]) -> VisionTransformer:
    """Loads official weights into `model`, strictly: every tensor the model has, and nothing
    but what `UNUSED` names left over.

    `source`: as `read_weights` takes it. A kernel or position grid of another size is resized
    (`fit_to_model`). The model may live on the meta device: tensors are assigned, so loading
    never holds a second copy.
    """
    state, family = read_weights(source)
    origin = "the given state dict" if isinstance(source, dict) else str(source)
    (found, found_name), (wanted, wanted_name) = describe(state, family), describe(model.state_dict(), model.family)
    if (family, found) != (model.family, wanted):
        raise ValueError(f"{origin} has {found}: this is {found_name}, not {wanted_name} ({wanted})")
    state |= fit_to_model(state, model)
    own = model.state_dict()
    # A dtype change is the only case that copies; the official files are float32 (CLIP's are
    # made so as they are read).
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{origin} does not match the {FAMILIES[family].title} layout: {e}") from None
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarise a backbone, optionally loading its weights.")
    parser.add_argument("arch", nargs="?", default="vitl14",
                        help=f"one of {', '.join(ARCHS)}; DINOv2 names may end in _reg4 (4 registers)")
    parser.add_argument("--patch-size", type=int, help="a patch other than the model's own (not DINOv3)")
    parser.add_argument("--weights", help="path, URL or name of official weights to load and check")
    args = parser.parse_args()
    if args.patch_size is not None and args.patch_size < 1:
        parser.error(f"--patch-size must be a positive number of pixels, got {args.patch_size}")
    with torch.device("meta"):
        try:
            model = build_vit(args.arch, args.patch_size)
        except ValueError as e:
            parser.error(str(e))
    family, dim, depth, heads, ffn, _ = ARCHS[parse_name(args.arch)[0]]
    n = sum(p.numel() for p in model.parameters())
    extra = f", {model.num_registers} {'storage tokens' if family == 'dinov3' else 'registers'}" \
        if family in ("dinov2", "dinov3") else ""
    print(f"{args.arch}: {FAMILIES[family].title}, width {dim}, {depth} blocks, {heads} heads, {ffn} FFN, "
          f"patch {model.patch_size}{extra}, {n:,} parameters")
    side = model.grid * model.patch_size
    print(f"a {side}x{side} image gives {model.num_prefix_tokens + model.grid**2} tokens of width {dim}")
    if args.weights:
        load_pretrained(model, args.weights)
        print(f"loaded {args.weights}: every tensor has the official name and shape")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
