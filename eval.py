"""Evaluation on unseen domains: sliding-window inference, exact mIoU, pictures to look at.

    python eval.py --ckpt runs/synthetic_game/last.pt --data synthetic:photo,synthetic:fog
    python eval.py --ckpt RUN/last.pt --data cityscapes,bdd,mapillary --json results.json
    python eval.py --ckpt RUN/last.pt --data cityscapes --split test --save-dir preds --format labelids
    python eval.py --ckpt RUN/last.pt --image photos/ street.jpg --save-dir preds
    torchrun --nproc_per_node 8 eval.py --ckpt RUN/last.pt --data cityscapes,bdd,mapillary

Each image is resized to its dataset's test scale, covered by 512 x 512 windows with
stride 341, and the per-class scores of overlapping windows are averaged. The scores are
resized to the label's full resolution before the argmax, and an int64 confusion matrix
counts every pixel; under torchrun each process takes a share of the images and the
matrices are summed, so the result is exactly that of one process. train.py calls
`evaluate` for its periodic validation.
"""

import argparse
import json
import multiprocessing
import os
import re
import signal
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm import tqdm

import data
import rein
import vit

# --------------------------------------------------------------------------------------- Inference


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, the last one flush with the far edge."""
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


@torch.inference_mode()
def slide_inference(model: rein.Segmenter, image: Tensor, *, window: int = 512, stride: int = 341,
                    batch_size: int = 8) -> Tensor:
    """Per-class scores (K, h, w) for one image (3, h, w), averaged over overlapping windows.

    Images smaller than a window are padded (with zeros, the mean colour after
    normalisation) and the padding is cut off the scores. All windows of the image go
    through the model in batches of `batch_size`.
    """
    _, h, w = image.shape
    padded = F.pad(image, (0, max(window - w, 0), 0, max(window - h, 0)))
    H, W = padded.shape[-2:]
    boxes = [(y, x) for y in window_starts(H, window, stride) for x in window_starts(W, window, stride)]
    crops = torch.stack([padded[:, y:y + window, x:x + window] for y, x in boxes])  # (n, 3, window, window)
    scores = counts = None
    # A large picture takes many batches: their own progress bar, under the one of the images.
    batches = tqdm(range(0, len(boxes), batch_size), desc=f"windows of {w}x{h}", leave=False,
                   disable=len(boxes) <= 8 * batch_size or world()[0] > 0)
    for i in batches:
        out = model.predict(crops[i:i + batch_size]).float()  # (b, K, window, window)
        if scores is None:
            scores = out.new_zeros(out.shape[1], H, W)
            counts = out.new_zeros(1, H, W)
        for (y, x), s in zip(boxes[i:i + batch_size], out):
            scores[:, y:y + window, x:x + window] += s
            counts[:, y:y + window, x:x + window] += 1
    return (scores / counts)[:, :h, :w]


@torch.inference_mode()
def whole_inference(model: rein.Segmenter, image: Tensor) -> Tensor:
    """Per-class scores (K, h, w) from one pass over the whole image (3, h, w), padded to the patch size."""
    _, h, w = image.shape
    p = model.backbone.vit.patch_size
    padded = F.pad(image, (0, -w % p, 0, -h % p))
    blocks = model.backbone.vit.blocks
    if padded[0].numel() // p**2 <= 64**2 or world()[0] > 0:
        return model.predict(padded[None]).float()[0, :, :h, :w]
    # A pass over a large picture takes minutes on a CPU (attention grows with the square of the
    # patches): a bar that moves with the ViT's blocks, ticked by forward hooks for this pass only.
    with tqdm(total=len(blocks) + 1, desc=f"one pass over {w}x{h}", leave=False) as bar:
        def tick(*_) -> None:  # a hook that returned something would replace the block's output
            bar.update()

        hooks = [block.register_forward_hook(tick) for block in blocks]
        try:
            scores = model.predict(padded[None]).float()[0, :, :h, :w]
        finally:
            for hook in hooks:
                hook.remove()
        bar.update()  # the head
    return scores


def available_memory(device: torch.device) -> int:
    """Bytes that `device` can still give: free GPU memory, or the memory Linux reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_whole_image_fits(model: rein.Segmenter, image: Tensor) -> None:
    """Refuses, up front, a whole-image pass that needs more memory than there is. Its largest
    tensors are every query's mask logits at the image's full size, with their sigmoid, and the
    per-class scores (float32: 4 bytes each)."""
    _, h, w = image.shape
    need = 4 * h * w * 2 * (model.config["num_queries"] + model.config["num_classes"])
    free = available_memory(image.device)
    if need > free:
        raise ValueError(f"--whole: one pass over a {w}x{h} image needs about {need / 2**30:.1f} GiB, and "
                         f"{image.device} has {free / 2**30:.1f} GiB available; leave out --whole (sliding windows "
                         f"need far less), or give smaller images")


