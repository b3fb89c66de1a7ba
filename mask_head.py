"""The paper's Mask2Former head, written plainly: queries that each predict a class and a mask.

Mask2Former (Cheng et al., CVPR 2022) as the Rein paper builds it from mmdet 3.x: a pixel
decoder of multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021), a
masked-attention transformer decoder, Hungarian matching and a set loss on sampled points.
Parameters carry mmdet's names where that stays readable; `OFFICIAL_NAMES` maps the rest,
so that the official release checkpoints load one to one.

    head = MaskHead(in_dim=1024, num_classes=19, rein_queries=True)
    predictions, features = head(maps, queries)  # 10 x (class (B, Q, K+1), mask embedding (B, Q, C)), (B, C, 4h, 4w)
    losses = SetCriterion(num_classes=19)(predictions, features, labels)  # labels (B, H, W), 255 = ignore
    class_logits, embedding = predictions[-1]
    scores = semantic_inference(class_logits, mask_logits(embedding, features))  # (B, K, 4h, 4w)

A query's mask is its embedding times the per-pixel mask features, a linear map, so it
commutes with resizing and with sampling at points: the attention masks and the loss
never build the full-resolution masks of all queries (Mask2Former builds 10 x 100 of them
per image), only the matched ones, with the same results.

Reading order: positions, the pixel decoder, the transformer decoder, the head, the targets
and the matcher (`HungarianMatcher`: the cost, then `linear_sum_assignment_batch`, written in
numpy), the set loss (`SetCriterion`), semantic inference.
"""

import math
import re

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

NUM_LEVELS = 3  # the decoder attends to strides 32, 16, 8 in turn
IGNORE = 255
Predictions = list[tuple[Tensor, Tensor]]  # per prediction: class logits (B, Q, K+1), mask embeddings (B, Q, C)
Targets = list[tuple[Tensor, Tensor]]  # per image: classes (T,), binary masks (T, H, W)


# Our parameter names -> mmdet's (the official release stores them under decode_head.), first
# match wins; names that match nothing are mmdet's already.
OFFICIAL_NAMES = (
    (r"^query_proj\.", "querys2feat."),
    (r"^post_norm\.", "transformer_decoder.post_norm."),
    (r"^layers\.(\d+)\.(cross|self)_attn\.in_proj\.", r"transformer_decoder.layers.\1.\2_attn.attn.in_proj_"),
    (r"^layers\.(\d+)\.(cross|self)_attn\.out_proj\.", r"transformer_decoder.layers.\1.\2_attn.attn.out_proj."),
    (r"^layers\.(\d+)\.cross_norm\.", r"transformer_decoder.layers.\1.norms.0."),
    (r"^layers\.(\d+)\.self_norm\.", r"transformer_decoder.layers.\1.norms.1."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"transformer_decoder.layers.\1.norms.2."),
    (r"^layers\.(\d+)\.ffn\.0\.", r"transformer_decoder.layers.\1.ffn.layers.0.0."),
    (r"^layers\.(\d+)\.ffn\.2\.", r"transformer_decoder.layers.\1.ffn.layers.1."),
    (r"^pixel_decoder\.encoder\.(\d+)\.attn_norm\.", r"pixel_decoder.encoder.layers.\1.norms.0."),
    (r"^pixel_decoder\.encoder\.(\d+)\.ffn_norm\.", r"pixel_decoder.encoder.layers.\1.norms.1."),
    (r"^pixel_decoder\.encoder\.(\d+)\.ffn\.0\.", r"pixel_decoder.encoder.layers.\1.ffn.layers.0.0."),
    (r"^pixel_decoder\.encoder\.(\d+)\.ffn\.2\.", r"pixel_decoder.encoder.layers.\1.ffn.layers.1."),
    (r"^pixel_decoder\.encoder\.(\d+)\.", r"pixel_decoder.encoder.layers.\1."),
    (r"^pixel_decoder\.lateral_conv\.", "pixel_decoder.lateral_convs.0."),
    (r"^pixel_decoder\.output_conv\.", "pixel_decoder.output_convs.0."),
)


def official_name(name: str) -> str:
    """A head parameter's name (e.g. 'layers.0.ffn.2.weight') -> mmdet's ('transformer_decoder.layers.0.ffn.layers.1.weight')."""
    for pattern, official in OFFICIAL_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, official, name)
    return name


# --------------------------------------------------------------------------------------- positions


