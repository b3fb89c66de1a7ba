"""Train Rein (or the frozen / fully fine-tuned baselines) for domain-generalised segmentation.

The demo, on any machine and with no download: a small random ViT learns synthetic street
scenes of the flat "game" domain and is evaluated on all five domains (under 4 minutes on
2 CPU cores). Then the paper's run, GTAV -> Cityscapes, BDD100K, Mapillary with DINOv2-L;
the same on EVA02-L (its official file downloads by name); on DINOv3-L (weights on request
from Meta); on 8 GPUs; on 2 machines of 8:

    python train.py
    python train.py --data gta --val cityscapes,bdd,mapillary --backbone vitl14 --weights vitl14
    python train.py --data gta --val cityscapes,bdd,mapillary --backbone eva02_vitl14
    python train.py --data gta --backbone dinov3_vitl16 --weights dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
    torchrun --nproc_per_node 8 train.py --data gta --val cityscapes,bdd,mapillary
    torchrun --nnodes 2 --node-rank 0 --nproc_per_node 8 --master-addr HOST --master-port 29500 \\
        train.py --data gta --val cityscapes,bdd,mapillary

Any dataset other than `synthetic` gets the paper's recipe (`--preset paper`): DINOv2-L with
patch 16, 512 x 512 crops, batch 4 (global: 4 crops per step whatever the number of GPUs),
AdamW at 1e-4, poly decay over 40,000 iterations. `--bench 20` times 20 steps instead.

The run folder (`--out`, default runs/DATA) receives args.json, log.jsonl, last.pt and
validation pictures. If it holds last.pt (or with `--resume PATH`), the run resumes exactly:
model, optimiser, schedule, iteration, sampler position and every random state; only options
that do not change what the run computes may differ. SIGTERM or Ctrl-C writes last.pt, then
exits with status 1.
"""

import argparse
import contextlib
import fcntl
import json
import os
import random
import resource
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import eval as evaluation
import rein
import vit

PRESETS = {
    # The recipe behind the paper's GTAV -> Cityscapes, BDD100K, Mapillary table (Table 2; official configs).
    "paper": dict(backbone="vitl14", patch_size=16, crop_size=512, batch_size=4, iters=40_000, lr=1e-4,
                  num_queries=100, head_dim=256, head_layers=9, encoder_layers=6, num_points=12544,
                  eval_every=4000, save_every=1000, window=512, stride=341, workers=4),
    # A few minutes on 2 CPU cores: a random ViT-S, a narrow head, small synthetic scenes.
    "demo": dict(backbone="vits14", weights=None, patch_size=16, crop_size=96, batch_size=6, iters=250, lr=1e-3,
                 num_queries=20, head_dim=64, head_layers=3, encoder_layers=1, num_points=784,
                 eval_every=250, save_every=100, window=96, stride=72, workers=2),
}
# Validation sets tried when --val is not given; those not found under data/ are skipped.
DEFAULT_VAL = {"cityscapes": "cityscapes,acdc,bdd,mapillary", "gta": "cityscapes,bdd,mapillary",
               "synthia": "cityscapes,bdd,mapillary",
               "synthetic": ",".join(f"synthetic:{d}" for d in data.SYNTHETIC_DOMAINS)}
PROGRESS_HELP = ("The progress bar shows loss, the training loss summed over the head's predictions (its deep "
                 "supervision: one after the query init and one per decoder layer, 10 in the paper), averaged over "
                 "the last --log-every steps and the processes; lr, the learning "
                 "rate; img_s, training images per second over all processes. log.jsonl in the run folder keeps "
                 "them, with each loss term.")
# Options that may change when a run resumes: they do not change what the run computes.
RESUMABLE_CHANGES = ("out", "resume", "workers", "log_every", "save_every", "eval_every", "compile", "grad_ckpt",
                     "fp32", "val")


class PresetHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, and for the options a preset fills in, both presets' values."""

    def _get_help_string(self, action: argparse.Action) -> str:
        key = action.dest
        if key in PRESETS["paper"] or key in PRESETS["demo"]:
            values = {name: preset.get(key, "the backbone's own" if key == "weights" else None)
                      for name, preset in PRESETS.items()}
            return f"{action.help or ''} (demo: {values['demo']}; paper: {values['paper']})".strip()
        return super()._get_help_string(action) if action.default is not None else action.help or ""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose what trains: the method, an augmentation, the backbone and its weights."""
    p.add_argument("--method", default="rein", choices=rein.METHODS,
                   help="rein: Rein and the head train; freeze: the head only; full: everything; the paper's "
                        "Table 5: lora (rank 8 on qkv), adaptformer (64-wide adapters beside the FFNs), vpt (150 "
                        "prompts per block), each with the head")
    p.add_argument("--augment", choices=("pasta", "advstyle"),
                   help="a domain-generalisation augmentation on top of the recipe's: pasta (Fourier amplitude "
                        "noise on each training image) or advstyle (adversarial channel statistics, doubling "
                        "the batch)")
    p.add_argument("--pasta-alpha", type=float, default=3.0, help="PASTA: how much more fine detail varies")
    p.add_argument("--pasta-k", type=float, default=2.0, help="PASTA: the growth law's exponent")
    p.add_argument("--pasta-beta", type=float, default=0.25, help="PASTA: the noise spread at every frequency")
    p.add_argument("--advstyle-lr", type=float, default=1.0,
                   help="AdvStyle's step size (the paper's is not published; 1.0 is a public re-implementation's)")
    p.add_argument("--backbone", help="DINOv2: vits14, vitb14, vitl14 or vitg14, optionally with _reg4; DINOv3: "
                                      "dinov3_vits16, dinov3_vits16plus, dinov3_vitb16, dinov3_vitl16, "
                                      "dinov3_vith16plus; EVA02: eva02_vitb14, eva02_vitl14; CLIP: clip_vitb16, "
                                      "clip_vitl14; SAM: sam_vitb16, sam_vitl16, sam_vith16; MAE: mae_vitb16, "
                                      "mae_vitl16")
    p.add_argument("--weights", help="backbone weights: a path, a URL, or a backbone name such as vitl14 or "
                                     "eva02_vitl14 (its official file, downloaded once; DINOv3's are gated); default "
                                     "under the paper preset: the backbone's own official weights")
    p.add_argument("--no-weights", action="store_true", help="a random backbone")
    p.add_argument("--patch-size", type=int, help="the ViT's patch in pixels; a patch-14 kernel (DINOv2, EVA02, "
                                                  "CLIP-L) is converted to it while loading, as the official "
                                                  "release does")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train Rein for domain-generalised semantic segmentation.",
                                formatter_class=PresetHelp, epilog=PROGRESS_HELP)
    p.add_argument("--data", default="synthetic:game",
                   help="training data, NAME[=ROOT]; sources joined by +, e.g. gta+synthia (see data.py)")
    p.add_argument("--val", help="validation datasets, NAME[=ROOT],...; default: the usual targets found under data/")
    p.add_argument("--preset", choices=PRESETS, help="defaults for every option left out; default: demo for "
                                                      "synthetic data, paper for any other --data")
    add_model_arguments(p)
    p.add_argument("--crop-size", type=int, help="side of the square training crops in pixels, a multiple of the "
                                                 "patch size")
    p.add_argument("--batch-size", type=int, help="global: crops per step over all processes")
    p.add_argument("--iters", type=int, help="training iterations (the poly schedule's length)")
    p.add_argument("--lr", type=float, help="AdamW's learning rate, decayed to 0 by the poly schedule")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW's weight decay; none on norms, Rein's tokens and scale, and the head's embeddings")
    p.add_argument("--num-queries", type=int, help="the head's object queries; under rein also Rein's tokens per block")
    p.add_argument("--head-dim", type=int, help="the head's width, a multiple of its 8 attention heads")
    p.add_argument("--head-layers", type=int, help="transformer decoder layers of the head (9 in the paper)")
    p.add_argument("--encoder-layers", type=int, help="deformable-attention layers of the pixel decoder (6 in the "
                                                      "paper; 0 for the simplest head)")
    p.add_argument("--num-points", type=int, help="points per mask in the loss")
    p.add_argument("--eval-every", type=int, help="validate every N iterations, and at the end")
    p.add_argument("--save-every", type=int, help="write last.pt every N iterations, and at the end")
    p.add_argument("--log-every", type=int, default=20, help="log the losses every N iterations")
    p.add_argument("--window", type=int, help="validation sliding window")
    p.add_argument("--stride", type=int, help="validation sliding window stride")
    p.add_argument("--workers", type=int, help="data loading processes per GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's initial weights, the data order and "
                                                        "the augmentation")
    p.add_argument("--out", type=Path, help="run folder; default runs/DATA (for folder=PATH: runs/ and PATH's "
                                            "own name)")
    p.add_argument("--resume", type=Path, help="checkpoint to resume; default OUT/last.pt if it exists")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone and the head")
    p.add_argument("--grad-ckpt", action="store_true", help="recompute the frozen blocks in backward: less memory")
    p.add_argument("--bench", type=int, metavar="N", help="time N training steps on random inputs, then exit")
    p.add_argument("--bench-data", type=int, metavar="N",
                   help="time N batches of the training data pipeline (PNG decoding, augmentation, crops) with "
                        "--workers processes, on GTAV-sized pairs it writes itself, then exit")
    args = p.parse_args(argv)
    args.preset = args.preset or ("demo" if args.data.startswith("synthetic") else "paper")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.no_weights:
        args.weights = None
    elif args.weights is None and args.preset == "paper":
        args.weights = args.backbone  # a name downloads its official file; a DINOv3 one says where to get it
    check_numbers(p, args)
    name, _, root = args.data.partition("=")
    own = name.strip() == "folder" and root  # a user's folder names its run
    args.out = args.out or Path("runs") / evaluation.folder_name(Path(root).expanduser().resolve().name if own else name)
    return args


def check_numbers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric option in range, so that a mistake is named before anything is created."""
    at_least = dict(iters=1, crop_size=1, patch_size=1, num_queries=1, head_dim=8, head_layers=3, encoder_layers=0,
                    num_points=1, eval_every=1, save_every=1, log_every=1, window=1, stride=1, bench=1,
                    bench_data=1)
    for key, low in at_least.items():
        if getattr(args, key) is not None and getattr(args, key) < low:
            p.error(f"--{key.replace('_', '-')} must be at least {low}, got {getattr(args, key)}")
    # AdamW checks only its default learning rate and weight decay, not the per-group ones it
    # is given here: a negative --lr would train, uphill.
    if args.lr <= 0 or args.weight_decay < 0:
        p.error(f"--lr must be positive and --weight-decay at least 0, got --lr {args.lr} and --weight-decay "
                f"{args.weight_decay}")
    # The crop's patch check is the ViT's own, at the first step; the windows' would come at
    # the first validation, hours later.
    if args.window % args.patch_size:
        p.error(f"--window {args.window} must be a multiple of the patch size {args.patch_size}, "
                f"e.g. {max(args.window // args.patch_size, 1) * args.patch_size}")
    if args.pasta_alpha < 0 or args.pasta_k <= 0 or args.pasta_beta < 0 or args.advstyle_lr <= 0:
        p.error(f"--pasta-alpha and --pasta-beta must be at least 0, --pasta-k and --advstyle-lr positive; got "
                f"{args.pasta_alpha}, {args.pasta_beta}, {args.pasta_k} and {args.advstyle_lr}")
    if args.head_dim % 8:
        p.error(f"--head-dim must be a multiple of 8 (8 attention heads), got {args.head_dim}")