@torch.inference_mode()
def predict_labels(model: rein.Segmenter, image: Tensor, size: tuple[int, int], *, slide: bool = True,
                   window: int = 512, stride: int = 341, batch_size: int = 8) -> Tensor:
    """Train ids (H, W) for an image (3, h, w) at test scale; `size` = (H, W) of the label."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=image.device.type == "cuda")
    with autocast:
        if slide:
            scores = slide_inference(model, image, window=window, stride=stride, batch_size=batch_size)
        else:
            check_whole_image_fits(model, image)
            scores = whole_inference(model, image)
    # Resized to the label's full resolution before the argmax, so that no label is resampled.
    scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    return scores.argmax(0)


# ----------------------------------------------------------------------------------------- Metrics


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """int64 (K, K): rows are the true class, columns the predicted one; label 255 is ignored."""
    keep = label != data.IGNORE
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores_from_confusion(conf: Tensor) -> dict:
    """Per-class IoU, mIoU and pixel accuracy from a confusion matrix.

    A class absent from both the labels and the predictions has no IoU (None) and is left
    out of the mean, as mmseg and cityscapesscripts do.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [(t / u).item() if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    total = conf.sum().item()
    return dict(miou=float(np.mean(present)) if present else float("nan"), iou=iou,
                accuracy=tp.sum().item() / total if total else float("nan"))


# ----------------------------------------------------------------------------- Writing predictions


FORMATS = ("color", "labelids", "trainids")


def train_to_raw_ids(lut: np.ndarray) -> np.ndarray:
    """Inverts a label table: train id -> the smallest raw id that maps to it (uint8, 256)."""
    inverse = np.arange(256, dtype=np.uint8)
    for raw in range(255, -1, -1):
        if lut[raw] != data.IGNORE:
            inverse[lut[raw]] = raw
    return inverse


def overlay(rgb: np.ndarray, pred: np.ndarray, palette: np.ndarray, label: np.ndarray | None) -> np.ndarray:
    """Prediction colours over the image, side by side with the coloured label if there is one."""
    blend = (0.5 * rgb + 0.5 * data.colorize(pred, palette)).astype(np.uint8)
    return blend if label is None else np.concatenate([blend, data.colorize(label, palette)], axis=1)


def legend(picture: np.ndarray, shown: np.ndarray, classes: tuple[str, ...], palette: np.ndarray,
           title: str) -> np.ndarray:
    """A white strip under the picture: the title, then a colour swatch and the name of each class shown."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width, line = picture.shape[1], 16
    entries, x, y = [], 4, line + 4
    for k in shown:
        size = 14 + int(measure.textlength(classes[k], font=font)) + 12
        if x + size > width and x > 4:
            x, y = 4, y + line
        entries.append((k, x, y))
        x += size
    strip = Image.new("RGB", (width, y + line + 2), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((4, 2), title, fill="black", font=font)
    for k, x, y in entries:
        draw.rectangle((x, y + 1, x + 10, y + 11), fill=tuple(int(c) for c in palette[k]), outline="black")
        draw.text((x + 14, y), classes[k], fill="black", font=font)
    return np.concatenate([picture, np.asarray(strip)], axis=0)


def save_prediction(path: Path, pred: np.ndarray, fmt: str, *, rgb: np.ndarray, classes: tuple[str, ...],
                    palette: np.ndarray, label: np.ndarray | None, to_raw: np.ndarray | None) -> None:
    """Writes one PNG at full resolution: a colour overlay with a legend, benchmark label ids, or train ids."""
    if fmt == "color":
        shown = np.unique(pred) if label is None else np.union1d(np.unique(pred), np.unique(label))
        title = "prediction over the image" + ("" if label is None else " (left), ground truth (right)")
        picture = legend(overlay(rgb, pred, palette, label), shown[shown < len(classes)], classes, palette, title)
    elif fmt == "labelids":
        picture = to_raw[pred]
    else:
        picture = pred
    Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8)).save(path)


# ----------------------------------------- The distributed set-up and the checks both command lines share


def setup_distributed() -> torch.device:
    """Reads torchrun's environment; NCCL on CUDA, gloo on CPU. Returns this process's device."""
    if "LOCAL_RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        # The device is chosen before the process group, so NCCL binds to the right GPU.
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and Ctrl-C to the main process, which saves a checkpoint
    and shuts them down; a worker that died first would fail the loader in the middle of a step."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def error_text(error: BaseException) -> str:
    """An error's own message. DataLoader re-raises a worker's error with the worker's whole
    traceback as its message; the error's own last line is what a user needs."""
    text = str(error)
    if "in DataLoader worker process" in text:
        marker = f"\n{type(error).__name__}: "
        text = text[text.rfind(marker) + len(marker):].strip() if marker in text else text
    return text


def run_command(main, args: argparse.Namespace, *, plain: tuple[type, ...] = ()) -> None:
    """Runs a command line's `main(args)` and exits: 0 when it returns; 1 with 'error: MESSAGE' for a
    mistake in the input (or with the message alone for the `plain` exceptions); 1 with the traceback
    for anything else. Data-loading workers are stopped first on every failure: they ignore SIGTERM
    (ignore_stop_signals), and Python's own exit would send them one and wait for them forever."""
    try:
        main(args)
        return
    except plain as e:
        message = str(e)
    except KeyboardInterrupt:
        message = "interrupted"
    except (OSError, ValueError, FloatingPointError) as e:  # FileNotFoundError and PermissionError too
        message = f"error: {error_text(e)}"
    except Exception:
        message = traceback.format_exc().rstrip()
    print(message, file=sys.stderr)
    # DataLoader's SIGCHLD handler would report the killed workers as a failure of their own.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()
    sys.exit(1)


def check_writable(folder: Path, flag: str) -> None:
    """Fails before any work if `folder` (given as `flag`) could not be created or written to.
    Creates nothing: a run that fails to start leaves no folder behind."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {folder} is not writable: {existing} is "
                              f"{'not a folder' if not existing.is_dir() else 'read-only for this user'}")


# ---------------------------------------------------------------- Evaluation, alone or distributed


def evaluate(model: rein.Segmenter, dataset, *, device: torch.device, slide: bool = True, window: int = 512,
             stride: int = 341, batch_size: int = 8, workers: int = 2, save_dir: Path | None = None,
             fmt: str = "color", save_limit: int | None = None, progress: bool = True, stop=None) -> dict:
    """mIoU, per-class IoU, accuracy and image count of `model` on `dataset`.

    Under torchrun, process r takes images r, r + world, ...: every image is counted once,
    whatever the dataset size. With `save_dir`, predictions are written as PNGs named
    after the image (the first `save_limit` of each process only, if given). `stop`: a
    function asked before each image; when it turns true the evaluation ends early.
    """
    rank, world_size = world()
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    K = dataset.num_classes
    conf = torch.zeros(K, K, dtype=torch.int64, device=device)
    to_raw = train_to_raw_ids(dataset.lut) if fmt == "labelids" else None
    bar = tqdm(loader, desc=f"eval {dataset.name}", disable=not progress or rank > 0, leave=False)
    for n, sample in enumerate(bar):
        if stop is not None and stop():
            break
        label = sample["label"].to(device, non_blocking=True)
        pred = predict_labels(model, sample["image"].to(device, non_blocking=True), tuple(label.shape),
                              slide=slide, window=window, stride=stride, batch_size=batch_size)
        conf += confusion_matrix(pred, label, K)
        if save_dir is not None and (save_limit is None or n < save_limit):
            rgb, raw_label = dataset.read(sample["index"])
            save_prediction(save_dir / f"{sample['name']}.png", pred.cpu().numpy(), fmt, rgb=rgb,
                            classes=dataset.classes, palette=dataset.palette,
                            label=raw_label if dataset.has_labels else None, to_raw=to_raw)
    if world_size > 1:
        dist.all_reduce(conf)
    return scores_from_confusion(conf.cpu()) | dict(images=len(dataset), confusion=conf.cpu())


def format_results(results: dict[str, dict], classes: tuple[str, ...]) -> str:
    """A per-class IoU table with one column per dataset, then mIoU, accuracy and the mean."""
    names = list(results)
    width = max(8, *(len(n) for n in names))
    lines = [f"{'class':<14}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for k, cls in enumerate(classes):
        cells = [results[n]["iou"][k] for n in names]
        lines.append(f"{cls:<14}" + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>{width + 2}}" for v in cells))
    lines.append(f"{'mIoU':<14}" + "".join(f"{100 * results[n]['miou']:>{width + 2}.1f}" for n in names))
    lines.append(f"{'accuracy':<14}" + "".join(f"{100 * results[n]['accuracy']:>{width + 2}.1f}" for n in names))
    lines.append(f"{'images':<14}" + "".join(f"{results[n]['images']:>{width + 2}}" for n in names))
    if len(names) > 1:
        lines.append(f"mean mIoU over {len(names)} datasets: {100 * mean_miou(results):.1f}")
    return "\n".join(lines)


def mean_miou(results: dict[str, dict]) -> float:
    return float(np.mean([r["miou"] for r in results.values()]))


def to_json(results: dict[str, dict], classes: tuple[str, ...]) -> dict:
    """Every figure, per dataset, plus the mean over datasets."""
    return dict(datasets={name: dict(miou=r["miou"], accuracy=r["accuracy"], images=r["images"],
                                     iou=dict(zip(classes, r["iou"])), confusion=r["confusion"].tolist())
                          for name, r in results.items()},
                mean_miou=mean_miou(results))


# ---------------------------------------------------------------- Checkpoints and the command line


def folder_name(dataset: str) -> str:
    """A dataset name as one safe folder name: 'synthetic:fog' -> 'synthetic_fog', '/abs/my data' -> 'abs_my_data'.
    (A name that is a path must never send files into that path.)"""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_.") or "dataset"


def check_head_version(config: dict, path: str | Path) -> None:
    """Checkpoints from before the paper's pixel decoder have no `encoder_layers`; say so plainly."""
    if "encoder_layers" not in config:
        raise ValueError(f"{path} was trained with the earlier convolutional (FPN) head, which the paper's "
                         f"deformable-attention head replaced; its weights cannot run in this version. Retrain "
                         f"it, or evaluate it with the version of this repository that trained it")


def load_checkpoint(path: str | Path, weights: str | None = None) -> tuple[rein.Segmenter, dict]:
    """Rebuilds the model a checkpoint describes and loads its trained weights.

    A train.py checkpoint stores what trained plus the arguments that rebuild the rest;
    `weights` overrides where its frozen backbone weights come from. An official Rein release
    file (an mmengine checkpoint with decode_head.* weights) goes through rein.from_official,
    with `weights` naming its backbone's weights.
    """
    ckpt = vit.read_file(path, what="a train.py checkpoint or an official Rein release file")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        return rein.from_official(path, weights), {}
    if isinstance(ckpt, dict) and not {"config", "model"} <= ckpt.keys():
        try:
            family = vit.FAMILIES[vit.read_weights(ckpt, origin=str(path))[1]].title
        except ValueError:
            family = None
        if family:
            raise ValueError(f"{path} holds {family} backbone weights, not a trained segmenter: pass it as "
                             f"--weights, and a train.py checkpoint or an official Rein release file as --ckpt")
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a train.py checkpoint: expected the keys 'config' and 'model', "
                         f"found {found}")
    check_head_version(ckpt["config"], path)
    config = dict(ckpt["config"])
    if weights is not None:
        config["weights"] = weights
    elif config["method"] == "full":
        config["weights"] = None  # the checkpoint holds the whole trained ViT
    model = rein.build_model(**config)
    model.load_trainable_state_dict(ckpt["model"], origin=str(path))
    recorded, now = ckpt.get("backbone_fingerprint"), model.backbone_fingerprint()
    if recorded and config["method"] != "full" and now != recorded:
        raise ValueError(f"{path} was trained on other backbone weights than {config['weights'] or 'the random ones'} "
                         f"(their fingerprints differ: {recorded} recorded, {now} now); "
                         f"pass the weights it was trained on with --weights (the run's args.json names them)")
    return model, ckpt