def sine_position(h: int, w: int, dim: int, device: torch.device) -> Tensor:
    """mmdet's SinePositionalEncoding(num_feats=dim/2, normalize=True) of an h x w grid: (h*w, dim).

    Rows and columns count from 1 and are divided by (size + 1e-6), then scaled to 2 pi;
    frequency k is shared by channels 2k and 2k+1, which hold its sin and its cos. The y
    half comes first, then the x half.
    """
    feats = dim // 2
    k = torch.arange(feats, dtype=torch.float32, device=device)
    periods = 10000 ** (2 * (k // 2) / feats)  # (feats,)

    def encode(n: int) -> Tensor:  # (n, feats)
        angle = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1e-6) * (2 * math.pi)
        angle = angle[:, None] / periods
        return torch.stack([angle[:, 0::2].sin(), angle[:, 1::2].cos()], dim=2).flatten(1)  # sin, cos interleaved

    y = encode(h)[:, None].expand(h, w, feats)
    x = encode(w)[None].expand(h, w, feats)
    return torch.cat([y, x], dim=2).flatten(0, 1)  # (h, w, dim) -> (h*w, dim)


def pixel_centres(h: int, w: int, device: torch.device) -> Tensor:
    """(h*w, 2): the (x, y) centre of every cell of an h x w grid, row by row, in [0, 1]."""
    y, x = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h,
                          (torch.arange(w, device=device) + 0.5) / w, indexing="ij")
    return torch.stack([x, y], dim=-1).flatten(0, 1)


# ----------------------------------------------------------------------------------- pixel decoder


