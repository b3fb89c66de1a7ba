"""Tests for the whole project. Run: python -m pytest -q test_rein.py

Nothing here downloads: checkpoints, datasets and runs are created in pytest's tmp_path.
Sections follow the files in the order README.md lists them: vit.py, rein.py, mask_head.py,
data.py, eval.py, train.py. Tests named test_cuda_* need a GPU; the others run on the CPU
everywhere. `python test_rein.py` runs the benchmark at the end instead: the deformable
attention's sampling (one grid_sample per level) and the matching.
"""

import colorsys
import contextlib
import fcntl
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

import data
import eval as evaluation
import rein
import train
import vit
from data import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, MEAN, STD, SYNTHETIC_DOMAINS, build_dataset,
                  choose_crop, palette_for, colorize, hsv_to_rgb, label_table, parse_data, photometric_distortion,
                  random_resize_crop_flip, rgb_to_hsv, to_test_tensor)
from mask_head import (DecoderLayer, DeformableAttention, HungarianMatcher, MaskHead, SetCriterion, attention_mask,
                       linear_sum_assignment_batch, make_targets, mask_logits, matched_pairs, sample_levels,
                       semantic_inference, sine_position)


# The GPU path: tests named test_cuda_* run wherever CUDA is, and are skipped elsewhere (CI has no
# GPU). Every other test holds the CPU path, also on a machine with a GPU.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def cpu_unless_a_cuda_test(request, monkeypatch):
    if not request.node.name.startswith("test_cuda_"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # for the processes a test starts


def free_port() -> int:
    """A TCP port nobody listens on, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# vit.py
# ---------------------------------------------------------------------------------------------

def tiny_vit(num_registers=0, ffn="mlp", patch_size=4, image_size=32, family="dinov2"):
    """A 2-block ViT small enough for exact, fast reference computations."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(dim=16, depth=2, num_heads=2, ffn=ffn, patch_size=patch_size,
                                  num_registers=num_registers, image_size=image_size, family=family).eval()
    # Random values everywhere, LayerScale and norms included, so that every weight matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name, patch, expected", [
    ("vits14", None, 22_056_576), ("vitb14", None, 86_580_480), ("vitl14", None, 304_368_640),
    ("vitg14", None, 1_136_480_768), ("vitl14", 16, 304_199_680), ("vitl14_reg4", None, 304_368_640 + 4 * 1024),
])
def test_vit_parameter_counts(name, patch, expected):
    """The official models' parameter counts, before and after the patch-16 conversion."""
    with torch.device("meta"):
        model = vit.build_vit(name, patch)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vit_every_backbone_name_builds_its_own_model():
    """build_vit(name) takes every name --backbone takes, with the family's own patch (the name's last
    digits) and extra tokens; DINOv3 takes no other patch size."""
    names = [a + r for a, spec in vit.ARCHS.items() for r in (("", "_reg4") if spec[0] == "dinov2" else ("",))]
    for name in names:
        with torch.device("meta"):
            model = vit.build_vit(name)
        v3 = name.startswith("dinov3")
        assert model.patch_size == int(re.search(r"vit[a-z](\d+)", name)[1]), name
        assert model.num_registers == (4 if v3 or name.endswith("_reg4") else 0), name
        assert model.num_prefix_tokens == (0 if name.startswith("sam") else 1 + model.num_registers), name
        assert train.parse_args(["--backbone", name]).backbone == name
    with torch.device("meta"):
        assert vit.build_vit("vitl14_reg4", 16).patch_size == 16
        with pytest.raises(ValueError, match="dinov3_vitl16 .*patch 16.*14"):
            vit.build_vit("dinov3_vitl16", 14)
        with pytest.raises(ValueError, match="'vitl14_reg8'.*vitl14_reg4"):
            vit.build_vit("vitl14_reg8")


