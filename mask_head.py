"""A simplified Mask2Former head: queries that each predict a class and a mask.

    head = MaskHead(in_dim=1024, num_classes=19, rein_queries=True)
    predictions = head(maps, queries)          # 10 x (class (B, Q, K+1), mask (B, Q, H/4, W/4))
    losses = SetCriterion(num_classes=19)(predictions, labels)    # labels (B, H, W), 255 = ignore
    scores = semantic_inference(*predictions[-1])                 # (B, K, H/4, W/4)

It follows Mask2Former as the Rein paper uses it (FACTS.md section 3) except for the pixel
decoder, which is a small convolutional FPN instead of a deformable-attention encoder.
Reading order: pixel decoder, masked-attention transformer decoder, the head, Hungarian
matching (`linear_sum_assignment`, written in numpy), the set criterion, semantic inference.
Run `python mask_head.py` to time one training step's matching.
"""

import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

NUM_LEVELS = 3  # the decoder attends to strides 32, 16, 8 in turn
IGNORE = 255
Predictions = list[tuple[Tensor, Tensor]]  # per prediction: class logits (B, Q, K+1), masks (B, Q, h, w)
Targets = list[tuple[Tensor, Tensor]]  # per image: classes (T,), binary masks (T, H, W)


# ---------------------------------------------------------------- pixel decoder