class ConvGN(nn.Module):
    """Conv2d, an optional bilinear resize, GroupNorm: mmcv's ConvModule, named `conv` and `gn`.

    The ViT gives one resolution and the decoder wants four. A 1x1 convolution commutes with
    bilinear resizing (both are linear, and bilinear weights sum to one), so projecting from
    the ViT's width to 256 channels before resizing gives the official result with a quarter
    (or less) of the memory.
    """

    def __init__(self, *, in_dim: int, dim: int, kernel_size: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel_size, padding=kernel_size // 2, bias=bias)
        # 32 groups as in Mask2Former; narrow test heads keep at least 2 channels per group,
        # so that a 1 x 1 map still has more than one value to normalise.
        self.gn = nn.GroupNorm(math.gcd(32, dim // 2), dim)

    def forward(self, x: Tensor, scale: float = 1) -> Tensor:
        x = self.conv(x)
        if scale != 1:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return self.gn(x)


def sample_levels(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """The core of deformable attention: weighted bilinear samples of every level, summed.

    value (B, Lv, M, d): M heads' values of the L levels, flattened row by row, one level
    after another; shapes: (h, w) of each level; locations (B, Lq, M, L, P, 2): (x, y) in
    [0, 1] of P points per level; weights (B, Lq, M, L, P). Returns (B, Lq, M*d).

    One grid_sample per level (bilinear, align_corners=False, zeros outside the map), as
    mmcv's PyTorch path computes it, on every device.
    """
    B, _, M, d = value.shape
    _, Lq, _, L, P, _ = locations.shape
    levels = value.split([h * w for h, w in shapes], dim=1)  # L x (B, h*w, M, d)
    # Per level, the points as rows and the queries along them: the sum over the P points then
    # adds whole rows, which the CPU does about twice as fast as sums of P neighbours.
    grids = locations.permute(3, 0, 2, 4, 1, 5).flatten(1, 2) * 2 - 1  # (L, B*M, P, Lq, 2) in [-1, 1]
    attention = weights.permute(3, 0, 2, 4, 1).flatten(1, 2)[:, :, None]  # (L, B*M, 1, P, Lq)
    out = 0
    for level, (h, w) in enumerate(shapes):
        maps = levels[level].permute(0, 2, 3, 1).reshape(B * M, d, h, w)  # (B*M, d, h, w)
        sampled = F.grid_sample(maps, grids[level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B*M, d, P, Lq)
        out = out + (sampled * attention[level]).sum(2)  # (B*M, d, Lq)
    return out.view(B, M * d, Lq).transpose(1, 2)  # (B, Lq, M*d)


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention with mmcv's parameter names and layout.

    Every query looks at `num_points` places per head and level, at learned offsets from
    its reference point, and mixes what it finds with learned, softmaxed weights.
    """

    def __init__(self, *, dim: int, num_heads: int = 8, num_levels: int = NUM_LEVELS, num_points: int = 4):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        # Deformable DETR's start: head m looks along the direction 2 pi m / M, point p at
        # p + 1 pixels, with equal weights.
        angle = torch.arange(num_heads) * (2 * math.pi / num_heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        direction = direction / direction.abs().amax(-1, keepdim=True)  # (M, 2), on the unit square
        distance = torch.arange(1, num_points + 1)[:, None]  # (P, 1)
        with torch.no_grad():
            self.sampling_offsets.weight.zero_()
            self.sampling_offsets.bias.copy_((direction[:, None, None] * distance).expand(
                num_heads, num_levels, num_points, 2).flatten())
            self.attention_weights.weight.zero_()
            self.attention_weights.bias.zero_()
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: Tensor, value: Tensor, reference: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query (B, Lq, C), positions included; value (B, Lv, C), every level flattened;
        reference (Lq, 2) (x, y) in [0, 1]; shapes (h, w) per level -> (B, Lq, C)."""
        B, Lq, C = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(B, -1, M, C // M)  # (B, Lv, M, d)
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)  # (x, y) in pixels of each level
        weights = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        size = torch.tensor([(w, h) for h, w in shapes], device=query.device)  # (L, 2)
        # The same reference point on every level; an offset of one pixel is 1/w (or 1/h) there.
        locations = reference[:, None, None, None, :] + offsets / size[:, None]  # (B, Lq, M, L, P, 2)
        return self.output_proj(sample_levels(value, shapes, locations, weights))


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then an FFN; each added and post-normed."""

    def __init__(self, *, dim: int, ffn_dim: int):
        super().__init__()
        self.self_attn = DeformableAttention(dim=dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """x (B, L, C), pos (L, C), reference (L, 2) -> (B, L, C). Positions go to the query only."""
        x = self.attn_norm(x + self.self_attn(x + pos, x, reference, shapes))
        return self.ffn_norm(x + self.ffn(x))


class PixelDecoder(nn.Module):
    """mmdet's MSDeformAttnPixelDecoder as the Rein config builds it.

    The three deepest maps, projected to `dim` channels at strides 32, 16 and 8, go through
    `encoder_layers` deformable-attention layers together; the shallowest map becomes the
    stride-4 mask features, with the stride-8 result added. With `encoder_layers=0` the
    projected maps go straight to the transformer decoder.
    """

    def __init__(self, *, in_dim: int, dim: int, encoder_layers: int):
        super().__init__()
        self.input_convs = nn.ModuleList(ConvGN(in_dim=in_dim, dim=dim) for _ in range(NUM_LEVELS))
        # Positions serve the encoder only: without it, a level embedding would never train (and DDP
        # refuses parameters that get no gradient).
        self.level_encoding = nn.Embedding(NUM_LEVELS, dim) if encoder_layers else None
        self.encoder = nn.ModuleList(EncoderLayer(dim=dim, ffn_dim=4 * dim) for _ in range(encoder_layers))
        self.lateral_conv = ConvGN(in_dim=in_dim, dim=dim, bias=False)
        self.output_conv = ConvGN(in_dim=dim, dim=dim, kernel_size=3, bias=False)
        self.mask_feature = nn.Conv2d(dim, dim, 1)

    def forward(self, maps: list[Tensor], scales: tuple[float, ...] = (4, 2, 1, 0.5)) -> tuple[list[Tensor], Tensor]:
        """maps: 4 x (B, in_dim, h_i, w_i), the backbone's features from shallow to deep; `scales`:
        the factors that bring them to strides 4, 8, 16, 32 (a ViT's maps all sit at its patch
        grid; the official CLIP's FPN has resized them already: all 1).

        Returns the memories (B, dim, h_l, w_l) at strides 32, 16, 8 (h/2, h, 2h for patch 16)
        and the mask features (B, dim, 4h, 4w).
        """
        # A ViT's maps are channels-last views of its tokens; on CPU, convolutions run their
        # backward about twice as fast on row-major maps.
        maps = [m.contiguous() for m in maps]
        # The deepest map becomes stride 32, the next ones 16 and 8, as the official backbone
        # resizes them (x0.5, x1, x2), but projected first (see ConvGN).
        levels = [conv(m, scale) for conv, m, scale in zip(self.input_convs, maps[:0:-1], scales[:0:-1])]
        B, C = levels[0].shape[:2]
        shapes = [tuple(level.shape[-2:]) for level in levels]
        x = torch.cat([level.flatten(2) for level in levels], dim=2).transpose(1, 2)  # (B, sum h*w, C)
        if self.encoder:
            pos = torch.cat([sine_position(h, w, C, x.device) + self.level_encoding.weight[i]
                             for i, (h, w) in enumerate(shapes)])  # (sum h*w, C)
            reference = torch.cat([pixel_centres(h, w, x.device) for h, w in shapes])  # (sum h*w, 2)
        for layer in self.encoder:
            x = layer(x, pos, reference, shapes)
        memories = [m.transpose(1, 2).reshape(B, C, h, w)  # (B, h*w, C) -> (B, C, h, w)
                    for m, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes)]
        fine = self.lateral_conv(maps[0], scale=scales[0])  # stride 4
        fine = fine + F.interpolate(memories[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return memories, self.mask_feature(F.relu(self.output_conv(fine)))


# ----------------------------------------------------------------------------- transformer decoder


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters: q, k and v projections
    stacked in one `in_proj`, then `out_proj`."""

    def __init__(self, *, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attend: Tensor | None = None) -> Tensor:
        """query (B, Lq, C), key and value (B, Lk, C), attend (B, Lq, Lk) bool -> (B, Lq, C)."""
        B, Lq, C = query.shape
        weights, biases = self.in_proj.weight.chunk(3), self.in_proj.bias.chunk(3)
        q, k, v = (F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, L, C/heads)
                   for x, w, b in zip((query, key, value), weights, biases))
        mask = None if attend is None else attend[:, None]  # (B, 1, Lq, Lk), the same for every head
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Lq, C/heads)
        return self.out_proj(x.transpose(1, 2).reshape(B, Lq, C))


class DecoderLayer(nn.Module):
    """Masked cross-attention, self-attention, FFN; each added and post-normed.

    Positions are added to queries and keys, never to values.
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.cross_attn = Attention(dim=dim, num_heads=num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim=dim, num_heads=num_heads)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                attend: Tensor) -> Tensor:
        """query, query_pos (B, Q, C); memory (B, h*w, C); memory_pos (h*w, C); attend (B, Q, h*w)."""
        query = self.cross_norm(query + self.cross_attn(query + query_pos, memory + memory_pos, memory, attend))
        q = query + query_pos
        query = self.self_norm(query + self.self_attn(q, q, query))
        return self.ffn_norm(query + self.ffn(query))


def mask_logits(embedding: Tensor, features: Tensor) -> Tensor:
    """Masks of the queries: embedding (B, Q, C) times features (B, C, h, w) -> (B, Q, h, w)."""
    return torch.einsum("bqc,bchw->bqhw", embedding, features)


def attention_mask(embedding: Tensor, features: Tensor) -> Tensor:
    """Where each query may attend next: its mask, at the size of `features`, has sigmoid >= 0.5.

    embedding (B, Q, C), features (B, C, h, w): the mask features resized to the level ->
    (B, Q, h*w) bool. A query whose mask is empty attends everywhere: it has nothing to
    focus on, and an all-False row would make attention NaN.
    """
    attend = mask_logits(embedding, features).flatten(2).sigmoid() >= 0.5  # (B, Q, h*w)
    return attend | ~attend.any(-1, keepdim=True)


# ---------------------------------------------------------------------------------------- the head


class MaskHead(nn.Module):
    """Pixel decoder + masked-attention decoder predicting a class and a mask per query.

    With `rein_queries`, the query positions are Q (num_queries, dim) from Rein (rein.py), and
    the query features `query_proj(Q)` (a Linear; the official configs' `replace_query_feat`)
    or, without `replace_query_feat`, a learned embedding (the official SAM and CLIP
    releases); otherwise both are learned embeddings, as in plain Mask2Former. The paper: `encoder_layers=6`,
    `decoder_layers=9`, `dim=256`, 8 heads, FFNs of 4 * dim in the encoder, 8 * dim in the decoder.
    """

    def __init__(self, *, in_dim: int, num_classes: int = 19, num_queries: int = 100, dim: int = 256,
                 decoder_layers: int = 9, encoder_layers: int = 6, num_heads: int = 8, rein_queries: bool = False,
                 replace_query_feat: bool = True):
        super().__init__()
        if decoder_layers < NUM_LEVELS:
            raise ValueError(f"MaskHead: decoder_layers must be >= {NUM_LEVELS} (one pass over every level, "
                             f"or a level would get no gradient); got {decoder_layers}")
        self.rein_queries = rein_queries
        self.pixel_decoder = PixelDecoder(in_dim=in_dim, dim=dim, encoder_layers=encoder_layers)
        self.level_embed = nn.Embedding(NUM_LEVELS, dim)
        if rein_queries and replace_query_feat:
            self.query_proj = nn.Linear(dim, dim)
        else:
            self.query_feat = nn.Embedding(num_queries, dim)
        if not rein_queries:
            self.query_embed = nn.Embedding(num_queries, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim=dim, num_heads=num_heads, ffn_dim=8 * dim)
                                    for _ in range(decoder_layers))
        self.post_norm = nn.LayerNorm(dim)
        self.cls_embed = nn.Linear(dim, num_classes + 1)  # the last class is "no object"
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                        nn.Linear(dim, dim))
        # mmdet's initialisation: Xavier for the transformers' matrices (deformable attention
        # keeps its own), Kaiming-uniform (a = 1) for the convolutions after the encoder.
        for layer in [*self.layers, *(layer.ffn for layer in self.pixel_decoder.encoder)]:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for conv in (self.pixel_decoder.lateral_conv.conv, self.pixel_decoder.output_conv.conv,
                     self.pixel_decoder.mask_feature):
            nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.zeros_(self.pixel_decoder.mask_feature.bias)

    def forward(self, maps: list[Tensor], queries: Tensor | None = None, scales: tuple[float, ...] = (4, 2, 1, 0.5)
                ) -> tuple[Predictions, Tensor]:
        """maps: 4 x (B, in_dim, h, w) from the backbone, brought to strides 4 to 32 by `scales` (see
        PixelDecoder); queries: (num_queries, dim) from Rein, or None.

        Returns decoder_layers + 1 pairs (class logits (B, Q, K+1), mask embeddings (B, Q, dim)),
        after the query init and after each layer (the last is the final prediction), and the
        mask features (B, dim, 4h, 4w): `mask_logits` of the two gives the masks.
        """
        memories, mask_features = self.pixel_decoder(maps, scales)
        # CPU shrinks channels-last maps tens of times faster than row-major ones.
        small = mask_features.detach().contiguous(memory_format=torch.channels_last)
        keys, key_pos, level_features = [], [], []
        for level, memory in enumerate(memories):
            _, C, h, w = memory.shape
            keys.append(memory.flatten(2).transpose(1, 2) + self.level_embed.weight[level])  # (B, h*w, C)
            key_pos.append(sine_position(h, w, C, memory.device))  # (h*w, C)
            # Mask2Former resizes every mask to the level for the attention mask; resizing the
            # features instead is the same (masks are linear in them) and far smaller.
            level_features.append(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))
        B = mask_features.shape[0]
        query_pos = (queries if self.rein_queries else self.query_embed.weight)[None].expand(B, -1, -1)  # (B, Q, dim)
        if hasattr(self, "query_proj"):
            query = self.query_proj(query_pos)
        else:
            query = self.query_feat.weight[None].expand(B, -1, -1)
        predictions = [self.predict(query)]
        for i, layer in enumerate(self.layers):
            level = i % NUM_LEVELS
            attend = attention_mask(predictions[-1][1].detach(), level_features[level])
            query = layer(query, query_pos, keys[level], key_pos[level], attend)
            predictions.append(self.predict(query))
        return predictions, mask_features

    def predict(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """query (B, Q, dim) -> class logits (B, Q, K+1) and mask embeddings (B, Q, dim)."""
        x = self.post_norm(query)
        return self.cls_embed(x), self.mask_embed(x)


# ------------------------------------------------------------------------ targets and matching


def make_targets(labels: Tensor, num_classes: int) -> Targets:
    """labels (B, H, W) -> per image (classes (T,), masks (T, H, W) float), one mask per class present."""
    bad = (labels < 0) | ((labels >= num_classes) & (labels != IGNORE))
    if bad.any():
        raise ValueError(f"labels must hold class ids 0..{num_classes - 1} or {IGNORE} (ignore); "
                         f"found {labels[bad].unique().tolist()}")
    B = len(labels)
    # Counting beats unique(), which sorts every pixel. One count for the whole batch, image b's
    # classes in bins b * (K + 1) + class; ignored pixels go to each image's last bin, no mask's.
    bins = labels.clamp(max=num_classes) + torch.arange(B, device=labels.device)[:, None, None] * (num_classes + 1)
    counts = torch.bincount(bins.flatten(), minlength=B * (num_classes + 1)).view(B, num_classes + 1)
    present = counts[:, :num_classes].nonzero()  # (sum T, 2): (image, class), image by image
    per_image = present[:, 1].split(torch.bincount(present[:, 0], minlength=B).tolist())
    return [(classes, (label == classes[:, None, None]).float()) for label, classes in zip(labels, per_image)]


def matched_pairs(matches: list[Tensor], device: torch.device) -> list[list[tuple[Tensor, Tensor]]]:
    """The matcher's host output (per image (L, T), the query of each target or -1) -> per
    prediction, per image, the matched pairs' target and query indices, (n,) and (n,) on
    `device`: all of them in one copy, which the host does not wait for."""
    pieces = []
    for i in range(matches[0].shape[0]):
        for match in matches:
            matched = (match[i] >= 0).nonzero()[:, 0]  # on the host: no wait
            pieces += [matched, match[i, matched]]
    flat = torch.cat(pieces)
    flat = (flat.pin_memory() if device.type == "cuda" else flat).to(device, non_blocking=True)
    flat = flat.split([len(piece) for piece in pieces])
    B = len(matches)
    return [[(flat[2 * (i * B + b)], flat[2 * (i * B + b) + 1]) for b in range(B)] for i in range(len(flat) // (2 * B))]


def point_sample(masks: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of masks (N, h, w) at points (N, P, 2), (x, y) in [-1, 1] -> (N, P)."""
    return F.grid_sample(masks[:, None], points[:, :, None], align_corners=False)[:, 0, :, 0]


class HungarianMatcher:
    """mmdet's Mask2Former matching: each target (a class present in the image) gets the query
    whose prediction costs least, one query per target, for every prediction of the head.

    cost = class_weight * (-class probability) + mask_weight * mask BCE + dice_weight * dice,
    the mask terms on `num_points` random points shared by queries and targets.
    """

    def __init__(self, *, num_points: int = 12544, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0):
        self.num_points = num_points
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight

    @torch.no_grad()
    def __call__(self, predictions: Predictions, features: Tensor, targets: Targets) -> list[Tensor]:
        """Per image int64 (L, T) on the CPU: the query matched to each target in each of the L
        predictions, -1 if none (more targets than queries). Every cost matrix of the batch goes
        to the CPU in one copy (the host waits for the device once), each image's L are solved
        in one batch."""
        L, Q = len(predictions), predictions[0][0].shape[1]
        # An image without a labelled pixel has no target, and no cost to compute.
        costs = [self.cost([(c[b], e[b]) for c, e in predictions], features[b], classes, masks) if len(classes)
                 else features.new_empty(L, Q, 0) for b, (classes, masks) in enumerate(targets)]  # (L, Q, T)
        flat = torch.cat([cost.flatten() for cost in costs]).cpu().numpy()
        matches = []
        for cost, host in zip(costs, np.split(flat, np.cumsum([cost.numel() for cost in costs])[:-1])):
            query = np.full(cost.shape[::2], -1)
            if cost.numel():
                rows, cols = linear_sum_assignment_batch(host.reshape(cost.shape))  # queries (L, n), targets (L, n)
                np.put_along_axis(query, cols, rows, 1)
            matches.append(torch.from_numpy(query))
        return matches

    def cost(self, predictions: list[tuple[Tensor, Tensor]], features: Tensor, classes: Tensor,
             masks: Tensor) -> Tensor:
        """One image: L x (class logits (Q, K+1), mask embeddings (Q, C)), features (C, h, w), its
        targets' classes (T,) and masks (T, H, W) -> the cost (L, Q, T) of every query for every target."""
        L, P = len(predictions), self.num_points
        h, w = features.shape[-2:]
        prob = torch.stack([c for c, _ in predictions]).softmax(-1)  # (L, Q, K+1)
        embedding = torch.stack([e for _, e in predictions])  # (L, Q, C)
        points = torch.rand(L, P, 2, device=features.device) * 2 - 1  # one set per prediction
        # The masks, no gradient, as one product (h*w, L*Q) seen as (L, Q, h, w): channels
        # last, which grid_sample reads about three times faster on CPU than row-major.
        pred = (features.flatten(1).T @ embedding.flatten(0, 1).T).view(h, w, L, -1).permute(2, 3, 0, 1)
        pred = F.grid_sample(pred, points[:, None], align_corners=False)[:, :, 0]  # (L, Q, P)
        target = F.grid_sample(masks[None].contiguous(memory_format=torch.channels_last), points[None],
                               align_corners=False)[0].transpose(0, 1)  # (L, T, P), read channels last too
        # BCE(x, t) = softplus(x) - x * t, so its mean over the points is one contraction.
        cost_mask = (F.softplus(pred).sum(-1, keepdim=True) - torch.einsum("lqp,ltp->lqt", pred, target)) / P
        sig = pred.sigmoid()
        overlap = torch.einsum("lqp,ltp->lqt", sig, target)
        cost_dice = 1 - (2 * overlap + 1) / (sig.sum(-1)[:, :, None] + target.sum(-1)[:, None, :] + 1)
        return -self.class_weight * prob[:, :, classes] + self.mask_weight * cost_mask + self.dice_weight * cost_dice


def linear_sum_assignment_batch(costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignments of N rectangular (R, C) matrices at once, like scipy's
    linear_sum_assignment on each: (N, R, C) -> rows, cols (N, min(R, C)), rows ascending,
    such that costs[n, rows[n], cols[n]].sum() is minimal over all assignments."""
    costs = np.asarray(costs, dtype=np.float64)
    if not np.isfinite(costs).all():  # a NaN would never be beaten, and the search would not end
        raise ValueError("linear_sum_assignment_batch: the cost matrix has non-finite values (NaN or inf)")
    N, R, C = costs.shape
    if R == 0 or C == 0:  # e.g. an image with no labelled pixel
        return np.zeros((N, 0), np.int64), np.zeros((N, 0), np.int64)
    if R > C:  # augment along the short side: one augmenting path per row
        cols, rows = linear_sum_assignment_batch(costs.transpose(0, 2, 1))
        order = np.argsort(rows, axis=1)
        return np.take_along_axis(rows, order, 1), np.take_along_axis(cols, order, 1)
    return np.tile(np.arange(R), (N, 1)), _shortest_augmenting_paths(costs)


def _shortest_augmenting_paths(cost: np.ndarray) -> np.ndarray:
    """Jonker-Volgenant style solver, vectorised over problems and columns.

    cost (N, R, C) with R <= C -> col4row (N, R). It keeps column duals v <= 0, zero on free
    columns, and gives each assigned row the dual u[i] = cost[i, j] - v[j] of its column j,
    so that every reduced cost cost[i, k] - u[i] - v[k] of an assigned row is >= 0. Once
    every row is assigned, these duals prove the assignment optimal. A free row joins along
    the shortest path (Dijkstra on reduced costs) to a free column, flipping the assignments
    on the way, and v is lowered on the columns the search reached so the invariant holds.
    """
    N, R, C = cost.shape
    problem = np.arange(N)
    # Greedy start: a row takes its cheapest column unless another row took it first.
    # With v = 0 this already satisfies the invariant above.
    best = cost.argmin(2)  # (N, R)
    row4col = np.full((N, C), -1)
    row4col[problem[:, None], best] = np.arange(R)
    col4row = np.where(row4col[problem[:, None], best] == np.arange(R), best, -1)  # (N, R)
    v = np.zeros((N, C))
    while (free_rows := col4row < 0).any():
        todo = free_rows.any(1)  # (N,) problems with a row left
        new_row = free_rows.argmax(1)  # (N,) their first free row
        shortest = np.full((N, C), np.inf)  # path length from new_row to each column
        path = np.full((N, C), -1)  # the row before each column on its shortest path
        cols_done, taken = np.zeros((N, C), bool), row4col >= 0
        distance, u_row = np.zeros(N), np.zeros(N)  # path length to, and dual of, the current row
        row, sink = new_row.copy(), np.full(N, -1)
        searching = todo.copy()  # problems that reached a free column wait for the others
        while searching.any():
            reduced = (distance - u_row)[:, None] + cost[problem, row] - v  # (N, C)
            closer = searching[:, None] & ~cols_done & (reduced < shortest)
            np.copyto(shortest, reduced, where=closer)
            np.copyto(path, row[:, None], where=closer)
            open_cols = np.where(cols_done, np.inf, shortest)
            lowest = open_cols.min(1)
            # The nearest column not yet reached; among equals a free one, which ends the path.
            col = np.argmax(2 * (open_cols == lowest[:, None]) - taken, axis=1)
            distance = np.where(searching, lowest, distance)
            cols_done[problem[searching], col[searching]] = True
            next_row = row4col[problem, col]
            sink = np.where(searching & (next_row < 0), col, sink)
            searching &= next_row >= 0
            row = np.where(searching, next_row, row)  # go on from the row that holds col
            u_row = cost[problem, row, col] - v[problem, col]
        v -= np.where(cols_done, distance[:, None] - shortest, 0.0)
        col, flipping = sink, todo
        while flipping.any():  # walk each path back to new_row, flipping assignments
            b = problem[flipping]
            r = path[b, col[b]]
            row4col[b, col[b]] = r
            col[b], col4row[b, r] = col4row[b, r], col[b]
            flipping[b[r == new_row[b]]] = False
    return col4row


# ------------------------------------------------------------------------------------ the set loss


class SetCriterion(nn.Module):
    """Mask2Former's set loss, with mmdet's weights.

    For each of the head's predictions (deep supervision), after `HungarianMatcher`: a class
    loss over all queries ("no object" for the unmatched ones), and BCE and dice losses of
    the matched masks on `num_points` points, never on full-resolution masks.
    """

    def __init__(self, *, num_classes: int, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_ratio: float = 0.75, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1):
        super().__init__()
        self.num_classes, self.num_points = num_classes, num_points
        self.oversample_ratio, self.importance_ratio = oversample_ratio, importance_ratio
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.matcher = HungarianMatcher(num_points=num_points, class_weight=class_weight, mask_weight=mask_weight,
                                        dice_weight=dice_weight)
        self.no_object_weight = no_object_weight
        self.register_buffer("ce_weight", torch.tensor([1.0] * num_classes + [no_object_weight]), persistent=False)

    def forward(self, predictions: Predictions, mask_features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """predictions: L x (class (B, Q, K+1), mask embeddings (B, Q, C)); mask_features (B, C, h, w);
        labels (B, H, W) int64.

        Returns float32 scalars: 'loss' (the weighted total) and 'loss_ce', 'loss_mask',
        'loss_dice', each summed over the L predictions.
        """
        targets = make_targets(labels, self.num_classes)
        with torch.autocast(labels.device.type, enabled=False):  # the loss in float32 under bf16
            predictions = [(c.float(), e.float()) for c, e in predictions]
            features = mask_features.float()
            everything = sum(c.sum() + e.sum() for c, e in predictions) + features.sum()
            if not torch.isfinite(everything):
                # A diverged model: nothing can be matched. A NaN loss that reaches every parameter
                # (as DDP needs) lets the training loop stop with its own message.
                nan = everything * float("nan")
                return {"loss": nan, "loss_ce": nan, "loss_mask": nan, "loss_dice": nan}
            matches = self.matcher(predictions, features, targets)  # per image (L, T): the query of each target
            pairs = matched_pairs(matches, features.device)  # per prediction, per image (targets, queries)
            num_masks, ce_weight_sum = self.normalisers(targets, num_queries=predictions[0][0].shape[1])
            # Each image's features once: a slice per image and prediction would fill a
            # zero gradient of the whole batch's features for each in the backward.
            per_image = features.unbind(0)
            loss_ce = loss_mask = loss_dice = 0
            for (class_logits, embedding), prediction_pairs in zip(predictions, pairs):
                loss_ce = loss_ce + self.class_loss(class_logits, targets, prediction_pairs)
                bce, dice = self.mask_losses(embedding, per_image, targets, prediction_pairs)
                loss_mask, loss_dice = loss_mask + bce, loss_dice + dice
            loss_ce, loss_mask, loss_dice = loss_ce / ce_weight_sum, loss_mask / num_masks, loss_dice / num_masks
        loss = self.class_weight * loss_ce + self.mask_weight * loss_mask + self.dice_weight * loss_dice
        return {"loss": loss, "loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def normalisers(self, targets: Targets, *, num_queries: int) -> tuple[Tensor, Tensor]:
        """The number of matched masks and the total class-loss weight of one prediction, per rank.

        Both are the whole batch's totals divided by the number of ranks (one all-reduce), so
        that the ranks' losses, averaged by DDP, equal the loss of the batch on one process.
        """
        matched = sum(min(len(classes), num_queries) for classes, _ in targets)
        unmatched = len(targets) * num_queries - matched
        device = self.ce_weight.device
        totals = torch.tensor([matched, matched + unmatched * self.no_object_weight], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
            totals = totals / dist.get_world_size()
        return totals[0].clamp(min=1), totals[1]

    def class_loss(self, class_logits: Tensor, targets: Targets, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Weighted cross-entropy summed over every query: unmatched ones learn "no object" (weight 0.1).
        class_logits (B, Q, K+1); pairs: per image, the matched pairs' target and query indices (n,), (n,)."""
        B, Q, K1 = class_logits.shape
        target = torch.full((B, Q), K1 - 1, device=class_logits.device)
        for b, ((classes, _), (t, q)) in enumerate(zip(targets, pairs)):
            target[b, q] = classes[t]
        return F.cross_entropy(class_logits.flatten(0, 1), target.flatten(), weight=self.ce_weight, reduction="sum")

    def mask_losses(self, embedding: Tensor, features: tuple[Tensor, ...], targets: Targets,
                    pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Sigmoid BCE and dice of one prediction's matched masks on their most uncertain points, summed.

        embedding (B, Q, C); features: per image (C, h, w); pairs: per image, as for class_loss.
        """
        pred, target = [], []
        for b, ((_, masks), (t, q), feature) in enumerate(zip(targets, pairs, features)):
            pred.append(mask_logits(embedding[b, q][None], feature[None])[0])  # (n_b, h, w)
            # Unless there are more targets than queries, every target is matched and nothing is copied.
            target.append(masks if len(t) == len(masks) else masks[t])  # (n_b, H, W)
        pred = torch.cat(pred)  # (n, h, w)
        if not len(pred):
            # No labelled pixel in the batch. DDP needs every parameter in the graph on every
            # step, so return zeros that still depend on the masks.
            zero = (embedding.sum() + sum(f.sum() for f in features)) * 0.0
            return zero, zero
        # The same points on both masks: in [-1, 1], so they fall alike on masks of any size.
        points = self.uncertain_points(pred)  # (n, P, 2)
        x = point_sample(pred, points)  # (n, P)
        # Each image's target masks sampled where they are, at their pairs' points: no copy of them.
        t = torch.cat([point_sample(masks, p) for masks, p in zip(target, points.split([len(m) for m in target]))])
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1).sum()
        sig = x.sigmoid()
        dice = (1 - (2 * (sig * t).sum(1) + 1) / (sig.sum(1) + t.sum(1) + 1)).sum()
        return bce, dice

    @torch.no_grad()
    def uncertain_points(self, masks: Tensor) -> Tensor:
        """masks (N, h, w) logits -> (N, P, 2) points in [-1, 1].

        The importance_ratio * P most uncertain (|logit| smallest) of oversample_ratio * P
        random points, the rest uniformly random.
        """
        N, P = masks.shape[0], self.num_points
        candidates = torch.rand(N, int(P * self.oversample_ratio), 2, device=masks.device) * 2 - 1
        certainty = point_sample(masks, candidates).abs()  # (N, kP)
        # Which points, not their order: an unsorted topk is twice as fast on CPU.
        index = certainty.topk(int(P * self.importance_ratio), dim=1, largest=False, sorted=False).indices
        uncertain = candidates.gather(1, index[..., None].expand(-1, -1, 2))
        random = torch.rand(N, P - index.shape[1], 2, device=masks.device) * 2 - 1
        return torch.cat([uncertain, random], 1)


# --------------------------------------------------------------------------------------- inference


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class scores: class probabilities (no "no object") times mask probabilities, summed over queries.

    class_logits (B, Q, K+1), mask_logits (B, Q, h, w) -> (B, K, h, w).
    """
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())