def test_vit_keys_are_the_official_ones():
    """state_dict keys and shapes follow the official DINOv2 checkpoint layout."""
    with torch.device("meta"):
        large, giant = vit.build_vit("vitl14_reg4"), vit.build_vit("vitg14")
    shapes = {k: tuple(v.shape) for k, v in large.state_dict().items()}
    assert shapes["cls_token"] == (1, 1, 1024) and shapes["pos_embed"] == (1, 1 + 37 * 37, 1024)
    assert shapes["mask_token"] == (1, 1024) and shapes["register_tokens"] == (1, 4, 1024)
    assert shapes["patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert shapes["blocks.23.attn.qkv.weight"] == (3072, 1024) and shapes["blocks.0.ls1.gamma"] == (1024,)
    assert shapes["blocks.5.mlp.fc1.weight"] == (4096, 1024) and shapes["norm.bias"] == (1024,)
    per_block = {k.split(".", 2)[2] for k in shapes if k.startswith("blocks.0.")}
    assert per_block == {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                         for p in ("weight", "bias")} | {"ls1.gamma", "ls2.gamma"}
    g = giant.state_dict()
    assert g["blocks.39.mlp.w12.weight"].shape == (8192, 1536) and g["blocks.39.mlp.w3.weight"].shape == (1536, 4096)


def reference_forward(model, images):
    """DINOv2's forward written out independently: patches by unfold, attention head by head.

    Catches a wrong token order, a wrong qkv split or a wrong place for the registers.
    """
    p, C, heads = model.patch_size, model.dim, 2
    B, _, H, W = images.shape
    h, w = H // p, W // p
    kernel = model.patch_embed.proj.weight.reshape(C, -1)
    patches = F.unfold(images, p, stride=p).transpose(1, 2) @ kernel.T + model.patch_embed.proj.bias
    x = torch.cat([model.cls_token.expand(B, 1, C), patches], 1) + model.interpolate_pos_embed(h, w)
    if model.num_registers:
        x = torch.cat([x[:, :1], model.register_tokens.expand(B, -1, C), x[:, 1:]], 1)
    for blk in model.blocks:
        y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        Wq, Wk, Wv = blk.attn.qkv.weight.split(C)
        bq, bk, bv = blk.attn.qkv.bias.split(C)
        outs = []
        for i in range(heads):
            s = slice(i * C // heads, (i + 1) * C // heads)
            q, k, v = y @ Wq[s].T + bq[s], y @ Wk[s].T + bk[s], y @ Wv[s].T + bv[s]
            outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C // heads), -1) @ v)
        x = x + blk.ls1.gamma * blk.attn.proj(torch.cat(outs, -1))
        y = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        if isinstance(blk.mlp, vit.Mlp):
            y = blk.mlp.fc2(F.gelu(blk.mlp.fc1(y)))
        else:
            a, b = blk.mlp.w12(y).chunk(2, -1)
            y = blk.mlp.w3(F.silu(a) * b)
        x = x + blk.ls2.gamma * y
    return F.layer_norm(x, (C,), model.norm.weight, model.norm.bias, 1e-6)


@pytest.mark.parametrize("regs, ffn, size", [(0, "mlp", (32, 32)), (4, "mlp", (24, 40)), (4, "swiglu_fused", (36, 20))])
def test_vit_matches_independent_reference(regs, ffn, size):
    """Token order [cls, registers, patches], the qkv split and both FFNs, against a by-hand forward."""
    model = tiny_vit(regs, ffn)
    images = torch.randn(2, 3, *size)
    out = model(images)
    assert out.shape == (2, 1 + regs + (size[0] // 4) * (size[1] // 4), 16)
    ref = reference_forward(model, images)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def bicubic_reference(grid, out_h, out_w, scale_h, scale_w):
    """PyTorch's bicubic resize (a = -0.75, border clamp, half-pixel centres) by hand in numpy."""
    def weights(t):
        a, t = -0.75, np.abs(t)
        return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))

    def matrix(n_out, n_in, scale):
        src = (np.arange(n_out) + 0.5) / scale - 0.5
        base = np.floor(src)
        m = np.zeros((n_out, n_in))
        for tap in range(-1, 3):
            idx = np.clip(base + tap, 0, n_in - 1).astype(int)
            np.add.at(m, (np.arange(n_out), idx), weights(src - (base + tap)))
        return m

    n = grid.shape[0]
    return matrix(out_h, n, scale_h) @ grid @ matrix(out_w, n, scale_w).T


def antialiased_bicubic_reference(grid, out_h, out_w):
    """PyTorch's antialiased bicubic resize to a size (a = -0.5, PIL's filter) by hand in numpy."""
    def cubic(t):
        a, t = -0.5, np.abs(t)
        return np.where(t < 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))

    def matrix(n_out, n_in):
        scale = n_in / n_out
        support, stretch = 2 * max(scale, 1.0), max(scale, 1.0)
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            centre = scale * (i + 0.5)
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            js = np.arange(lo, hi)
            w = cubic((js - centre + 0.5) / stretch)
            m[i, lo:hi] = w / w.sum()
        return m

    return matrix(out_h, grid.shape[0]) @ grid @ matrix(out_w, grid.shape[1]).T


def test_vit_register_models_resize_positions_without_offset_with_antialias():
    """The _reg4 release resizes its grid to the size, antialiased: a different rule from the original."""
    model = tiny_vit(num_registers=4, image_size=32)
    grid = model.pos_embed[0, 1:, 3].detach().reshape(8, 8).double().numpy()
    for h, w in [(5, 11), (3, 4), (12, 12)]:
        got = model.interpolate_pos_embed(h, w)[0, 1:, 3].reshape(h, w).detach().double().numpy()
        assert np.abs(got - antialiased_bicubic_reference(grid, h, w)).max() < 1e-5
        assert np.abs(got - bicubic_reference(grid, h, w, (h + 0.1) / 8, (w + 0.1) / 8)).max() > 1e-3


def test_vit_position_embedding_interpolation():
    """Native grid: unchanged. Other grids: bicubic with the 0.1 offset, smooth and shaped right."""
    model = tiny_vit(image_size=32)  # an 8 x 8 grid
    n = model.grid
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    smooth = np.sin(ys / 3.0) + np.cos(xs / 4.0)  # one smooth channel
    with torch.no_grad():
        model.pos_embed[0, 1:, 0] = torch.tensor(smooth.ravel(), dtype=torch.float32)
    assert model.interpolate_pos_embed(n, n) is model.pos_embed
    for h, w in [(5, 11), (12, 12), (8, 3)]:
        pos = model.interpolate_pos_embed(h, w)
        assert pos.shape == (1, 1 + h * w, 16) and torch.equal(pos[:, 0], model.pos_embed[:, 0])
        got = pos[0, 1:, 0].reshape(h, w).detach().double().numpy()
        offset = bicubic_reference(smooth, h, w, (h + 0.1) / n, (w + 0.1) / n)
        plain = bicubic_reference(smooth, h, w, h / n, w / n)
        assert np.abs(got - offset).max() < 1e-5
        assert np.abs(got - plain).max() > 1e-3  # the offset really matters
        # Smooth: neighbouring values differ by no more than the function's own slope allows.
        assert np.abs(np.diff(got, axis=0)).max() < 1.0 and np.abs(np.diff(got, axis=1)).max() < 1.0


def official_layout_checkpoint(tmp_path, arch="vits14", regs=0):
    """A random checkpoint of an official architecture, saved as the release saves it."""
    torch.manual_seed(1)
    state = vit.build_vit(arch + ("_reg4" if regs else "")).state_dict()
    path = tmp_path / f"dinov2_{arch}{'_reg4' if regs else ''}_pretrain.pth"
    torch.save(state, path)
    return state, path


def test_vit_loads_from_path_url_and_state_dict(tmp_path, monkeypatch):
    """An official-layout file loads strictly from a path, a file:// URL (via the hub cache) and a dict."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    state, path = official_layout_checkpoint(tmp_path)
    for source in (path, str(path), path.as_uri(), state):
        with torch.device("meta"):
            model = vit.build_vit("vits14")
        vit.load_pretrained(model, source)
        loaded = model.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / path.name).is_file()
    images = torch.randn(1, 3, 28, 42)
    assert model(images).shape == (1, 1 + 2 * 3, 384)


def test_vit_short_names_resolve_to_official_urls():
    """--weights vitl14_reg4 means the official file."""
    assert vit.resolve_source("vitl14") == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    assert vit.resolve_source("vitg14_reg4") == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    assert vit.resolve_source("runs/my.pth") == "runs/my.pth"


def test_vit_patch16_conversion_resamples_kernel_and_grid():
    """Patch 14 -> 16: the kernel and the 37 x 37 grid are resized to a size, half-pixel aligned."""
    with torch.device("meta"):
        src_model = vit.build_vit("vits14")
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) for k, v in src_model.state_dict().items()}
    with torch.device("meta"):
        model = vit.build_vit("vits14", patch_size=16)
    vit.load_pretrained(model, state)
    kernel, pos = model.patch_embed.proj.weight.detach(), model.pos_embed.detach()
    assert kernel.shape == (384, 3, 16, 16) and pos.shape == (1, 1 + 32 * 32, 384)
    src_kernel = state["patch_embed.proj.weight"][7, 2].double().numpy()
    expected = bicubic_reference(src_kernel, 16, 16, 16 / 14, 16 / 14)
    assert np.abs(kernel[7, 2].double().numpy() - expected).max() < 1e-5
    src_grid = state["pos_embed"][0, 1:, 5].reshape(37, 37).double().numpy()
    expected = bicubic_reference(src_grid, 32, 32, 32 / 37, 32 / 37)
    assert np.abs(pos[0, 1:, 5].reshape(32, 32).double().numpy() - expected).max() < 1e-5
    assert torch.equal(pos[:, 0], state["pos_embed"][:, 0])
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 1 + 4 * 3, 384)


def test_vit_registers_output_shapes():
    """The _reg4 variant returns [cls, 4 registers, patches]; registers carry no position."""
    model = tiny_vit(num_registers=4)
    tokens, grid = model.prepare_tokens(torch.randn(3, 3, 16, 24))
    assert grid == (4, 6) and tokens.shape == (3, 1 + 4 + 24, 16)
    assert torch.equal(tokens[:, 1:5], model.register_tokens.expand(3, -1, -1))
    assert model(torch.randn(3, 3, 16, 24)).shape == (3, 29, 16)


def dinov3_reference(model, images, *, eps=1e-5, rope_pairs="half", rotate_cls=False):
    """DINOv3's forward written out independently: RoPE by explicit angle pairs, head by head.

    The keyword arguments make it wrong on purpose, to show the test can tell.
    """
    p, C, heads = model.patch_size, model.dim, 2
    D = C // heads
    B, _, H, W = images.shape
    h, w = H // p, W // p
    kernel = model.patch_embed.proj.weight.reshape(C, -1)
    patches = F.unfold(images, p, stride=p).transpose(1, 2) @ kernel.T + model.patch_embed.proj.bias
    x = torch.cat([model.cls_token.expand(B, 1, C), model.storage_tokens.expand(B, -1, C), patches], 1)
    n_extra = 5
    # The angle of dim pair k of patch (i, j): rows for k < D/4, columns for D/4 <= k < D/2.
    periods = 100 ** (torch.arange(D // 4) / (D // 4))
    angle = torch.zeros(h * w, D // 2)
    for i, j in itertools.product(range(h), range(w)):
        y, xx = 2 * (i + 0.5) / h - 1, 2 * (j + 0.5) / w - 1
        angle[i * w + j] = torch.cat([2 * math.pi * y / periods, 2 * math.pi * xx / periods])

    def turn(t):  # (B, N, D): rotate the patch tokens (and the class token if asked, which is wrong)
        t = t.clone()
        first = 0 if rotate_cls else n_extra
        for k in range(D // 2):
            a, b = (k, k + D // 2) if rope_pairs == "half" else (2 * k, 2 * k + 1)
            cos, sin = angle[:, k].cos(), angle[:, k].sin()
            if rotate_cls:
                cos, sin = torch.cat([cos[:1].expand(n_extra), cos]), torch.cat([sin[:1].expand(n_extra), sin])
            u, v = t[:, first:, a].clone(), t[:, first:, b].clone()
            t[:, first:, a], t[:, first:, b] = u * cos[-u.shape[1]:] - v * sin[-u.shape[1]:], \
                v * cos[-u.shape[1]:] + u * sin[-u.shape[1]:]
        return t

    for blk in model.blocks:
        y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, eps)
        Wq, Wk, Wv = blk.attn.qkv.weight.split(C)
        bq, _, bv = blk.attn.qkv.bias.split(C)  # the key bias never applies
        outs = []
        for i in range(heads):
            s = slice(i * D, (i + 1) * D)
            q, k, v = turn(y @ Wq[s].T + bq[s]), turn(y @ Wk[s].T), y @ Wv[s].T + bv[s]
            outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1) @ v)
        x = x + blk.ls1.gamma * blk.attn.proj(torch.cat(outs, -1))
        y = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, eps)
        if isinstance(blk.mlp, vit.Mlp):
            y = blk.mlp.fc2(F.gelu(blk.mlp.fc1(y)))
        else:
            y = blk.mlp.w3(F.silu(blk.mlp.w1(y)) * blk.mlp.w2(y))
        x = x + blk.ls2.gamma * y
    return F.layer_norm(x, (C,), model.norm.weight, model.norm.bias, eps)


@pytest.mark.parametrize("ffn, size", [("mlp", (32, 32)), ("swiglu", (24, 40)), ("mlp", (16, 36))])
def test_dinov3_matches_independent_reference(ffn, size):
    """RoPE (separate row and column coordinates, rotate-half pairs, patches only), the masked key bias,
    eps 1e-5 and the storage tokens' place, against a by-hand forward; each mistake is caught."""
    model = tiny_vit(ffn=ffn, family="dinov3")
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.bias_mask.copy_(torch.tensor([1.0] * 16 + [0.0] * 16 + [1.0] * 16))
        for p in (model.cls_token, model.storage_tokens, model.patch_embed.proj.weight, model.patch_embed.proj.bias):
            p.mul_(0.01)  # small tokens, so that LayerNorm's eps matters
    images = torch.randn(2, 3, *size)
    out = model(images)
    assert out.shape == (2, 1 + 4 + (size[0] // 4) * (size[1] // 4), 16)
    assert (out - dinov3_reference(model, images)).abs().max() / out.abs().max() < 1e-5
    for wrong in (dict(eps=1e-6), dict(rope_pairs="interleaved"), dict(rotate_cls=True)):
        assert (out - dinov3_reference(model, images, **wrong)).abs().max() / out.abs().max() > 1e-4, wrong
    moved = torch.cat([out[:, :1], out[:, -4:], out[:, 1:-4]], 1)  # storage tokens after the patches
    assert (moved - out).abs().max() > 1e-2


@pytest.mark.parametrize("arch, expected", [
    ("dinov3_vits16", 21_601_152), ("dinov3_vits16plus", 28_697_472), ("dinov3_vitb16", 85_669_632),
    ("dinov3_vitl16", 303_154_176), ("dinov3_vith16plus", 840_633_600)])
def test_dinov3_parameter_counts_and_keys(arch, expected):
    """Counts of the official models; the keys of the official checkpoints, both buffers included."""
    with torch.device("meta"):
        model = vit.build_vit(arch, 16)
    assert sum(p.numel() for p in model.parameters()) == expected
    state = model.state_dict()
    C = model.dim
    top = {"cls_token": (1, 1, C), "storage_tokens": (1, 4, C), "mask_token": (1, C),
           "patch_embed.proj.weight": (C, 3, 16, 16), "patch_embed.proj.bias": (C,), "rope_embed.periods": (16,),
           "norm.weight": (C,), "norm.bias": (C,)}
    assert {k: tuple(v.shape) for k, v in state.items() if not k.startswith("blocks.")} == top
    ffn = ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"] if "plus" not in arch else \
        [f"mlp.{n}.{t}" for n in ("w1", "w2", "w3") for t in ("weight", "bias")]
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.qkv.bias_mask",
             "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", *ffn, "ls2.gamma"]
    assert sorted(k for k in state if k.startswith("blocks.0.")) == sorted("blocks.0." + k for k in block)
    assert len(state) == {"dinov3_vits16": 188, "dinov3_vits16plus": 212, "dinov3_vitb16": 188,
                          "dinov3_vitl16": 368, "dinov3_vith16plus": 552}[arch]


def test_dinov3_loads_from_path_and_url_and_families_are_told_apart(tmp_path, monkeypatch):
    """A random official-layout DINOv3 file loads strictly from a path and a file:// URL; a DINOv2 file
    in a DINOv3 model (and the reverse) names the family and size; a DINOv3 name says where to get it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(0)
    state = vit.build_vit("dinov3_vits16").state_dict()
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(state, path)
    for source in (path, path.as_uri()):
        with torch.device("meta"):
            model = vit.build_vit("dinov3_vits16")
        vit.load_pretrained(model, source)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 5 + 6, 384)
    with pytest.raises(ValueError, match="30x48 .*patch size 16"):
        model(torch.randn(1, 3, 30, 48))
    with torch.device("meta"):
        v2 = vit.build_vit("vits14")
    with pytest.raises(ValueError, match="DINOv3, width 384, 12 blocks.*dinov3_vits16, not vits14"):
        vit.load_pretrained(v2, state)
    with pytest.raises(ValueError, match="DINOv2, width 384, 12 blocks.*vits14, not dinov3_vits16"):
        vit.load_pretrained(model, v2.state_dict())
    with pytest.raises(FileNotFoundError, match="request.*dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"):
        vit.load_pretrained(model, "dinov3_vitl16")


# The paper's other foundation models. Tiny sizes of each family (registered for the test under
# their own names) keep the by-hand references and the runs fast; the real sizes are checked on
# the meta device. Every reference reads the upstream layout directly, with the upstream names.

TINY_ARCHS = {"eva02_vitt14": ("eva02", 128, 4, 2, "swiglu_ln", 14),
              "clip_vitt16": ("clip", 64, 4, 2, "quick_gelu", 16), "sam_vitt16": ("sam", 64, 8, 2, "mlp", 16),
              "sam_vits16": ("sam", 96, 8, 2, "mlp", 16),
              "mae_vitt16": ("mae", 64, 4, 2, "mlp", 16)}


@pytest.fixture
def tiny_archs(monkeypatch):
    for name, spec in TINY_ARCHS.items():
        monkeypatch.setitem(vit.ARCHS, name, spec)


def randn(*shape, std=0.3, gen=None):
    return torch.randn(*shape, generator=gen) * std


def ln_params(prefix, n, gen):
    return {f"{prefix}.weight": 1 + randn(n, std=0.2, gen=gen), f"{prefix}.bias": randn(n, std=0.1, gen=gen)}


def linear(prefix, n_out, n_in, gen, bias=True, std=None):
    std = std or n_in ** -0.5
    return {f"{prefix}.weight": randn(n_out, n_in, std=std, gen=gen)} | (
        {f"{prefix}.bias": randn(n_out, std=0.1, gen=gen)} if bias else {})


@pytest.mark.parametrize("name, patch, expected", [
    # The official modules' counts (w1oves/Rein's EVA2, CLIPVisionTransformer and SAMViT at 512 x 512, MAE's
    # models_vit without its classifier), counted by running that code; EVA02 here also carries the masked,
    # always-zero key bias (24 x 1024) that its fused qkv has in place of none.
    ("eva02_vitl14", 16, 304_237_504 + 24 * 1024), ("clip_vitl14", 16, 304_148_480), ("sam_vith16", None, 632_175_360),
    ("mae_vitl16", None, 303_099_904),
])
def test_other_backbones_parameter_counts(name, patch, expected):
    with torch.device("meta"):
        model = vit.build_vit(name, patch)
    assert sum(p.numel() for p in model.parameters()) == expected
    if name == "sam_vith16":
        assert model.global_blocks == (7, 15, 23, 31) and model.num_prefix_tokens == 0
        assert model.blocks[7].attn.window == 0 and model.blocks[8].attn.window == 14
        assert model.blocks[7].attn.rel_pos_h.shape == (127, 80) and model.blocks[8].attn.rel_pos_w.shape == (27, 80)


def test_rein_on_each_family_has_the_papers_counts_and_taps(capsys):
    """2.99M on the L models, 4.51M for SAM-H with Rein after all 32 blocks (the paper), 3.89M after its 4 global
    blocks (the official release); the taps: blocks 7, 11, 15, 23, and SAM's global blocks."""
    assert rein_formula(24, 1024) == 2_990_081 and rein_formula(32, 1280) == 4_510_721
    assert rein_formula(4, 1280) == 3_892_481
    for name, layers, taps in [("eva02_vitl14", 24, (7, 11, 15, 23)), ("clip_vitl14", 24, (7, 11, 15, 23)),
                               ("mae_vitl16", 24, (7, 11, 15, 23)), ("sam_vith16", 32, (7, 15, 23, 31))]:
        with torch.device("meta"):
            vit_model = vit.build_vit(name, 16)
            backbone = rein.ReinViT(vit_model, rein.Rein(layers, vit_model.dim))
        assert backbone.feature_blocks == taps
        assert rein.count_trainable(backbone) == rein_formula(layers, vit_model.dim)
    with torch.device("meta"):
        sam = vit.build_vit("sam_vith16")
        backbone = rein.ReinViT(sam, rein.Rein(4, 1280), rein_blocks="global")
    assert backbone.rein_layers == {7: 0, 15: 1, 23: 2, 31: 3}
    with pytest.raises(ValueError, match="rein_blocks.*'global'.*vits14"):
        small_model(rein_blocks="global")


def eva02_upstream(C, depth, heads, grid, patch, gen):
    """A random EVA02 file's tensors, in EVA02's names (asuka's MIM checkpoint), with what Rein never uses."""
    hidden = int(C * 4 * 2 / 3)
    state = {"cls_token": randn(1, 1, C, gen=gen), "pos_embed": randn(1, 1 + grid * grid, C, gen=gen),
             "patch_embed.proj.weight": randn(C, 3, patch, patch, std=0.05, gen=gen),
             "patch_embed.proj.bias": randn(C, gen=gen), "mask_token": randn(1, 1, C, gen=gen),
             "rope.freqs_cos": torch.ones(grid * grid, 64)} | ln_params("norm", C, gen) | linear("lm_head", 8, C, gen)
    for i in range(depth):
        b = f"blocks.{i}."
        state |= ln_params(b + "norm1", C, gen) | ln_params(b + "norm2", C, gen)
        state |= ln_params(b + "mlp.ffn_ln", hidden, gen)
        for n in "qkv":
            state |= linear(b + f"attn.{n}_proj", C, C, gen, bias=False)
        state |= {b + "attn.q_bias": randn(C, gen=gen), b + "attn.v_bias": randn(C, gen=gen),
                  b + "attn.rope.freqs_sin": torch.ones(grid * grid, 64)}
        state |= linear(b + "attn.proj", C, C, gen) | linear(b + "mlp.w1", hidden, C, gen) | \
            linear(b + "mlp.w2", hidden, C, gen) | linear(b + "mlp.w3", C, hidden, gen)
    return state


def eva02_reference(s, images, heads, patch, grid):
    """EVA02 as the official Rein runs it, by hand: the p14 file converted (kernel and position table resized
    bicubically), q and v biases but no k bias, RoPE on the patches only, each pair of neighbouring dims rotated
    at angles t * 10000^(-2j/32) with t the position on the 16 x 16 pre-training grid, SwiGLU with a LayerNorm on
    the product, no final norm."""
    C = s["cls_token"].shape[-1]
    kernel = F.interpolate(s["patch_embed.proj.weight"], size=(patch, patch), mode="bicubic", align_corners=False)
    x = F.conv2d(images, kernel, s["patch_embed.proj.bias"], stride=patch)
    B, _, h, w = x.shape
    n = math.isqrt(s["pos_embed"].shape[1] - 1)
    pos = F.interpolate(s["pos_embed"][:, 1:].reshape(1, n, n, C).permute(0, 3, 1, 2), size=(grid, grid),
                        mode="bicubic", align_corners=False)
    if (h, w) != (grid, grid):  # another input size: the stored grid resized again, as EVA02's fine-tuning does
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    x = torch.cat([s["cls_token"].expand(B, 1, C), x.flatten(2).transpose(1, 2)], 1)
    x = x + torch.cat([s["pos_embed"][:, :1], pos.flatten(2).transpose(1, 2)], 1)
    f = 1 / 10000 ** (torch.arange(0, 32, 2) / 32)
    th = (torch.arange(h) / h * 16)[:, None] * f  # (h, 16)
    tw = (torch.arange(w) / w * 16)[:, None] * f
    angles = torch.cat([th[:, None].expand(h, w, 16).repeat_interleave(2, -1),
                        tw[None].expand(h, w, 16).repeat_interleave(2, -1)], -1).reshape(h * w, 64)

    def turn(t):  # (B, heads, h*w, 64), neighbours (2j, 2j+1) -> (-x_{2j+1}, x_{2j})
        pairs = t.unflatten(-1, (32, 2))
        swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        return t * angles.cos() + swapped * angles.sin()

    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        b = f"blocks.{i}."
        y = F.layer_norm(x, (C,), s[b + "norm1.weight"], s[b + "norm1.bias"], 1e-6)
        q = (y @ s[b + "attn.q_proj.weight"].T + s[b + "attn.q_bias"]).unflatten(-1, (heads, 64)).transpose(1, 2)
        k = (y @ s[b + "attn.k_proj.weight"].T).unflatten(-1, (heads, 64)).transpose(1, 2)
        v = (y @ s[b + "attn.v_proj.weight"].T + s[b + "attn.v_bias"]).unflatten(-1, (heads, 64)).transpose(1, 2)
        q = torch.cat([q[:, :, :1], turn(q[:, :, 1:])], 2)
        k = torch.cat([k[:, :, :1], turn(k[:, :, 1:])], 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
        x = x + a.transpose(1, 2).flatten(2) @ s[b + "attn.proj.weight"].T + s[b + "attn.proj.bias"]
        y = F.layer_norm(x, (C,), s[b + "norm2.weight"], s[b + "norm2.bias"], 1e-6)
        g = F.silu(y @ s[b + "mlp.w1.weight"].T + s[b + "mlp.w1.bias"])
        g = g * (y @ s[b + "mlp.w2.weight"].T + s[b + "mlp.w2.bias"])
        g = F.layer_norm(g, g.shape[-1:], s[b + "mlp.ffn_ln.weight"], s[b + "mlp.ffn_ln.bias"], 1e-6)
        x = x + g @ s[b + "mlp.w3.weight"].T + s[b + "mlp.w3.bias"]
        i += 1
    return x


def test_eva02_loads_its_file_and_matches_a_by_hand_reference(tmp_path, tiny_archs):
    """An EVA02 p14 file (under 'model', with mask_token, norm, lm_head and RoPE tables) loads strictly at patch
    16 and gives the by-hand EVA02, at the 512 x 512 crop's grid and at a non-square one."""
    gen = torch.Generator().manual_seed(0)
    upstream = eva02_upstream(128, 4, 2, 16, 14, gen)
    torch.save({"model": upstream}, tmp_path / "eva02_p14.pt")
    with torch.device("meta"):
        model = vit.build_vit("eva02_vitt14", 16)
    vit.load_pretrained(model, tmp_path / "eva02_p14.pt")
    for H, W in ((512, 512), (192, 320)):
        images = torch.randn(1, 3, H, W, generator=gen)
        with torch.no_grad():
            ours, ref = model(images), eva02_reference(upstream, images, 2, 16, 32)
        assert (ours - ref).abs().max() / ref.abs().max() < 1e-4, (H, W)
    assert all(float(b.attn.qkv.bias_mask[128:256].max()) == 0 for b in model.blocks)  # no key bias, ever


def clip_upstream(C, depth, grid, patch, gen):
    """A random CLIP image tower in OpenAI's names (visual.*) with a text tower key beside it. The embedding
    is small, so that ln_pre's eps (1e-5) matters."""
    state = {"conv1.weight": randn(C, 3, patch, patch, std=1e-3, gen=gen),
             "class_embedding": randn(C, std=1e-3, gen=gen),
             "positional_embedding": randn(1 + grid * grid, C, std=1e-3, gen=gen), "proj": randn(C, 16, gen=gen)}
    state |= ln_params("ln_pre", C, gen) | ln_params("ln_post", C, gen)
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        state |= ln_params(b + "ln_1", C, gen) | ln_params(b + "ln_2", C, gen)
        state |= {b + "attn.in_proj_weight": randn(3 * C, C, std=C ** -0.5, gen=gen),
                  b + "attn.in_proj_bias": randn(3 * C, std=0.1, gen=gen)}
        state |= linear(b + "attn.out_proj", C, C, gen) | linear(b + "mlp.c_fc", 4 * C, C, gen) | \
            linear(b + "mlp.c_proj", C, 4 * C, gen)
    return {"visual." + k: v.half() for k, v in state.items()} | {"positional_embedding": torch.zeros(7, 16).half()}


def clip_reference(s, images, heads, patch, grid):
    """The official Rein's CLIP by hand: OpenAI's position table resized bilinearly to the 512 crop's grid when
    loaded and to the input's grid at every forward, the class embedding added twice, ln_pre, LayerNorm eps
    1e-5, nn.MultiheadAttention's packed in_proj, QuickGELU."""
    s = {k[len("visual."):]: v.float() for k, v in s.items() if k.startswith("visual.")}
    C = s["class_embedding"].shape[0]
    x = F.conv2d(images, s["conv1.weight"], stride=patch)
    B, _, h, w = x.shape
    pos = s["positional_embedding"]
    n = math.isqrt(pos.shape[0] - 1)
    grid_pos = F.interpolate(pos[1:].reshape(1, n, n, C).permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear")
    grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bilinear").flatten(2).transpose(1, 2)
    x = torch.cat([s["class_embedding"].expand(B, 1, C), x.flatten(2).transpose(1, 2)], 1)
    x = x + torch.cat([(pos[0] + s["class_embedding"]).expand(1, 1, C), grid_pos], 1)
    x = F.layer_norm(x, (C,), s["ln_pre.weight"], s["ln_pre.bias"], 1e-5)
    for i in range(4):
        b = f"transformer.resblocks.{i}."
        y = F.layer_norm(x, (C,), s[b + "ln_1.weight"], s[b + "ln_1.bias"], 1e-5)
        q, k, v = (y @ s[b + "attn.in_proj_weight"].T + s[b + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (heads, C // heads)).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), -1) @ v
        x = x + a.transpose(1, 2).flatten(2) @ s[b + "attn.out_proj.weight"].T + s[b + "attn.out_proj.bias"]
        y = F.layer_norm(x, (C,), s[b + "ln_2.weight"], s[b + "ln_2.bias"], 1e-5)
        y = y @ s[b + "mlp.c_fc.weight"].T + s[b + "mlp.c_fc.bias"]
        x = x + (y * torch.sigmoid(1.702 * y)) @ s[b + "mlp.c_proj.weight"].T + s[b + "mlp.c_proj.bias"]
    return x


def save_torchscript(state, path):
    """A TorchScript archive whose state dict is `state`, as OpenAI ships CLIP."""
    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.save(torch.jit.script(root), path)


def test_clip_loads_openais_torchscript_file_and_matches_a_by_hand_reference(tmp_path, tiny_archs):
    """A float16 TorchScript file with visual.* and text keys loads strictly (in float32) and gives the official
    Rein's CLIP at the crop's grid and at a non-square one; a state dict of the same tensors loads too."""
    gen = torch.Generator().manual_seed(1)
    upstream = clip_upstream(64, 4, 14, 16, gen)
    save_torchscript(upstream, tmp_path / "ViT-T-16.pt")
    with torch.device("meta"):
        model = vit.build_vit("clip_vitt16")
    vit.load_pretrained(model, tmp_path / "ViT-T-16.pt")
    assert model.pos_embed.dtype == torch.float32 and model.pos_embed.shape == (1, 1 + 32 * 32, 64)
    for H, W in ((512, 512), (192, 320)):
        images = torch.randn(1, 3, H, W, generator=gen)
        with torch.no_grad():
            ours, ref = model(images), clip_reference(upstream, images, 2, 16, 32)
        assert (ours - ref).abs().max() / ref.abs().max() < 1e-4, (H, W)
    torch.save({k: v.float() for k, v in upstream.items()}, tmp_path / "visual.pth")
    vit.load_pretrained(model, tmp_path / "visual.pth")
    with pytest.raises(ValueError, match="model.pth cannot be read as pretrained backbone weights"):
        torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")  # a pickled module, not a state dict
        vit.load_pretrained(model, tmp_path / "model.pth")
    save_torchscript({"text.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not the weights of .*CLIP.*visual.conv1.weight.*text.weight"):
        vit.load_pretrained(model, tmp_path / "other.pt")


def sam_upstream(C, depth, heads, gen):
    """A random SAM checkpoint: the image encoder at SAM's 1024-pixel grid (64 x 64, global tables of 127)
    under image_encoder., its neck, and a prompt-encoder key."""
    d = C // heads
    state = {"patch_embed.proj.weight": randn(C, 3, 16, 16, std=0.05, gen=gen),
             "patch_embed.proj.bias": randn(C, gen=gen),
             "pos_embed": randn(1, 64, 64, C, gen=gen), "neck.0.weight": randn(8, C, 1, 1, gen=gen)}
    for i in range(depth):
        b = f"blocks.{i}."
        table = 127 if i in vit.global_blocks(depth) else 27
        state |= ln_params(b + "norm1", C, gen) | ln_params(b + "norm2", C, gen) | linear(b + "attn.qkv", 3 * C, C, gen)
        state |= linear(b + "attn.proj", C, C, gen) | linear(b + "mlp.lin1", 4 * C, C, gen) | \
            linear(b + "mlp.lin2", C, 4 * C, gen)
        state |= {b + "attn.rel_pos_h": randn(table, d, gen=gen), b + "attn.rel_pos_w": randn(table, d, gen=gen)}
    return {"image_encoder." + k: v for k, v in state.items()} | {"prompt_encoder.point.weight": torch.zeros(3)}


def sam_reference(s, images, heads):
    """SAM's image encoder as the official Rein runs it, by hand: the position grid converted bicubically to
    the crop's, channels-last tokens, zero-padded 14 x 14 windows (the padding attends as keys), decomposed
    relative positions resized linearly to 2n - 1, four global blocks, no neck, no final norm."""
    s = {k[len("image_encoder."):]: v for k, v in s.items() if k.startswith("image_encoder.")}
    C = s["pos_embed"].shape[-1]
    d = C // heads
    x = F.conv2d(images, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=16).permute(0, 2, 3, 1)
    B, h, w, _ = x.shape
    x = x + F.interpolate(s["pos_embed"].permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1)

    def table(t, n):
        if t.shape[0] != 2 * n - 1:
            t = F.interpolate(t.T[None], size=2 * n - 1, mode="linear")[0].T
        return t[torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1]

    def attend(y, b):  # y (m, a, c, C): attention within each a x c map
        m, a, c, _ = y.shape
        q, k, v = (y.reshape(m, a * c, C) @ s[b + "attn.qkv.weight"].T + s[b + "attn.qkv.bias"]).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))  # (m, heads, a*c, d)
        score = q @ k.transpose(-1, -2) / math.sqrt(d)
        Rh, Rw = table(s[b + "attn.rel_pos_h"], a), table(s[b + "attn.rel_pos_w"], c)
        q4 = q.reshape(m, heads, a, c, d)
        rel = (torch.einsum("mhijd,ikd->mhijk", q4, Rh)[..., None]
               + torch.einsum("mhijd,jld->mhijl", q4, Rw)[..., None, :])
        out = torch.softmax(score + rel.reshape(m, heads, a * c, a * c), -1) @ v
        return (out.transpose(1, 2).reshape(m, a, c, C)) @ s[b + "attn.proj.weight"].T + s[b + "attn.proj.bias"]

    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(x, (C,), s[b + "norm1.weight"], s[b + "norm1.bias"], 1e-6)
        if i in vit.global_blocks(depth):
            y = attend(y, b)
        else:
            ph, pw = -h % 14, -w % 14
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            H, W = h + ph, w + pw
            y = y.reshape(B, H // 14, 14, W // 14, 14, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 14, 14, C)
            y = attend(y, b).reshape(B, H // 14, W // 14, 14, 14, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
            y = y[:, :h, :w]
        x = x + y
        y = F.layer_norm(x, (C,), s[b + "norm2.weight"], s[b + "norm2.bias"], 1e-6)
        x = x + F.gelu(y @ s[b + "mlp.lin1.weight"].T + s[b + "mlp.lin1.bias"]) @ s[b + "mlp.lin2.weight"].T + \
            s[b + "mlp.lin2.bias"]
    return x.reshape(B, h * w, C)


def test_sam_loads_its_checkpoint_and_matches_a_by_hand_reference(tmp_path, tiny_archs):
    """SAM's whole checkpoint (image encoder, neck, prompt encoder) loads strictly, its 64 x 64 position grid
    converted to 32 x 32 as the official convert_sam.py does; the encoder equals the by-hand one at 512 x 512."""
    gen = torch.Generator().manual_seed(2)
    upstream = sam_upstream(64, 8, 2, gen)
    torch.save(upstream, tmp_path / "sam_vit_t.pth")
    with torch.device("meta"):
        model = vit.build_vit("sam_vitt16")
    vit.load_pretrained(model, tmp_path / "sam_vit_t.pth")
    images = torch.randn(1, 3, 512, 512, generator=gen)
    with torch.no_grad():
        ours, ref = model(images), sam_reference(upstream, images, 2)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4
    assert model.blocks[0].attn.window == 14 and model.blocks[1].attn.rel_pos_h.shape == (127, 32)


def mae_table(grid, dim):
    """MAE's get_2d_sincos_pos_embed by hand in numpy: channels [sin(w), cos(w), sin(h), cos(h)] of the column
    w and the row h, frequencies 10000^(-k / (dim/4)), a zero row for the class token."""
    omega = 1 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    h, w = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    parts = [f(np.outer(p.reshape(-1), omega)) for p in (w, h) for f in (np.sin, np.cos)]
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), np.concatenate(parts, 1)])).float()[None]


def test_mae_loads_its_file_and_matches_a_by_hand_reference(tmp_path, tiny_archs):
    """MAE's file (under 'model', with its fixed 14 x 14 table) loads strictly; the model computes MAE's table
    for any grid, and runs the plain ViT with a final norm. A file whose table is not MAE's is refused."""
    gen = torch.Generator().manual_seed(3)
    with torch.device("meta"):
        model = vit.build_vit("mae_vitt16")
    upstream = {k: randn(*v.shape, std=0.2, gen=gen) for k, v in model.state_dict().items()}
    upstream |= ln_params("norm", 64, gen) | {"pos_embed": mae_table((14, 14), 64)}
    torch.save({"model": upstream}, tmp_path / "mae_pretrain_vit_tiny.pth")
    vit.load_pretrained(model, tmp_path / "mae_pretrain_vit_tiny.pth")
    for H, W in ((512, 512), (192, 320)):
        images = torch.randn(1, 3, H, W, generator=gen)
        reference = vit.build_vit("mae_vitt16")
        reference.load_state_dict({k: v for k, v in upstream.items() if k != "pos_embed"})
        x = F.conv2d(images, upstream["patch_embed.proj.weight"], upstream["patch_embed.proj.bias"], stride=16)
        x = torch.cat([upstream["cls_token"], x.flatten(2).transpose(1, 2)], 1) + mae_table((H // 16, W // 16), 64)
        with torch.no_grad():
            for blk in reference.blocks:
                x = blk(x)
            ref = reference.norm(x)
            ours = model(images)
        assert (ours - ref).abs().max() / ref.abs().max() < 1e-5, (H, W)
    upstream["pos_embed"] = mae_table((14, 14), 64)[..., torch.randperm(64)]
    with pytest.raises(ValueError, match="not MAE's fixed sin-cos table"):
        vit.load_pretrained(model, {"model": upstream})


def test_other_families_bad_files_are_named(tmp_path, tiny_archs):
    """A file of another family, or of another size of the same family, is named as such; so is a backbone file
    given as a checkpoint, and an image that is no whole number of patches."""
    gen = torch.Generator().manual_seed(4)
    with torch.device("meta"):
        clip_model, sam_small = vit.build_vit("clip_vitt16"), vit.build_vit("sam_vits16")
    torch.save({"model": eva02_upstream(128, 4, 2, 16, 14, gen)}, tmp_path / "eva02.pt")
    with pytest.raises(ValueError, match="eva02.pt has EVA02, width 128, 4 blocks: this is eva02_vitt14, not clip"):
        vit.load_pretrained(clip_model, tmp_path / "eva02.pt")
    torch.save(sam_upstream(64, 8, 2, gen), tmp_path / "sam.pth")
    with pytest.raises(ValueError, match="sam.pth has SAM, width 64, 8 blocks: this is sam_vitt16, not sam_vits16"):
        vit.load_pretrained(sam_small, tmp_path / "sam.pth")
    with pytest.raises(ValueError, match="eva02.pt holds EVA02 backbone weights.*--weights"):
        evaluation.load_checkpoint(tmp_path / "eva02.pt")
    with pytest.raises(ValueError, match="200x328 is not a multiple of the patch size 16"):
        vit.build_vit("sam_vitt16")(torch.zeros(1, 3, 200, 328))
    assert vit.resolve_source("eva02_vitl14").endswith("/eva02_L_pt_m38m_p14to16.pt")
    assert vit.resolve_source("sam_vith16").endswith("/sam_vit_h_4b8939.pth")
    assert vit.resolve_source("clip_vitl14").endswith("/ViT-L-14.pt")
    assert vit.resolve_source("mae_vitl16").endswith("/mae_pretrain_vit_large.pth")


@pytest.mark.parametrize("name, kw", [("eva02_vitt14", {}), ("clip_vitt16", dict(fpn=True, replace_query_feat=False)),
                                      ("sam_vitt16", dict(rein_blocks="global", replace_query_feat=False))])
def test_from_official_recognises_each_release_layout(tmp_path, tiny_archs, name, kw):
    """The EVA02 release (Rein after every block, querys2feat), CLIP's (a trained FPN with BatchNorm statistics
    under backbone.fpn*, learned query features) and SAM-H's (Rein after the 4 global blocks, learned query
    features) load from the release file and the upstream backbone file, and predict as the model that wrote them."""
    gen = torch.Generator().manual_seed(5)
    upstream = {"eva02_vitt14": lambda: {"model": eva02_upstream(128, 4, 2, 32, 16, gen)},
                "clip_vitt16": lambda: clip_upstream(64, 4, 32, 16, gen),
                "sam_vitt16": lambda: sam_upstream(64, 8, 2, gen)}[name]()
    torch.save(upstream, tmp_path / "backbone.pth")
    torch.manual_seed(0)
    model = rein.build_model(method="rein", backbone=name, weights=str(tmp_path / "backbone.pth"), num_classes=19,
                             num_queries=100, head_layers=9, encoder_layers=6, **kw).eval()
    with torch.no_grad():
        for t in model.trainable_state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    write_release(tmp_path / "release.pth", model)
    official = rein.from_official(tmp_path / "release.pth", tmp_path / "backbone.pth")
    assert {k: official.config[k] for k in kw} == kw
    images = torch.randn(1, 3, 64, 96, generator=gen)
    with torch.no_grad():
        assert torch.allclose(official.predict(images), model.predict(images), atol=1e-6)


@pytest.mark.parametrize("name", list(TINY_ARCHS)[:3] + ["mae_vitt16"])
def test_train_and_eval_on_each_family(tmp_path, tiny_archs, name):
    """Two iterations of Rein on a small model of each family (random backbone), then eval.py on the checkpoint."""
    out = tmp_path / "run"
    train.main(train.parse_args(TINY_RUN + ["--backbone", name, "--no-weights", "--iters", "2", "--eval-every", "2",
                                            "--out", str(out)]))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["backbone"] == name and ckpt["iteration"] == 2
    results = evaluation.main(evaluation.parse_args(["--ckpt", str(out / "last.pt"), "--data", "synthetic:night",
                                                     "--workers", "0"]))
    assert 0 <= results["synthetic:night"]["miou"] <= 1


def test_vit_errors_are_clear(tmp_path):
    """Missing file, not a checkpoint, wrong size, wrong keys, bad image size, unknown arch."""
    with torch.device("meta"):
        small, large = vit.build_vit("vits14"), vit.build_vit("vitl14")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vit.load_pretrained(small, tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth .*pretrained backbone weights"):
        vit.load_pretrained(small, junk)
    torch.save({"model": {}}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="wrapped.pth .*DINOv2, DINOv3, EVA02, CLIP, SAM or MAE.*qkv"):
        vit.load_pretrained(small, tmp_path / "wrapped.pth")
    state = small.state_dict()
    with pytest.raises(ValueError, match="width 384, 12 blocks.*vits14, not vitl14"):
        vit.load_pretrained(large, state)
    with torch.device("meta"):
        with_regs = vit.build_vit("vits14_reg4")
    with pytest.raises(ValueError, match="vits14, not vits14_reg4"):
        vit.load_pretrained(with_regs, state)
    broken = dict(state)
    del broken["blocks.3.attn.proj.bias"]
    broken["head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="DINOv2 layout") as error:
        vit.load_pretrained(small, broken)
    assert '"blocks.3.attn.proj.bias"' in str(error.value) and '"head.weight"' in str(error.value)
    with pytest.raises(ValueError, match="30x28 .*patch size 4"):
        tiny_vit()(torch.randn(1, 3, 30, 28))


def test_vit_command_line_takes_reg4_names_and_rejects_bad_patches(monkeypatch, capsys):
    """python vit.py vitl14_reg4 works; --patch-size 0 is an error that names it."""
    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["vit.py", *argv])
        vit.main()
        return capsys.readouterr().out

    assert "4 registers, 304,372,736 parameters" in run("vitl14_reg4")
    assert "DINOv3, width 1024" in run("dinov3_vitl16")
    with pytest.raises(SystemExit) as stop:
        run("vitl14", "--patch-size", "0")
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "--patch-size" in error and "got 0" in error


# ---------------------------------------------------------------------------------------------
# rein.py
# ---------------------------------------------------------------------------------------------

def small_model(method="rein", registers="", **kw):
    """A ViT-S segmenter with a tiny head, random weights: fast enough for CPU tests."""
    torch.manual_seed(0)
    kw = dict(num_queries=8, head_dim=32, head_layers=3, encoder_layers=1, num_classes=5) | kw
    return rein.build_model(method=method, backbone="vits14" + registers, **kw)


def rein_formula(N, c, m=100, r=16, q=256):
    """The paper's count of Rein's parameters: N*m*r + N*r*c + 2*(c*c + c) + 1 + (c*q + q) + (3q*q + q)."""
    return N * m * r + N * r * c + 2 * (c * c + c) + 1 + (c * q + q) + (3 * q * q + q)


@pytest.mark.parametrize("depth, dim, expected", [
    (12, 384, 684_033), (12, 768, 1_741_569), (24, 1024, 2_990_081), (40, 1536, 6_359_041), (32, 1280, 4_510_721)])
def test_rein_parameter_counts(depth, dim, expected):
    """Rein's trainable parameters: 2.99M for ViT-L and 4.51M for SAM ViT-H as in the paper, and S, B, g."""
    assert sum(p.numel() for p in rein.Rein(depth, dim).parameters()) == expected == rein_formula(depth, dim)


def test_rein_backbone_trainable_counts_per_method(capsys):
    """rein: only Rein trains in the backbone; freeze: nothing; full: all of the ViT but the two parts
    segmentation never uses, the pre-training mask token and the final norm. The count is printed."""
    counts = {}
    for method in ("rein", "freeze", "full"):
        model = small_model(method)
        counts[method] = rein.count_trainable(model.backbone)
        assert f"{counts[method]:,} trainable parameters in the backbone" in capsys.readouterr().out
    # ViT-S/14 converted to patch 16 has 21,993,216 parameters: 384 in the mask token and 768
    # in the final norm. The small head asks for 8 queries of width 32.
    assert counts == {"rein": rein_formula(12, 384, m=8, q=32), "freeze": 0, "full": 21_993_216 - 384 - 768}


def test_rein_layer_follows_the_equations():
    """forward is the paper's equations term by term: T = A @ B, token 0 joins the softmax but sends no value."""
    torch.manual_seed(0)
    layer = rein.Rein(3, 12, num_tokens=5, rank=2, query_dim=8)
    with torch.no_grad():
        layer.scale.fill_(0.7)
    f = torch.randn(2, 6, 12)
    for i in range(3):
        T = layer.learnable_tokens_a[i] @ layer.learnable_tokens_b[i]
        assert torch.equal(layer.tokens(i), T)
        S = torch.softmax(f @ T.T / math.sqrt(12), dim=-1)
        dF_bar = S[..., 1:] @ layer.mlp_token2feat(T[1:])
        expected = f + 0.7 * layer.mlp_delta_f(dF_bar + f)
        assert torch.allclose(layer(f, i), expected, atol=1e-6)
        # Sending token 0's value too would change the result: the test can tell.
        wrong = f + 0.7 * layer.mlp_delta_f(S @ layer.mlp_token2feat(T) + f)
        assert not torch.allclose(layer(f, i), wrong, atol=1e-4)


def test_rein_initialisation_is_the_official_one():
    """Tokens uniform in +-sqrt(6 / (3 p^2 + sqrt(c r))), scale 1e-3."""
    layer = rein.Rein(24, 1024)
    v = math.sqrt(6 / (3 * 16 * 16 + math.sqrt(1024 * 16)))
    for t in (layer.learnable_tokens_a, layer.learnable_tokens_b):
        assert t.abs().max() <= v and t.abs().max() > 0.95 * v and abs(t.mean()) < 0.01 * v
    assert layer.scale.item() == pytest.approx(1e-3)


def test_rein_queries_interleave_max_mean_last():
    """Q = merge([max_i Q_i, mean_i Q_i, Q_N] per channel, interleaved), not concatenated block-wise."""
    torch.manual_seed(0)
    layer = rein.Rein(4, 12, num_tokens=5, rank=3, query_dim=6)
    Qi = layer.transform(torch.stack([layer.tokens(i) for i in range(4)]))  # (N, m, q)
    interleaved = torch.empty(5, 18)
    interleaved[:, 0::3], interleaved[:, 1::3], interleaved[:, 2::3] = Qi.max(0).values, Qi.mean(0), Qi[-1]
    Q = layer.queries()
    assert Q.shape == (5, 6)
    assert torch.allclose(Q, layer.merge(interleaved), atol=1e-6)
    blockwise = torch.cat([Qi.max(0).values, Qi.mean(0), Qi[-1]], dim=-1)
    assert not torch.allclose(Q, layer.merge(blockwise), atol=1e-3)


def test_rein_with_zero_scale_reproduces_the_plain_vit():
    """scale = 0: the refined backbone's features equal the frozen ViT's, exactly."""
    model = small_model()
    with torch.no_grad():
        model.backbone.rein.scale.zero_()
    images = torch.randn(2, 3, 64, 48)
    maps, queries = model.backbone(images)
    plain = rein.ReinViT(model.backbone.vit, None)
    plain_maps, no_queries = plain(images)
    assert no_queries is None and queries.shape == (8, 32)
    assert all(torch.equal(a, b) for a, b in zip(maps, plain_maps))
    # ... and those are the ViT's own block outputs at blocks 3, 5, 7, 11.
    x, (h, w) = model.backbone.vit.prepare_tokens(images)
    outs = []
    for block in model.backbone.vit.blocks:
        x = block(x)
        outs.append(x[:, 1:].transpose(1, 2).reshape(2, 384, h, w))
    assert all(torch.equal(m, outs[i]) for m, i in zip(plain_maps, (3, 5, 7, 11)))


def test_rein_maps_and_feature_blocks():
    """Four maps at the patch grid; blocks 7, 11, 15, 23 for ViT-L and the same fractions elsewhere."""
    model = small_model()
    maps, _ = model.backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[-3:]) for m in maps] == [(384, 4, 6)] * 4
    assert model.backbone.feature_blocks == (3, 5, 7, 11)
    with torch.device("meta"):
        assert rein.ReinViT(vit.build_vit("vitl14"), None).feature_blocks == (7, 11, 15, 23)
        assert rein.ReinViT(vit.build_vit("vitg14"), None).feature_blocks == (12, 19, 26, 39)


def test_rein_refines_patches_only(monkeypatch):
    """Class and register tokens pass through Rein unchanged: Rein sees exactly the h*w patches."""
    model = small_model(registers="_reg4")
    seen, original = [], rein.Rein.forward

    def spy(self, f, layer):
        seen.append(f.shape)
        return original(self, f, layer)

    monkeypatch.setattr(rein.Rein, "forward", spy)
    model.backbone(torch.randn(2, 3, 32, 48))
    assert seen == [(2, 2 * 3, 384)] * 12


def test_rein_gradients_reach_rein_and_never_the_frozen_vit():
    """Every Rein parameter gets a gradient, no frozen one does, and a step leaves the ViT unchanged."""
    model = small_model().train()
    assert model.backbone.vit.training is False and model.train() is model
    before = {k: v.clone() for k, v in model.backbone.vit.state_dict().items()}
    opt = torch.optim.AdamW(model.param_groups(lr=1e-3, weight_decay=0.05))
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    model.loss(images, labels)["loss"].backward()
    for name, p in model.backbone.rein.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.vit.parameters())
    rein_before = {k: v.clone() for k, v in model.backbone.rein.state_dict().items()}
    opt.step()
    after = model.backbone.vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(rein_before[k], v) for k, v in model.backbone.rein.state_dict().items())


def test_rein_gradient_checkpointing_changes_nothing_but_memory():
    """grad_ckpt gives the same loss and the same gradients, and really recomputes every block in backward."""
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    grads, calls = [], []
    for ckpt in (False, True):
        model = small_model()
        model.backbone.grad_ckpt = ckpt
        count = [0]
        for block in model.backbone.vit.blocks:
            # A pre-hook: the recomputation stops early, once it has what backward needs.
            block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        torch.manual_seed(1)  # the criterion samples points at random
        model.loss(images, labels)["loss"].backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
        calls.append(count[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert calls[0] == 12 and calls[1] >= 23  # with checkpointing the blocks run again in the backward pass


@cuda
def test_cuda_segmenter_gives_the_cpu_scores_in_fp32_and_close_ones_in_bf16():
    """The whole model on CUDA: in fp32 (TF32 off) the CPU's scores to float tolerance; under bf16
    autocast, the training precision, close to them."""
    model = small_model().eval()
    images = torch.randn(2, 3, 64, 64)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with torch.no_grad():
        cpu = model.predict(images)
        model.cuda()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            fp32 = model.predict(images.cuda()).cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.predict(images.cuda()).float().cpu()
    print(f"max |fp32 - cpu| {(fp32 - cpu).abs().max():.2e}, max |bf16 - cpu| {(bf16 - cpu).abs().max():.2e}, "
          f"max |cpu| {cpu.abs().max():.2f}")
    assert torch.allclose(fp32, cpu, rtol=1e-4, atol=1e-5)
    assert (bf16 - cpu).abs().max() < 0.05 * cpu.abs().max()  # bf16 keeps 8 bits: about 1% here


def test_rein_checkpoint_holds_only_what_trains(tmp_path):
    """rein: the trainable state is Rein + head; it round-trips strictly; full adds the ViT."""
    model = small_model()
    state = model.trainable_state_dict()
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("backbone")} == {"backbone.rein"}
    assert sum(v.numel() for v in state.values()) == rein.count_trainable(model)
    other = small_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_trainable_state_dict(state)
    assert all(torch.equal(other.trainable_state_dict()[k], v) for k, v in state.items())
    full = small_model("full").trainable_state_dict()
    assert "backbone.vit.blocks.0.attn.qkv.weight" in full
    with pytest.raises(ValueError, match="rein model.*missing"):
        other.load_trainable_state_dict(full)


def test_rein_param_groups():
    """No decay on norms, tokens, VPT's prompts, scale, query features, query and level embeddings; full trains
    the ViT at 0.1x (LoRA's tensors inside the ViT at the full rate)."""
    for method in rein.METHODS:
        model = small_model(method)
        groups = model.param_groups(lr=1e-4, weight_decay=0.05)
        by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        assert len(by_param) == sum(p.requires_grad for p in model.parameters())
        for pid, (lr, wd) in by_param.items():
            name = names[pid]
            assert lr == pytest.approx(1e-5 if method == "full" and name.startswith("backbone.vit.") else 1e-4), name
            no_decay = "norm" in name or "learnable_tokens" in name or "prompts" in name or name.endswith("rein.scale") \
                or "query_feat" in name or "query_embed" in name or "level_embed" in name
            assert wd == (0.0 if no_decay else 0.05), name


def official_release_keys(depth: int, dim: int, num_classes: int = 19) -> dict[str, tuple[int, ...]]:
    """Every key and shape of an official Rein release file (Rein + mmdet's Mask2Former head),
    written out from the official layout, independently of rein.py."""
    keys = {"backbone.reins.scale": (), "backbone.reins.learnable_tokens_a": (depth, 100, 16),
            "backbone.reins.learnable_tokens_b": (depth, 16, dim)}
    for name, shape in (("mlp_token2feat", (dim, dim)), ("mlp_delta_f", (dim, dim)), ("transform", (256, dim)),
                        ("merge", (256, 768))):
        keys |= {f"backbone.reins.{name}.weight": shape, f"backbone.reins.{name}.bias": shape[:1]}
    head = {}
    for i in range(3):
        head |= {f"pixel_decoder.input_convs.{i}.conv.weight": (256, dim, 1, 1),
                 f"pixel_decoder.input_convs.{i}.conv.bias": (256,),
                 f"pixel_decoder.input_convs.{i}.gn.weight": (256,), f"pixel_decoder.input_convs.{i}.gn.bias": (256,)}
    linears = {}
    for i in range(6):
        layer = f"pixel_decoder.encoder.layers.{i}."
        linears |= {layer + "self_attn.sampling_offsets": (192, 256), layer + "self_attn.attention_weights": (96, 256),
                    layer + "self_attn.value_proj": (256, 256), layer + "self_attn.output_proj": (256, 256),
                    layer + "ffn.layers.0.0": (1024, 256), layer + "ffn.layers.1": (256, 1024),
                    layer + "norms.0": (256,), layer + "norms.1": (256,)}
    for i in range(9):
        layer = f"transformer_decoder.layers.{i}."
        for attn in ("self_attn", "cross_attn"):
            head |= {layer + attn + ".attn.in_proj_weight": (768, 256), layer + attn + ".attn.in_proj_bias": (768,)}
            linears[layer + attn + ".attn.out_proj"] = (256, 256)
        linears |= {layer + "ffn.layers.0.0": (2048, 256), layer + "ffn.layers.1": (256, 2048),
                    layer + "norms.0": (256,), layer + "norms.1": (256,), layer + "norms.2": (256,)}
    linears |= {"transformer_decoder.post_norm": (256,), "cls_embed": (num_classes + 1, 256),
                "mask_embed.0": (256, 256), "mask_embed.2": (256, 256), "mask_embed.4": (256, 256),
                "querys2feat": (256, 256), "pixel_decoder.mask_feature": (256, 256, 1, 1)}
    for name, shape in linears.items():
        head |= {name + ".weight": shape, name + ".bias": shape[:1]}
    head |= {"pixel_decoder.level_encoding.weight": (3, 256), "level_embed.weight": (3, 256),
             "pixel_decoder.lateral_convs.0.conv.weight": (256, dim, 1, 1),
             "pixel_decoder.lateral_convs.0.gn.weight": (256,), "pixel_decoder.lateral_convs.0.gn.bias": (256,),
             "pixel_decoder.output_convs.0.conv.weight": (256, 256, 3, 3),
             "pixel_decoder.output_convs.0.gn.weight": (256,), "pixel_decoder.output_convs.0.gn.bias": (256,)}
    return keys | {"decode_head." + k: v for k, v in head.items()}


def test_official_names_cover_the_release_layout_of_dinov2_l():
    """Our Rein + head for DINOv2-L, named the official way, has exactly the release's 303 keys and shapes;
    the head has 20,579,796 parameters."""
    with torch.device("meta"):
        model = rein.build_model(backbone="vitl14")
    ours = {rein.official_name(k): tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    assert ours == official_release_keys(24, 1024) and len(ours) == 303
    assert sum(p.numel() for p in model.head.parameters()) == 20_579_796


def write_release(path, model, *, drop=(), with_backbone=False):
    """An official-layout release file (mmengine: meta + state_dict) holding `model`'s weights."""
    state = {rein.official_name(k): v.clone() for k, v in model.trainable_state_dict().items()}
    if with_backbone:
        state |= {"backbone." + k: v.clone() for k, v in model.backbone.vit.state_dict().items()}
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": {k: v for k, v in state.items() if k not in drop}},
               path)


@pytest.mark.parametrize("method", ["rein", "freeze"])
def test_from_official_loads_a_release_file_strictly_and_predicts_the_same(tmp_path, method):
    """A random release file of a ViT-S-sized model loads through from_official (backbone from --weights,
    or inside the file for the frozen baseline) and predicts what the model that wrote it predicts."""
    model = small_model(method, num_queries=100, head_dim=256, num_classes=19, head_layers=9, encoder_layers=6).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.05)
    write_release(tmp_path / "release.pth", model, with_backbone=method == "freeze")
    torch.save(model.backbone.vit.state_dict(), tmp_path / "dinov2_converted.pth")
    loaded = rein.from_official(tmp_path / "release.pth", None if method == "freeze" else
                                tmp_path / "dinov2_converted.pth")
    assert not loaded.training and loaded.config["method"] == method
    assert (loaded.config["num_classes"], loaded.config["head_layers"], loaded.config["encoder_layers"]) == (19, 9, 6)
    images = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.allclose(loaded.predict(images), model.predict(images), atol=1e-5)


def test_from_official_on_a_dinov2_l_release_and_through_eval(tmp_path):
    """Every key and shape of a DINOv2-L release (built from the list above, random values) loads strictly
    through from_official and through eval.py's --ckpt loader, with the backbone from --weights."""
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.02 for k, shape in official_release_keys(24, 1024).items()}
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "release.pth")
    with torch.device("meta"):
        backbone = vit.build_vit("vitl14", 16)
    torch.save({k: torch.zeros(v.shape) for k, v in backbone.state_dict().items()}, tmp_path / "dinov2.pth")
    # eval.py --ckpt reads the file through load_checkpoint, which calls from_official.
    loaded, _ = evaluation.load_checkpoint(tmp_path / "release.pth", str(tmp_path / "dinov2.pth"))
    ours = {rein.official_name(k): v for k, v in loaded.trainable_state_dict().items()}
    assert ours.keys() == state.keys() and all(torch.equal(ours[k], v) for k, v in state.items())
    scores = evaluation.whole_inference(loaded, torch.randn(3, 40, 56))  # a small picture: ViT-L is slow
    assert scores.shape == (19, 40, 56) and torch.isfinite(scores).all()


def test_official_files_and_checkpoints_fail_clearly(tmp_path):
    """A DINOv2 file as --ckpt, a release for another backbone size, a release missing keys (listed),
    and a train.py checkpoint of the old head each get a message that says what is wrong."""
    model = small_model("rein", num_queries=100, head_dim=256)
    torch.save(model.backbone.vit.state_dict(), tmp_path / "dinov2_vits.pth")
    with pytest.raises(ValueError, match="dinov2_vits.pth .*DINOv2 backbone weights.*--weights"):
        evaluation.load_checkpoint(tmp_path / "dinov2_vits.pth")
    write_release(tmp_path / "release.pth", model)
    with torch.device("meta"):
        vitb = vit.build_vit("vitb14", 16)
    torch.save({k: torch.zeros(v.shape) for k, v in vitb.state_dict().items()}, tmp_path / "dinov2_vitb.pth")
    with pytest.raises(ValueError, match="release.pth .*width 384 with 12 Rein layers.*dinov2_vitb.pth .*vitb14.*width 768"):
        rein.from_official(tmp_path / "release.pth", tmp_path / "dinov2_vitb.pth")
    write_release(tmp_path / "partial.pth", model, drop=("decode_head.querys2feat.bias",
                                                        "decode_head.pixel_decoder.encoder.layers.0.norms.1.weight"))
    with pytest.raises(ValueError, match=r"partial.pth .*missing \['decode_head.pixel_decoder.encoder.layers.0.norms.1"
                                         r".weight', 'decode_head.querys2feat.bias'\]"):
        rein.from_official(tmp_path / "partial.pth", tmp_path / "dinov2_vits.pth")
    with pytest.raises(ValueError, match="release.pth .*no backbone weights.*--weights"):
        rein.from_official(tmp_path / "release.pth")
    config = dict(model.config)
    del config["encoder_layers"]  # as a checkpoint from before the paper's pixel decoder
    torch.save({"config": config, "model": {}, "optimizer": {}}, tmp_path / "old.pt")
    for load in (evaluation.load_checkpoint, lambda p: train.load_resume(p, model, {}, "")):
        with pytest.raises(ValueError, match="old.pt .*FPN"):
            load(tmp_path / "old.pt")
    with pytest.raises(ValueError, match="'lora8'.*rein, freeze, full, lora, adaptformer, vpt"):
        rein.build_model(method="lora8")


# ------------------------------------------------------------- Table 5's comparisons (rein.py, train.py)


@pytest.mark.parametrize("method, backbone, expected", [
    ("lora", "vitl14", 786_432), ("adaptformer", "vitl14", 3_171_840), ("vpt", "vitl14", 3_686_400),
    ("lora", "eva02_vitl14", 1_179_648)])
def test_table5_trainable_counts_are_the_papers(method, backbone, expected):
    """Table 5: LoRA 0.79M, AdaptFormer 3.17M, VPT 3.69M on DINOv2-L, LoRA 1.18M on EVA02-L."""
    with torch.device("meta"):
        backbone_module = rein.ReinViT(vit.build_vit(backbone, 16), baseline=method)
    assert rein.count_trainable(backbone_module) == expected


@pytest.mark.parametrize("method", rein.BASELINES)
def test_table5_methods_train_their_own_tensors_only(method, capsys):
    """Two AdamW steps change exactly the trainable tensors (the method's and the head's), which a checkpoint
    holds (one is not enough: what feeds a zero-initialised projection gets its first gradient at the
    second); the head has its own queries; the count is printed at build time."""
    model = small_model(method)
    trainable = model.trainable_state_dict()
    own = {"lora": ".lora_", "adaptformer": "backbone.adapters.", "vpt": "backbone.prompts."}[method]
    assert {k for k in trainable if not k.startswith("head.")} == {k for k in trainable if own in k} != set()
    assert "head.query_feat.weight" in trainable and "backbone.rein.scale" not in trainable
    n = sum(v.numel() for k, v in trainable.items() if not k.startswith("head."))
    printed = capsys.readouterr().out
    assert f"{method} on vits14: {n:,} trainable parameters in the backbone ({method} {n:,})" in printed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-3, weight_decay=0.05))
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model.loss(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)))["loss"].backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(trainable)