# --------------- Data: a resumable sampler whose augmentations do not depend on the number of GPUs


class TrainSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (one shuffling seed on every rank, drop_last) that can start mid-epoch.

    It yields (index, augmentation seed). The seed is the sample's place in the epoch's
    global order, so every sample of every rank is augmented differently, a resumed run
    draws exactly what the uninterrupted run drew, and 2 GPUs with 2 crops each see the
    crops that 1 GPU with 4 sees.
    """

    def __init__(self, dataset, *, seed: int, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())  # this rank's share: global order[rank::world]
        for pos in range(self.start, len(indices)):
            yield indices[pos], (self.seed, self.epoch, pos * self.num_replicas + self.rank)


class Augmented(torch.utils.data.Dataset):
    """A training set indexed by (index, seed): the seed alone drives the random augmentation."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, tuple[int, ...]]):
        index, seed = item
        return self.dataset.augment(index, np.random.default_rng(seed))


def batches(loader, sampler: TrainSampler, *, epoch: int, position: int):
    """Endless (epoch, batches done in the epoch, batch), calling set_epoch at every pass."""
    while True:
        sampler.set_epoch(epoch)
        sampler.start = position * loader.batch_size
        for batch in loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


def datasets(args: argparse.Namespace, rank: int) -> tuple:
    """The training set and the validation sets, checked before anything is created.

    Without --val: the training source's own val split (GTAV and Synthia have none), then the
    usual target domains found under data/.
    """
    if rank == 0:
        evaluation.check_writable(args.out, "--out")
    sources = data.parse_data(args.data)
    if len(sources) != 1:
        raise ValueError(f"--data {args.data}: one training set, e.g. gta or gta+synthia (',' separates "
                         f"--val datasets)")
    (name, root), source = sources[0], data.first_source(args.data)
    train_set = data.build_dataset(name, root, "train", train=True, crop_size=args.crop_size,
                                   **data.dataset_kwargs(name, "train", vars(args)))
    if len(train_set) < args.batch_size:
        raise ValueError(f"{args.data} has {len(train_set)} training images, fewer than --batch-size "
                         f"{args.batch_size}")
    if args.val:
        candidates = data.parse_data(args.val)
    elif source == "folder" and not (Path(root) / "images" / "val").is_dir():
        candidates = []
        if rank == 0:
            print(f"validation: none, since {root} has no images/val split; training goes on without it "
                  f"(give --val folder=PATH of your validation images to have one)")
    else:
        candidates = [] if "+" in name or source in ("gta", "synthia") else [(name, root)]
        if source in DEFAULT_VAL:
            candidates += [(target, None) for target, _ in data.parse_data(DEFAULT_VAL[source]) if target != name]
    val_sets = []
    for val_name, val_root in candidates:
        try:
            val_sets.append(data.build_dataset(val_name, val_root, "val", train=False,
                                               **data.dataset_kwargs(val_name, "val", vars(args))))
        except FileNotFoundError as e:
            if args.val:
                raise
            if rank == 0:
                print(f"validation: skipping {val_name}: {e}")
    if rank == 0:
        print(f"{args.preset} preset: {args.method} on {args.backbone}, {args.iters:,} iterations of batch "
              f"{args.batch_size} at {args.crop_size}x{args.crop_size}, {train_set.num_classes} classes")
    return train_set, val_sets