def image_outputs(paths: list[str], save_dir: Path) -> list[tuple[Path, Path]]:
    """(input, output PNG) for the files named and the files inside the folders named.

    A folder's sub-folders are kept under save_dir. An output is the input's name with
    .png, or the whole name plus .png where two inputs would share it (a.jpg and a.png);
    one that would overwrite an input is refused.
    """
    pairs = []
    for p in map(Path, paths):
        if p.is_dir():
            pairs += [(f, f.relative_to(p)) for f in sorted(p.rglob("*")) if f.is_file()]
        elif p.is_file():
            pairs.append((p, Path(p.name)))
        else:
            raise FileNotFoundError(f"--image {p}: no such file or folder")
    stems = Counter(rel.with_suffix("") for _, rel in pairs)
    outputs = [save_dir / (rel.with_suffix(".png") if stems[rel.with_suffix("")] == 1
                           else rel.parent / f"{rel.name}.png") for _, rel in pairs]
    inputs = {f.resolve() for f, _ in pairs}
    clash = [str(o) for o in outputs if o.resolve() in inputs] or \
        [str(o) for o, n in Counter(outputs).items() if n > 1]
    if clash:
        raise ValueError(f"--save-dir {save_dir} would overwrite {clash[:3]} (inputs, or two predictions of the "
                         f"same name); choose another --save-dir")
    check_new_files(outputs, save_dir)
    return [(f, o) for (f, _), o in zip(pairs, outputs)]


