"""DINOv2 and DINOv3 Vision Transformers, written by hand, that load the official checkpoints exactly.

    model = build_vit("vitl14", patch_size=16)     # DINOv2-L at the Rein paper's patch 16 (native: 14)
    load_pretrained(model, "vitl14")                # official weights, converted to patch 16
    model = build_vit("dinov3_vitl16")              # DINOv3-L (patch 16)
    load_pretrained(model, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")
    tokens = model(images)                          # (B, 1 + R + h*w, C), R registers / storage tokens

Run `python vit.py vitl14` for a summary of a model (built on the meta device, so it is
instant and allocates nothing).

The two families (DINOv2, Oquab et al. 2023; DINOv3, Simeoni et al. 2025) share the block
and differ in a few named places:
- position: DINOv2 adds an absolute `pos_embed` to the tokens; DINOv3 rotates the patch
  tokens' queries and keys (RoPE, `rope_embed`) in every attention;
- extra tokens: DINOv2's optional 4 `register_tokens`, DINOv3's 4 `storage_tokens`;
  both sit between the class token and the patches and carry no position;
- the FFN: an MLP for most sizes; SwiGLU for DINOv2-g (one fused `w12`) and DINOv3-S+ and
  H+ (separate `w1`, `w2`, `w3`);
- LayerNorm eps 1e-6 (DINOv2) or 1e-5 (DINOv3), and DINOv3's qkv never adds its key bias.
Parameter and buffer names are those of the official checkpoints, so `model.state_dict()`
and the official file have the same keys. rein.py runs the blocks one at a time:
`prepare_tokens` gives the input tokens and the patch grid, `rope` the rotation for that
grid (None for DINOv2), `blocks` are the blocks, `norm` is the final norm.
"""

import argparse
import math
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name: (family, width, depth, heads, feed-forward network)
ARCHS = {
    "vits14": ("dinov2", 384, 12, 6, "mlp"),
    "vitb14": ("dinov2", 768, 12, 12, "mlp"),
    "vitl14": ("dinov2", 1024, 24, 16, "mlp"),
    "vitg14": ("dinov2", 1536, 40, 24, "swiglu_fused"),
    "dinov3_vits16": ("dinov3", 384, 12, 6, "mlp"),
    "dinov3_vits16plus": ("dinov3", 384, 12, 6, "swiglu"),
    "dinov3_vitb16": ("dinov3", 768, 12, 12, "mlp"),
    "dinov3_vitl16": ("dinov3", 1024, 24, 16, "mlp"),
    "dinov3_vith16plus": ("dinov3", 1280, 32, 20, "swiglu"),
}
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"
# DINOv3's LVD-1689M files (facebookresearch/dinov3, dinov3/hub/backbones.py); access is gated.
DINOV3_FILES = {
    "dinov3_vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "dinov3_vits16plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    "dinov3_vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    "dinov3_vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "dinov3_vith16plus": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
}