# ------------------------------------------------------------- Model, optimiser, one training step


def build(args: argparse.Namespace, device: torch.device, world_size: int, *, num_classes: int) -> tuple:
    """The model (the same initial weights on every rank), its DDP wrapper, AdamW (the official
    recipe) and the poly schedule, stepped per iteration."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    model = rein.build_model(method=args.method, backbone=args.backbone, weights=args.weights,
                             num_classes=num_classes, patch_size=args.patch_size, num_queries=args.num_queries,
                             head_dim=args.head_dim, head_layers=args.head_layers,
                             encoder_layers=args.encoder_layers, num_points=args.num_points,
                             grad_ckpt=args.grad_ckpt).to(device)
    if args.compile:
        model.backbone.compile()
        model.head.compile()
    # DDP sees only the trainable parameters: a frozen ViT never counts as unused.
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.param_groups(lr=args.lr, weight_decay=args.weight_decay),
                                  betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - it / args.iters) ** 0.9)
    return model, ddp, optimizer, schedule


def adversarial_style(model, images: torch.Tensor, labels: torch.Tensor, lr: float, autocast) -> torch.Tensor:
    """AdvStyle (Zhong et al., NeurIPS 2022): each image's per-channel mean and standard deviation,
    its style, taken as parameters and moved by one step of gradient ascent on the loss, step size
    `lr`; returns the restyled images (B, 3, H, W). `model` is the plain model, not DDP's wrapper:
    this pass computes no weight gradients, only the styles'."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True) + 1e-6
    content = ((images - mean) / std).detach()
    mean, std = mean.detach().requires_grad_(), std.detach().requires_grad_()
    with autocast:
        loss = model(content * std + mean, labels)["loss"]
    grad_mean, grad_std = torch.autograd.grad(loss, (mean, std))
    return (content * (std + lr * grad_std) + mean + lr * grad_mean).detach()