@pytest.mark.parametrize("method", ["lora", "adaptformer"])
def test_lora_and_adaptformer_start_as_the_frozen_backbone(method):
    """B and the adapters' up projections start at zero: the maps are exactly the frozen backbone's."""
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        frozen, _ = small_model("freeze").backbone(images)
        refined, _ = small_model(method).backbone(images)
    assert all(torch.equal(a, b) for a, b in zip(frozen, refined))


def test_vpt_prompts_enter_every_block_and_never_reach_the_maps(tiny_archs):
    """Before block i the prompt slots hold prompts[i] (the previous block's prompt outputs are dropped);
    the maps are the patch tokens only."""
    model = small_model("vpt").eval()
    backbone = model.backbone
    inputs, outputs = [], []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in backbone.vit.blocks]
    hooks += [b.register_forward_hook(lambda m, args, out: outputs.append(out)) for b in backbone.vit.blocks]
    with torch.no_grad():
        maps, queries = backbone(torch.randn(2, 3, 48, 64))
    for hook in hooks:
        hook.remove()
    m = backbone.prompts.prompts.shape[1]
    assert queries is None and all(x.shape[1] == 1 + m + 12 for x in inputs)
    for i, x in enumerate(inputs):
        assert torch.equal(x[:, 1:1 + m], backbone.prompts.prompts[i].expand(2, -1, -1))
    for k, i in enumerate(backbone.feature_blocks):
        assert torch.equal(maps[k], outputs[i][:, 1 + m:].transpose(1, 2).reshape(2, -1, 3, 4))
    with pytest.raises(ValueError, match="vpt cannot run on sam_vitt16"):
        rein.build_model(method="vpt", backbone="sam_vitt16")