def check_new_files(outputs: list[Path], save_dir: Path) -> None:
    """Refuses, before anything is written, to replace a file that is already there: this command
    writes only files that it creates."""
    existing = [str(o) for o in outputs if o.exists()]
    if existing:
        raise FileExistsError(f"--save-dir {save_dir} already holds {len(existing)} of the {len(outputs)} files this "
                              f"would write ({', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}); "
                              f"nothing was written: choose a new folder, or move those files away")


def dataset_outputs(dataset, save_dir: Path) -> Path:
    """The folder of a dataset's predictions under --save-dir, checked: one new file per image."""
    out_dir = save_dir / folder_name(dataset.name)
    names = Counter(dataset.stem(i) for i in range(len(dataset)))
    twice = [n for n, count in names.items() if count > 1]
    if twice:
        raise ValueError(f"{dataset.name} has {len(twice)} image names that occur more than once (e.g. {twice[0]}), "
                         f"so their predictions would overwrite each other in {out_dir}; rename them")
    check_new_files([out_dir / f"{name}.png" for name in names], save_dir)
    return out_dir


def class_names(ckpt: dict, num_classes: int) -> tuple[tuple[str, ...], np.ndarray]:
    """The class names and colours a checkpoint was trained with; for files that do not record them
    (official releases, older runs), Cityscapes' for 19 classes and class_0, class_1, ... otherwise."""
    if "classes" in ckpt:
        return tuple(ckpt["classes"]), np.array(ckpt["palette"], dtype=np.uint8)
    if num_classes == len(data.CITYSCAPES_CLASSES):
        return data.CITYSCAPES_CLASSES, data.CITYSCAPES_PALETTE
    return tuple(f"class_{k}" for k in range(num_classes)), data.palette_for(num_classes)