def train_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, autocast,
               advstyle_lr: float | None = None) -> dict[str, torch.Tensor]:
    """Forward and backward; `model` may be the DDP wrapper, which averages the gradients. With
    `advstyle_lr`, the batch is trained together with its AdvStyle copies (twice the images)."""
    if advstyle_lr is not None:
        plain = model.module if isinstance(model, DistributedDataParallel) else model
        images = torch.cat([images, adversarial_style(plain, images, labels, advstyle_lr, autocast)])
        labels = torch.cat([labels, labels])
    with autocast:
        losses = model(images, labels)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    return losses


# ----------------------------------------------- Exact resume: checkpoints with every random state


def rng_state() -> dict:
    """Every random state of this process, as tensors and numbers (so weights_only can load it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(args, run: dict, model, optimizer, schedule, rank: int, world_size: int) -> None:
    """OUT/last.pt with every rank's random state, written by rank 0 alone: a temporary file,
    then a rename, so that a crash never leaves a half-written checkpoint. Weights that are
    not finite are never written: the last good last.pt stays."""
    weights = model.trainable_state_dict()
    if not all(torch.isfinite(v).all() for v in weights.values()):  # the same on every rank
        raise FloatingPointError(f"the weights are not finite after iteration {run['iteration']}: the run "
                                 f"diverged. {kept(args.out)}; {TRY_INSTEAD}")
    states = [rng_state()]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, rng_state())
    if rank == 0:
        path, partial = args.out / "last.pt", args.out / "last.pt.tmp"
        try:
            torch.save(dict(config=model.config, model=weights, optimizer=optimizer.state_dict(),
                            schedule=schedule.state_dict(), rng=states, **run), partial)
            os.replace(partial, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            partial.unlink(missing_ok=True)
            free = shutil.disk_usage(args.out).free
            reason = "the disk is full" if free < 2**20 else f"{type(e).__name__}: {e}"
            raise OSError(f"could not write {path} ({reason}); the previous one is kept as it was") from e


def kept(out: Path) -> str:
    """What a run that stops now leaves behind, for its message."""
    path = out / "last.pt"
    if not path.exists():
        return "no checkpoint had been written yet"
    return f"{path} keeps iteration {torch.load(path, weights_only=True, mmap=True)['iteration']}, the last good state"


def load_resume(path: Path, model: rein.Segmenter, plain_args: dict, fingerprint: str) -> dict:
    """A train.py checkpoint to resume, refused if the run it records computed something else."""
    ckpt = vit.read_file(path, what="a train.py checkpoint to resume")
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt:
        raise ValueError(f"cannot resume from {path}: it is not a train.py checkpoint")
    evaluation.check_head_version(ckpt["config"], path)
    if ckpt["config"] != model.config:
        changed = {k: (ckpt["config"].get(k), v) for k, v in model.config.items() if ckpt["config"].get(k) != v}
        raise ValueError(f"cannot resume from {path}: it was trained with other model arguments "
                         f"(checkpoint, now): {changed}; use the same arguments or another --out")
    if ckpt.get("backbone_fingerprint", fingerprint) != fingerprint:
        raise ValueError(f"cannot resume from {path}: it was trained on other backbone weights than "
                         f"{model.config['weights']} (fingerprint {ckpt['backbone_fingerprint']}, now {fingerprint})")
    recorded = ckpt.get("args", {})
    changed = [f"--{k.replace('_', '-')} {recorded.get(k)} (run) vs {v} (now)" for k, v in plain_args.items()
               if k not in RESUMABLE_CHANGES and recorded.get(k) != v]
    if changed:
        raise ValueError(f"cannot resume from {path} with other options: {'; '.join(changed)}. Resume with the "
                         f"run's own options (its args.json), or start a new run with another --out")
    return ckpt


def resume(args, run: dict, model, optimizer, schedule, rank: int, world_size: int) -> bool:
    """Weights, optimiser, schedule, position in the data and every random state from OUT/last.pt
    or --resume, into `run` (iteration, epoch, position); a fresh run writes args.json, the
    record of what it does. False: the run is already finished."""
    path = args.resume or (args.out / "last.pt" if (args.out / "last.pt").exists() else None)
    if path:
        ckpt = load_resume(path, model, run["args"], run["backbone_fingerprint"])
        if ckpt["iteration"] >= args.iters:
            if rank == 0:
                print(f"{path} is a finished run of {args.iters:,} iterations, nothing to do: its figures are in "
                      f"{Path(path).parent / 'log.jsonl'}; evaluate it with eval.py --ckpt {path}")
            return False
        model.load_trainable_state_dict(ckpt["model"], origin=str(path))
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        run |= {k: ckpt[k] for k in ("iteration", "epoch", "position")}
        if rank == 0:
            print(f"resuming {path} at iteration {run['iteration']} of {args.iters}")
    if path and len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank])
    else:
        for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
            seed_fn(args.seed + rank)  # each rank draws its own random points in the loss
    if rank == 0 and not path:
        (args.out / "args.json").write_text(json.dumps(run["args"], indent=2))
    return True


@contextlib.contextmanager
def own_folder(out: Path, rank: int, world_size: int):
    """Holds a lock on OUT/run.lock while the run runs: a second run on the same --out is refused,
    with the first one's process named. The lock goes with its process, even a killed one."""
    lock, error = None, None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = open(out / "run.lock", "a+")
        except OSError as e:
            error = f"--out {out} cannot be created: {e.strerror}"
    if lock is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.truncate(0)
            lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        except BlockingIOError:
            lock.seek(0)
            error = (f"--out {out} belongs to a run that is still going ({lock.read().strip() or 'another process'}); "
                     f"wait for it to end, or give this run another --out")
            lock.close()
    if world_size > 1:  # every rank stops if rank 0 cannot own the folder
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise FileExistsError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