@pytest.mark.parametrize("method", rein.BASELINES)
def test_table5_methods_resume_exactly_and_evaluate(tmp_path, monkeypatch, method):
    """A run of each method stopped by a signal after 2 of 3 iterations resumes to the uninterrupted run's
    weights, and eval.py reads its checkpoint."""
    argv = TINY_RUN + ["--method", method, "--iters", "3"]
    train.main(train.parse_args(argv + ["--out", str(tmp_path / "straight")]))
    step = train.Log.step

    def stop_after_two(self, iteration, losses, lr):
        step(self, iteration, losses, lr)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train.Log, "step", stop_after_two)
    with pytest.raises(train.Interrupted):
        train.main(train.parse_args(argv + ["--out", str(tmp_path / "resumed")]))
    monkeypatch.setattr(train.Log, "step", step)
    train.main(train.parse_args(argv + ["--out", str(tmp_path / "resumed")]))
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "resumed"))
    assert a["iteration"] == b["iteration"] == 3 and a["model"].keys() == b["model"].keys()
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])
    results = evaluation.main(evaluation.parse_args(["--ckpt", str(tmp_path / "straight" / "last.pt"), "--data",
                                                     "synthetic:night", "--workers", "0"]))
    assert 0 <= results["synthetic:night"]["miou"] <= 1


def test_pasta_multiplies_the_spectrum_by_its_documented_noise():
    """The output's spectrum is the input's times a real factor (the phase kept up to sign), the mean of
    the draws at f and -f, so spread sqrt(sigma(f)^2 + sigma(-f)^2) / 2, sigma growing from beta at the
    lowest frequencies to alpha^k + beta at the highest; the mean colour is kept in expectation."""
    h, w = 16, 24
    y, x = np.mgrid[:h, :w]
    waves = [(0, 3), (5, 0), (4, 7), (7, 11)]  # (row, column) frequencies
    image = 128 + sum(20 * np.cos(2 * np.pi * (fy * y / h + fx * x / w)) for fy, fx in waves)
    image = np.repeat(image[..., None], 3, -1).round().astype(np.uint8)  # grey, never clipped below
    sigma = data.pasta_sigma(h, w, 0.4, 2, 0.02)
    assert sigma[0, 0] == pytest.approx(0.02) and sigma.max() == pytest.approx(0.4**2 + 0.02)
    assert sigma[0, 11] == pytest.approx(0.02 + (0.4 * 11 / math.hypot(7, 11)) ** 2)  # 24 wide: 0..11, then 11..0
    spectrum = np.fft.fft2(image / 255, axes=(0, 1))
    factors, means = [], []
    for seed in range(400):
        out = data.pasta(image, np.random.default_rng(seed), 0.4, 2, 0.02)
        out_spectrum = np.fft.fft2(out / 255, axes=(0, 1))[..., 0]
        factors.append([out_spectrum[fy, fx] / spectrum[fy, fx, 0] for fy, fx in [(0, 0)] + waves])
        means.append(out.mean((0, 1)))
    factors = np.array(factors)  # (draws, 1 + waves)
    for i, (fy, fx) in enumerate(waves, start=1):
        f = factors[:, i]
        assert np.abs(f.imag).max() < 0.02  # only uint8 rounding: the phase is kept
        spread = math.hypot(sigma[fy, fx], sigma[-fy % h, -fx % w]) / 2
        assert f.real.std() == pytest.approx(spread, rel=0.15)
        assert f.real.mean() == pytest.approx(1, abs=0.03)
    assert factors[:, 0].real.std() == pytest.approx(0.02, rel=0.15)  # DC is its own mirror: sigma itself
    assert np.abs(np.mean(means, 0) - image.mean((0, 1))).max() < 1.0


def test_pasta_applies_to_training_crops_only():
    """--augment pasta reaches the training set's transform, not the validation sets."""
    args = vars(train.parse_args(TINY_RUN + ["--augment", "pasta"]))
    assert data.dataset_kwargs("synthetic:game", "train", args)["pasta_args"] == (3.0, 2.0, 0.25)
    assert "pasta_args" not in data.dataset_kwargs("synthetic:photo", "val", args)
    plain = build_dataset("synthetic:game", None, "train", train=True, crop_size=32, image_size=(64, 32))
    pasta = build_dataset("synthetic:game", None, "train", train=True, crop_size=32, image_size=(64, 32),
                          pasta_args=(3.0, 2.0, 0.25))
    a, b = plain.augment(0, np.random.default_rng(1)), pasta.augment(0, np.random.default_rng(1))
    assert a[0].shape == b[0].shape and not torch.equal(a[0], b[0])


@pytest.mark.parametrize("augment", ["pasta", "advstyle"])
def test_augmentations_run_in_train_py(tmp_path, augment, monkeypatch):
    """--augment reaches the loop: PASTA on every training image, AdvStyle doubling each batch."""
    seen = []
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a: seen.append((a[2].shape[0], a[5])) or step(*a))
    calls = []
    pasta = data.pasta
    monkeypatch.setattr(data, "pasta", lambda *a: calls.append(a[0].shape) or pasta(*a))
    train.main(train.parse_args(TINY_RUN + ["--augment", augment, "--iters", "2", "--out", str(tmp_path)]))
    assert seen == [(2, 1.0 if augment == "advstyle" else None)] * 2
    assert len(calls) == (4 if augment == "pasta" else 0) and all(c == (32, 64, 3) for c in calls)


def test_data_benchmark_times_the_training_pipeline_on_gta_like_files(tmp_path, monkeypatch, capsys):
    """--bench-data writes GTAV-layout pairs (Cityscapes label ids that map back to the scene's classes) and
    reports the images per second of the training pipeline."""
    train.write_gta_like(tmp_path / "gta", 2, (96, 64))
    dataset = build_dataset("gta", tmp_path / "gta", "train", train=False)
    scenes = build_dataset("synthetic:photo", None, "train", train=False, image_size=(96, 64), length=2)
    assert len(dataset) == 2 and np.array_equal(dataset.read(1)[1], scenes.read(1)[1])
    monkeypatch.setattr(train, "GTA_SIZE", (96, 64))
    train.main(train.parse_args(["--bench-data", "2", "--batch-size", "2", "--crop-size", "32", "--workers", "0"]))
    assert re.search(r"bench-data: [\d.]+ images/s from 96x64 PNG pairs to 32x32 crops, 0 workers", capsys.readouterr().out)


def test_advstyle_step_raises_the_loss():
    """AdvStyle's restyled batch has a higher loss than the batch it came from (gradient ascent on the
    channel statistics), and the content of each image stays: same normalised pixels."""
    model = small_model("freeze").train()
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    torch.manual_seed(0)
    adv = train.adversarial_style(model, images, labels, 1.0, contextlib.nullcontext())
    with torch.no_grad():
        torch.manual_seed(1)
        before = model.loss(images, labels)["loss"]
        torch.manual_seed(1)
        after = model.loss(adv, labels)["loss"]
    assert after > before
    standard = lambda x: (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    assert torch.allclose(standard(adv), standard(images), atol=1e-4)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# mask_head.py
# ---------------------------------------------------------------------------------------------

def cost_matrices(rng: np.random.Generator, shape: tuple[int, int]) -> list[np.ndarray]:
    """Random, tied (few distinct integers, or all equal) and badly scaled matrices."""
    return [
        rng.random(shape),
        rng.integers(0, 3, shape).astype(float),
        np.full(shape, 7.0),
        10.0 ** rng.uniform(-9, 9, shape) * rng.choice([-1, 1], shape),
    ]


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One matrix through the batched solver, as scipy's function takes it."""
    rows, cols = linear_sum_assignment_batch(cost[None])
    return rows[0], cols[0]


def check_assignment(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """scipy's output format: int64, length min(R, C), rows ascending, no row or column twice."""
    assert rows.dtype == cols.dtype == np.int64
    assert len(rows) == len(cols) == min(cost.shape)
    assert np.all(np.diff(rows) > 0) and len(set(cols.tolist())) == len(cols)


def test_assignment_equals_brute_force_on_small_matrices():
    """The total equals the best of all assignments, found by enumeration."""
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 6), (6, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7)]:
        for cost in cost_matrices(rng, shape):
            rows, cols = linear_sum_assignment(cost)
            check_assignment(cost, rows, cols)
            short = cost if shape[0] <= shape[1] else cost.T
            best = min(
                short[np.arange(short.shape[0]), list(p)].sum()
                for p in itertools.permutations(range(short.shape[1]), short.shape[0])
            )
            assert np.isclose(cost[rows, cols].sum(), best, rtol=1e-12, atol=0), (shape, cost)


def test_assignment_never_beaten_on_large_matrices():
    """No one of 1,000 random assignments, and no swap of two rows' columns, does better."""
    rng = np.random.default_rng(1)
    for shape in [(100, 19), (19, 100), (1, 80), (80, 1), (50, 50)]:
        for cost in cost_matrices(rng, shape):
            rows, cols = linear_sum_assignment(cost)
            check_assignment(cost, rows, cols)
            total = cost[rows, cols].sum()
            tol = 1e-9 * np.abs(cost).max() * min(shape)
            short = cost if shape[0] <= shape[1] else cost.T
            n, m = short.shape
            random_totals = [short[np.arange(n), rng.permutation(m)[:n]].sum() for _ in range(1000)]
            assert min(random_totals) >= total - tol, shape
            r, c = (rows, cols) if shape[0] <= shape[1] else (cols[np.argsort(cols)], rows[np.argsort(cols)])
            # swapped[i, j]: row i takes row j's column and row j takes row i's.
            swapped = short[r[:, None], c[None, :]] + short[r[None, :], c[:, None]]
            kept = short[r, c][:, None] + short[r, c][None, :]
            assert np.all(swapped >= kept - tol), shape


def test_assignment_of_empty_matrices_and_bad_input():
    """An empty matrix (no labelled pixel) gives empty int64 arrays; NaN is refused."""
    for shape in [(0, 0), (0, 5), (5, 0)]:
        rows, cols = linear_sum_assignment(np.zeros(shape))
        assert rows.shape == cols.shape == (0,) and rows.dtype == cols.dtype == np.int64
    with pytest.raises(ValueError, match="non-finite"):
        linear_sum_assignment(np.array([[0.0, np.nan]]))


def test_batched_assignment_matches_one_by_one():
    """Solving problems together gives each its optimal total."""
    rng = np.random.default_rng(2)
    costs = rng.random((10, 100, 19))
    rows, cols = linear_sum_assignment_batch(costs)
    for cost, r, c in zip(costs, rows, cols):
        single_rows, single_cols = linear_sum_assignment(cost)
        assert np.isclose(cost[r, c].sum(), cost[single_rows, single_cols].sum(), rtol=1e-12)


def test_matching_minimises_mmdets_cost_on_full_masks():
    """Each prediction's matching is the cheapest under mmdet's cost, computed here the slow way: the
    full masks, both masks sampled at match's own random points, BCE and dice per pair, every assignment."""
    torch.manual_seed(0)
    L, B, Q, P = 3, 2, 6, 50
    predictions = [(torch.randn(B, Q, 5), torch.randn(B, Q, 8)) for _ in range(L)]
    features = torch.randn(B, 8, 12, 10)  # not square: rows and columns cannot be swapped unseen
    labels = torch.randint(0, 4, (B, 6, 5)).repeat_interleave(4, 1).repeat_interleave(4, 2)  # (B, 24, 20)
    targets = make_targets(labels, 4)
    rng = torch.get_rng_state()
    matches = HungarianMatcher(num_points=P)(predictions, features, targets)
    torch.set_rng_state(rng)  # match draws one set of points per image, in image order
    for b, (classes, masks) in enumerate(targets):
        points = (torch.rand(L, P, 2) * 2 - 1)[:, None]  # (L, 1, P, 2)
        for i, (class_logits, embedding) in enumerate(predictions):
            pred = F.grid_sample(mask_logits(embedding, features)[b:b + 1], points[i:i + 1], align_corners=False)
            target = F.grid_sample(masks[None], points[i:i + 1], align_corners=False)
            pred, target = pred[0, :, 0], target[0, :, 0]  # (Q, P), (T, P)
            pairs = pred[:, None].expand(-1, len(classes), -1), target[None].expand(Q, -1, -1)
            bce = F.binary_cross_entropy_with_logits(*pairs, reduction="none").mean(-1)  # (Q, T)
            sig = pred.sigmoid()
            dice = 1 - (2 * sig @ target.T + 1) / (sig.sum(-1)[:, None] + target.sum(-1)[None] + 1)
            cost = -2 * class_logits[b].softmax(-1)[:, classes] + 5 * bce + 5 * dice  # (Q, T)
            best = min(cost[list(q), range(len(classes))].sum()
                       for q in itertools.permutations(range(Q), len(classes)))
            assert torch.isclose(cost[matches[b][i], range(len(classes))].sum(), best, atol=1e-5), (b, i)


def tiny_head(num_classes: int = 3, **kwargs) -> MaskHead:
    """A small head: width 16, 6 queries, 3 decoder layers, 1 deformable encoder layer."""
    args = dict(in_dim=8, num_queries=6, dim=16, decoder_layers=3, encoder_layers=1, num_heads=2)
    return MaskHead(num_classes=num_classes, **(args | kwargs))