class ConvNorm(nn.Module):
    """Conv2d (no bias: the norm has one), GroupNorm, optional ReLU."""

    def __init__(self, *, in_dim: int, dim: int, kernel_size: int, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel_size, padding=kernel_size // 2, bias=False)
        # 32 groups as in Mask2Former; narrow test heads keep at least 2 channels per group,
        # so that a 1 x 1 map still has more than one value to normalise.
        self.norm = nn.GroupNorm(math.gcd(32, dim // 2), dim)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.conv(x))
        return F.relu(x) if self.relu else x


def sine_position(h: int, w: int, dim: int, device: torch.device) -> Tensor:
    """The 2-D sine position encoding of an h x w grid: (h*w, dim), y half then x half."""
    frequencies = 10000 ** (torch.arange(dim // 4, device=device) / (dim // 4))  # (dim/4,)
    y = (torch.arange(h, device=device) + 0.5) / h * 2 * math.pi  # pixel centres in [0, 2 pi]
    x = (torch.arange(w, device=device) + 0.5) / w * 2 * math.pi
    y = y[:, None] / frequencies  # (h, dim/4)
    x = x[:, None] / frequencies  # (w, dim/4)
    y = torch.cat([y.sin(), y.cos()], 1)[:, None].expand(h, w, dim // 2)  # (h, w, dim/2)
    x = torch.cat([x.sin(), x.cos()], 1)[None].expand(h, w, dim // 2)  # (h, w, dim/2)
    return torch.cat([y, x], 2).flatten(0, 1)  # (h*w, dim)


class PixelDecoder(nn.Module):
    """A top-down FPN over the four ViT maps.

    Gives the decoder three memories (strides 32, 16, 8), each with its sine positions and a
    learned level embedding, and the per-pixel mask features at stride 4.
    """

    def __init__(self, *, in_dim: int, dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(
            ConvNorm(in_dim=in_dim, dim=dim, kernel_size=1, relu=False) for _ in range(4)
        )
        self.output = nn.ModuleList(
            ConvNorm(in_dim=dim, dim=dim, kernel_size=3, relu=True) for _ in range(4)
        )
        self.mask_features = nn.Conv2d(dim, dim, 1)
        self.level_embed = nn.Embedding(NUM_LEVELS, dim)

    def forward(self, maps: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]], Tensor]:
        """maps: (B, in_dim, H/s, W/s) for s = 4, 8, 16, 32.

        Returns memories [(B, h*w, dim)] and positions [(1, h*w, dim)] for strides 32, 16, 8,
        their sizes [(h, w)], and the mask features (B, dim, H/4, W/4).
        """
        x = self.lateral[3](maps[3])
        outputs = [self.output[3](x)]
        for i in (2, 1, 0):  # top-down: coarse semantics flow into finer maps
            lateral = self.lateral[i](maps[i])
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            outputs.append(self.output[i](x))
        memories, positions, sizes = [], [], []
        for level, feature in enumerate(outputs[:NUM_LEVELS]):
            B, C, h, w = feature.shape
            memory = feature.flatten(2).transpose(1, 2)  # (B, h*w, C)
            memories.append(memory + self.level_embed.weight[level])
            positions.append(sine_position(h, w, C, feature.device)[None])  # (1, h*w, C)
            sizes.append((h, w))
        return memories, positions, sizes, self.mask_features(outputs[-1])


# ---------------------------------------------------------------- transformer decoder


class Attention(nn.Module):
    """Multi-head attention; `attend` (B, Lq, Lk) bool, True where a query may attend."""

    def __init__(self, *, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attend: Tensor | None = None) -> Tensor:
        """query (B, Lq, C), key and value (B, Lk, C) -> (B, Lq, C)."""
        B, Lq, C = query.shape
        heads = self.num_heads
        q = self.q(query).view(B, Lq, heads, C // heads).transpose(1, 2)  # (B, heads, Lq, C/heads)
        k = self.k(key).view(B, -1, heads, C // heads).transpose(1, 2)  # (B, heads, Lk, C/heads)
        v = self.v(value).view(B, -1, heads, C // heads).transpose(1, 2)  # (B, heads, Lk, C/heads)
        mask = None if attend is None else attend[:, None]  # (B, 1, Lq, Lk), same for every head
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Lq, C/heads)
        return self.proj(x.transpose(1, 2).reshape(B, Lq, C))  # (B, Lq, C)


class DecoderLayer(nn.Module):
    """Masked cross-attention, self-attention, FFN; each post-norm, as in Mask2Former.

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

    def forward(
        self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attend: Tensor
    ) -> Tensor:
        """query, query_pos (B, Q, C); memory (B, h*w, C); memory_pos (1, h*w, C); attend (B, Q, h*w)."""
        attended = self.cross_attn(query + query_pos, memory + memory_pos, memory, attend)
        query = self.cross_norm(query + attended)
        q = query + query_pos
        query = self.self_norm(query + self.self_attn(q, q, query))
        return self.ffn_norm(query + self.ffn(query))


def attention_mask(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Where each query may attend next: its mask, resized to `size`, has sigmoid > 0.5.

    (B, Q, h, w) logits -> (B, Q, size[0]*size[1]) bool. A query whose mask is empty attends
    everywhere: it has nothing to focus on, and an all-False row would make attention NaN.
    """
    mask = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    attend = mask.flatten(2) > 0  # (B, Q, h*w); sigmoid(x) > 0.5 exactly when x > 0
    return attend | ~attend.any(-1, keepdim=True)


# ---------------------------------------------------------------- the head


class MaskHead(nn.Module):
    """Pixel decoder + masked-attention decoder predicting a class and a mask per query.

    With `rein_queries`, the query features are `query_feat(Q)` (a Linear) and the query
    positions are Q itself, where Q (num_queries, dim) comes from Rein (FACTS.md section 1);
    otherwise both are learned embeddings.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int = 19,
        num_queries: int = 100,
        dim: int = 256,
        num_layers: int = 9,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        rein_queries: bool = False,
    ):
        super().__init__()
        if num_classes < 1 or num_queries < 1 or num_layers < NUM_LEVELS:
            raise ValueError(
                f"MaskHead: num_classes and num_queries must be >= 1 and num_layers >= {NUM_LEVELS} (one pass "
                f"over every level, or a level would get no gradient); got {num_classes}, {num_queries} and "
                f"{num_layers}."
            )
        if dim % 4 or dim % num_heads:
            raise ValueError(
                f"MaskHead: dim must be a multiple of 4 (sine positions) and of "
                f"num_heads={num_heads}; got {dim}."
            )
        self.in_dim, self.dim, self.num_queries = in_dim, dim, num_queries
        self.rein_queries = rein_queries
        self.pixel_decoder = PixelDecoder(in_dim=in_dim, dim=dim)
        if rein_queries:
            self.query_feat = nn.Linear(dim, dim)
        else:
            self.query_feat = nn.Embedding(num_queries, dim)
            self.query_embed = nn.Embedding(num_queries, dim)
        self.layers = nn.ModuleList(
            DecoderLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)  # the last class is "no object"
        self.mask_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)
        )

    def forward(self, maps: list[Tensor], queries: Tensor | None = None) -> Predictions:
        """maps: 4 x (B, in_dim, H/s, W/s), s = 4, 8, 16, 32; queries: (num_queries, dim) or None.

        Returns num_layers + 1 pairs (class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)):
        after the query init and after each layer; the last is the final prediction.
        """
        self._check_inputs(maps, queries)
        memories, positions, sizes, mask_features = self.pixel_decoder(maps)
        B = maps[0].shape[0]
        if self.rein_queries:
            query = self.query_feat(queries)[None].expand(B, -1, -1)  # (B, Q, dim)
            query_pos = queries[None].expand(B, -1, -1)  # (B, Q, dim)
        else:
            query = self.query_feat.weight[None].expand(B, -1, -1)  # (B, Q, dim)
            query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, Q, dim)
        predictions = [self.predict(query, mask_features)]
        for i, layer in enumerate(self.layers):
            level = i % NUM_LEVELS
            attend = attention_mask(predictions[-1][1], sizes[level])
            query = layer(query, query_pos, memories[level], positions[level], attend)
            predictions.append(self.predict(query, mask_features))
        return predictions

    def predict(self, query: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """query (B, Q, dim), mask features (B, dim, h, w) -> class (B, Q, K+1), masks (B, Q, h, w)."""
        x = self.decoder_norm(query)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        return self.class_embed(x), mask_logits

    def _check_inputs(self, maps: list[Tensor], queries: Tensor | None) -> None:
        expected = f"4 feature maps (strides 4, 8, 16, 32) of shape (B, in_dim={self.in_dim}, h, w)"
        if not isinstance(maps, (list, tuple)) or len(maps) != 4:
            got = f"{len(maps)} maps" if isinstance(maps, (list, tuple)) else type(maps).__name__
            raise ValueError(f"MaskHead.forward: maps must be a list of {expected}; got {got}.")
        for i, m in enumerate(maps):
            if m.ndim != 4 or m.shape[1] != self.in_dim or m.shape[0] != maps[0].shape[0]:
                raise ValueError(
                    f"MaskHead.forward: maps must be {expected} with one batch size; "
                    f"map {i} has shape {tuple(m.shape)}."
                )
        if self.rein_queries and queries is None:
            raise ValueError("MaskHead.forward: rein_queries=True needs the queries from Rein; got None.")
        if not self.rein_queries and queries is not None:
            raise ValueError("MaskHead.forward: queries were given but the head has rein_queries=False.")
        if queries is not None and tuple(queries.shape) != (self.num_queries, self.dim):
            raise ValueError(
                f"MaskHead.forward: queries must have shape (num_queries={self.num_queries}, "
                f"dim={self.dim}); got {tuple(queries.shape)}."
            )


# ---------------------------------------------------------------- matching


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of a rectangular (R, C) matrix, like scipy's function.

    Returns (rows, cols), int64 of length min(R, C), rows ascending, such that
    cost[rows, cols].sum() is minimal over all assignments.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost must be a 2-D matrix; got shape {cost.shape}.")
    rows, cols = linear_sum_assignment_batch(cost[None])  # (1, n) each
    return rows[0], cols[0]


def linear_sum_assignment_batch(costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`linear_sum_assignment` of N same-shaped matrices at once: (N, R, C) -> 2 x (N, min(R, C))."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 3:
        raise ValueError(f"linear_sum_assignment_batch: costs must have shape (N, R, C); got {costs.shape}.")
    if not np.isfinite(costs).all():
        raise ValueError("linear_sum_assignment: the cost matrix has non-finite values (NaN or inf).")
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


# ---------------------------------------------------------------- criterion


class SetCriterion(nn.Module):
    """Mask2Former's set loss: Hungarian matching, then class, mask BCE and dice losses.

    Every prediction (deep supervision) is matched and supervised on its own; the mask
    terms use `num_points` points per mask, never full-resolution masks.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
    ):
        super().__init__()
        if not 1 <= num_classes < IGNORE:
            raise ValueError(
                f"SetCriterion: num_classes must be in 1..{IGNORE - 1} ({IGNORE} is the ignore label); "
                f"got {num_classes}."
            )
        if num_points < 1 or oversample_ratio < 1 or not 0 <= importance_ratio <= 1:
            raise ValueError(
                f"SetCriterion: need num_points >= 1, oversample_ratio >= 1 and 0 <= importance_ratio <= 1; "
                f"got {num_points}, {oversample_ratio} and {importance_ratio}."
            )
        self.num_classes, self.num_points = num_classes, num_points
        self.oversample_ratio, self.importance_ratio = oversample_ratio, importance_ratio
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.no_object_weight = no_object_weight

    def forward(self, predictions: Predictions, labels: Tensor) -> dict[str, Tensor]:
        """predictions: L x (class (B, Q, K+1), masks (B, Q, h, w)); labels (B, H, W) int64.

        Returns float32 scalars: 'loss' (weighted total) and 'loss_ce', 'loss_mask',
        'loss_dice', each summed over the L predictions.
        """
        targets = self.targets(labels)
        self._check_predictions(predictions, labels)
        with torch.autocast(labels.device.type, enabled=False):  # losses in float32 under bf16
            logits = [(c.float(), m.float()) for c, m in predictions]
            matches = self.match(logits, targets)
            class_targets, class_weights = self.class_targets(logits, targets, matches)
            num_masks, weight_sums = self.normalisers(targets, class_weights)
            loss_ce = self.class_loss(logits, class_targets, class_weights, weight_sums)
            loss_mask, loss_dice = self.mask_losses(logits, targets, matches, num_masks)
        loss = self.class_weight * loss_ce + self.mask_weight * loss_mask + self.dice_weight * loss_dice
        return {"loss": loss, "loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def targets(self, labels: Tensor) -> Targets:
        """labels (B, H, W) -> per image (classes (T,), masks (T, H, W) float), one mask per class present."""
        if labels.ndim != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"SetCriterion: labels must be integer (B, H, W); got {labels.dtype} {tuple(labels.shape)}."
            )
        values = labels.unique()
        bad = values[(values < 0) | ((values >= self.num_classes) & (values != IGNORE))]
        if bad.numel():
            raise ValueError(
                f"SetCriterion: labels must hold class ids 0..{self.num_classes - 1} or {IGNORE} (ignore); "
                f"found {bad.tolist()}."
            )
        targets = []
        for label in labels:
            classes = label.unique()
            classes = classes[classes != IGNORE]  # ignored pixels belong to no mask
            targets.append((classes, (label == classes[:, None, None]).float()))  # (T,), (T, H, W)
        return targets

    @torch.no_grad()
    def match(self, logits: Predictions, targets: Targets) -> list[Tensor]:
        """Per image int64 (L, T): the query matched to each target in each prediction, -1 if none.

        The L cost matrices of an image go to the CPU together and are solved in one batch.
        """
        matches = []
        for b, (classes, masks) in enumerate(targets):
            cost = self.match_cost(logits, b, classes, masks).cpu().numpy()  # (L, Q, T)
            rows, cols = linear_sum_assignment_batch(cost)  # queries (L, n), targets (L, n)
            query = np.full((cost.shape[0], cost.shape[2]), -1)  # (L, T)
            np.put_along_axis(query, cols, rows, 1)
            matches.append(torch.from_numpy(query).to(classes.device))
        return matches

    def match_cost(self, logits: Predictions, b: int, classes: Tensor, masks: Tensor) -> Tensor:
        """Image b's matching costs (L, Q, T); mask terms on random points shared by prediction and target."""
        L, P = len(logits), self.num_points
        prob = torch.stack([c[b] for c, _ in logits]).softmax(-1)  # (L, Q, K+1)
        pred = torch.stack([m[b] for _, m in logits])  # (L, Q, h, w)
        points = torch.rand(L, 1, P, 2, device=pred.device) * 2 - 1  # grid_sample's [-1, 1] coordinates
        pred = F.grid_sample(pred, points, align_corners=False).flatten(2)  # (L, Q, 1, P) -> (L, Q, P)
        # Every target at every prediction's points: grid (1, L, P, 2) -> (1, T, L, P).
        target = F.grid_sample(masks[None], points.view(1, L, P, 2), align_corners=False)[0]  # (T, L, P)
        target = target.transpose(0, 1)  # (L, T, P)
        cost_class = -prob[:, :, classes]  # (L, Q, T)
        # BCE(x, t) = softplus(x) - x * t, so its mean over the points is one contraction.
        cross = torch.einsum("lqp,ltp->lqt", pred, target)
        cost_mask = (F.softplus(pred).sum(-1)[:, :, None] - cross) / P
        sig = pred.sigmoid()
        overlap = torch.einsum("lqp,ltp->lqt", sig, target)
        cost_dice = 1 - (2 * overlap + 1) / (sig.sum(-1)[:, :, None] + target.sum(-1)[:, None, :] + 1)
        return self.class_weight * cost_class + self.mask_weight * cost_mask + self.dice_weight * cost_dice

    def class_targets(self, logits: Predictions, targets: Targets, matches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each query's class target (L, B, Q), "no object" where unmatched, and its CE weight (L, B, Q)."""
        L, (B, Q, K1) = len(logits), logits[0][0].shape
        target = torch.full((L, B, Q), K1 - 1, device=logits[0][0].device)  # "no object"
        for b, ((classes, _), query) in enumerate(zip(targets, matches)):
            layer, t = (query >= 0).nonzero(as_tuple=True)
            target[layer, b, query[layer, t]] = classes[t]
        weight = torch.ones(K1, device=target.device)
        weight[-1] = self.no_object_weight
        return target, weight[target]

    def normalisers(self, targets: Targets, class_weights: Tensor) -> tuple[Tensor, Tensor]:
        """The number of target masks and each prediction's CE weight total (L,), per rank.

        Both are the batch's totals divided by the number of ranks (one all-reduce), so the
        ranks' losses, averaged by DDP, equal the loss of the whole batch on one process.
        """
        num_masks = torch.tensor([float(sum(classes.numel() for classes, _ in targets))], device=class_weights.device)
        totals = torch.cat([num_masks, class_weights.flatten(1).sum(1)])  # (1 + L,)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
            totals = totals / dist.get_world_size()
        return totals[0].clamp(min=1), totals[1:]

    def class_loss(self, logits: Predictions, target: Tensor, weight: Tensor, weight_sums: Tensor) -> Tensor:
        """Weighted cross-entropy, a weighted mean per prediction, summed over predictions.

        Unmatched queries learn "no object" at weight 0.1.
        """
        class_logits = torch.stack([c for c, _ in logits])  # (L, B, Q, K+1)
        ce = F.cross_entropy(class_logits.flatten(0, 2), target.flatten(), reduction="none")  # (L*B*Q,)
        return ((ce * weight.flatten()).view(len(logits), -1).sum(1) / weight_sums).sum()

    def mask_losses(
        self, logits: Predictions, targets: Targets, matches: list[Tensor], num_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Sigmoid BCE and dice of every matched mask on its uncertain points, summed / num_masks."""
        P = self.num_points
        pred_points, target_points = [], []
        for b, ((classes, masks), query) in enumerate(zip(targets, matches)):
            T, L = classes.numel(), len(logits)
            if T == 0:
                continue
            # One slot per (target, prediction). A slot with no query (more targets than
            # queries) borrows query 0 and is dropped after sampling.
            pred = torch.stack([m[b, q.clamp(min=0)] for (_, m), q in zip(logits, query)], 1)  # (T, L, h, w)
            pred = pred.flatten(0, 1)[:, None]  # (T*L, 1, h, w)
            keep = (query >= 0).T.flatten()  # (T*L,)
            points = self.uncertain_points(pred)  # (T*L, 1, P, 2)
            pred = F.grid_sample(pred, points, align_corners=False)  # (T*L, 1, 1, P)
            pred_points.append(pred.flatten(1)[keep])  # (n, P)
            # Target t is sampled at the points of its L slots: grid (T, L, P, 2) -> (T, 1, L, P).
            target = F.grid_sample(masks[:, None], points.view(T, L, P, 2), align_corners=False)
            target_points.append(target.view(T * L, P)[keep])  # (n, P)
        if not pred_points:
            # No labelled pixel in the batch. DDP needs every parameter in the graph on every
            # step, so return zeros that still depend on the masks.
            zero = sum(m.sum() for _, m in logits) * 0.0
            return zero, zero
        x, t = torch.cat(pred_points), torch.cat(target_points)  # (n, P) each
        loss_mask = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1).sum() / num_masks
        sig = x.sigmoid()
        dice = 1 - (2 * (sig * t).sum(1) + 1) / (sig.sum(1) + t.sum(1) + 1)  # (n,)
        return loss_mask, dice.sum() / num_masks

    @torch.no_grad()
    def uncertain_points(self, masks: Tensor) -> Tensor:
        """masks (N, 1, h, w) logits -> (N, 1, P, 2) grid points.

        The importance_ratio * P most uncertain (|logit| smallest) of oversample_ratio * P
        random points, the rest uniformly random.
        """
        N, P = masks.shape[0], self.num_points
        candidates = torch.rand(N, 1, int(P * self.oversample_ratio), 2, device=masks.device) * 2 - 1
        certainty = F.grid_sample(masks, candidates, align_corners=False).abs().flatten(1)  # (N, kP)
        num_uncertain = int(P * self.importance_ratio)
        index = certainty.topk(num_uncertain, dim=1, largest=False).indices  # (N, num_uncertain)
        uncertain = candidates[:, 0].gather(1, index[..., None].expand(-1, -1, 2))  # (N, num_uncertain, 2)
        random = torch.rand(N, P - num_uncertain, 2, device=masks.device) * 2 - 1
        return torch.cat([uncertain, random], 1)[:, None]  # (N, 1, P, 2)

    def _check_predictions(self, predictions: Predictions, labels: Tensor) -> None:
        B, K1 = labels.shape[0], self.num_classes + 1
        for i, (c, m) in enumerate(predictions):
            class_ok = c.ndim == 3 and c.shape[0] == B and c.shape[2] == K1
            if not class_ok or m.ndim != 4 or m.shape[:2] != c.shape[:2]:
                raise ValueError(
                    f"SetCriterion: prediction {i} must be class logits (B={B}, Q, num_classes+1={K1}) "
                    f"and mask logits (B, Q, h, w); got {tuple(c.shape)} and {tuple(m.shape)}."
                )


# ---------------------------------------------------------------- inference


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class scores: class probabilities (no "no object") times mask probabilities, summed over queries.

    class_logits (B, Q, K+1), mask_logits (B, Q, h, w) -> (B, K, h, w).
    """
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())


# ---------------------------------------------------------------- benchmark


def benchmark(repeats: int = 20) -> None:
    """Time one training step's matching: 4 images x 10 predictions, 100 queries, 19 classes.

    The tensors live on the GPU when there is one, as in training; the assignment always runs on the CPU.
    """
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, L, Q, K = 4, 10, 100, 19
    criterion = SetCriterion(num_classes=K)
    logits = [(torch.randn(B, Q, K + 1), torch.randn(B, Q, 128, 128)) for _ in range(L)]
    logits = [(c.to(device), m.to(device)) for c, m in logits]
    blocks = torch.stack([torch.randperm(256).remainder(K).view(16, 16) for _ in range(B)])  # all K in each
    labels = blocks.repeat_interleave(32, 1).repeat_interleave(32, 2).to(device)  # (B, 512, 512)
    targets = criterion.targets(labels)
    costs = [criterion.match_cost(logits, b, *target).cpu().numpy() for b, target in enumerate(targets)]

    def best_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1000 * min(times)

    assign = best_ms(lambda: [linear_sum_assignment_batch(cost) for cost in costs])
    match = best_ms(lambda: criterion.match(logits, targets))
    print(f"{B} images x {L} predictions of {Q} queries x {K} targets, {criterion.num_points} points, "
          f"{device}, {torch.get_num_threads()} threads, best of {repeats}:")
    print(f"  assignment only               {assign:8.2f} ms")
    print(f"  whole matching (costs + LSA)  {match:8.2f} ms")


if __name__ == "__main__":
    benchmark()