class Interrupted(Exception):
    """SIGTERM or Ctrl-C stopped training after last.pt was written."""


TRY_INSTEAD = "start again with a lower --lr (and another --out)"


# ----------------------------------------------------------- Logging, validation and the benchmark


class Log:
    """The progress bar and OUT/log.jsonl: mean losses (over ranks and steps) every --log-every steps."""

    def __init__(self, args, iteration: int, rank: int, world_size: int, device: torch.device):
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.file = open(args.out / "log.jsonl", "a") if rank == 0 else None
        self.bar = tqdm(total=args.iters, initial=iteration, disable=rank > 0, dynamic_ncols=True)
        self.sums, self.count, self.start = 0.0, 0, time.perf_counter()

    def step(self, iteration: int, losses: dict[str, torch.Tensor], lr: float) -> None:
        self.bar.update(1)
        self.sums = self.sums + torch.stack([v.detach().float() for v in losses.values()])
        self.count += 1
        if iteration % self.args.log_every and iteration != self.args.iters:
            return
        mean = (self.sums / self.count).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(mean)
            mean /= self.world_size
        record = dict(iter=iteration, lr=lr, images_per_s=self.count * self.args.batch_size /
                      (time.perf_counter() - self.start)) | dict(zip(losses, mean.tolist()))
        self.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}")
        self.sums, self.count, self.start = 0.0, 0, time.perf_counter()

    def validation(self, iteration: int, results: dict, classes: tuple[str, ...]) -> None:
        if self.rank == 0 and results:
            tqdm.write(f"iteration {iteration}:\n" + evaluation.format_results(results, classes))
            self.write(dict(iter=iteration, val=evaluation.to_json(results, classes)))

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


def validate(model, val_sets, args, device, iteration: int, rank: int, stop) -> dict:
    """Every validation set, with 4 coloured predictions per set saved under OUT/val/ITERATION;
    it ends early when `stop()` turns true (a stop signal)."""
    results = {}
    for ds in val_sets:
        out_dir = args.out / "val" / f"iter_{iteration:06d}" / evaluation.folder_name(ds.name)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        results[ds.name] = evaluation.evaluate(model, ds, device=device, window=args.window, stride=args.stride,
                                               workers=args.workers, save_dir=out_dir if rank == 0 else None,
                                               save_limit=4, stop=stop)
    return results