class LinearKMaskedBias(nn.Linear):
    """DINOv3's qkv projection: its bias is multiplied by the stored `bias_mask`, which is 0 on
    the key third, so the key bias never applies."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__(dim, out_dim)
        mask = torch.ones(out_dim)
        mask[out_dim // 3:2 * out_dim // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def rotate(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """RoPE, rotate-half form: x (..., n, D) with its two halves [x1, x2] paired dim j with j + D/2:
    x * cos + [-x2, x1] * sin, in float32 as DINOv3 computes it."""
    sin, cos = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, and RoPE on the patches if given."""

    def __init__(self, *, dim: int, num_heads: int, mask_key_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = LinearKMaskedBias(dim, 3 * dim) if mask_key_bias else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C); rope: sin and cos (h*w, head_dim) for the last h*w tokens."""
        B, N, C = x.shape
        # The checkpoint's qkv output is laid out as (3, heads, head_dim).
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, head_dim)
        if rope is not None:
            # Only the patches turn; the class and storage tokens have no position.
            n = N - rope[0].shape[0]
            q = torch.cat([q[:, :, :n], rotate(q[:, :, n:], rope)], dim=2)
            k = torch.cat([k[:, :, :n], rotate(k[:, :, n:], rope)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """The feed-forward network of most sizes: fc1, exact GELU, fc2."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


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
    """DINOv3-S+ and H+'s feed-forward network: w3(silu(w1 x) * w2 x)."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def feed_forward(ffn: str, dim: int) -> nn.Module:
    """The FFN of a family and size. SwiGLU has two input projections, so it gets 2/3 of the
    hidden width, rounded up to a multiple of 8: 4096 for DINOv2-g (from 4 * 1536), 1536 and
    5120 for DINOv3-S+ and H+ (from 6 * width)."""
    if ffn == "mlp":
        return Mlp(dim=dim, hidden=4 * dim)
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

    def __init__(self, *, dim: int, num_heads: int, ffn: str, eps: float, mask_key_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim=dim, num_heads=num_heads, mask_key_bias=mask_key_bias)
        self.ls1 = LayerScale(dim=dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = feed_forward(ffn, dim)
        self.ls2 = LayerScale(dim=dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopePositions(nn.Module):
    """DINOv3's axial RoPE: per head, 16 periods base^(i/16) for rows and the same for columns.

    Patch (i, j) of an h x w grid sits at ((i + 0.5) / h, (j + 0.5) / w) mapped to [-1, 1];
    its angles 2 pi * coordinate / period are the 16 row angles, then the 16 column angles,
    the whole tiled twice over the head dimension. (DINOv3 jitters the coordinates when
    training; the backbone here is frozen and never does.)
    """

    def __init__(self, *, head_dim: int, base: float = 100.0):
        super().__init__()
        quarter = head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(quarter) / (head_dim // 2)))

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """sin and cos, each (h*w, head_dim), float32."""
        device = self.periods.device
        rows = (torch.arange(h, device=device) + 0.5) / h
        cols = (torch.arange(w, device=device) + 0.5) / w
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1) * 2 - 1  # (h*w, 2)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()  # (h*w, 2, head_dim/4)
        angles = angles.flatten(1).tile(2)  # (h*w, head_dim)
        return angles.sin(), angles.cos()


def resize_positions(pos: Tensor, **size) -> Tensor:
    """DINOv2's position embedding (1, 1 + n*n, C) resized as an n x n grid, bicubic in float32, to
    (1, 1 + h*w, C); `size` takes F.interpolate's size or scale_factor, and antialias."""
    grid = math.isqrt(pos.shape[1] - 1)
    patch_pos = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, n, n)
    patch_pos = F.interpolate(patch_pos, mode="bicubic", **size)  # (1, C, h, w)
    return torch.cat([pos[:, :1].float(), patch_pos.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + h*w, C)


class VisionTransformer(nn.Module):
    """DINOv2 or DINOv3 ViT: patch embedding, [cls, extra tokens, patches], blocks, final norm.

    DINOv2: `image_size` is the resolution the position embedding is stored for: 518 (a
    37 x 37 grid) for the official patch-14 models, 512 (32 x 32) for the paper's patch 16;
    other input sizes interpolate the position grid. DINOv3 has no stored grid: RoPE works
    at any size.
    """

    def __init__(self, *, dim: int, depth: int, num_heads: int, ffn: str = "mlp", patch_size: int = 14,
                 num_registers: int = 0, image_size: int = 518, family: str = "dinov2"):
        super().__init__()
        self.family, self.patch_size, self.dim = family, patch_size, dim
        v3 = family == "dinov3"
        self.num_registers = 4 if v3 else num_registers
        # The original release resizes its position grid with DINO's historical 0.1
        # offset; the register models were trained with a plain, antialiased resize.
        self.interpolate_offset, self.interpolate_antialias = (0.0, True) if num_registers else (0.1, False)
        self.grid = image_size // patch_size
        # Keys and shapes follow the official checkpoints.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if v3:
            self.storage_tokens = nn.Parameter(torch.zeros(1, 4, dim))
            self.rope_embed = RopePositions(head_dim=dim // num_heads)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
            if num_registers:
                self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        # Only used by masked-image pre-training; kept so that checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        eps = 1e-5 if v3 else 1e-6
        self.blocks = nn.ModuleList(Block(dim=dim, num_heads=num_heads, ffn=ffn, eps=eps, mask_key_bias=v3)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        for p in (self.cls_token, self.extra_tokens, getattr(self, "pos_embed", None)):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    @property
    def extra_tokens(self) -> Tensor | None:
        """DINOv2's registers or DINOv3's storage tokens (1, R, C), or None."""
        return getattr(self, "storage_tokens", getattr(self, "register_tokens", None))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token and the registers or storage tokens."""
        return 1 + self.num_registers

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """DINOv2's position embedding for an h x w patch grid, (1, 1 + h*w, C).

        Bicubic, in float32. Without registers, with DINOv2's historical 0.1 offset: the
        scale factor is (h + 0.1) / grid, so the output has h rows but the sampling
        positions differ slightly from a plain resize to h. The register models resize to
        (h, w) with antialiasing. Each checkpoint was trained with exactly its own rule.
        """
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        if self.interpolate_offset:
            offset = self.interpolate_offset
            size = dict(scale_factor=((h + offset) / self.grid, (w + offset) / self.grid))
        else:
            size = dict(size=(h, w))
        return resize_positions(self.pos_embed, antialias=self.interpolate_antialias, **size).to(self.pos_embed.dtype)

    def prepare_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> input tokens (B, 1 + R + h*w, C) and the grid (h, w)."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; "
                             f"resize or pad to e.g. {H // p * p or p}x{W // p * p or p}")
        h, w = H // p, W // p
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + h*w, C)
        if self.family == "dinov2":
            x = x + self.interpolate_pos_embed(h, w)
        if self.num_registers:
            # Registers or storage tokens go between the class token and the patches, with no position.
            x = torch.cat([x[:, :1], self.extra_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x, (h, w)

    def rope(self, h: int, w: int) -> tuple[Tensor, Tensor] | None:
        """DINOv3's rotation (sin, cos) of an h x w grid for every block; None for DINOv2."""
        return self.rope_embed(h, w) if self.family == "dinov3" else None

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W), normalised -> final-norm tokens (B, 1 + R + h*w, C)."""
        x, (h, w) = self.prepare_tokens(images)
        rope = self.rope(h, w)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)


def parse_name(name: str) -> tuple[str, int]:
    """'vitl14_reg4' -> ('vitl14', 4); 'vitl14' -> ('vitl14', 0); 'dinov3_vitl16' -> ('dinov3_vitl16', 0)."""
    arch, _, reg = name.partition("_reg")
    if arch not in ARCHS or reg not in ("", "4") or (reg and ARCHS[arch][0] != "dinov2"):
        dinov2 = [a for a, spec in ARCHS.items() if spec[0] == "dinov2"]
        raise ValueError(f"unknown backbone {name!r}; expected one of "
                         f"{', '.join(a + s for a in dinov2 for s in ('', '_reg4'))} (DINOv2) or "
                         f"{', '.join(a for a in ARCHS if a not in dinov2)} (DINOv3)")
    return arch, int(reg or 0)


def build_vit(name: str, patch_size: int | None = None) -> VisionTransformer:
    """Builds the model a backbone name stands for, with random weights: 'vitl14', 'vitl14_reg4'
    (4 registers), 'dinov3_vitl16' (patch 16, 4 storage tokens), ...

    `patch_size`: DINOv2 also runs at another patch than its 14 (16 in the Rein paper), with
    the stored position grid of a 512-pixel crop; DINOv3 has patch 16 only.
    """
    arch, num_registers = parse_name(name)
    family, dim, depth, heads, ffn = ARCHS[arch]
    native = 14 if family == "dinov2" else 16
    patch_size = patch_size or native
    if family == "dinov3" and patch_size != native:
        raise ValueError(f"{name} has patch {native} only; got patch size {patch_size}")
    # DINOv2's stored position grid: 37 x 37 at patch 14, else the grid of a 512-pixel crop.
    image_size = 518 if patch_size == 14 else 512 // patch_size * patch_size
    return VisionTransformer(dim=dim, depth=depth, num_heads=heads, ffn=ffn, patch_size=patch_size,
                             num_registers=num_registers, image_size=image_size, family=family)


def num_blocks(state: dict[str, Tensor]) -> int:
    """The number of transformer blocks in a DINOv2 or DINOv3 state dict."""
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")})


def describe(state: dict[str, Tensor]) -> tuple[str, str]:
    """What a DINOv2 or DINOv3 state dict is: ('DINOv3, width 1024, 24 blocks, 4 storage tokens', 'dinov3_vitl16')."""
    family = "dinov3" if "storage_tokens" in state else "dinov2"
    dim = state["cls_token"].shape[-1]
    depth = num_blocks(state)
    ffn = "swiglu_fused" if "blocks.0.mlp.w12.weight" in state else "swiglu" if "blocks.0.mlp.w1.weight" in state \
        else "mlp"
    extra = state.get("storage_tokens", state.get("register_tokens"))
    extra = 0 if extra is None else extra.shape[1]
    names = [a for a, spec in ARCHS.items() if spec == (family, dim, depth, spec[3], ffn)]
    name = (names[0] if names else "no official model") + ("_reg4" if family == "dinov2" and extra == 4 else "")
    tokens = f"{extra} storage tokens" if family == "dinov3" else f"{extra} registers"
    return f"{family.replace('dino', 'DINO')}, width {dim}, {depth} blocks, {ffn} FFN, {tokens}", name


def resolve_source(source: str) -> str:
    """A short name such as 'vitl14_reg4' -> its official URL; anything else unchanged.

    DINOv3's files are gated, so a DINOv3 name cannot download: the error says where to
    ask for them and which file to pass.
    """
    if match := re.fullmatch(r"(vit[sblg]14)(_reg4)?", source):
        return WEIGHTS_URL.format(arch=match[1], reg=match[2] or "")
    if source in DINOV3_FILES:
        raise FileNotFoundError(
            f"DINOv3 weights cannot be downloaded by name: Meta gives them out on request (see the "
            f"facebookresearch/dinov3 README), with download links by e-mail. Download "
            f"{DINOV3_FILES[source]} and pass its path or URL, e.g. --weights checkpoints/{DINOV3_FILES[source]}")
    return source


def read_file(source: str | os.PathLike, *, what: str, mmap: bool = False):
    """torch.load of a path or an http(s) or file URL, weights only, with errors that name the
    file and `what` it should be. URLs are downloaded once into torch's hub cache
    (`$TORCH_HOME/hub/checkpoints`). Every checkpoint this project reads comes through here."""
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
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False, which is not the fix here
        raise ValueError(f"{path} cannot be read as {what}: it is not a PyTorch checkpoint file, or it is "
                         f"truncated ({type(e).__name__})") from e


def read_weights(source: str | os.PathLike | dict[str, Tensor], origin: str | None = None) -> dict[str, Tensor]:
    """A DINOv2 or DINOv3 state dict from a path, a URL, a DINOv2 short name (vitl14, vitl14_reg4,
    ...) or a dict, checked to be one. Files are memory-mapped: the tensors stay in the page
    cache and are assigned to the model, never copied."""
    if isinstance(source, dict):
        state, origin = dict(source), origin or "the given state dict"
    else:
        state, origin = read_file(resolve_source(str(source)), what="DINOv2 or DINOv3 weights", mmap=True), str(source)
    if not isinstance(state, dict) or "cls_token" not in state:
        found = sorted(state)[:5] if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{origin} is not a DINOv2 or DINOv3 state dict: expected keys like cls_token, "
                         f"blocks.0.attn.qkv.weight; found {found}")
    return state


def load_pretrained(model: VisionTransformer, source: str | os.PathLike | dict[str, Tensor]) -> VisionTransformer:
    """Loads official DINOv2 or DINOv3 weights into `model`, strictly, with nothing renamed.

    `source`: as `read_weights` takes it. If a DINOv2 model's patch size or position grid
    differ from the checkpoint's (patch 16 for the Rein paper), the patch kernel and the
    position grid are resized bicubically, as the official Rein release converts DINOv2.
    The model may live on the meta device: tensors are assigned, so loading never holds a
    second copy.
    """
    state = read_weights(source)
    origin = "the given state dict" if isinstance(source, dict) else str(source)
    (found, found_name), (wanted, wanted_name) = describe(state), describe(model.state_dict())
    if found != wanted:
        raise ValueError(f"{origin} has {found}: this is {found_name}, not {wanted_name} ({wanted})")
    if model.family == "dinov2":
        state |= convert_dinov2(state, model)

    own = model.state_dict()
    # A dtype change is the only case that copies; official checkpoints are float32.
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{origin} does not match the {model.family} layout: {e}") from None
    return model


def convert_dinov2(state: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """The patch kernel and position grid of a DINOv2 checkpoint resized to `model`'s, where they differ."""
    converted = {}
    kernel, p = state["patch_embed.proj.weight"], model.patch_size
    if kernel.shape[-1] != p:
        converted["patch_embed.proj.weight"] = F.interpolate(kernel.float(), size=(p, p), mode="bicubic",
                                                             align_corners=False)
    if state["pos_embed"].shape[1] != 1 + model.grid**2:
        converted["pos_embed"] = resize_positions(state["pos_embed"], size=(model.grid, model.grid))
    return converted


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarise a DINOv2 or DINOv3 ViT, optionally loading weights.")
    parser.add_argument("arch", nargs="?", default="vitl14",
                        help=f"one of {', '.join(ARCHS)}; DINOv2 names may end in _reg4 (4 registers)")
    parser.add_argument("--patch-size", type=int, help="DINOv2 only (default 14); DINOv3 has 16")
    parser.add_argument("--weights", help="path, URL or name of official weights to load and check")
    args = parser.parse_args()
    if args.patch_size is not None and args.patch_size < 1:
        parser.error(f"--patch-size must be a positive number of pixels, got {args.patch_size}")
    with torch.device("meta"):
        try:
            model = build_vit(args.arch, args.patch_size)
        except ValueError as e:
            parser.error(str(e))
    family, dim, depth, heads, ffn = ARCHS[parse_name(args.arch)[0]]
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {family}, width {dim}, {depth} blocks, {heads} heads, {ffn} FFN, patch {model.patch_size}, "
          f"{model.num_registers} {'storage tokens' if family == 'dinov3' else 'registers'}, {n:,} parameters")
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