@torch.inference_mode()
def predict_images(model: rein.Segmenter, paths: list[str], save_dir: Path, *, device: torch.device,
                   test_size: tuple[int, int] | None, slide: bool, window: int, stride: int,
                   classes: tuple[str, ...], palette: np.ndarray) -> int:
    """Coloured predictions for the user's own pictures, seen at `test_size` (long, short) or as
    they are (None); files that are not images are skipped with a warning."""
    rank, world_size = world()
    written = 0
    for f, out in tqdm(image_outputs(paths, save_dir)[rank::world_size], desc="predict", disable=rank > 0):
        try:
            rgb = np.asarray(data.read_rgb(f))
        except ValueError as e:
            warnings.warn(f"skipping {f}: not an image ({e})")
            continue
        image = data.to_test_tensor(rgb, test_size).to(device)
        pred = predict_labels(model, image, rgb.shape[:2], slide=slide, window=window, stride=stride).cpu().numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        save_prediction(out, pred, "color", rgb=rgb, classes=classes, palette=palette, label=None, to_raw=None)
        written += 1
    if world_size > 1:  # a process may have had no picture among its share
        total = torch.tensor(written, device=device)
        dist.all_reduce(total)
        written = int(total)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a trained checkpoint on several domains, or predict images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (e.g. runs/NAME/last.pt) or an official "
                                                 "Rein release file")
    p.add_argument("--data", help="datasets to evaluate, NAME[=ROOT],... (see data.py)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="dataset split")
    p.add_argument("--weights", help="where the frozen backbone weights come from (path, URL or name, e.g. "
                                     "eva02_vitl14 or a release's converted file such as dinov2_converted.pth); "
                                     "default: as recorded in the checkpoint")
    p.add_argument("--image", nargs="+", help="your own image files or folders: coloured predictions, no labels")
    p.add_argument("--save-dir", type=Path, help="write one PNG per image here")
    p.add_argument("--format", choices=FORMATS, default="color",
                   help="with --data: color, an overlay beside the label; labelids, the dataset's own label ids "
                        "for benchmark servers; trainids. --image writes color")
    p.add_argument("--json", type=Path, help="write every figure here as JSON")
    p.add_argument("--whole", action="store_true", help="whole-image inference instead of sliding windows")
    p.add_argument("--window", type=int, help="sliding window size; default: the checkpoint's (512 in the paper)")
    p.add_argument("--stride", type=int, help="sliding window stride; default: the checkpoint's (341 in the paper)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading processes")
    args = p.parse_args(argv)
    if args.image and not args.save_dir:
        p.error("--image needs --save-dir to write the predictions to")
    if args.image and args.format != "color":
        p.error(f"--format {args.format} needs a dataset's label ids (--data); --image writes colour overlays")
    for key in ("window", "stride", "batch_size"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if not args.image and not args.data:
        p.error("say what to evaluate: --data NAME[=ROOT],... or --image PATH")
    return args


def main(args: argparse.Namespace) -> dict | None:
    device = setup_distributed()
    rank, _ = world()
    if args.save_dir:
        check_writable(args.save_dir, "--save-dir")
    model, ckpt = load_checkpoint(args.ckpt, args.weights)
    model.to(device)
    trained = ckpt.get("args", {})
    window = args.window or trained.get("window", 512)
    stride = args.stride or trained.get("stride", 341)
    results = None
    if args.image:
        classes, palette = class_names(ckpt, model.config["num_classes"])
        # Pictures are seen at the test scale of the data the model learnt from (GTAV for the
        # official release files).
        source = data.first_source(trained.get("data", "gta"))
        n = predict_images(model, args.image, args.save_dir, device=device, test_size=data.TEST_SIZES.get(source),
                           slide=not args.whole, window=window, stride=stride, classes=classes, palette=palette)
        if n == 0:
            raise ValueError(f"--image {' '.join(args.image)}: no image among the files found there; expected "
                             f"pictures ({', '.join(data.IMAGE_SUFFIXES)})")
        if rank == 0:
            print(f"wrote {n} predictions to {args.save_dir}")
    else:
        datasets = [data.build_dataset(name, root, args.split, train=False,
                                       **data.dataset_kwargs(name, args.split, trained))
                    for name, root in data.parse_data(args.data)]
        for ds in datasets:
            if ds.num_classes != model.config["num_classes"]:
                raise ValueError(f"{ds.name} has {ds.num_classes} classes but the model in {args.ckpt} "
                                 f"predicts {model.config['num_classes']}")
            if not ds.has_labels and not args.save_dir:
                raise ValueError(f"{ds.name} {args.split} has no labels to score; add --save-dir to write "
                                 f"its predictions")
            if args.format == "labelids" and not hasattr(ds, "lut"):
                raise ValueError(f"--format labelids writes a dataset's own label ids, and {ds.name} has none "
                                 f"(generated or combined data); use --format trainids or color")
        out_dirs = [dataset_outputs(ds, args.save_dir) if args.save_dir else None for ds in datasets]
        results = {}
        for ds, out_dir in zip(datasets, out_dirs):
            if out_dir:
                out_dir.mkdir(parents=True, exist_ok=True)
            result = evaluate(model, ds, device=device, slide=not args.whole, window=window, stride=stride,
                              batch_size=args.batch_size, workers=args.workers, save_dir=out_dir, fmt=args.format)
            if ds.has_labels:
                results[ds.name] = result
            elif rank == 0:
                print(f"{ds.name} {args.split} has no labels: {len(ds)} predictions written to {out_dir}")
        if rank == 0 and results:
            print(format_results(results, datasets[0].classes))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(to_json(results, datasets[0].classes), indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    run_command(main, parse_args())