GTA_SIZE = (1914, 1052)  # GTAV's frames, width x height


def write_gta_like(root: Path, count: int, size: tuple[int, int]) -> None:
    """`count` synthetic street scenes of the photo domain saved as GTAV ships its data,
    root/images/NNNNN.png and root/labels/NNNNN.png of Cityscapes label ids, `size` (w, h). Their
    PNGs weigh what GTAV's do, 3 to 4 MB a frame at its size."""
    to_label_id = np.zeros(256, dtype=np.uint8)  # train id -> a Cityscapes label id; 0 (unlabelled) else
    for label_id, train_id in data.CITYSCAPES_ID_TO_TRAIN.items():
        to_label_id[train_id] = label_id
    scenes = data.build_dataset("synthetic:photo", None, "train", train=False, image_size=size, length=count)
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    for i in range(count):
        rgb, train_ids = scenes.read(i)
        Image.fromarray(rgb).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(to_label_id[train_ids]).save(root / "labels" / f"{i:05d}.png")


def benchmark_data(args) -> None:
    """Training images per second the data pipeline delivers: GTAV-sized PNG pairs read, augmented
    (the paper's recipe, and --augment pasta if given) and cropped by --workers processes, as
    training reads them, after one batch of warm-up."""
    with tempfile.TemporaryDirectory() as folder:
        write_gta_like(Path(folder), 2 * args.batch_size, GTA_SIZE)
        train_set = data.build_dataset("gta", folder, "train", train=True, crop_size=args.crop_size,
                                       **data.dataset_kwargs("gta", "train", vars(args)))
        sampler = TrainSampler(train_set, seed=args.seed, rank=0, world_size=1)
        loader = torch.utils.data.DataLoader(Augmented(train_set), batch_size=args.batch_size, sampler=sampler,
                                             drop_last=True, num_workers=args.workers,
                                             persistent_workers=args.workers > 0)
        stream = batches(loader, sampler, epoch=0, position=0)
        next(stream)
        start = time.perf_counter()
        for _ in range(args.bench_data):
            next(stream)
        rate = args.bench_data * args.batch_size / (time.perf_counter() - start)
    print(f"bench-data: {rate:.1f} images/s from {GTA_SIZE[0]}x{GTA_SIZE[1]} PNG pairs to {args.crop_size}x"
          f"{args.crop_size} crops, {args.workers} workers on {os.cpu_count()} cores")


def benchmark(model, optimizer, args, device, autocast, per_rank: int) -> None:
    """Median time of a training step on random inputs of the real size, after 3 warm-up steps."""
    images = torch.randn(per_rank, 3, args.crop_size, args.crop_size, device=device)
    labels = torch.randint(0, model.config["num_classes"], (per_rank, args.crop_size, args.crop_size), device=device)
    times = []
    for _ in range(3 + args.bench):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, images, labels, autocast)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    ms = 1000 * float(np.median(times[3:]))
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA max allocated" if device.type == "cuda" \
        else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process peak RSS"
    flags = [name for name, on in (("bf16", device.type == "cuda" and not args.fp32), ("compile", args.compile),
                                   ("grad-ckpt", args.grad_ckpt)) if on]
    print(f"bench: {args.method} {args.backbone} patch {args.patch_size}, {args.crop_size}x{args.crop_size}, batch "
          f"{args.batch_size}, {device}, {'+'.join(flags) or 'fp32'}: {ms:.1f} ms/step, "
          f"{1000 * args.batch_size / ms:.1f} images/s, peak {peak}")


# ---------------------------------------------------------------------------------------- Training