def tiny_maps(batch: int = 2, size: int = 64, in_dim: int = 8) -> list[torch.Tensor]:
    """Four random ViT feature maps of a size x size image at patch 16."""
    return [torch.randn(batch, in_dim, size // 16, size // 16) for _ in range(4)]


@pytest.mark.parametrize("rein_queries", [False, True])
@pytest.mark.parametrize("encoder_layers", [0, 2])
def test_head_output_shapes(rein_queries, encoder_layers):
    """decoder_layers + 1 predictions of class logits (B, Q, K+1) and mask embeddings; mask features at stride 4."""
    torch.manual_seed(0)
    head = tiny_head(rein_queries=rein_queries, encoder_layers=encoder_layers)
    queries = torch.randn(6, 16) if rein_queries else None
    predictions, features = head(tiny_maps(batch=2, size=64), queries)
    assert len(predictions) == 4 and features.shape == (2, 16, 16, 16)
    for class_logits, embedding in predictions:
        assert class_logits.shape == (2, 6, 4) and embedding.shape == (2, 6, 16)
    with pytest.raises(ValueError, match="decoder_layers.*3.*2"):
        tiny_head(decoder_layers=2)


def test_sine_position_is_mmdets_formula():
    """Channel 2k of the y half is sin((y + 1) / (h + 1e-6) * 2 pi / 10000^(2k / (dim/2))), 2k+1 its cos; x follows."""
    h, w, dim = 3, 5, 8
    pos = sine_position(h, w, dim, torch.device("cpu")).view(h, w, dim)
    for y, x, k in itertools.product(range(h), range(w), range(dim // 4)):
        period = 10000 ** (2 * k / (dim // 2))
        ay, ax = (y + 1) / (h + 1e-6) * 2 * math.pi / period, (x + 1) / (w + 1e-6) * 2 * math.pi / period
        expected = [math.sin(ay), math.cos(ay), math.sin(ax), math.cos(ax)]
        got = [pos[y, x, 2 * k], pos[y, x, 2 * k + 1], pos[y, x, dim // 2 + 2 * k], pos[y, x, dim // 2 + 2 * k + 1]]
        assert np.allclose(got, expected, atol=1e-5), (y, x, k)


def bilinear_reference(value, h, w, x, y):
    """grid_sample(align_corners=False, zeros) at one point, by hand: value (h*w, d), (x, y) in [0, 1]."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[1], dtype=torch.float64)
    for cx, cy in itertools.product((x0, x0 + 1), (y0, y0 + 1)):
        if 0 <= cx < w and 0 <= cy < h:
            out += (1 - abs(px - cx)) * (1 - abs(py - cy)) * value[cy * w + cx].double()
    return out


def deformable_reference(value, shapes, locations, weights):
    """sample_levels point by point: sum over levels and points of weight * bilinear sample."""
    B, Lv, M, d = value.shape
    _, Lq, _, L, P, _ = locations.shape
    starts = [0, *itertools.accumulate(h * w for h, w in shapes)]
    out = torch.zeros(B, Lq, M, d, dtype=torch.float64)
    for b, q, m, level, p in itertools.product(range(B), range(Lq), range(M), range(L), range(P)):
        h, w = shapes[level]
        x, y = locations[b, q, m, level, p].tolist()
        sampled = bilinear_reference(value[b, starts[level]:starts[level + 1], m], h, w, x, y)
        out[b, q, m] += weights[b, q, m, level, p].item() * sampled
    return out.view(B, Lq, M * d)


def test_deformable_sampling_equals_a_per_point_reference():
    """sample_levels (one grid_sample per level) equals a slow per-point reference, values and
    gradients, with points inside, on the border and outside the maps."""
    torch.manual_seed(0)
    shapes = [(2, 3), (3, 5), (4, 2)]
    B, M, d, P = 2, 2, 3, 2
    Lv = sum(h * w for h, w in shapes)
    value = torch.randn(B, Lv, M, d, dtype=torch.float64, requires_grad=True)
    locations = (torch.rand(B, 4, M, 3, P, 2, dtype=torch.float64) * 1.6 - 0.3).requires_grad_()
    weights = torch.rand(B, 4, M, 3, P, dtype=torch.float64, requires_grad=True)
    ours = sample_levels(value, shapes, locations, weights)
    assert torch.allclose(ours, deformable_reference(value, shapes, locations, weights), atol=1e-10)
    # The gradients, against finite differences of the same function.
    assert torch.autograd.gradcheck(lambda *x: sample_levels(x[0], shapes, *x[1:]), (value, locations, weights))


@cuda
def test_cuda_deformable_sampling_equals_cpu():
    """On CUDA sample_levels gives the CPU's values and gradients, and under bf16 autocast, as in
    training, gives them to bf16 rounding."""
    torch.manual_seed(0)
    shapes = [(8, 8), (16, 12), (32, 32)]
    B, Lq, M, d, P = 2, 300, 4, 8, 4
    inputs = (torch.randn(B, sum(h * w for h, w in shapes), M, d), torch.rand(B, Lq, M, 3, P, 2) * 1.2 - 0.1,
              torch.rand(B, Lq, M, 3, P))

    def run(sample, device: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        value = inputs[0].to(device, dtype).requires_grad_()
        locations, weights = (t.to(device).requires_grad_() for t in inputs[1:])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = sample(value, shapes, locations, weights)
        grads = torch.autograd.grad(out.float().square().sum(), (value, locations, weights))
        return [t.float().cpu() for t in (out, *grads)]

    def close(ours: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> bool:
        """Each tensor within `tolerance` of the expected one, relative to its largest entry."""
        return all(torch.allclose(a, b, rtol=0, atol=tolerance * b.abs().max().item()) for a, b in zip(ours, expected))

    cpu = run(sample_levels, "cpu")
    assert close(run(sample_levels, "cuda"), cpu, 1e-5)
    assert close(run(sample_levels, "cuda", torch.bfloat16), cpu, 0.02)


def test_deformable_attention_layout_is_mmcvs():
    """Offsets are (heads, levels, points, (x, y)) in pixels of each level, weights softmaxed over a
    head's levels and points together, around the query's reference point on every level."""
    torch.manual_seed(0)
    attn = DeformableAttention(dim=8, num_heads=2, num_levels=2, num_points=3)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    shapes = [(3, 4), (5, 2)]
    value = torch.randn(1, 22, 8)
    query = torch.randn(1, 2, 8)
    reference = torch.tensor([[0.3, 0.6], [0.9, 0.1]])
    offsets = attn.sampling_offsets(query).view(1, 2, 2, 2, 3, 2)  # (B, Lq, heads, levels, points, xy)
    weights = attn.attention_weights(query).view(1, 2, 2, 6).softmax(-1).view(1, 2, 2, 2, 3)
    wh = torch.tensor([[4.0, 3.0], [2.0, 5.0]])  # (w, h) per level
    locations = reference[None, :, None, None, None] + offsets / wh[:, None]
    projected = attn.value_proj(value).view(1, 22, 2, 4)
    expected = attn.output_proj(deformable_reference(projected, shapes, locations, weights).float())
    assert torch.allclose(attn(query, value, reference, shapes), expected, atol=1e-5)
    # y before x, or levels normalised by (h, w), would move the points: the test can tell.
    swapped = reference[None, :, None, None, None] + offsets.flip(-1) / wh[:, None]
    wrong = attn.output_proj(deformable_reference(projected, shapes, swapped, weights).float())
    assert not torch.allclose(wrong, expected, atol=1e-3)


def test_pixel_decoder_levels_are_deep_to_shallow():
    """Without encoder layers, memory 0 (stride 32) comes from the deepest map alone, memory 2 (stride 8)
    from the third; the mask features at stride 4 see the shallowest map."""
    torch.manual_seed(0)
    decoder = tiny_head(encoder_layers=0).pixel_decoder
    maps = tiny_maps(batch=1, size=128)  # an 8 x 8 patch grid
    memories, mask_features = decoder(maps)
    assert [tuple(m.shape[-2:]) for m in memories] == [(4, 4), (8, 8), (16, 16)]
    assert mask_features.shape[-2:] == (32, 32)
    for changed in range(4):
        other = [m.clone() for m in maps]
        other[changed] += 1.0
        new, new_features = decoder(other)
        moved = [not torch.allclose(a, b) for a, b in zip(memories, new)]
        assert moved == [changed == 3, changed == 2, changed == 1]
        assert (not torch.allclose(mask_features, new_features)) == (changed in (0, 1))


def test_projection_before_resizing_equals_resizing_before_projection():
    """The memory saving is exact: conv1x1(resize(x)) == resize(conv1x1(x)) for the scales used."""
    torch.manual_seed(0)
    head = tiny_head()
    x = torch.randn(2, 8, 6, 6)
    for conv, scale in zip(head.pixel_decoder.input_convs, (0.5, 1, 2)):
        resized_first = conv.gn(conv.conv(F.interpolate(x, scale_factor=scale, mode="bilinear"))) if scale != 1 \
            else conv.gn(conv.conv(x))
        assert torch.allclose(conv(x, scale), resized_first, atol=1e-5)
    lateral = head.pixel_decoder.lateral_conv
    assert torch.allclose(lateral(x, 4), lateral.gn(lateral.conv(F.interpolate(x, scale_factor=4, mode="bilinear"))),
                          atol=1e-5)


def test_masked_attention_ignores_features_outside_the_masks():
    """Memory outside every query's mask cannot change the layer output, unless a mask is empty."""
    torch.manual_seed(0)
    layer = DecoderLayer(dim=16, num_heads=2, ffn_dim=32)
    features = torch.eye(36).view(1, 36, 6, 6)  # one feature per pixel: a mask is its embedding
    logits = torch.randn(1, 4, 6, 6)
    logits[..., :3] = -5.0  # the left half is outside every mask...
    logits[..., 0, 5] = 5.0  # ...and no mask is empty
    attend = attention_mask(logits.flatten(2), features)
    outside = ~attend[0].any(0)  # (36,)
    assert outside.view(6, 6)[:, :3].all() and not outside.all()
    query, query_pos = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    memory, memory_pos = torch.randn(1, 36, 16), torch.randn(36, 16)
    changed = memory.clone()
    changed[:, outside] = torch.randn(1, int(outside.sum()), 16)
    before = layer(query, query_pos, memory, memory_pos, attend)
    assert torch.allclose(layer(query, query_pos, changed, memory_pos, attend), before, atol=1e-6)

    logits[:, 0] = -5.0  # query 0's mask is now empty: it attends everywhere
    attend = attention_mask(logits.flatten(2), features)
    assert attend[0, 0].all() and not attend[0, 1].all()
    before = layer(query, query_pos, memory, memory_pos, attend)
    after = layer(query, query_pos, changed, memory_pos, attend)
    assert not torch.allclose(after[:, 0], before[:, 0], atol=1e-3)


def test_attention_masks_from_resized_features_equal_resized_masks():
    """Mask2Former resizes each mask to the level and blocks where sigmoid < 0.5; resizing the features
    instead gives the same logits, because a mask is linear in the features."""
    torch.manual_seed(0)
    embedding, features = torch.randn(2, 5, 8), torch.randn(2, 8, 32, 32)
    for size in ((4, 4), (8, 8), (16, 16)):
        masks = F.interpolate(mask_logits(embedding, features), size=size, mode="bilinear", align_corners=False)
        small = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(mask_logits(embedding, small), masks, atol=1e-5)
        official = masks.flatten(2).sigmoid() >= 0.5
        official |= ~official.any(-1, keepdim=True)
        agree = attention_mask(embedding, small) == official
        assert agree.float().mean() > 0.999


def synthetic_labels(num_classes: int, size: int = 64) -> torch.Tensor:
    """(1, size, size) labels: a background, a square and a bar, on a 4-pixel grid."""
    label = torch.zeros(1, size, size, dtype=torch.int64)
    label[:, 8:32, 8:40] = 1 % num_classes
    label[:, 44:56, :] = 2 % num_classes
    return label


@pytest.mark.parametrize(
    "num_classes, labels",
    [
        (19, torch.full((2, 64, 64), 4)),  # one class
        (19, torch.full((2, 64, 64), 255)),  # no labelled pixel
        (19, torch.arange(19).repeat_interleave(4).repeat(64, 1)[None, :, :64].repeat(2, 1, 1)),  # 19 classes
        (1, synthetic_labels(2).repeat(2, 1, 1).masked_fill(synthetic_labels(2) == 1, 255)),  # binary
    ],
    ids=["one-class", "all-ignored", "all-19", "binary"],
)
def test_losses_are_finite(num_classes, labels):
    """Every loss is a finite float32 scalar, also with 19 targets for 20 queries."""
    torch.manual_seed(0)
    head = tiny_head(num_classes=num_classes, num_queries=20)
    losses = SetCriterion(num_classes=num_classes, num_points=256)(*head(tiny_maps(batch=2)), labels)
    assert set(losses) == {"loss", "loss_ce", "loss_mask", "loss_dice"}
    for value in losses.values():
        assert value.dtype == torch.float32 and value.ndim == 0 and torch.isfinite(value)
    assert (losses["loss_mask"] == 0) == (labels == 255).all()


def test_more_targets_than_queries():
    """With 19 classes and 6 queries only 6 targets are matched; the loss stays finite."""
    torch.manual_seed(0)
    labels = torch.arange(19).repeat_interleave(4).repeat(64, 1)[None, :, :64]
    predictions = tiny_head(num_classes=19)(tiny_maps(batch=1))
    losses = SetCriterion(num_classes=19, num_points=64)(*predictions, labels)
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("rein_queries", [False, True])
def test_every_parameter_gets_a_gradient_without_labelled_pixels(rein_queries):
    """DDP needs every parameter in the graph: all get finite gradients from an all-255 label."""
    torch.manual_seed(0)
    head = tiny_head(rein_queries=rein_queries)
    queries = torch.randn(6, 16, requires_grad=True) if rein_queries else None
    labels = torch.full((2, 64, 64), 255)
    SetCriterion(num_classes=3, num_points=64)(*head(tiny_maps(), queries), labels)["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert queries is None or queries.grad is not None


def test_bad_labels_name_the_bad_values():
    """Label values other than 0..K-1 and 255 are refused with the values in the message."""
    labels = torch.zeros(1, 64, 64, dtype=torch.int64)
    labels[0, 0, :3] = torch.tensor([19, 42, -1])
    predictions = tiny_head(num_classes=19)(tiny_maps(batch=1))
    with pytest.raises(ValueError, match=r"0\.\.18 or 255.*found \[-1, 19, 42\]"):
        SetCriterion(num_classes=19)(*predictions, labels)


def test_loss_is_float32_under_bf16_autocast():
    """The criterion computes in float32 whatever precision the head ran in, and the backward
    pass (deformable sampling included) gives every parameter a finite gradient: CUDA's bf16
    path, run with CPU autocast."""
    torch.manual_seed(0)
    head = tiny_head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions, features = head(tiny_maps())
        losses = SetCriterion(num_classes=3, num_points=64)(predictions, features, synthetic_labels(3).repeat(2, 1, 1))
    assert predictions[-1][1].dtype == torch.bfloat16 and features.dtype == torch.bfloat16
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def criterion_on_a_share(rank, world_size, port, out):
    """One process of the normaliser test: the loss of its share of a fixed batch of 2 images."""
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.rand = fake_rand  # the same points for a mask on any rank
    torch.manual_seed(0)
    predictions, features = tiny_head()(tiny_maps())
    labels = synthetic_labels(3).repeat(2, 1, 1)
    labels[1] = 2  # the images have different numbers of masks, so the normalisers differ per rank
    share = slice(rank, rank + 1) if world_size > 1 else slice(0, 2)
    predictions = [(c[share], e[share]) for c, e in predictions]
    loss = SetCriterion(num_classes=3, num_points=64)(predictions, features[share], labels[share])["loss"]
    torch.save(loss.detach(), f"{out}_{world_size}_{rank}.pt")
    if world_size > 1:
        dist.destroy_process_group()


def test_distributed_normalisers_are_all_reduced(tmp_path):
    """2 gloo processes with 1 image each: the mean of their losses (what DDP's gradient averaging
    optimises) equals the loss of both images on one process; per-rank normalisers would not."""
    torch.multiprocessing.spawn(criterion_on_a_share, args=(2, free_port(), tmp_path / "loss"), nprocs=2)
    torch.multiprocessing.spawn(criterion_on_a_share, args=(1, 0, tmp_path / "loss"), nprocs=1)
    two = [torch.load(tmp_path / f"loss_2_{r}.pt") for r in range(2)]
    one = torch.load(tmp_path / "loss_1_0.pt")
    assert torch.allclose((two[0] + two[1]) / 2, one, rtol=1e-5)
    assert not torch.allclose(two[0], two[1], rtol=1e-2)  # the shares really differ


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_mask_losses_equal_a_per_pair_reference_also_with_more_classes_than_queries():
    """The mask losses of one prediction, pair by matched pair: the full mask of the matched query and
    the target's own mask, both sampled at the pair's points, BCE and dice. Image 0 has 5 classes for 3
    queries, so some targets go unmatched; a target paired with the wrong query or mask shows."""
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[1] = 255  # ignored, but for one class
    labels[1, :10] = 3
    Q, C = 3, 16
    embedding, features = torch.randn(2, Q, C), torch.randn(2, C, 16, 16)
    criterion = SetCriterion(num_classes=5, num_points=32)
    targets = make_targets(labels, 5)
    matches = criterion.matcher([(torch.randn(2, Q, 6), embedding)], features, targets)
    assert [tuple(m.shape) for m in matches] == [(1, 5), (1, 1)] and [(m >= 0).sum().item() for m in matches] == [3, 1]
    queries = [m[0] for m in matches]
    points = []
    real = criterion.uncertain_points
    criterion.uncertain_points = lambda masks: points.append(real(masks)) or points[-1]  # keep what it drew
    bce, dice = criterion.mask_losses(embedding, features.unbind(0), targets, matched_pairs(matches, labels.device)[0])
    pairs = [(b, q.item(), t) for b, query in enumerate(queries) for t, q in enumerate(query) if q >= 0]
    expected_bce = expected_dice = 0.0
    for (b, q, t), p in zip(pairs, points[0]):
        full = torch.einsum("c,chw->hw", embedding[b, q], features[b])  # the query's mask, (16, 16)
        x = F.grid_sample(full[None, None], p[None, :, None], align_corners=False).flatten()
        target = F.grid_sample(targets[b][1][t][None, None], p[None, :, None], align_corners=False).flatten()
        expected_bce += F.binary_cross_entropy_with_logits(x, target)
        expected_dice += 1 - (2 * (x.sigmoid() * target).sum() + 1) / (x.sigmoid().sum() + target.sum() + 1)
    assert len(pairs) == len(points[0]) == 4
    assert torch.allclose(bce, expected_bce) and torch.allclose(dice, expected_dice)


class HostReads(TorchFunctionMode):
    """Counts the calls that make the host wait for a CUDA device: reading a value (item, tolist,
    cpu, a tensor's truth), and indexing with a boolean mask (its size must be read first)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" else ()
        self.count += name in ("item", "tolist", "cpu", "__bool__") or any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (index if isinstance(index, tuple)
                                                                            else (index,)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [1, 4])
def test_loss_waits_for_the_device_a_fixed_number_of_times(batch):
    """By this count the set loss reads from the device 4 times whatever the batch B and the number of
    predictions L: the labels' check, the classes present (their counts per image), the finiteness check,
    every cost matrix at once (and make_targets' one nonzero waits too). It was 3 + B + 4LB: 167 for the
    paper's batch 4 and 10 predictions."""
    torch.manual_seed(0)
    predictions = tiny_head(num_queries=6)(tiny_maps(batch=batch, size=32))
    labels = synthetic_labels(3, 32)[:1].expand(batch, -1, -1)
    with HostReads() as reads:
        SetCriterion(num_classes=3, num_points=64)(*predictions, labels)
    assert reads.count == 4


def test_loss_never_builds_full_resolution_masks_for_all_queries():
    """Point sampling: no tensor in the criterion is as large as Q masks at label resolution."""
    torch.manual_seed(0)
    Q, size = 50, 128
    predictions = tiny_head(num_queries=Q)(tiny_maps(batch=1, size=size))
    labels = synthetic_labels(3, size)
    with LargestTensor() as mode:
        SetCriterion(num_classes=3, num_points=256)(*predictions, labels)
    # The 4 predictions' stride-4 masks, computed without gradients for the matching, are the
    # largest: 1/4 of it.
    assert mode.numel <= Q * size * size / 4


def test_semantic_inference_combines_class_and_mask():
    """A confident query's class wins where its mask is on."""
    class_logits = torch.full((1, 2, 4), -10.0)
    class_logits[0, 0, 1] = class_logits[0, 1, 2] = 10.0  # query 0 says class 1, query 1 class 2
    mask_logits = torch.full((1, 2, 4, 6), -10.0)
    mask_logits[0, 0, :, :3] = mask_logits[0, 1, :, 3:] = 10.0  # left half, right half
    scores = semantic_inference(class_logits, mask_logits)
    assert scores.shape == (1, 3, 4, 6)
    expected = torch.tensor([1, 1, 1, 2, 2, 2]).expand(4, 6)
    assert torch.equal(scores[0].argmax(0), expected)


def test_head_overfits_one_image():
    """Head and loss learn one synthetic image to near-perfect mIoU from fixed random features."""
    torch.manual_seed(0)
    head = tiny_head(num_classes=3, dim=32, num_queries=8)
    maps = tiny_maps(batch=1, size=64)
    labels = synthetic_labels(3)
    criterion = SetCriterion(num_classes=3, num_points=256)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for _ in range(75):
        loss = criterion(*head(maps), labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictions, features = head(maps)
        scores = semantic_inference(predictions[-1][0], mask_logits(predictions[-1][1], features))  # (1, 3, 16, 16)
    pred = torch.nn.functional.interpolate(scores, size=(64, 64), mode="bilinear").argmax(1)
    ious = [((pred == k) & (labels == k)).sum() / ((pred == k) | (labels == k)).sum() for k in range(3)]
    assert torch.stack(ious).mean() > 0.95, ious


# ---------------------------------------------------------------------------------------------
# data.py
# ---------------------------------------------------------------------------------------------

MAPILLARY_V12_CLASSES = (  # the "readable" names of config_v1.2.json, in label-value order (checked by hand)
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane",
    "Crosswalk - Plain", "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane",
    "Sidewalk", "Bridge", "Building", "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider",
    "Lane Marking - Crosswalk", "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain",
    "Vegetation", "Water", "Banner", "Bench", "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera",
    "Fire Hydrant", "Junction Box", "Mailbox", "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole",
    "Traffic Sign Frame", "Utility Pole", "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)",
    "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan", "Motorcycle", "On Rails", "Other Vehicle",
    "Trailer", "Truck", "Wheeled Slow", "Car Mount", "Ego Vehicle", "Unlabeled",
)

# The label specs (cityscapesScripts' labels.py, Synthia's and Mapillary's documentation), written out
# independently of data.py.
CITYSCAPES_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                  25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_IDS = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
               8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
# Mapillary v1.2 label value -> train id by the name rule, worked out by hand; others are 255.
MAPILLARY_IDS = {2: 1, 3: 4, 6: 3, 7: 0, 8: 0, 9: 1, 10: 0, 11: 1, 13: 0, 14: 0, 15: 1, 17: 2, 19: 11,
                 20: 12, 21: 12, 22: 12, 23: 0, 24: 0, 27: 10, 29: 9, 30: 8, 44: 5, 45: 5, 46: 7, 47: 5,
                 48: 6, 49: 7, 50: 7, 52: 18, 54: 15, 55: 13, 57: 17, 58: 16, 61: 14}


def expected(mapping: dict[int, int], values: np.ndarray) -> np.ndarray:
    return np.array([mapping.get(int(v), 255) for v in values.ravel()], dtype=np.uint8).reshape(values.shape)


def save(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:
        image.putpalette(CITYSCAPES_PALETTE.tobytes())  # turns an 8-bit image into a palette PNG
    image.save(path)


def save_png16(path: Path, rgb: np.ndarray) -> None:
    """Write (H, W, 3) uint16 as a 16-bit RGB PNG; Sub-filtered rows make decoding depend on the pixel size."""
    height, width, _ = rgb.shape
    raw = rgb.astype(">u2").view(np.uint8).reshape(height, width * 6).astype(np.int16)
    raw[:, 6:] -= raw[:, :-6].copy()
    rows = b"".join(b"\x01" + (row % 256).astype(np.uint8).tobytes() for row in raw)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def all_values(count: int, rows: int = 2) -> np.ndarray:
    return np.tile(np.arange(count, dtype=np.uint8), (rows, 1))


def block_label(height: int, width: int, cell: int, seed: int) -> np.ndarray:
    grid = np.random.default_rng(seed).integers(0, 19, (height // cell + 1, width // cell + 1))
    return np.kron(grid, np.ones((cell, cell), dtype=np.int64))[:height, :width].astype(np.uint8)


def interior(label: np.ndarray, margin: int = 2) -> np.ndarray:
    """Mask of pixels whose (2 margin + 1)^2 neighbourhood holds one label (edges excluded)."""
    height, width = label.shape
    centre = label[margin:height - margin, margin:width - margin]
    same = np.ones_like(centre, dtype=bool)
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            same &= label[margin + dy:height - margin + dy, margin + dx:width - margin + dx] == centre
    mask = np.zeros_like(label, dtype=bool)
    mask[margin:height - margin, margin:width - margin] = same
    return mask


def test_label_tables_follow_the_spec():
    """label_table gives 256-entry uint8 tables equal to the published specs for every id scheme."""
    values = np.arange(256)
    for name in ("cityscapes", "gta", "acdc"):
        assert label_table(name)[0].dtype == np.uint8 and (label_table(name)[0] == expected(CITYSCAPES_IDS, values)).all()
    assert (label_table("synthia")[0] == expected(SYNTHIA_IDS, values)).all()
    assert (label_table("bdd")[0] == np.where(values < 19, values, 255)).all()


def test_gta_palette_pngs_map_every_id(tmp_path):
    """GTAV: 8-bit palette PNG labels in Cityscapes ids land on the right train ids."""
    raw = all_values(34)
    save(tmp_path / "images" / "00001.png", rgb(2, 34))
    save(tmp_path / "labels" / "00001.png", raw, palette=True)
    dataset = build_dataset("gta", tmp_path, "train", train=False)
    image, label = dataset.read(0)
    assert image.shape == (2, 34, 3) and label.dtype == np.uint8
    assert (label == expected(CITYSCAPES_IDS, raw)).all()
    assert dataset.unknown_pixels == 0 and dataset.num_classes == 19 and dataset.name == "gta"


def test_converted_train_id_files_are_accepted(tmp_path):
    """GTAV and Cityscapes `_labelTrainIds.png` files are read as train ids when no raw labels exist."""
    train_ids = np.array([[0, 5, 18, 255]], dtype=np.uint8)
    save(tmp_path / "gta" / "images" / "00001.png", rgb(1, 4))
    save(tmp_path / "gta" / "labels" / "00001_labelTrainIds.png", train_ids)
    base = tmp_path / "cs" / "gtFine" / "train" / "ulm" / "ulm_000000_000019"
    save(tmp_path / "cs" / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000019_leftImg8bit.png", rgb(1, 4))
    save(Path(f"{base}_gtFine_labelTrainIds.png"), train_ids)
    for name in ("gta", "cs"):
        dataset = build_dataset("gta" if name == "gta" else "cityscapes", tmp_path / name, "train", train=False)
        assert (dataset.read(0)[1] == train_ids).all()


def test_synthia_16bit_labels_use_the_first_channel(tmp_path):
    """Synthia: 16-bit RGB PNGs keep the class in the first channel; values past 255 are ignored."""
    classes = np.tile(np.arange(23, dtype=np.uint16), (3, 1))
    classes[2, 0] = 300  # not a Synthia class, and past the 8-bit table
    labels = np.stack([classes, np.full_like(classes, 517), np.zeros_like(classes)], axis=-1)  # instance ids in G
    save(tmp_path / "RGB" / "0000000.png", rgb(3, 23))
    save_png16(tmp_path / "GT" / "LABELS" / "0000000.png", labels)
    dataset = build_dataset("synthia", tmp_path, "train", train=False)
    with pytest.warns(UserWarning, match="> 255"):
        label = dataset.read(0)[1]
    assert (label == expected(SYNTHIA_IDS, classes)).all() and label[2, 0] == 255
    assert dataset.unknown_pixels == 1


def test_cityscapes_city_folders_and_test_split(tmp_path):
    """Cityscapes: city folders per split pair by name; test has images only and cannot train."""
    raw = all_values(34)
    for split, cities in (("train", ("aachen", "bonn")), ("val", ("lindau",)), ("test", ("berlin",))):
        for city in cities:
            stem = f"{city}_000001_000019"
            save(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(2, 34))
            if split != "test":
                save(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw)
    train = build_dataset("cityscapes", tmp_path, "train", train=False)
    assert len(train) == 2 and len(build_dataset("cityscapes", tmp_path, "val", train=False)) == 1
    assert (train.read(1)[1] == expected(CITYSCAPES_IDS, raw)).all()
    assert train[1]["name"] == "bonn_000001_000019_leftImg8bit"
    test = build_dataset("cityscapes", tmp_path, "test", train=False)
    assert not test.has_labels and (test.read(0)[1] == 255).all()
    with pytest.raises(ValueError, match="no labels"):
        build_dataset("cityscapes", tmp_path, "test", train=True)


def test_bdd_jpg_images_and_train_id_masks(tmp_path):
    """BDD100K: jpg images with png masks that already hold train ids (255 stays ignore)."""
    mask = np.array([list(range(19)) + [255]], dtype=np.uint8)
    save(tmp_path / "images" / "10k" / "val" / "7d06fefd-f7be05a6.jpg", rgb(1, 20))
    save(tmp_path / "labels" / "sem_seg" / "masks" / "val" / "7d06fefd-f7be05a6.png", mask)
    dataset = build_dataset("bdd", tmp_path, "val", train=False)
    assert (dataset.read(0)[1] == mask).all() and dataset.unknown_pixels == 0


def write_mapillary_config(path: Path) -> None:
    """config_v1.2.json as the dataset ships it: a 'labels' list, one entry per label value."""
    entries = [dict(readable=name, name=name.lower().replace(" ", "-"), color=[i, i, i], instances=False,
                    evaluate=True) for i, name in enumerate(MAPILLARY_V12_CLASSES)]
    path.write_text(json.dumps(dict(labels=entries)))


def test_mapillary_config_maps_names_to_train_ids(tmp_path):
    """Mapillary: the table comes from config_v1.2.json by the name rule, in v1.2 and older layouts."""
    raw = all_values(66)
    for root, labels in ((tmp_path / "v12", "training/v1.2/labels"), (tmp_path / "old", "training/labels")):
        save(root / "training" / "images" / "abc.jpg", rgb(2, 66))
        write_mapillary_config(root / "config_v1.2.json")
        save(root / labels / "abc.png", raw, palette=True)
        dataset = build_dataset("mapillary", root, "train", train=False)
        assert (dataset.read(0)[1] == expected(MAPILLARY_IDS, raw)).all()
        assert (label_table("mapillary", root)[0] == expected(MAPILLARY_IDS, np.arange(256))).all()


def test_acdc_conditions_and_subsets(tmp_path):
    """ACDC: each condition reads alone, `acdc` reads all four, labelIds win over shipped trainIds."""
    raw = all_values(34)
    for i, condition in enumerate(("fog", "night", "rain", "snow")):
        stem = f"GOPR03{i}_frame_000001"
        save(tmp_path / "rgb_anon" / condition / "val" / f"GOPR03{i}" / f"{stem}_rgb_anon.png", rgb(2, 34, i))
        save(tmp_path / "gt" / condition / "val" / f"GOPR03{i}" / f"{stem}_gt_labelIds.png", raw)
        save(tmp_path / "gt" / condition / "val" / f"GOPR03{i}" / f"{stem}_gt_labelTrainIds.png", raw * 0 + 7)
        save(tmp_path / "rgb_anon" / condition / "test" / f"GOPR03{i}" / f"{stem}_rgb_anon.png", rgb(2, 34, i))
    night = build_dataset("acdc:night", tmp_path, "val", train=False)
    assert len(night) == 1 and night.name == "acdc:night" and night[0]["name"] == "GOPR031_frame_000001_rgb_anon"
    everything = build_dataset("acdc", tmp_path, "val", train=False)
    assert len(everything) == 4
    assert all((everything.read(i)[1] == expected(CITYSCAPES_IDS, raw)).all() for i in range(4))
    assert not build_dataset("acdc", tmp_path, "test", train=False).has_labels


def test_unknown_label_values_become_ignore_counted_and_warned_once(tmp_path):
    """A raw value the dataset does not define (200) maps to 255, is counted, and warns once per dataset."""
    raw = np.array([[7, 200, 200, 33, 0]], dtype=np.uint8)  # 0 is a real Cityscapes id that maps to 255
    save(tmp_path / "images" / "a.png", rgb(1, 5))
    save(tmp_path / "labels" / "a.png", raw, palette=True)
    dataset = build_dataset("gta", tmp_path, "train", train=False)
    with pytest.warns(UserWarning, match=r"\[200\]") as record:
        label = dataset.read(0)[1]
        dataset.read(0)
    assert len(record) == 1 and dataset.unknown_pixels == 4
    assert label.tolist() == [[0, 255, 255, 18, 255]]


def test_folder_dataset_classes_splits_and_binary(tmp_path):
    """folder: K from the largest label (any image format, nested), or classes.txt; split folders."""
    flat = tmp_path / "flat"
    save(flat / "images" / "a.jpg", rgb(4, 6))
    save(flat / "images" / "sub" / "b.png", rgb(4, 6, 1))
    save(flat / "labels" / "a.png", np.array([[0, 1, 255, 0, 0, 1]] * 4, dtype=np.uint8))
    save(flat / "labels" / "sub" / "b.png", np.zeros((4, 6), dtype=np.uint8))
    binary = build_dataset("folder", flat, "val", train=False)
    assert binary.num_classes == 2 and binary.classes == ("class_0", "class_1") and len(binary) == 2
    assert binary.palette.shape == (2, 3) and len(np.unique(binary.palette, axis=0)) == 2
    assert binary.read(0)[1][0].tolist() == [0, 1, 255, 0, 0, 1]

    split = tmp_path / "split"
    (split / "classes.txt").parent.mkdir()
    (split / "classes.txt").write_text("background\ncrack\n\nrust\n")
    for name in ("train", "val"):
        save(split / "images" / name / "x.png", rgb(4, 6))
        save(split / "labels" / name / "x.png", np.full((4, 6), 1 if name == "val" else 2, dtype=np.uint8))
    train = build_dataset("folder", split, "train", train=False)
    assert train.classes == ("background", "crack", "rust") and (train.read(0)[1] == 2).all()
    assert (build_dataset("folder", split, "val", train=False).read(0)[1] == 1).all()
    with pytest.raises(FileNotFoundError, match="images/test"):
        build_dataset("folder", split, "test", train=False)
    # A label value that classes.txt does not name is refused before anything trains, for every split.
    save(split / "labels" / "val" / "x.png", np.array([[0, 4, 7, 255, 1, 2]] * 4, dtype=np.uint8))
    for name in ("train", "val"):
        with pytest.raises(ValueError, match=r"labels.*\[4, 7\].*classes.txt.*3 classes"):
            build_dataset("folder", split, name, train=name == "train")


def test_combined_sources(tmp_path):
    """gta+synthia joins sources with one root each; differing class lists cannot be joined."""
    save(tmp_path / "gta" / "images" / "1.png", rgb(2, 34))
    save(tmp_path / "gta" / "labels" / "1.png", all_values(34), palette=True)
    save(tmp_path / "syn" / "RGB" / "1.png", rgb(3, 23))
    synthia_ids = np.tile(np.arange(23, dtype=np.uint16), (3, 1))
    save_png16(tmp_path / "syn" / "GT" / "LABELS" / "1.png", np.stack([synthia_ids] * 3, axis=-1))
    joined = build_dataset("gta+synthia", f"{tmp_path / 'gta'}+{tmp_path / 'syn'}", "train", train=False)
    assert len(joined) == 2 and joined.num_classes == 19 and joined.name == "gta+synthia"
    assert joined.read(1)[1].shape == (3, 23) and joined[0]["label"].shape == (2, 34)
    save(tmp_path / "bin" / "images" / "1.png", rgb(2, 2))
    save(tmp_path / "bin" / "labels" / "1.png", np.eye(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="class lists differ"):
        build_dataset("gta+folder", f"{tmp_path / 'gta'}+{tmp_path / 'bin'}", "train", train=False)
    with pytest.raises(ValueError, match="2 folders joined by"):
        build_dataset("gta+synthia", tmp_path, "train", train=False)


def test_bad_input_gives_clear_errors(tmp_path):
    """Missing roots, wrong layouts, unlabelled or corrupt images, empty sets and unknown names fail clearly."""
    with pytest.raises(FileNotFoundError, match="nowhere .*images and labels"):
        build_dataset("gta", tmp_path / "nowhere", "train", train=True)
    (tmp_path / "cs" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train and gtFine/train"):
        build_dataset("cityscapes", tmp_path / "cs", "train", train=True)
    (tmp_path / "gta" / "images").mkdir(parents=True)
    (tmp_path / "gta" / "labels").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_dataset("gta", tmp_path / "gta", "train", train=True)
    for name in ("00001", "00002", "00003"):
        save(tmp_path / "gta" / "images" / f"{name}.png", rgb(40, 40))
    save(tmp_path / "gta" / "labels" / "00001.png", np.zeros((40, 40), np.uint8), palette=True)
    save(tmp_path / "gta" / "labels" / "00003.png", np.zeros((40, 40), np.uint8), palette=True)
    with pytest.raises(FileNotFoundError, match="00002.png"):
        build_dataset("gta", tmp_path / "gta", "train", train=True)
    save(tmp_path / "gta" / "labels" / "00002.png", np.zeros((40, 40), np.uint8), palette=True)
    broken = tmp_path / "gta" / "images" / "00003.png"
    broken.write_bytes(broken.read_bytes()[:200])
    dataset = build_dataset("gta", tmp_path / "gta", "train", train=False)
    with pytest.raises(ValueError, match="00003.png"):
        dataset.read(2)
    with pytest.raises(ValueError, match="cityscapes.*synthetic"):
        build_dataset("kitti", None, "train", train=True)
    with pytest.raises(ValueError, match="fog, night, rain, snow"):
        build_dataset("acdc:dusk", None, "val", train=False)


def test_parse_data_reads_the_command_line_form():
    """parse_data splits NAME[=ROOT] entries, keeps + and :subset, and rejects unknown names; first_source
    names the first training source's dataset."""
    assert parse_data("gta+synthia, cityscapes=/d/cs,acdc:night,folder=my/data") == [
        ("gta+synthia", None), ("cityscapes", "/d/cs"), ("acdc:night", None), ("folder", "my/data")]
    with pytest.raises(ValueError, match="gta, synthia, cityscapes"):
        parse_data("gta,kitti")
    with pytest.raises(ValueError, match="folder=PATH"):
        parse_data("folder")
    with pytest.raises(ValueError, match="no folder"):
        parse_data("gta=")
    assert [data.first_source(t) for t in ("gta+synthia=/a+/b", "synthetic:game", "acdc:night=/x")] == \
        ["gta", "synthetic", "acdc"]


def test_crop_respects_the_category_ratio_rule():
    """choose_crop re-draws until no class covers 75% of a crop, and still returns one when none can."""
    label = np.zeros((512, 1024), dtype=np.uint8)
    label[:, :512] = np.where(np.arange(512)[:, None] % 64 < 32, 1, 2)  # mixed left half, class 0 right
    for seed in range(100):
        top, left = choose_crop(label, 512, np.random.default_rng(seed))
        counts = np.bincount(label[top:top + 512, left:left + 512].ravel())
        assert top == 0 and np.count_nonzero(counts) > 1 and counts.max() < 0.75 * counts.sum()
    top, left = choose_crop(np.zeros((600, 700), np.uint8), 512, np.random.default_rng(0))
    assert 0 <= top <= 88 and 0 <= left <= 188


def test_geometric_augmentation_keeps_image_and_label_aligned():
    """After random resize, crop and flip, every interior pixel still has its label's colour."""
    label = block_label(640, 1024, 48, seed=0)
    image = Image.fromarray(CITYSCAPES_PALETTE[label])
    for seed in range(6):
        crop, crop_label = random_resize_crop_flip(image, label, np.random.default_rng(seed), 512)
        assert crop.shape[:2] == crop_label.shape and max(crop_label.shape) <= 512
        inside = interior(crop_label)
        assert inside.mean() > 0.5
        assert np.abs(crop[inside].astype(int) - CITYSCAPES_PALETTE[crop_label[inside]]).max() <= 1


def test_train_samples_stay_aligned_through_photometric_distortion(tmp_path):
    """Full train samples: one input colour per class gives one output colour per class after distortion."""
    label = block_label(560, 700, 40, seed=1)
    save(tmp_path / "images" / "x.png", CITYSCAPES_PALETTE[label])
    save(tmp_path / "labels" / "x.png", label)
    dataset = build_dataset("folder", tmp_path, "train", train=True)
    for seed in range(4):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.shape == (3, 512, 512) and image.dtype == torch.float32 and target.dtype == torch.int64
        pixels = (image.numpy() * np.float32(STD)[:, None, None] + np.float32(MEAN)[:, None, None]).transpose(1, 2, 0)
        target = target.numpy().astype(np.uint8)
        inside = interior(target) & (target != 255)
        assert inside.sum() > 10000
        for cls in np.unique(target[inside]):
            colours = pixels[inside & (target == cls)]
            assert np.ptp(colours, axis=0).max() < 0.05


def test_train_crops_are_square_and_padding_is_ignore(tmp_path):
    """Crops are always crop x crop; where the resized image is smaller, labels pad with 255 and images with 0."""
    save(tmp_path / "images" / "wide.png", rgb(200, 800))
    save(tmp_path / "labels" / "wide.png", np.random.default_rng(0).integers(0, 3, (200, 800), dtype=np.uint8))
    dataset = build_dataset("folder", tmp_path, "train", train=True)
    padded = 0
    for seed in range(6):
        torch.manual_seed(seed)
        image, label = dataset[0]
        assert image.shape == (3, 512, 512) and label.shape == (512, 512)
        rows = (label == 255).all(dim=1)
        assert ((label == 255) == rows[:, None]).all()  # padding fills whole rows at the bottom
        assert (image[:, rows] == 0).all() and (label[~rows] < 3).all()
        padded += bool(rows.any())
    assert padded > 0


def test_eval_samples_resize_to_the_test_scale(tmp_path):
    """Eval samples: image fitted to the test scale keeping aspect, label and name at full resolution."""
    for city, width in (("a", 200), ("b", 300)):
        stem = f"{city}_000000_000019"
        save(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", rgb(100, width))
        save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", np.full((100, width), 7, np.uint8))
    dataset = build_dataset("cityscapes", tmp_path, "val", train=False)
    first, second = dataset[0], dataset[1]
    assert first["image"].shape == (3, 512, 1024) and second["image"].shape == (3, 341, 1024)
    assert first["label"].shape == (100, 200) and first["label"].dtype == torch.int64 and (first["label"] == 0).all()
    assert first["name"] == "a_000000_000019_leftImg8bit" and second["index"] == 1
    assert torch.equal(to_test_tensor(dataset.read(1)[0], (1024, 512)), second["image"])


def test_synthetic_is_deterministic_and_domains_change_only_appearance():
    """Synthetic: same (seed, split, index) -> same sample; domains share layouts; splits differ."""
    def make(domain, split="train", seed=0):
        return build_dataset(f"synthetic:{domain}", None, split, train=False, image_size=(96, 64), length=3, seed=seed)

    game = make("game")
    image, label = game.read(1)
    assert image.shape == (64, 96, 3) and label.shape == (64, 96) and label.dtype == np.uint8
    assert all((a == b).all() for a, b in zip(make("game").read(1), (image, label)))
    for domain in SYNTHETIC_DOMAINS[1:]:
        other_image, other_label = make(domain).read(1)
        assert (other_label == label).all() and np.abs(other_image.astype(int) - image).mean() > 10
    assert (make("game", "val").read(1)[1] != label).any() and (make("game", seed=1).read(1)[1] != label).any()
    assert game[2]["name"] == "game_000002"
    with pytest.raises(IndexError):
        game.read(3)


def test_synthetic_scenes_cover_most_classes_and_train_at_any_size():
    """Synthetic scenes draw most of the 19 classes; every domain gives train crops at free sizes."""
    scenes = build_dataset("synthetic:photo", None, "val", train=False, image_size=(256, 128), length=12)
    seen = set(np.concatenate([np.unique(scenes.read(i)[1]) for i in range(12)]).tolist())
    assert len(seen) >= 14 and {0, 1, 2, 5, 8, 10, 11, 13} <= seen and 255 not in seen
    everything = build_dataset("synthetic", None, "train", train=True, crop_size=64, image_size=(128, 80), length=2)
    assert len(everything) == 2 * len(SYNTHETIC_DOMAINS) and everything.name == "synthetic"
    for index in range(len(everything)):
        image, label = everything[index]
        assert image.shape == (3, 64, 64) and label.shape == (64, 64)
        assert ((label < 19) | (label == 255)).all() and (label < 19).any()


def test_datasets_pickle_for_worker_processes(tmp_path):
    """Datasets survive pickling, as DataLoader workers started by spawn need."""
    save(tmp_path / "images" / "1.png", rgb(2, 34))
    save(tmp_path / "labels" / "1.png", all_values(34), palette=True)
    for dataset in (build_dataset("gta", tmp_path, "train", train=False),
                    build_dataset("synthetic", None, "val", train=False, image_size=(32, 24), length=2)):
        copy = pickle.loads(pickle.dumps(dataset))
        assert all((a == b).all() for a, b in zip(copy.read(1 % len(copy)), dataset.read(1 % len(dataset))))


def test_hsv_conversions_match_colorsys():
    """rgb_to_hsv and hsv_to_rgb agree with the standard library and invert each other."""
    colours = np.random.default_rng(0).integers(0, 256, (200, 3)).astype(np.float32)
    colours[:3] = [(0, 0, 0), (255, 255, 255), (90, 90, 90)]  # greys have no hue
    hsv = rgb_to_hsv(colours.T).T
    reference = np.array([colorsys.rgb_to_hsv(*(c / 255)) for c in colours])
    assert np.allclose(hsv[:, 1:], reference[:, 1:] * [1, 255], atol=1e-3)
    assert np.allclose(np.cos(2 * np.pi * hsv[:, 0]), np.cos(2 * np.pi * reference[:, 0]), atol=1e-3)
    assert np.allclose(hsv_to_rgb(hsv.T).T, colours, atol=1e-2)


def test_photometric_distortion_keeps_to_mmsegs_ranges():
    """(3, h, w) in [0, 255] in and out. A grey image stays grey (hue and saturation cannot colour
    it) within brightness +-32 then contrast x0.5-1.5; the hue step turns a colour by OpenCV's 180ths."""
    rng = np.random.default_rng(0)
    grey = np.full((3, 4, 4), 100, np.float32)
    outs = [photometric_distortion(grey, rng) for _ in range(200)]
    assert all(o.shape == (3, 4, 4) and np.allclose(o, o[0, 0, 0], atol=1e-3) for o in outs)
    values = [int(o[0, 0, 0]) for o in outs]
    assert min(values) >= (100 - 32) * 0.5 - 1 and max(values) <= (100 + 32) * 1.5 + 1 and len(set(values)) > 20

    class HueOnly:  # draws that skip every step but the hue, turned by `turn` of 180
        def __init__(self, turn):
            self.draws, self.turn = iter([0.9, 0.9, 0.9, 0.9, 0.1]), turn

        def random(self):
            return next(self.draws)

        def integers(self, low, high):
            return self.turn

    red = np.array([200, 60, 40], np.float32).reshape(3, 1, 1)
    before = colorsys.rgb_to_hsv(*(red.ravel() / 255))[0]
    for turn in (18, -18, 9):
        after = colorsys.rgb_to_hsv(*(photometric_distortion(red, HueOnly(turn)).ravel() / 255))[0]
        assert (after - before + 0.5) % 1 - 0.5 == pytest.approx(turn / 180, abs=1e-4)


def test_palettes_and_colorize():
    """19 classes use Cityscapes colours, other counts distinct colours; colorize paints 255 black."""
    assert (palette_for(19) == CITYSCAPES_PALETTE).all() and len(CITYSCAPES_CLASSES) == 19
    for count in (1, 2, 7, 100, 255):
        palette = palette_for(count)
        assert palette.shape == (count, 3) and palette.dtype == np.uint8 and len(np.unique(palette, axis=0)) == count
    label = torch.tensor([[0, 13], [255, 18]])
    assert colorize(label).tolist() == [[[128, 64, 128], [0, 0, 142]], [[0, 0, 0], [119, 11, 32]]]
    assert colorize(np.array([[1, 2]]), palette_for(2))[0, 1].tolist() == [0, 0, 0]


def own_folder(root: Path, *, splits=("train", "val"), values=(0, 1), count=2) -> Path:
    """A folder= dataset: images/SPLIT/*.png and labels/SPLIT/*.png with the given label values in stripes."""
    for split in splits:
        for i in range(count):
            label = np.zeros((32, 48), dtype=np.uint8)
            for j, v in enumerate(values):
                label[:, j * 48 // len(values):] = v
            save(root / "images" / split / f"{i}.png", rgb(32, 48, i))
            save(root / "labels" / split / f"{i}.png", label)
    return root


@pytest.mark.parametrize("values, message", [
    ((0, 255), "labels.*0 and 255.*mask // 255"),
    ((3,), "one class only.*3"),
    ((0, 1, 2, 200), "201 classes.*197 ids never occur.*255"),
])
def test_own_labels_that_cannot_mean_classes_are_explained(tmp_path, values, message):
    """0/255 masks, a single class and a stray value are refused with what they probably mean."""
    with pytest.raises(ValueError, match=message):
        build_dataset("folder", own_folder(tmp_path / "mine", splits=("train",), values=values), "train", train=True)


# ---------------------------------------------------------------------------------------------
# eval.py
# ---------------------------------------------------------------------------------------------

def write_checkpoint(path, num_classes=19):
    """A train.py-style checkpoint of a small random model: its config, trainable state and args."""
    model = small_model(num_classes=num_classes)
    args = dict(data="synthetic:game", window=64, stride=48)
    torch.save(dict(config=model.config, model=model.trainable_state_dict(), args=args), path)


def cityscapes_folder(root, count=3, size=(96, 64)):
    """A tiny Cityscapes val split in the distributed layout, labels in Cityscapes ids."""
    ids = np.array(list(CITYSCAPES_IDS) + [0, 1, 4])  # evaluated ids and some that map to ignore
    rng = np.random.default_rng(0)
    for i in range(count):
        city = "lindau" if i % 2 else "munster"
        stem = f"{city}_{i:06d}_000019"
        save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", rgb(size[1], size[0], seed=i))
        label = ids[rng.integers(0, len(ids), (size[1] // 8, size[0] // 8))].repeat(8, 0).repeat(8, 1)
        save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label.astype(np.uint8))
    return root


def test_eval_iou_agrees_with_a_hand_computation():
    """Per-class IoU, the absent-class rule, the ignore label and accuracy, on a known confusion."""
    # 4 classes. Class 0: 3 right, 1 predicted as 1. Class 1: 2 right. Class 2 is never
    # labelled but predicted twice. Class 3 appears nowhere. Three ignored pixels predict 3.
    label = torch.tensor([0, 0, 0, 0, 1, 1, 255, 255, 255, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 3, 3, 3, 2, 2])
    conf = evaluation.confusion_matrix(pred, label, 4)
    assert conf.dtype == torch.int64 and conf.sum() == 8
    assert conf.tolist() == [[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    scores = evaluation.scores_from_confusion(conf)
    # IoU = TP / (TP + FP + FN): class 0 3/4, class 1 2/(2+1+2), class 2 0/2, class 3 absent.
    assert scores["iou"] == [pytest.approx(3 / 4), pytest.approx(2 / 5), 0.0, None]
    assert scores["miou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    assert scores["accuracy"] == pytest.approx(5 / 8)


class ConstantModel(torch.nn.Module):
    """Stands in for Segmenter.predict: a fixed score map per window, recording the windows it saw."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes, self.batches = num_classes, []
        self.backbone = type("B", (), {"vit": type("V", (), {"patch_size": 4})})()

    def predict(self, images):
        self.batches.append(images.shape[0])
        # Scores that depend on the pixel values, so that windows can be told apart.
        weights = torch.arange(1.0, self.num_classes + 1)[:, None, None]  # (K, 1, 1)
        return images[:, :1].expand(-1, self.num_classes, -1, -1) * weights


def test_eval_sliding_windows_with_stride_equal_to_window_equal_whole_image_crops():
    """Stride = window on an exact multiple: each window's scores are the whole-image pass on that crop."""
    model = small_model().eval()
    image = torch.randn(3, 128, 192)
    slid = evaluation.slide_inference(model, image, window=64, stride=64, batch_size=4)
    assert slid.shape == (5, 128, 192)
    for y in (0, 64):
        for x in (0, 64, 128):
            crop = image[:, y:y + 64, x:x + 64]
            assert torch.allclose(slid[:, y:y + 64, x:x + 64], evaluation.whole_inference(model, crop), atol=1e-5)


@pytest.mark.parametrize("h, w", [(37, 53), (20, 71), (64, 64), (10, 10)])
def test_eval_sliding_windows_cover_every_pixel_and_batch_the_windows(h, w):
    """Odd sizes and images smaller than a window: every pixel is covered, overlaps are averaged."""
    model = ConstantModel()
    image = torch.rand(3, h, w) + 1
    scores = evaluation.slide_inference(model, image, window=16, stride=11, batch_size=3)
    assert scores.shape == (3, h, w)
    # Every window reproduces the pixel value, so the average must too: no hole, no double count.
    assert torch.allclose(scores[0], image[0]) and torch.allclose(scores[2], 3 * image[0])
    n = len(evaluation.window_starts(max(h, 16), 16, 11)) * len(evaluation.window_starts(max(w, 16), 16, 11))
    assert sum(model.batches) == n and max(model.batches) <= 3 and len(model.batches) == -(-n // 3)


def test_eval_labelids_are_what_the_benchmark_server_reads(tmp_path, capsys):
    """--format labelids: full-resolution PNGs that map back through the Cityscapes table to the prediction."""
    root = cityscapes_folder(tmp_path / "cityscapes", count=1)
    write_checkpoint(tmp_path / "last.pt")
    out = tmp_path / "preds"
    results = evaluation.main(evaluation.parse_args([
        "--ckpt", str(tmp_path / "last.pt"), "--data", f"cityscapes={root}", "--save-dir", str(out),
        "--format", "labelids", "--workers", "0", "--json", str(tmp_path / "r.json"), "--whole"]))
    model, _ = evaluation.load_checkpoint(tmp_path / "last.pt")
    dataset = build_dataset("cityscapes", root, "val", train=False)
    lut = label_table("cityscapes")[0]
    for i in range(len(dataset)):
        sample = dataset[i]
        png = np.asarray(Image.open(out / "cityscapes" / f"{sample['name']}.png"))
        assert png.shape == sample["label"].shape == (64, 96)
        expected = evaluation.predict_labels(model, sample["image"], (64, 96), slide=False).numpy()
        assert np.array_equal(lut[png], expected)
    saved = json.loads((tmp_path / "r.json").read_text())["datasets"]["cityscapes"]
    assert saved["images"] == 1 and saved["miou"] == pytest.approx(results["cityscapes"]["miou"])
    assert np.array(saved["confusion"]).sum() == sum((s["label"] != 255).sum().item() for s in dataset)
    assert "mIoU" in capsys.readouterr().out


def test_eval_every_train_id_maps_to_a_raw_id_and_back(tmp_path):
    """A labelids PNG holding all 19 classes reads back, through each dataset's table, as the prediction."""
    pred = np.arange(19, dtype=np.uint8).repeat(3).reshape(3, 19)
    for name in ("cityscapes", "gta", "bdd", "acdc"):
        lut = label_table(name)[0]
        evaluation.save_prediction(tmp_path / f"{name}.png", pred, "labelids", rgb=None, classes=CITYSCAPES_CLASSES,
                                   palette=None, label=None, to_raw=evaluation.train_to_raw_ids(lut))
        assert np.array_equal(lut[np.asarray(Image.open(tmp_path / f"{name}.png"))], pred)


def test_eval_color_overlay_and_own_images(tmp_path):
    """Colour PNGs: overlay beside the label; --image predicts a folder and skips a non-image with a warning."""
    write_checkpoint(tmp_path / "last.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(rgb(40, 60)).save(photos / "street.jpg")
    Image.fromarray(rgb(30, 30, seed=2)).save(tmp_path / "single.png")
    (photos / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipping .*notes.txt"):
        evaluation.main(evaluation.parse_args(["--ckpt", str(tmp_path / "last.pt"), "--image", str(photos),
                                               str(tmp_path / "single.png"), "--save-dir", str(tmp_path / "out")]))
    # The image's own size, with the legend strip below it.
    width, height = Image.open(tmp_path / "out" / "street.png").size
    assert width == 60 and height > 40
    assert Image.open(tmp_path / "out" / "single.png").size[0] == 30
    assert not (tmp_path / "out" / "notes.png").exists()
    label = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    picture = evaluation.overlay(np.zeros((2, 2, 3), np.uint8), label, CITYSCAPES_PALETTE, label)
    assert picture.shape == (2, 4, 3)
    assert np.array_equal(picture[:, 2:], colorize(label, CITYSCAPES_PALETTE))
    assert np.array_equal(picture[0, 0], CITYSCAPES_PALETTE[0] // 2)


def test_eval_test_split_without_labels_writes_predictions_only(tmp_path, capsys):
    """Cityscapes test publishes no labels: predictions are written, nothing is scored, and
    asking for scores alone is an error."""
    root = tmp_path / "cityscapes"
    save(root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png", rgb(256, 512))
    write_checkpoint(tmp_path / "last.pt")
    common = ["--ckpt", str(tmp_path / "last.pt"), "--data", f"cityscapes={root}", "--split", "test", "--whole",
              "--workers", "0"]
    with pytest.raises(ValueError, match="cityscapes test .*no labels.*--save-dir"):
        evaluation.main(evaluation.parse_args(common))
    assert evaluation.main(evaluation.parse_args(common + ["--save-dir", str(tmp_path / "out")])) == {}
    assert "no labels: 1 predictions written" in capsys.readouterr().out
    # Written at the image's own size: the test scale (1024 x 512) changes it for the model only.
    width, height = Image.open(tmp_path / "out" / "cityscapes" / "berlin_000000_000019_leftImg8bit.png").size
    assert width == 512 and height > 256  # the legend strip goes below


def test_eval_distributed_counts_every_image_once(tmp_path):
    """2 gloo processes on 5 images give the same confusion matrix as 1 process."""
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CITYSCAPES_CLASSES))
    for i in range(5):
        save(root / "images" / f"{i}.jpg", rgb(48, 80, seed=i))
        save(root / "labels" / f"{i}.png", np.random.default_rng(i).integers(0, 19, (48, 80)).astype(np.uint8))
    write_checkpoint(tmp_path / "last.pt")
    argv = ["--ckpt", str(tmp_path / "last.pt"), "--data", f"folder={root}", "--workers", "0", "--json"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           "eval.py", *argv, str(tmp_path / "two.json")]
    subprocess.run(cmd, check=True, cwd=Path(__file__).parent, capture_output=True, timeout=120,
                   env=os.environ | {"OMP_NUM_THREADS": "1"})
    evaluation.main(evaluation.parse_args(argv + [str(tmp_path / "one.json")]))
    one, two = (json.loads((tmp_path / f).read_text())["datasets"][str(root)] for f in ("one.json", "two.json"))
    assert one["images"] == two["images"] == 5
    assert one["confusion"] == two["confusion"] and np.array(one["confusion"]).sum() > 0


def test_eval_errors_are_clear(tmp_path):
    """Missing, truncated or foreign checkpoints; unknown datasets; wrong layouts; unwritable --save-dir."""
    ckpt = tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt .*train.py checkpoint"):
        evaluation.load_checkpoint(tmp_path / "missing.pt")
    write_checkpoint(ckpt)
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.pt .*train.py checkpoint"):
        evaluation.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a train.py checkpoint.*found \\['weights'\\]"):
        evaluation.load_checkpoint(tmp_path / "other.pth")
    state = torch.load(ckpt, weights_only=True)
    state["config"]["num_queries"] = 9
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt .*another model"):
        evaluation.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        evaluation.main(evaluation.parse_args(["--ckpt", str(ckpt), "--data", "kitti"]))
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val"):
        evaluation.main(evaluation.parse_args(["--ckpt", str(ckpt), "--data", f"cityscapes={tmp_path}"]))
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="--save-dir .*file/preds .*writable"):
        evaluation.main(evaluation.parse_args(["--ckpt", str(ckpt), "--image", str(tmp_path),
                                               "--save-dir", str(tmp_path / "file" / "preds")]))


def test_own_images_keep_their_folders_and_never_overwrite_anything(tmp_path):
    """Sub-folders are kept, same-stem files get distinct names, and --save-dir on the inputs is refused."""
    photos = tmp_path / "photos"
    for name in ("a.jpg", "a.png", "sub/a.jpg"):
        save(photos / name, rgb(32, 48))
    pairs = evaluation.image_outputs([str(photos)], tmp_path / "preds")
    assert [str(o.relative_to(tmp_path / "preds")) for _, o in pairs] == ["a.jpg.png", "a.png.png", "sub/a.png"]
    before = (photos / "a.png").read_bytes()
    with pytest.raises(ValueError, match="would overwrite .*a.png"):
        evaluation.image_outputs([str(photos / "a.png")], photos)
    flat = tmp_path / "flat"
    save(flat / "x.png", rgb(32, 48))
    with pytest.raises(ValueError, match="--save-dir .*flat would overwrite"):
        evaluation.image_outputs([str(flat)], flat)
    assert (photos / "a.png").read_bytes() == before


def test_eval_mistakes_are_named(tmp_path, capsys):
    """--format labelids without label ids, --format with --image, a bogus split, a file that is no checkpoint."""
    ckpt = tmp_path / "last.pt"
    write_checkpoint(ckpt)
    with pytest.raises(ValueError, match="--format labelids.*synthetic:fog"):
        evaluation.main(evaluation.parse_args(["--ckpt", str(ckpt), "--data", "synthetic:fog", "--format",
                                               "labelids", "--save-dir", str(tmp_path / "p"), "--workers", "0"]))
    for argv, message in ((["--image", "x.jpg", "--save-dir", "p", "--format", "labelids"],
                           "--format labelids"),
                          (["--data", "synthetic:fog", "--split", "bogus"], "invalid choice: 'bogus'")):
        with pytest.raises(SystemExit):
            evaluation.parse_args(["--ckpt", str(ckpt), *argv])
        assert message in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("my notes")
    with pytest.raises(ValueError, match="notes.pt .*train.py checkpoint.*not a PyTorch checkpoint file"):
        evaluation.load_checkpoint(tmp_path / "notes.pt")


def test_prediction_pictures_carry_a_legend(tmp_path):
    """The colour overlay gets a strip naming the classes shown, with their colours."""
    pred = np.zeros((40, 60), dtype=np.int64)
    pred[:, 30:] = 13
    evaluation.save_prediction(tmp_path / "p.png", pred, "color", rgb=rgb(40, 60), classes=CITYSCAPES_CLASSES,
                               palette=CITYSCAPES_PALETTE, label=None, to_raw=None)
    picture = np.asarray(Image.open(tmp_path / "p.png"))
    assert picture.shape[0] > 40 and picture.shape[1] == 60
    strip = picture[40:].reshape(-1, 3)
    for k in (0, 13):  # road and car swatches are drawn in their palette colours
        assert (strip == CITYSCAPES_PALETTE[k]).all(1).sum() >= 50


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------

TINY_RUN = ["--data", "synthetic:game", "--val", "synthetic:photo", "--crop-size", "32", "--batch-size", "2",
            "--num-queries", "4", "--head-dim", "32", "--num-points", "64", "--log-every", "1", "--workers", "0",
            "--window", "64", "--stride", "48"]


def logged_losses(run):
    return {r["iter"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}


def test_train_resume_after_sigterm_is_exact(tmp_path):
    """SIGTERM mid-run writes last.pt; resuming gives the parameters and losses of an uninterrupted run."""
    straight = tmp_path / "straight"
    train.main(train.parse_args(TINY_RUN + ["--iters", "12", "--out", str(straight)]))
    interrupted = tmp_path / "interrupted"
    # With a loader worker, and the signal sent to the whole process group, as a cluster does.
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_RUN, "--workers", "1", "--iters", "12",
                             "--out", str(interrupted)], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = interrupted / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output  # not 0: `train.py && eval.py` must not go on
    stopped = torch.load(interrupted / "last.pt", weights_only=True)["iteration"]
    assert 3 <= stopped < 12 and f"stopped by signal {int(signal.SIGTERM)} at iteration {stopped}" in output
    train.main(train.parse_args(TINY_RUN + ["--iters", "12", "--out", str(interrupted)]))
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 12 and a["model"].keys() == b["model"].keys()
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])
    assert logged_losses(straight) == pytest.approx(logged_losses(interrupted), rel=1e-5)
    assert len(logged_losses(interrupted)) == 12
    model, _ = evaluation.load_checkpoint(straight / "last.pt")  # what eval.py reads from a run
    assert all(torch.equal(model.trainable_state_dict()[k], v) for k, v in a["model"].items())


def fake_rand(*size, **kwargs):
    """Deterministic stand-in for torch.rand: every row (first dimension) the same, so that each mask
    gets the same 'random' points wherever it stands in the batch, on any rank."""
    size = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
    values = torch.arange(math.prod(size[1:]), dtype=torch.float64).mul(0.6180339887).remainder(1.0)
    values = values.to(kwargs.get("dtype") or torch.float32).reshape(size[1:]).expand(size).clone()
    return values.to(kwargs.get("device", "cpu"))


def ddp_steps(rank, world_size, port, out):
    """One process of the DDP test: for each method, two steps on its share of a fixed batch of 4;
    saves the gradients and parameters."""
    os.environ |= dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.rand = fake_rand  # the loss samples points at random; make them the same in both set-ups
    for method in rein.METHODS:
        torch.manual_seed(0)
        torch.save(ddp_record(method, rank, world_size), f"{out}_{method}_{rank}.pt")
    dist.destroy_process_group()


def ddp_record(method, rank, world_size):
    """Two steps of `method` on this rank's share of a fixed batch of 4: gradients and parameters."""
    model = small_model(method)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 5, (4, 64, 64), generator=generator)
    labels[1, :32] = 255  # images with different numbers of classes weigh differently
    labels[3] = 2
    share = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    record = {}
    for step in range(2):  # a second step is where DDP would complain about unused parameters
        train.train_step(ddp, optimizer, images[share], labels[share], torch.autocast("cpu", enabled=False))
        record[f"grads{step}"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        record[f"params{step}"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return record


def test_train_ddp_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    """2 gloo processes with 2 crops each: the same gradients and parameters as 1 process with 4
    (this one), for each method; no DDP error."""
    torch.multiprocessing.spawn(ddp_steps, args=(2, free_port(), tmp_path / "two"), nprocs=2)
    monkeypatch.setattr(torch, "rand", fake_rand)
    # One thread, as each rank has. A matrix product split over 2 threads rounds differently,
    # and with torch 2.4.1 that flipped a near-tie of the untrained queries' matching.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in rein.METHODS:
            torch.manual_seed(0)
            one = ddp_record(method, rank=0, world_size=1)
            two, other_rank = (torch.load(tmp_path / f"two_{method}_{rank}.pt", weights_only=True) for rank in (0, 1))
            for key in ("grads0", "params0", "grads1", "params1"):
                # Float noise only: 1e-4 of the largest gradient (some gradients are zero in theory,
                # such as those of attention key biases, and hold only noise); SGD turns the same
                # bound on the gradients into one on the parameters.
                scale = max(v.abs().max() for v in one["grads" + key[-1]].values())
                tolerance = 1e-4 * scale * (1 if key.startswith("grads") else 0.1)  # SGD's lr is 0.1
                for name, value in one[key].items():
                    assert (two[key][name] - value).abs().max() <= tolerance, (key, name)
                    assert torch.equal(two[key][name], other_rank[key][name]), (key, name)
    finally:
        torch.set_num_threads(threads)


@cuda
def test_cuda_training_under_torchrun_then_evaluation(tmp_path):
    """The GPU path end to end: torchrun with NCCL, bf16 autocast, fused AdamW, pinned memory and a
    loader worker for three steps, then eval.py on the checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port",
                           str(free_port()), "train.py", *TINY_RUN, "--workers", "1", "--iters", "3", "--out",
                           str(out)], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = logged_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    results = evaluation.main(evaluation.parse_args(["--ckpt", str(out / "last.pt"), "--data", "synthetic:night",
                                                     "--workers", "1"]))
    assert 0 <= results["synthetic:night"]["miou"] <= 1


def test_train_that_fails_with_a_loader_worker_exits(tmp_path):
    """An unexpected error mid-run (a CUDA one, say) with a loader worker ends train.py with status 1
    and the traceback, instead of an exit that waits forever for the worker, which ignores SIGTERM."""
    runner = ("import runpy, sys\nimport rein\n"
              "def fail(*args): raise RuntimeError('simulated CUDA error')\n"
              "rein.Segmenter.forward = fail\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", runner, "train.py", *TINY_RUN, "--workers", "1", "--iters", "4",
                           "--out", str(tmp_path / "run")], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "RuntimeError: simulated CUDA error" in proc.stderr, proc.stderr


def test_train_sampler_splits_the_global_batch_across_ranks():
    """Ranks' shares of each step are the single process's batch, with the same augmentation seeds."""
    dataset = list(range(23))
    single = list(train.TrainSampler(dataset, seed=3, rank=0, world_size=1))
    ranks = [list(train.TrainSampler(dataset, seed=3, rank=r, world_size=2)) for r in range(2)]
    for step in range(5):  # global batch 4 = 2 per rank
        assert sorted(single[4 * step:4 * step + 4]) == sorted(ranks[0][2 * step:2 * step + 2]
                                                               + ranks[1][2 * step:2 * step + 2])
    sampler = train.TrainSampler(dataset, seed=3, rank=0, world_size=1)
    sampler.start = 8
    assert list(sampler) == single[8:]
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in single[8:]]


def test_train_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A NaN loss at iteration 3 stops before the update; last.pt still holds iteration 2."""
    forward, calls = rein.Segmenter.forward, []

    def poisoned(self, images, labels):
        calls.append(1)
        losses = forward(self, images, labels)
        return losses | {"loss": losses["loss"] * float("nan")} if len(calls) == 3 else losses

    monkeypatch.setattr(rein.Segmenter, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="nan at iteration 3"):
        train.main(train.parse_args(TINY_RUN + ["--iters", "5", "--save-every", "1", "--out", str(tmp_path)]))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_train_bad_input_fails_before_training(tmp_path):
    """Unwritable output, a missing dataset, weights for another backbone, a batch that does not divide."""
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="--out .*file/run .*writable"):
        train.main(train.parse_args(TINY_RUN + ["--out", str(tmp_path / "file" / "run")]))
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        train.main(train.parse_args(TINY_RUN + ["--data", f"cityscapes={tmp_path}", "--out", str(tmp_path / "r")]))
    torch.save(vit.build_vit("vits14").state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="vits14, not vitb14"):
        train.main(train.parse_args(TINY_RUN + ["--backbone", "vitb14", "--weights", str(tmp_path / "small.pth"),
                                                "--out", str(tmp_path / "r")]))
    assert not (tmp_path / "r" / "last.pt").exists()
    with pytest.raises(ValueError, match="--batch-size 3 .*2 processes"):
        train.train(train.parse_args(TINY_RUN + ["--batch-size", "3"]), torch.device("cpu"), rank=0, world_size=2)


def test_train_and_eval_on_dinov3(tmp_path):
    """Two iterations of Rein on a DINOv3-S-sized backbone read from an official-layout file, then eval.py."""
    torch.manual_seed(0)
    torch.save(vit.build_vit("dinov3_vits16", 16).state_dict(), tmp_path / "dinov3.pth")
    out = tmp_path / "run"
    train.main(train.parse_args(TINY_RUN + ["--backbone", "dinov3_vits16", "--weights", str(tmp_path / "dinov3.pth"),
                                            "--iters", "2", "--eval-every", "2", "--out", str(out)]))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["backbone"] == "dinov3_vits16" and ckpt["iteration"] == 2
    assert "backbone.rein.learnable_tokens_a" in ckpt["model"]
    assert not any(k.startswith("backbone.vit.") for k in ckpt["model"])
    results = evaluation.main(evaluation.parse_args(["--ckpt", str(out / "last.pt"), "--data", "synthetic:night",
                                                     "--workers", "0"]))
    assert 0 <= results["synthetic:night"]["miou"] <= 1
    with pytest.raises(FileNotFoundError, match="on request"):
        train.main(train.parse_args(["--data", "synthetic:game", "--preset", "paper", "--backbone", "dinov3_vitl16",
                                     "--bench", "1"]))


def test_train_bench_reports_time_and_memory(capsys):
    """--bench times steps on random inputs and reports ms/step, images/s and peak memory."""
    train.main(train.parse_args(TINY_RUN + ["--bench", "2"]))
    out = capsys.readouterr().out
    assert re.search(r"bench: rein vits14 patch 16, 32x32, batch 2, cpu, fp32: [\d.]+ ms/step, [\d.]+ images/s, "
                     r"peak [\d.]+ GiB process peak RSS", out)


def own_run(data_arg: str, out: Path, *extra: str) -> list[str]:
    return ["--data", data_arg, "--preset", "demo", "--crop-size", "32", "--batch-size", "2", "--iters", "2",
            "--num-queries", "4", "--head-dim", "32", "--num-points", "64", "--workers", "0", "--window", "32",
            "--stride", "32", "--out", str(out), *extra]


def test_own_folder_trains_with_its_own_val_split_or_says_there_is_none(tmp_path, capsys):
    """folder=PATH without --val: validation on PATH's val/ split, or a statement that there is none."""
    with_val = own_folder(tmp_path / "mine")
    results = train.main(train.parse_args(own_run(f"folder={with_val}", tmp_path / "r1")))
    assert list(results) == [str(with_val)] and results[str(with_val)]["images"] == 2
    flat = tmp_path / "flat"
    for i in range(2):
        save(flat / "images" / f"{i}.png", rgb(32, 48, i))
        save(flat / "labels" / f"{i}.png", np.array([[0] * 24 + [1] * 24] * 32, dtype=np.uint8))
    assert train.main(train.parse_args(own_run(f"folder={flat}", tmp_path / "r2"))) == {}
    assert re.search(f"{flat}.* no images/val", capsys.readouterr().out)


def test_absolute_dataset_paths_never_receive_predictions(tmp_path):
    """--val folder=/abs/path and eval.py --data folder=/abs/path --save-dir D write under OUT/val and D only."""
    mine = own_folder(tmp_path / "mine")
    before = sorted(p for p in mine.rglob("*"))
    out = tmp_path / "run"
    train.main(train.parse_args(own_run(f"folder={mine}", out, "--val", f"folder={mine.resolve()}")))
    assert list((out / "val" / "iter_000002").glob("*/0.png"))
    evaluation.main(evaluation.parse_args(["--ckpt", str(out / "last.pt"), "--data", f"folder={mine.resolve()}",
                                           "--save-dir", str(tmp_path / "preds"), "--workers", "0"]))
    assert list((tmp_path / "preds").glob("*/0.png"))
    assert sorted(p for p in mine.rglob("*")) == before


def test_resume_with_other_options_is_refused_and_the_record_kept(tmp_path, capsys):
    """--lr, --iters, --data, --batch-size cannot change on resume; args.json stays the run's; a finished
    run says so; an allowed change (workers) resumes."""
    out = tmp_path / "run"
    train.main(train.parse_args(TINY_RUN + ["--iters", "2", "--out", str(out)]))
    record = (out / "args.json").read_text()
    for change in (["--lr", "0.5"], ["--iters", "3"], ["--batch-size", "4"], ["--data", "synthetic:fog"]):
        with pytest.raises(ValueError, match=f"{change[0]} .* \\(run\\) vs {change[1]} \\(now\\)"):
            train.main(train.parse_args(TINY_RUN + ["--iters", "2", "--out", str(out)] + change))
    assert (out / "args.json").read_text() == record
    capsys.readouterr()
    assert train.main(train.parse_args(TINY_RUN + ["--iters", "2", "--workers", "0", "--out", str(out)])) == {}
    assert re.search("finished run of 2 iterations.*nothing to do", capsys.readouterr().out)


@pytest.mark.parametrize("option, value, expected", [
    ("--iters", "0", "at least 1"), ("--iters", "-5", "at least 1"), ("--eval-every", "0", "at least 1"),
    ("--log-every", "0", "at least 1"), ("--window", "100", "multiple of the patch size 16"),
    ("--head-layers", "2", "at least 3"), ("--method", "lora8", "invalid choice"), ("--lr", "-1", "positive"),
    ("--lr", "0", "positive"), ("--weight-decay", "-0.5", "at least 0"), ("--augment", "cutmix", "invalid choice"),
    ("--pasta-k", "0", "--pasta-k and --advstyle-lr positive"), ("--advstyle-lr", "-1", "positive; got 3.0, 0.25"),
    ("--pasta-beta", "-0.1", "--pasta-beta must be at least 0"),
])
def test_train_numeric_mistakes_are_named_before_anything_is_created(tmp_path, capsys, option, value, expected):
    """Each bad option exits with its name, its value and what was expected; no run folder is left behind."""
    with pytest.raises(SystemExit):
        train.main(train.parse_args(TINY_RUN + ["--out", str(tmp_path / "run"), option, value]))
    error = capsys.readouterr().err
    assert option in error and value in error and expected in error and not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--crop-size", "40", "40x40 .*patch size 16"), ("--workers", "-1", "num_workers .*non-negative"),
])
def test_train_mistakes_that_pytorch_names_itself(tmp_path, option, value, message):
    """The ViT's and the DataLoader's own checks say what is wrong before a step is taken."""
    with pytest.raises(ValueError, match=message):
        train.main(train.parse_args(TINY_RUN + ["--out", str(tmp_path / "run"), option, value]))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_help_shows_both_presets(capsys):
    """--help shows the values each preset fills in, never '(default: None)'."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(demo: 96; paper: 512)" in text and "(demo: 250; paper: 40000)" in text
    assert "demo for synthetic data, paper for any other --data" in text


def test_failed_start_leaves_no_folder(tmp_path):
    """A dataset that is not there fails before the run folder exists."""
    with pytest.raises(FileNotFoundError):
        train.main(train.parse_args(TINY_RUN + ["--data", f"cityscapes={tmp_path / 'no'}", "--preset", "demo",
                                                "--out", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Faults and odd inputs: never hang, never overwrite, never keep a poisoned run
# ---------------------------------------------------------------------------------------------

def run_script(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A command line of the project in its own process, as a user runs it; a hang fails at `timeout`."""
    return subprocess.run([sys.executable, *argv], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.parametrize("fault", ["truncated", "sizes", "empty"])
def test_a_bad_sample_in_a_loader_worker_ends_train_and_eval_with_its_message(tmp_path, fault):
    """A truncated image, an image and label of different sizes, an empty file: read by a loader
    worker (the default), the run ends within seconds with the file named and status 1, in
    train.py and in eval.py alike. Before, both printed the error and then waited forever."""
    root = own_folder(tmp_path / "mine", count=3)
    bad = root / "images" / "train" / "1.png"
    if fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    elif fault == "sizes":
        save(bad, rgb(30, 48))
    else:
        bad.write_bytes(b"")
    shutil.copy(bad, root / "images" / "val" / "1.png")
    start = time.time()
    proc = run_script("train.py", *own_run(f"folder={root}", tmp_path / "run", "--workers", "2", "--iters", "20"))
    assert proc.returncode == 1 and re.search(r"error: .*images/train/1.png", proc.stderr), proc.stderr[-2000:]
    write_checkpoint(tmp_path / "last.pt", num_classes=2)
    proc = run_script("eval.py", "--ckpt", str(tmp_path / "last.pt"), "--data", f"folder={root}", "--workers", "2")
    assert proc.returncode == 1 and re.search(r"error: .*images/val/1.png", proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and time.time() - start < 50


def test_long_inference_shows_progress_and_a_whole_pass_that_cannot_fit_is_refused(monkeypatch, capsys):
    """--whole on a 6000 x 4000 picture: refused before any work, with the size and the memory it needs.
    A pass that fits over a large picture, and the windows of one, move a progress bar of their own."""
    model = small_model(num_classes=19).eval()
    monkeypatch.setattr(evaluation, "available_memory", lambda device: 2**30)
    with pytest.raises(ValueError, match=r"--whole.*6000x4000.*4.8 GiB.*1.0 GiB"):
        evaluation.predict_labels(model, torch.zeros(3, 4000, 6000), (4000, 6000), slide=False)
    monkeypatch.undo()
    assert evaluation.available_memory(torch.device("cpu")) > 0
    evaluation.predict_labels(model, torch.zeros(3, 1040, 1040), (1040, 1040), slide=False)
    assert re.search(r"one pass over 1040x1040: +[1-9]\d*%.*/13", capsys.readouterr().err)
    evaluation.predict_labels(model, torch.zeros(3, 96, 1600), (96, 1600), window=32, stride=32, batch_size=2)
    assert re.search(r"windows of 1600x96: +[1-9]\d*%.*/75", capsys.readouterr().err)


def test_save_dir_never_replaces_a_file_it_did_not_write(tmp_path):
    """--save-dir pointing at a folder with files of the same names (here: the labels) is refused, for
    --image and for --data, and nothing is written; a new folder works."""
    write_checkpoint(tmp_path / "last.pt", num_classes=2)
    root = own_folder(tmp_path / "mine", splits=("val",), count=2)
    labels = root / "labels" / "val"
    before = {p: p.read_bytes() for p in labels.iterdir()}
    for argv in (["--image", str(root / "images" / "val")], ["--data", f"folder={root}"]):
        target = labels if argv[0] == "--image" else tmp_path / "preds"
        if argv[0] == "--data":  # a previous evaluation's predictions are someone's files too
            (target / evaluation.folder_name(str(root))).mkdir(parents=True)
            (target / evaluation.folder_name(str(root)) / "0.png").write_bytes(b"mine")
        with pytest.raises(FileExistsError, match=r"--save-dir .*already holds [12] of the 2 files.*0.png.*nothing"):
            evaluation.main(evaluation.parse_args(["--ckpt", str(tmp_path / "last.pt"), *argv, "--save-dir",
                                                   str(target), "--workers", "0"]))
    assert {p: p.read_bytes() for p in labels.iterdir()} == before
    assert (tmp_path / "preds" / evaluation.folder_name(str(root)) / "0.png").read_bytes() == b"mine"
    evaluation.main(evaluation.parse_args(["--ckpt", str(tmp_path / "last.pt"), "--image", str(root / "images"),
                                           "--save-dir", str(tmp_path / "new")]))
    assert sorted(p.name for p in (tmp_path / "new" / "val").iterdir()) == ["0.png", "1.png"]


def test_a_diverging_run_stops_with_its_message_and_never_saves_non_finite_weights(tmp_path):
    """--lr 5 makes the model diverge: the run stops with the iteration, what last.pt keeps and what to
    try, before any matching error; every checkpoint it wrote is finite. Weights that are not finite
    are never written over a good last.pt."""
    out = tmp_path / "run"
    proc = run_script("train.py", *TINY_RUN, "--lr", "5", "--iters", "30", "--save-every", "1", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(r"error: the loss is nan at iteration (\d+).*last.pt keeps iteration \d+.*lower --lr",
                     proc.stderr), proc.stderr[-2000:]
    assert "non-finite" not in proc.stderr and "Traceback" not in proc.stderr
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    model = small_model()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
    args = train.parse_args(TINY_RUN + ["--out", str(out)])
    with pytest.raises(FloatingPointError, match=r"not finite after iteration 7.*keeps iteration"):
        train.save_checkpoint(args, dict(iteration=7), model, None, None, rank=0, world_size=1)
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == ckpt["iteration"]


def test_a_full_disk_keeps_the_previous_checkpoint_and_removes_the_partial_one(tmp_path, monkeypatch):
    """torch.save failing half-way (as on a full disk) leaves last.pt as it was and no last.pt.tmp, and
    the error says that the disk is full."""
    out = tmp_path / "run"
    train.main(train.parse_args(TINY_RUN + ["--iters", "2", "--out", str(out)]))
    before = (out / "last.pt").read_bytes()

    def full_disk(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3008")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = train.parse_args(TINY_RUN + ["--out", str(out)])
    with pytest.raises(OSError, match=r"could not write .*last.pt \(the disk is full\).*previous one is kept"):
        train.save_checkpoint(args, dict(iteration=3), model, optimizer, schedule, rank=0, world_size=1)
    assert (out / "last.pt").read_bytes() == before and not (out / "last.pt.tmp").exists()


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    """While a run holds OUT/run.lock, another run on OUT stops before reading or writing anything there."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("process 4242 on gpu-node-7\n")
        lock.flush()
        with pytest.raises(FileExistsError, match=r"--out .*run belongs to a run that is still going \(process 4242"):
            train.main(train.parse_args(TINY_RUN + ["--iters", "2", "--out", str(out)]))
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    train.main(train.parse_args(TINY_RUN + ["--iters", "2", "--out", str(out)]))  # the lock went with its holder
    assert (out / "last.pt").exists()


def test_a_stop_signal_during_validation_ends_it_with_last_pt_written(tmp_path, monkeypatch):
    """SIGTERM while validation runs (torchrun gives 30 s): the validation stops at the next image, last.pt
    holds the iteration, no partial validation is logged, and the same command resumes."""
    out = tmp_path / "run"
    predict, calls = evaluation.predict_labels, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as torchrun sends it, in the middle of the validation
        return predict(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict_labels", signalled)
    with pytest.raises(train.Interrupted, match="signal 15 at iteration 3"):
        train.main(train.parse_args(TINY_RUN + ["--iters", "6", "--eval-every", "3", "--save-every", "100",
                                                "--out", str(out)]))
    assert len(calls) == 1 and torch.load(out / "last.pt", weights_only=True)["iteration"] == 3
    assert not any("val" in json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    monkeypatch.setattr(evaluation, "predict_labels", predict)
    results = train.main(train.parse_args(TINY_RUN + ["--iters", "6", "--eval-every", "3", "--save-every", "100",
                                                      "--out", str(out)]))
    assert results["synthetic:photo"]["images"] == 20


def test_checkpoints_carry_their_class_names_and_backbone_weights(tmp_path):
    """A run on a folder with classes.txt names its classes in --image legends; evaluating with other
    backbone weights than the run's is refused, naming the fingerprints."""
    root = own_folder(tmp_path / "mine", values=(0, 1, 2))
    (root / "classes.txt").write_text("soil\nweed\ncrop\n")
    torch.manual_seed(0)
    weights = tmp_path / "vits14.pth"
    torch.save(vit.build_vit("vits14").state_dict(), weights)
    out = tmp_path / "run"
    train.main(train.parse_args(own_run(f"folder={root}", out, "--weights", str(weights))))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["classes"] == ["soil", "weed", "crop"] and len(ckpt["palette"]) == 3
    model, loaded = evaluation.load_checkpoint(out / "last.pt")
    assert evaluation.class_names(loaded, 3)[0] == ("soil", "weed", "crop")
    evaluation.main(evaluation.parse_args(["--ckpt", str(out / "last.pt"), "--image", str(root / "images" / "val"),
                                           "--save-dir", str(tmp_path / "preds")]))
    legend = np.asarray(Image.open(tmp_path / "preds" / "0.png"))[32:]  # the strip under the picture
    assert any((legend == colour).all(-1).sum() >= 50 for colour in ckpt["palette"])
    torch.save(vit.build_vit("vits14").state_dict(), weights)  # the same file name, other weights
    with pytest.raises(ValueError, match=r"last.pt .*other backbone weights than .*vits14.pth.*fingerprints.*--weights"):
        evaluation.load_checkpoint(out / "last.pt")
    with pytest.raises(ValueError, match=r"cannot resume .*other backbone weights"):
        train.main(train.parse_args(own_run(f"folder={root}", out, "--weights", str(weights))))


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """16-bit grey PNGs keep their shades (not all white); an EXIF-rotated JPEG turns as its tag says, in
    training and prediction alike; a label of the unturned size is refused naming EXIF."""
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)).save(grey)
    shown = np.asarray(data.read_rgb(grey))
    assert shown.shape == (48, 64, 3) and shown.min() == 0 and shown.max() == 255 and 120 < shown.mean() < 135
    picture = np.zeros((32, 48, 3), np.uint8)
    picture[:, :24] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: a viewer rotates the stored pixels by 90 degrees clockwise
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    Image.fromarray(picture).save(root / "images" / "0.jpg", exif=exif)
    turned = np.asarray(data.read_rgb(root / "images" / "0.jpg"))
    assert turned.shape == (48, 32, 3) and turned[:24].mean() > 200 and turned[24:].mean() < 50
    save(root / "labels" / "0.png", np.array([[0] * 32] * 24 + [[1] * 32] * 24, dtype=np.uint8))  # drawn as shown
    image, label = build_dataset("folder", root, "train", train=True, crop_size=32)[0]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    save(root / "labels" / "0.png", np.zeros((32, 48), dtype=np.uint8) + np.array([0, 1] * 24, np.uint8))
    with pytest.raises(ValueError, match=r"label .*0.png is 48x32 but image .*0.jpg is 32x48.*EXIF"):
        build_dataset("folder", root, "train", train=True, crop_size=32)[0]


def test_image_prediction_with_no_picture_is_an_error(tmp_path):
    """--image on a folder without a picture stops with an error instead of 'wrote 0 predictions'."""
    write_checkpoint(tmp_path / "last.pt")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no picture here")
    with pytest.warns(UserWarning, match="notes.txt"), pytest.raises(ValueError, match=r"--image .*docs.*no image"):
        evaluation.main(evaluation.parse_args(["--ckpt", str(tmp_path / "last.pt"), "--image",
                                               str(tmp_path / "docs"), "--save-dir", str(tmp_path / "out")]))


def test_without_encoder_layers_every_trainable_parameter_gets_a_gradient():
    """--encoder-layers 0 (README's simplest head): DDP needs a gradient for every trainable parameter,
    which the pixel decoder's level embedding, used by the encoder only, did not get."""
    model = small_model(encoder_layers=0)
    model.loss(torch.randn(2, 3, 64, 64), synthetic_labels(3).repeat(2, 1, 1))["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_help_explains_every_option_and_folder_runs_are_named_after_their_folder(capsys, tmp_path):
    """Every option of train.py --help says what it is; the progress bar's figures are explained; a
    folder= run goes to runs/ and the folder's own name."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--crop-size", "--patch-size", "--lr", "--num-queries", "--head-dim", "--seed", "--weight-decay"):
        described = re.search(re.escape(option) + r" [A-Z_]+ (.*?) \((default|demo): ", text)
        assert described and len(described[1]) > 10, option
    assert re.search(r"loss, the training loss summed over the head's predictions.*img_s, training images", text)
    own = own_folder(tmp_path / "crops", splits=("train",))
    assert train.parse_args(["--data", f"folder={own}"]).out == Path("runs") / "crops"


# ---------------------------------------------------------------------------------------------
# Benchmark, not a test: python test_rein.py
# ---------------------------------------------------------------------------------------------

def benchmark(repeats: int = 5) -> None:
    """Deformable attention's sampling in the paper's pixel decoder (512 x 512 crops, batch 2), forward
    and backward, on the GPU if there is one; then the matching."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def best_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1000 * min(times)

    B, M, d, P, shapes = 2, 8, 32, 4, [(16, 16), (32, 32), (64, 64)]
    Lq = sum(h * w for h, w in shapes)
    value = torch.randn(B, Lq, M, d, device=device, requires_grad=True)
    locations = torch.rand(B, Lq, M, len(shapes), P, 2, device=device, requires_grad=True)
    weights = torch.rand(B, Lq, M, len(shapes), P, device=device, requires_grad=True)
    print(f"deformable attention, {Lq} queries x {M} heads x {len(shapes)} levels x {P} points, batch {B}, "
          f"{device}, {torch.get_num_threads()} threads, best of {repeats}:")
    forward = best_ms(lambda: sample_levels(value, shapes, locations, weights))
    both = best_ms(lambda: sample_levels(value, shapes, locations, weights).square().sum().backward())
    print(f"  sample_levels (grid_sample)   forward {forward:8.1f} ms, backward {both - forward:8.1f} ms")

    B, L, Q, K = 4, 10, 100, 19
    criterion = SetCriterion(num_classes=K).to(device)
    predictions = [(torch.randn(B, Q, K + 1, device=device), torch.randn(B, Q, 256, device=device))
                   for _ in range(L)]
    features = torch.randn(B, 256, 128, 128, device=device)
    blocks = torch.stack([torch.randperm(256).remainder(K).view(16, 16) for _ in range(B)])  # all K in each
    labels = blocks.repeat_interleave(32, 1).repeat_interleave(32, 2).to(device)  # (B, 512, 512)
    targets = make_targets(labels, K)
    costs = [np.random.default_rng(b).random((L, Q, K)) for b in range(B)]
    assign = best_ms(lambda: [linear_sum_assignment_batch(cost) for cost in costs])
    match = best_ms(lambda: criterion.matcher(predictions, features, targets))
    print(f"matching, {B} images x {L} predictions of {Q} queries x {K} targets, {criterion.num_points} points:")
    print(f"  assignment only               {assign:8.2f} ms")
    print(f"  whole matching (costs + LSA)  {match:8.2f} ms")


if __name__ == "__main__":
    benchmark()
