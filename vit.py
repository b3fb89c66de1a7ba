"""DINOv2 Vision Transformer, written by hand, that loads the official checkpoints exactly.

    model = build_vit("vitl14", patch_size=16)     # the Rein paper's setting
    load_dinov2(model, "vitl14")                    # official weights, converted to patch 16
    tokens = model(images)                          # (B, 1 + R + h*w, 1024)

Run `python vit.py vitl14` for a summary of a model (built on the meta device, so it is
instant and allocates nothing).

The parameter names are those of the official release (FACTS.md section 2), so
`model.state_dict()` and `dinov2_vitl14_pretrain.pth` have the same keys and, at patch 14,
the same shapes. rein.py runs the blocks one at a time: `prepare_tokens` gives the input
tokens and the patch grid, `blocks` are the blocks, `norm` is the final norm.
"""

import argparse
import math
import os
import re
import resource
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name: (width, depth, heads, feed-forward network)
ARCHS = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, *, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        # The checkpoint's qkv output is laid out as (3, heads, head_dim).
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """The feed-forward network of ViT-S, B and L: fc1, exact GELU, fc2."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """The feed-forward network of ViT-g: one fused projection split into a gate and a value."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch."""

    def __init__(self, *, dim: int):
        super().__init__()
        # DINOv2 trains with LayerScale initialised at 1e-5.
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, *, dim: int, num_heads: int, ffn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.ls1 = LayerScale(dim=dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # SwiGLU has two input projections, so it gets 2/3 of the MLP's 4x hidden width,
        # rounded up to a multiple of 8 (4096 for ViT-g), as DINOv2 sizes it.
        swiglu_hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
        self.mlp = Mlp(dim=dim, hidden=4 * dim) if ffn == "mlp" else SwiGLU(dim=dim, hidden=swiglu_hidden)
        self.ls2 = LayerScale(dim=dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """DINOv2 ViT: patch embedding, [cls, registers, patches] tokens, blocks, final norm.

    `image_size` is the resolution the position embedding is stored for: 518 (a 37 x 37
    grid) for the official patch-14 models, 512 (32 x 32) for the paper's patch 16.
    Other input sizes interpolate the position grid.
    """

    def __init__(self, *, dim: int, depth: int, num_heads: int, ffn: str = "mlp",
                 patch_size: int = 14, num_registers: int = 0, image_size: int = 518):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.num_registers = num_registers
        # The original release resizes its position grid with DINO's historical 0.1
        # offset; the register models were trained with a plain, antialiased resize.
        self.interpolate_offset, self.interpolate_antialias = (0.0, True) if num_registers else (0.1, False)
        self.grid = image_size // patch_size
        self.dim = dim
        # Keys and shapes follow the official checkpoints, in their order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        # Only used by DINOv2's masked-image pre-training; kept so checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(Block(dim=dim, num_heads=num_heads, ffn=ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.cls_token, self.pos_embed) + ((self.register_tokens,) if num_registers else ()):
            nn.init.trunc_normal_(p, std=0.02)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token and the registers."""
        return 1 + self.num_registers

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """The position embedding for an h x w patch grid, (1, 1 + h*w, C).

        Bicubic, in float32. Without registers, with DINOv2's historical 0.1 offset: the
        scale factor is (h + 0.1) / grid, so the output has h rows but the sampling
        positions differ slightly from a plain resize to h. The register models resize to
        (h, w) with antialiasing. Each checkpoint was trained with exactly its own rule.
        """
        pos = self.pos_embed
        if (h, w) == (self.grid, self.grid):
            return pos
        cls_pos, patch_pos = pos[:, :1].float(), pos[:, 1:].float()
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)  # (1, C, grid, grid)
        if self.interpolate_offset:
            offset = self.interpolate_offset
            size = dict(scale_factor=((h + offset) / self.grid, (w + offset) / self.grid))
        else:
            size = dict(size=(h, w))
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **size)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, self.dim)  # (1, h*w, C)
        return torch.cat([cls_pos, patch_pos], dim=1).to(pos.dtype)

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
        x = x + self.interpolate_pos_embed(h, w)
        if self.num_registers:
            # Registers go between the class token and the patches, with no position.
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x, (h, w)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W), normalised -> final-norm tokens (B, 1 + R + h*w, C)."""
        x, _ = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build_vit(arch: str, patch_size: int = 14, num_registers: int = 0) -> VisionTransformer:
    """Builds one of ARCHS with random weights; the position grid is 518/14 or 512/patch."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if num_registers not in (0, 4):
        raise ValueError(f"num_registers must be 0 or 4 (the official checkpoints), got {num_registers}")
    dim, depth, heads, ffn = ARCHS[arch]
    return VisionTransformer(dim=dim, depth=depth, num_heads=heads, ffn=ffn, patch_size=patch_size,
                             num_registers=num_registers, image_size=518 if patch_size == 14 else 512)


def describe(state: dict[str, Tensor]) -> tuple[str, str]:
    """The shape and the name of a DINOv2 state dict: ('width 1024, 24 blocks, 4 registers', 'vitl14_reg4')."""
    dim = state["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    names = [a for a, (d, n, _, _) in ARCHS.items() if (d, n) == (dim, depth)]
    name = (names[0] if names else "no official model") + ("_reg4" if names and regs == 4 else "")
    return f"width {dim}, {depth} blocks, {regs} registers", name


def resolve_source(source: str) -> str:
    """A short name such as 'vitl14_reg4' -> its official URL; anything else unchanged."""
    match = re.fullmatch(r"(vit[sblg]14)(_reg4)?", source)
    return WEIGHTS_URL.format(arch=match[1], reg=match[2] or "") if match else source


def load_file(path: str | os.PathLike, *, what: str, mmap: bool = False):
    """torch.load of a file of tensors (weights only), with errors that name the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {what}")
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as {what} (truncated, or not a PyTorch file): {e}") from e


def read_checkpoint(source: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a state dict from a path or an http(s)/file URL, memory-mapped, weights only.

    URLs are downloaded once into torch's hub cache (`$TORCH_HOME/hub/checkpoints`).
    """
    source = str(source)
    if urlparse(source).scheme in ("http", "https", "file"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(source).path).name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading {source} to {path}", file=sys.stderr)
            try:
                torch.hub.download_url_to_file(source, str(path), progress=True)
            except OSError as e:
                raise FileNotFoundError(f"could not download DINOv2 weights from {source}: {e}") from e
    else:
        path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 weights {path} not found; expected a .pth file, an http(s) or "
                                f"file:// URL, or a name such as vitl14 or vitl14_reg4")
    # mmap: the tensors stay in the page cache and are assigned, never copied.
    state = load_file(path, what="DINOv2 weights", mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of DINOv2 weights")
    return state


def load_dinov2(model: VisionTransformer, source: str | os.PathLike | dict[str, Tensor]) -> VisionTransformer:
    """Loads official DINOv2 weights into `model`, strictly, with nothing renamed.

    `source`: a path to a .pth file, an http(s) or file URL, a short name (vits14, vitb14,
    vitl14, vitg14, with optional _reg4) that resolves to the official URL, or a state dict.
    If the model's patch size or position grid differ from the checkpoint's (patch 16 for
    the Rein paper), the patch kernel and the position grid are resized bicubically, as
    the official Rein release converts DINOv2. The model may live on the meta device:
    tensors are assigned, so loading never holds a second copy of the weights.
    """
    state = dict(source) if isinstance(source, dict) else read_checkpoint(resolve_source(str(source)))
    origin = "the given state dict" if isinstance(source, dict) else str(source)
    if "cls_token" not in state:
        raise ValueError(f"{origin} is not a DINOv2 state dict: expected keys like cls_token, pos_embed, "
                         f"blocks.0.attn.qkv.weight; found {list(state)[:5]}")
    (found, found_name), (wanted, wanted_name) = describe(state), describe(model.state_dict())
    if found != wanted:
        raise ValueError(f"{origin} has {found}: this is {found_name}, not {wanted_name} ({wanted})")

    kernel = state["patch_embed.proj.weight"]
    p = model.patch_size
    if kernel.shape[-1] != p:
        state["patch_embed.proj.weight"] = F.interpolate(
            kernel.float(), size=(p, p), mode="bicubic", align_corners=False)
    pos = state["pos_embed"]
    grid = math.isqrt(pos.shape[1] - 1)
    if grid != model.grid:
        patch_pos = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, grid, grid)
        patch_pos = F.interpolate(patch_pos, size=(model.grid, model.grid), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, model.grid**2, -1)  # (1, grid'^2, C)
        state["pos_embed"] = torch.cat([pos[:, :1].float(), patch_pos], dim=1)

    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{origin} does not match the DINOv2 layout: missing keys {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{origin} has tensors of the wrong shape (checkpoint vs model): {bad[:5]}")
    # A dtype change is the only case that copies; official checkpoints are float32.
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarise a DINOv2 ViT, optionally loading weights.")
    parser.add_argument("arch", nargs="?", default="vitl14", help=f"one of {', '.join(ARCHS)}")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--registers", type=int, default=0)
    parser.add_argument("--weights", help="path, URL or name of official weights to load and check")
    args = parser.parse_args()
    with torch.device("meta"):
        model = build_vit(args.arch, args.patch_size, args.registers)
    dim, depth, heads, ffn = ARCHS[args.arch]
    n = sum(p.numel() for p in model.parameters())
    side = model.grid * model.patch_size
    print(f"{args.arch}: width {dim}, {depth} blocks, {heads} heads, {ffn} FFN, patch {model.patch_size}, "
          f"{args.registers} registers")
    print(f"position grid {model.grid}x{model.grid} ({side}x{side} inputs), {n:,} parameters")
    print(f"a {side}x{side} image gives {1 + args.registers + model.grid**2} tokens of width {dim}")
    if args.weights:
        load_dinov2(model, args.weights)
        # Read every weight once so that all of them are resident, then report the peak.
        total = sum(p.double().sum().item() for p in model.parameters())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"loaded {args.weights} (weights sum {total:.6g}): peak process memory {peak / 2**30:.2f} GiB "
              f"for {size / 2**30:.2f} GiB of weights ({peak / size:.2f}x)")


if __name__ == "__main__":
    main()