def main(args: argparse.Namespace) -> dict:
    device = evaluation.setup_distributed()
    rank, world_size = evaluation.world()
    previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train(args, device, rank, world_size)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> dict:
    """The whole run, top to bottom: set-up, resume, then the loop; the run owns its folder meanwhile."""
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch and must divide among "
                         f"{world_size} processes")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.fp32)
    if args.bench_data:
        benchmark_data(args)
        return {}
    if args.bench:
        model, ddp, optimizer, _ = build(args, device, world_size, num_classes=19)
        benchmark(ddp, optimizer, args, device, autocast, args.batch_size // world_size)
        return {}

    train_set, val_sets = datasets(args, rank)  # everything that can fail on user input fails here
    model, ddp, optimizer, schedule = build(args, device, world_size, num_classes=train_set.num_classes)
    # What the checkpoint records besides the weights: the options, the classes with their colours,
    # the backbone weights' fingerprint, and where in the data the run is.
    run = dict(args=json.loads(json.dumps(vars(args), default=str)), classes=list(train_set.classes),
               palette=train_set.palette.tolist(), backbone_fingerprint=model.backbone_fingerprint(),
               iteration=0, epoch=0, position=0)
    with own_folder(args.out, rank, world_size):
        if not resume(args, run, model, optimizer, schedule, rank, world_size):
            return {}
        sampler = TrainSampler(train_set, seed=args.seed, rank=rank, world_size=world_size)
        # The loader gets its own generator, so that creating it draws nothing from the global
        # random state (which the checkpoint restores).
        loader = torch.utils.data.DataLoader(Augmented(train_set), batch_size=args.batch_size // world_size,
                                             sampler=sampler, drop_last=True, num_workers=args.workers,
                                             pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                                             generator=torch.Generator(),
                                             worker_init_fn=evaluation.ignore_stop_signals)
        stream = batches(loader, sampler, epoch=run["epoch"], position=run["position"])
        return loop(args, run, (model, ddp, optimizer, schedule), stream, val_sets, train_set.classes, device,
                    autocast)


def any_rank(values: list, device: torch.device) -> torch.Tensor:
    """The largest of each value over the ranks (the values themselves outside torchrun)."""
    flags = torch.tensor([float(v) for v in values], device=device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def loop(args, run: dict, trained: tuple, stream, val_sets, classes, device, autocast) -> dict:
    """Steps until --iters: the update, the log, last.pt every --save-every steps and before each
    validation, the validation every --eval-every steps; a NaN or a stop signal ends it."""
    model, ddp, optimizer, schedule = trained
    rank, world_size = evaluation.world()
    stop = {"signal": 0}
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.update(signal=signum))
    log = Log(args, run["iteration"], rank, world_size, device)
    results = {}
    model.train()
    try:
        while run["iteration"] < args.iters:
            run["epoch"], run["position"], (images, labels) = next(stream)
            losses = train_step(ddp, optimizer, images.to(device, non_blocking=True),
                                labels.to(device, non_blocking=True), autocast,
                                args.advstyle_lr if args.augment == "advstyle" else None)
            # One small all-reduce per step, so that every rank agrees on a NaN or a signal.
            flags = any_rank([not torch.isfinite(losses["loss"]), stop["signal"]], device)
            if flags[0]:
                raise FloatingPointError(f"the loss is {losses['loss'].item()} at iteration {run['iteration'] + 1}: "
                                         f"the run diverged, and stopped before the update. {kept(args.out)}; "
                                         f"{TRY_INSTEAD}")
            optimizer.step()
            schedule.step()
            run["iteration"] += 1
            log.step(run["iteration"], losses, schedule.get_last_lr()[0])
            validating = run["iteration"] % args.eval_every == 0 or run["iteration"] == args.iters
            if flags[1] or validating or run["iteration"] % args.save_every == 0:
                save_checkpoint(args, run, model, optimizer, schedule, rank, world_size)
            if validating and not flags[1]:
                # A signal stops the validation too (torchrun waits 30 s only); last.pt is written.
                results = validate(model, val_sets, args, device, run["iteration"], rank, lambda: stop["signal"])
                flags[1] = any_rank([0, stop["signal"]], device)[1]
                if not flags[1]:
                    log.validation(run["iteration"], results, classes)
                model.train()
            if flags[1]:
                raise Interrupted(f"stopped by signal {int(flags[1])} at iteration {run['iteration']}: "
                                  f"{args.out / 'last.pt'} written; the same command resumes")
    finally:
        log.close()
    return results


if __name__ == "__main__":
    # An interrupted run exits with status 1 too: `train.py && eval.py` must not evaluate a half-trained model.
    evaluation.run_command(main, parse_args(), plain=(Interrupted,))
