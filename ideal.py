"""IDEAL: Improved DEnse locAL contrastive learning for semi-supervised cardiac MRI segmentation.

Reference implementation of Basak et al., ICASSP 2023 (paper Fig. 2):

  (a) pre-training   x -> two views x_q, x_k -> E (ResNetEncoder) -> G (DenseHead, one 1x1 conv)
                     -> local InfoNCE over exactly corresponding locations (Eq. 2)
                     (+ GAP+MLP GlobalHead -> global InfoNCE, Eq. 1)
  (b) fine-tuning    x -> E -> D(theta1) (ConvTranspose U-Net decoder) -> p1 -> y1
                             -> D(theta2) (bilinear U-Net decoder)      -> p2 -> y2
                     cross-consistency loss (Eq. 3): CE(p, m) on labeled, CE(p1, y2) + CE(p2, y1) on unlabeled

    python ideal.py pretrain --data DIR --out RUN_P
    python ideal.py finetune --data DIR --out RUN_F --pretrained RUN_P/encoder.pt --labeled 1.25
    python ideal.py eval --run RUN_F [--save-pred --save-png]
    python ideal.py bench

Without --data the synthetic phantom of data.py is written once to cache/phantom and used.
"""
import argparse
import csv
import glob
import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
PHANTOM_DIR = os.path.join(HERE, "cache", "phantom")

# Every value can be overridden by the flag of the same name (--lr and --epochs set the sub-command's own).
# lr 1e-5 is the paper's; the cpu preset uses 1e-3 / 3e-3 because its budget is minutes, not GPU-days
# (README, "Decisions and deviations").
PRESETS = {
    "paper": dict(depth=50, width=64, size=192, spacing=1.367, batch_size=32, proj_dim=128, steps_per_epoch=100,
                  pretrain_lr=1e-5, finetune_lr=1e-5, pretrain_epochs=100, finetune_epochs=100),
    "cpu": dict(depth=18, width=16, size=128, spacing=2.05, batch_size=16, proj_dim=64, steps_per_epoch=50,
                pretrain_lr=1e-3, finetune_lr=3e-3, pretrain_epochs=100, finetune_epochs=30),
}
ARCH_KEYS = ("depth", "width", "size", "spacing")


# ----------------------------------------------------------------------------------------------------------
# E: ResNet encoder
# ----------------------------------------------------------------------------------------------------------
def conv_bn(cin, cout, k, stride=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN (ResNet-18/34) plus the identity or a 1x1 projection skip, then ReLU."""
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.body = self.make_body(cin, width, cout, stride)
        self.skip = conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()

    @staticmethod
    def make_body(cin, width, cout, stride):
        return nn.Sequential(conv_bn(cin, width, 3, stride), conv_bn(width, cout, 3, relu=False))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4 (ResNet-50/101; stride on the 3x3 as torchvision's v1.5)."""
    expansion = 4

    @staticmethod
    def make_body(cin, width, cout, stride):
        return nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                             conv_bn(width, cout, 1, relu=False))


RESNETS = {10: (BasicBlock, (1, 1, 1, 1)), 18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
           50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


class ResNetEncoder(nn.Module):
    """E: a 1-channel ResNet returning the stride 2, 4, 8, 16 and 32 feature maps (the U-Net skips).

    depth: 10/18/34 (basic blocks) or 50/101 (bottlenecks; the paper uses 50)
    width: channels of the stem and of the first stage (default: 64, as torchvision's ResNet)
    """

    def __init__(self, depth=50, width=64):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNETS)}, got {depth}")
        block, counts = RESNETS[depth]
        self.stem = conv_bn(1, width, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, n in enumerate(counts):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width * 2 ** i, 2 if (j == 0 and i > 0) else 1))
                cin = width * 2 ** i * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.channels = [width] + [width * 2 ** i * block.expansion for i in range(4)]

    def forward(self, x):                            # x: (B, 1, H, W)
        feats = [self.stem(x)]                       # (B, width, H/2, W/2)
        x = self.pool(feats[0])
        for stage in self.stages:
            x = stage(x)
            feats.append(x)                          # strides 4, 8, 16, 32
        return feats


# ----------------------------------------------------------------------------------------------------------
# G: projection heads
# ----------------------------------------------------------------------------------------------------------
class GlobalHead(nn.Module):
    """Global projection of Eq. 1 (Chaitanya et al., SimCLR): GAP + MLP -> (B, dim)."""

    def __init__(self, cin, dim=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cin, cin), nn.ReLU(inplace=True), nn.Linear(cin, dim))

    def forward(self, f):                            # f: (B, C, h, w)
        return self.mlp(f.mean((2, 3)))              # (B, dim)


class DenseHead(nn.Module):
    """G: the paper's dense projection head, a single 1x1 convolution -> (B, dim, h, w)."""

    def __init__(self, cin, dim=128):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, 1)

    def forward(self, f):                            # f: (B, C, h, w)
        return self.proj(f)


class PretrainNet(nn.Module):
    """Fig. 2a: E followed by the dense head G (and the global head for Eq. 1)."""

    def __init__(self, depth=50, width=64, proj_dim=128):
        super().__init__()
        self.encoder = ResNetEncoder(depth, width)
        self.global_head = GlobalHead(self.encoder.channels[-1], proj_dim)
        self.dense_head = DenseHead(self.encoder.channels[-1], proj_dim)

    def forward(self, x):                            # x: (B, 1, H, W)
        f = self.encoder(x)[-1]                      # (B, C, H/32, W/32)
        return self.global_head(f), self.dense_head(f)


# ----------------------------------------------------------------------------------------------------------
# Views with known geometry (on the training device, batched)
# ----------------------------------------------------------------------------------------------------------
def random_affine(n, g, device, scale=(0.7, 1.0), rotate=math.pi / 6, flip=True, shift=None):
    """Random affines theta (n, 2, 3) in normalised coordinates, view -> image (F.affine_grid's convention).

    A view covers `scale` of the image side, rotated by up to +-`rotate` radians, optionally flipped in x, and
    shifted by up to +-`shift` (default: as far as an unrotated view stays inside the image, 1 - scale).
    """
    u = torch.rand(n, 4, generator=g, device=device)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    a = (2 * u[:, 1] - 1) * rotate
    fx = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=device)
    cos, sin = torch.cos(a) * s, torch.sin(a) * s
    shift = (2 * torch.rand(n, 2, generator=g, device=device) - 1) * ((1 - s)[:, None] if shift is None else shift)
    return torch.stack([torch.stack([cos * fx, -sin, shift[:, 0]], 1),
                        torch.stack([sin * fx, cos, shift[:, 1]], 1)], 1)


def warp(x, theta, mode="bilinear"):
    """Resample x (B, C, H, W) through theta (B, 2, 3); zeros outside the image."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def jitter_intensity(x, g, gamma=(0.7, 1.5), contrast=(0.8, 1.2), brightness=0.1, noise=0.05):
    """Per-image gamma, contrast, brightness and Gaussian noise on images in [0, 1]."""
    u = torch.rand(x.shape[0], 4, 1, 1, 1, generator=g, device=x.device)
    x = x.clamp(min=0) ** (gamma[0] + (gamma[1] - gamma[0]) * u[:, 0])
    x = x * (contrast[0] + (contrast[1] - contrast[0]) * u[:, 1]) + brightness * (2 * u[:, 2] - 1)
    return x + noise * u[:, 3] * torch.randn(x.shape, generator=g, device=x.device)


def make_view(x, g):
    """One random view of each slice: x (B, 1, H, W) -> (view (B, 1, H, W), theta (B, 2, 3))."""
    theta = random_affine(x.shape[0], g, x.device)
    return jitter_intensity(warp(x, theta), g), theta


def relative_affine(theta_q, theta_k):
    """The affine mapping query-view coordinates to key-view coordinates: inv(M_k) @ M_q, (B, 2, 3)."""
    last = torch.tensor([0.0, 0.0, 1.0], device=theta_q.device).expand(theta_q.shape[0], 1, 3)
    m_q, m_k = torch.cat([theta_q, last], 1), torch.cat([theta_k, last], 1)
    return (torch.linalg.inv(m_k) @ m_q)[:, :2]


def align(k, theta_q, theta_k):
    """Resample the key's dense map onto the query's feature grid.

    k: (B, C, h, w) key-view features; theta_q, theta_k: (B, 2, 3) the two views' affines.
    Returns (k_aligned (B, C, h, w), valid (B, h, w) bool: the query location lies inside the key view).
    """
    rel = relative_affine(theta_q.float(), theta_k.float())
    grid = F.affine_grid(rel, list(k.shape), align_corners=False)          # (B, h, w, 2) key coords
    valid = (grid.abs() <= 1).all(-1)
    k = F.grid_sample(k, grid.to(k.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return k, valid


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def global_infonce(q, k, tau=0.1):
    """Eq. 1, symmetric (NT-Xent): global InfoNCE over a batch of view pairs.

    q, k: (B, D) projections of the two views of B images (normalised here).
    Positive of q_b is k_b; negatives are the 2B - 2 views of the other images.
    tau: softmax temperature (default: 0.1).
    """
    z = F.normalize(torch.cat([q, k]), dim=1)                               # (2B, D)
    logits = z @ z.t() / tau                                                # (2B, 2B)
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    b = q.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(logits, target)


def local_infonce(q, k, valid, tau=0.1, negatives="same"):
    """Eq. 2: dense local InfoNCE over exactly corresponding locations.

    q: (B, C, h, w) L2-normalised query map; k: (B, C, h, w) L2-normalised key map aligned to q's grid;
    valid: (B, h, w) bool, locations with a counterpart in the key view.
    Positive of q_{b,i} is k_{b,i}. negatives: "same" (Eq. 2): k_{b',i} of the other images b' at the same
    location i; "all": every valid location of the other images' key maps.
    Negatives that are not valid are left out; the loss is averaged over valid query locations.
    tau: softmax temperature (default: 0.1).
    """
    b, c, h, w = q.shape
    q, k, valid = q.flatten(2), k.flatten(2), valid.flatten(1)              # (B, C, L), (B, L)
    l_pos = torch.einsum("bcl,bcl->bl", q, k)[..., None]                     # positive logits: B x L x 1
    if negatives == "same":
        l_neg = torch.einsum("bcl,ecl->ble", q, k)                          # B x L x B (same location)
        keep = valid.t()[None].expand(b, -1, -1)                            # k_{e,l} valid
        other = ~torch.eye(b, dtype=torch.bool, device=q.device)[:, None, :]
    elif negatives == "all":
        l_neg = torch.einsum("bcl,ecm->blem", q, k).flatten(2)              # B x L x (B L)
        keep = valid.reshape(1, 1, b * h * w).expand(b, h * w, -1)
        other = (torch.arange(b, device=q.device)[:, None] !=
                 torch.arange(b, device=q.device).repeat_interleave(h * w)[None])[:, None, :]
    else:
        raise ValueError(f"negatives must be 'same' or 'all', got {negatives!r}")
    l_neg = l_neg.masked_fill(~(keep & other), float("-inf"))
    logits = torch.cat([l_pos, l_neg], -1).float() / tau                    # B x L x (1 + N)
    loss = -F.log_softmax(logits, -1)[..., 0]                               # B x L
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def pretrain_loss(model, xq, xk, theta_q, theta_k, loss="both", tau=0.1, lambda_loc=1.0, negatives="same"):
    """L = L_g + lambda_loc * L_loc, with both directions of Eq. 2 (q -> k and k -> q).

    Both views go through the model as one batch. loss: "global" | "local" | "both".
    Returns (total loss, {"global": ..., "local": ...} as detached tensors).
    """
    g, d = model(torch.cat([xq, xk]))                                       # (2B, D), (2B, D, h, w)
    (gq, gk), (dq, dk) = g.chunk(2), d.chunk(2)
    parts, total = {}, 0.0
    if loss in ("global", "both"):
        parts["global"] = global_infonce(gq, gk, tau)
        total = total + parts["global"]
    if loss in ("local", "both"):
        dq, dk = F.normalize(dq.float(), dim=1), F.normalize(dk.float(), dim=1)
        k_on_q, valid_q = align(dk, theta_q, theta_k)
        q_on_k, valid_k = align(dq, theta_k, theta_q)
        parts["local"] = (local_infonce(dq, F.normalize(k_on_q, dim=1), valid_q, tau, negatives) +
                          local_infonce(dk, F.normalize(q_on_k, dim=1), valid_k, tau, negatives)) / 2
        total = total + lambda_loc * parts["local"]
    return total, {name: v.detach() for name, v in parts.items()}


# ----------------------------------------------------------------------------------------------------------
# D(theta1), D(theta2): the two U-Net decoders
# ----------------------------------------------------------------------------------------------------------
class Up(nn.Module):
    """x2 upscaling: ConvTranspose (trainable kernels, D(theta1)) or bilinear Upsample + 1x1 conv (D(theta2))."""

    def __init__(self, cin, cout, up):
        super().__init__()
        if up == "transpose":
            self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        elif up == "bilinear":
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(cin, cout, 1))
        else:
            raise ValueError(f"up must be 'transpose' or 'bilinear', got {up!r}")

    def forward(self, x):
        return self.up(x)


class DecoderStage(nn.Module):
    """Upscale, concatenate the encoder skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin, cskip, cout, up):
        super().__init__()
        self.up = Up(cin, cout, up)
        self.conv = nn.Sequential(conv_bn(cout + cskip, cout, 3), conv_bn(cout, cout, 3))

    def forward(self, x, skip=None):
        x = self.up(x)
        return self.conv(x if skip is None else torch.cat([x, skip], 1))


class UNetDecoder(nn.Module):
    """D: 4 upscaling stages over the encoder skips (stride 32 -> 2), then one to input size, C logits."""

    def __init__(self, channels, num_classes, up="transpose"):
        super().__init__()
        skips = channels[3::-1]                      # encoder channels at strides 16, 8, 4, 2
        width = channels[0]
        outs = [width * 4, width * 2, width, max(width // 2, 8), max(width // 4, 8)]   # strides 16 .. 1
        ins = [channels[4]] + outs[:4]
        self.stages = nn.ModuleList([DecoderStage(ins[i], skips[i], outs[i], up) for i in range(4)])
        self.final = DecoderStage(ins[4], 0, outs[4], up)
        self.head = nn.Conv2d(outs[4], num_classes, 1)

    def forward(self, feats):                        # feats: 5 maps, strides 2..32
        x = feats[4]
        for stage, skip in zip(self.stages, reversed(feats[:4])):
            x = stage(x, skip)                       # strides 16, 8, 4, 2
        return self.head(self.final(x))              # (B, C, H, W)


class IDEALSegmenter(nn.Module):
    """Fig. 2b: the shared encoder E(theta) and two decoders D(theta1) (transpose) and D(theta2) (bilinear)."""

    def __init__(self, num_classes, depth=50, width=64, same_decoders=False):
        super().__init__()
        self.encoder = ResNetEncoder(depth, width)
        self.d1 = UNetDecoder(self.encoder.channels, num_classes, "transpose")
        self.d2 = UNetDecoder(self.encoder.channels, num_classes, "transpose" if same_decoders else "bilinear")

    def forward(self, x):                            # x: (B, 1, H, W)
        feats = self.encoder(x)
        return self.d1(feats), self.d2(feats)        # logits (B, C, H, W) twice


IGNORE = -1                                          # pseudo-label of a pixel left out of Eq. 3


@torch.no_grad()
def pseudo_label(logits, threshold=0.0):
    """y = one-hot argmax of softmax(logits) as class indices (B, H, W), detached: no gradient flows into it.

    threshold: pixels whose top probability is below it get IGNORE (default: 0.0, every pixel is kept).
    """
    confidence, y = logits.detach().float().softmax(1).max(1)
    return y.masked_fill(confidence < threshold, IGNORE)


def cross_consistency_loss(l1_lab, l2_lab, mask, l1_unl, l2_unl, y1, y2, weight=1.0):
    """Eq. 3: CE(p1, m) + CE(p2, m) on labeled slices, weight * (CE(p1, y2) + CE(p2, y1)) on unlabeled ones.

    l*_lab: (B_l, C, H, W) logits of D(theta1)/D(theta2) on labeled slices; mask: (B_l, H, W) class indices.
    l*_unl: (B_u, C, H, W) logits on unlabeled slices (None: supervised only); y1, y2: (B_u, H, W) the two
    decoders' pseudo-labels (pseudo_label), IGNORE pixels count as zero in the mean over all B_u H W pixels.
    weight: unlabeled weight at this step (the ramp-up is applied by the caller).
    Returns (loss, supervised term, unsupervised term).
    """
    sup = F.cross_entropy(l1_lab.float(), mask) + F.cross_entropy(l2_lab.float(), mask)
    if l1_unl is None:
        return sup, sup, sup.new_zeros(())
    unsup = (F.cross_entropy(l1_unl.float(), y2, ignore_index=IGNORE, reduction="none").mean() +
             F.cross_entropy(l2_unl.float(), y1, ignore_index=IGNORE, reduction="none").mean())
    return sup + weight * unsup, sup, unsup


def rampup(step, total, fraction=1.0, start=0.0):
    """Sigmoid ramp-up exp(-5 (1 - t)^2) (Laine & Aila 2017): 0 before `start` x total steps, then
    t = (step - start total) / (fraction total), 1 after that; fraction 0 jumps to 1 at the start."""
    if step < start * total:
        return 0.0
    if fraction <= 0:
        return 1.0
    t = min((step - start * total) / (fraction * total), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def learning_rate(base, step, total, schedule="constant"):
    """The learning rate at `step` of `total`: constant, or poly decay base (1 - step/total)^0.9 (SSL4MIS)."""
    return base if schedule == "constant" else base * (1.0 - step / total) ** 0.9


def predict(model, x, mode="mean"):
    """Class probabilities (B, C, H, W): mean of the two decoders' softmax, or one decoder's."""
    l1, l2 = model(x)
    p1, p2 = l1.float().softmax(1), l2.float().softmax(1)
    return {"mean": (p1 + p2) / 2, "d1": p1, "d2": p2}[mode]


# ----------------------------------------------------------------------------------------------------------
# Run folders and checkpoints
# ----------------------------------------------------------------------------------------------------------
def atomic_save(obj, path):
    """torch.save to a temporary file, then os.replace: a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_checkpoint(path, keys):
    """A plain-dict checkpoint, loaded with weights_only=True; DataError naming the file if it is not one."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                            # unpickling refused, not a zip, truncated ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise data.DataError(f"{path}: not a loadable checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        raise data.DataError(f"{path}: not an IDEAL checkpoint (expected keys {', '.join(keys)})")
    return ckpt


def check_arch(found, wanted, path):
    """DataError naming every architecture value that differs between a checkpoint and this run."""
    diff = [f"{k}={found.get(k)} (this run: {wanted[k]})" for k in ARCH_KEYS if found.get(k) != wanted[k]]
    if diff:
        raise data.DataError(f"{path}: made with another architecture: {', '.join(diff)}")


def load_state(module, state, path):
    """load_state_dict(strict=True), turning a mismatch into one line naming the offending keys."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise data.DataError(f"{path}: weights do not fit this model: {detail[:300]}") from None


def resume_or_new(cfg, ckpt_keys, command):
    """(cfg, last checkpoint) for --resume, else (cfg, None) after checking that --out holds no run yet.

    A resumed run keeps its stored configuration; an explicit --epochs extends it. Writes nothing: the run folder
    is only created once the data and weights have been checked (start_run).
    """
    out = cfg["out"]
    last = os.path.join(out, "last.pt")
    if cfg["resume"]:
        ckpt = load_checkpoint(last, ckpt_keys)
        check_arch(ckpt["config"], cfg, last)
        stored = ckpt["config"]
        return dict(stored, quiet=cfg["quiet"], device=cfg["device"], resume=True,
                    epochs=cfg["epochs"] or stored["epochs"]), ckpt
    if os.path.exists(last) or os.path.exists(os.path.join(out, "config.json")):
        raise data.DataError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    return dict(cfg, epochs=cfg["epochs"] or PRESETS[cfg["preset"]][f"{command}_epochs"]), None


def start_run(cfg, split):
    """Create the run folder with config.json (every resolved option) and split.json."""
    os.makedirs(cfg["out"], exist_ok=True)
    write_json(cfg, os.path.join(cfg["out"], "config.json"))
    data.save_split(split, os.path.join(cfg["out"], "split.json"))


def note(cfg, text):
    """An informational line on stderr, unless --quiet."""
    if not cfg["quiet"]:
        print(text, file=sys.stderr, flush=True)


class Progress:
    """One progress line on stderr per `every` seconds (epoch, step, loss, images/s, ETA); quiet silences it."""

    def __init__(self, total_steps, quiet=False, every=10.0):
        self.total, self.quiet, self.every = total_steps, quiet, every
        self.t0 = self.last = time.time()
        self.images = 0

    def update(self, done_steps, epoch, step, loss, images):
        self.images += images
        now = time.time()
        if self.quiet or now - self.last < self.every:
            return
        self.last = now
        rate = self.images / (now - self.t0)
        eta = (now - self.t0) / max(done_steps, 1) * (self.total - done_steps)
        print(f"epoch {epoch} step {step} loss {loss:.4f} {rate:.1f} img/s ETA {eta / 60:.1f} min",
              file=sys.stderr, flush=True)

    def rate(self):
        return self.images / max(time.time() - self.t0, 1e-9)


def log_epoch(out, record, quiet):
    """Append one JSON line per epoch to log.jsonl (and echo it on stdout)."""
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if not quiet:
        print(json.dumps(record), flush=True)


def check_finite(loss, epoch, step, out):
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}; "
                                 f"the last good checkpoint is kept in {out}")


def generators(seed, epoch, device, stream=0):
    """Per-epoch RNGs (CPU for sampling order, device for augmentation) derived from (seed, epoch, stream), so a
    resumed run draws exactly what an uninterrupted one would. Fine-tuning draws its labeled batches from
    stream 0 and its unlabeled ones from stream 1: the labeled sequence is the same with or without them."""
    base = seed * 100003 + epoch + 1000003 * stream
    return torch.Generator().manual_seed(base), torch.Generator(device=device).manual_seed(base + 7919)


def autocast(device):
    """bf16 autocast on CUDA, a no-op on CPU: one code path."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(x, device):
    """Move a batch or a model to the device, channels_last on CUDA."""
    x = x.to(device)
    if device.type == "cuda" and (isinstance(x, nn.Module) or x.dim() == 4):
        x = x.to(memory_format=torch.channels_last)
    return x


# ----------------------------------------------------------------------------------------------------------
# Data for training
# ----------------------------------------------------------------------------------------------------------
def resolve_data(cfg):
    """The data folder: --data, or the synthetic phantom written once to cache/phantom."""
    if cfg["data"]:
        return cfg["data"]
    if not os.path.isdir(PHANTOM_DIR):
        note(cfg, f"no --data: writing the synthetic phantom to {PHANTOM_DIR} (not real data)")
        tmp = f"{PHANTOM_DIR}.tmp{os.getpid()}"
        data.write_phantom(tmp, n=100, seed=0)
        os.replace(tmp, PHANTOM_DIR)                 # a killed run never leaves half a phantom
    else:
        note(cfg, f"no --data: using the synthetic phantom in {PHANTOM_DIR} (not real data)")
    return PHANTOM_DIR


def load_split_volumes(cfg):
    """Read the volumes and the split: the run's own split.json when resuming, --split FILE, or a new one."""
    layout, volumes = data.load_volumes(resolve_data(cfg), cfg["layout"], cfg["frames"], cfg["label_map"])
    split_file = os.path.join(cfg["out"], "split.json") if cfg["resume"] else cfg.get("split")
    if split_file:
        return layout, volumes, data.load_split(split_file, volumes)
    return layout, volumes, data.make_split(volumes, layout, cfg.get("labeled", 100.0), cfg["seed"])


def slices_of(volumes, ids, cfg, labels=True):
    """Preprocessed slices of the volumes named in ids: images (N, 1, H, W) float32, labels (N, H, W) long."""
    wanted = set(ids)
    chosen = [v for v in volumes if v.id in wanted]
    images, masks, _ = data.stack_slices(chosen, cfg["spacing"], cfg["size"])
    x = torch.from_numpy(images)[:, None]
    return (x, torch.from_numpy(masks).long()) if labels else x


# ----------------------------------------------------------------------------------------------------------
# pretrain
# ----------------------------------------------------------------------------------------------------------
def pretrain(cfg):
    """Self-supervised pre-training of E with L = L_g + lambda_loc * L_loc on train+val images."""
    cfg, ckpt = resume_or_new(cfg, ("model", "optimizer", "epoch", "config"), "pretrain")
    out, device = cfg["out"], torch.device(cfg["device"])
    _, volumes, split = load_split_volumes(cfg)
    images = to_device(slices_of(volumes, split["train"] + split["val"], cfg, labels=False), device)
    b, n = cfg["batch_size"], len(images)
    steps = n // b
    if steps == 0:
        raise data.DataError(f"--batch-size {b} is larger than the {n} pre-training slices")
    torch.manual_seed(cfg["seed"])
    model = PretrainNet(cfg["depth"], cfg["width"], cfg["proj_dim"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    start = 0
    if ckpt:
        load_state(model, ckpt["model"], out)
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"]
    else:
        start_run(cfg, split)
    model = to_device(model, device)
    step_fn = torch.compile(model) if cfg["compile"] else model
    note(cfg, f"pretrain: {n} slices of {len(split['train']) + len(split['val'])} train+val volumes, "
              f"{steps} steps/epoch, epochs {start}->{cfg['epochs']}")
    progress = Progress((cfg["epochs"] - start) * steps, cfg["quiet"])
    for epoch in range(start, cfg["epochs"]):
        g_cpu, g_dev = generators(cfg["seed"], epoch, device)
        order = torch.randperm(n, generator=g_cpu).to(device)
        sums, t0 = {}, time.time()
        for step in range(steps):
            losses = pretrain_step(step_fn, opt, images[order[step * b:(step + 1) * b]], g_dev, cfg)
            loss = losses["loss"].item()                                    # stop on a non-finite loss
            check_finite(loss, epoch + 1, step + 1, out)
            sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
            progress.update((epoch - start) * steps + step + 1, epoch + 1, step + 1, loss, b)
        record = {k: round(float(v) / steps, 5) for k, v in sums.items()}
        record.update(epoch=epoch + 1, images_per_s=round(steps * b / (time.time() - t0), 1), lr=cfg["lr"])
        save_pretrain(out, model, opt, epoch + 1, cfg)
        log_epoch(out, record, cfg["quiet"])
    write_json({"finished": True, "epochs": cfg["epochs"]}, os.path.join(out, "done.json"))
    return model


def pretrain_step(model, opt, x, g, cfg):
    """One step: two views -> forward -> L_g + lambda_loc * L_loc -> backward -> Adam.

    Returns the detached losses {"loss", "global", "local"} (tensors on the device)."""
    views, thetas = make_view(torch.cat([x, x]), g)                         # both views in one batch
    (xq, xk), (theta_q, theta_k) = views.chunk(2), thetas.chunk(2)
    with autocast(x.device):
        loss, parts = pretrain_loss(model, xq, xk, theta_q, theta_k, cfg["loss"], cfg["tau"],
                                    cfg["lambda_loc"], cfg["negatives"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return dict(parts, loss=loss.detach())


def save_pretrain(out, model, opt, epoch, cfg):
    """last.pt (everything to resume) and encoder.pt (the encoder E alone, for fine-tuning)."""
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "config": cfg},
                os.path.join(out, "last.pt"))
    atomic_save({"encoder": model.encoder.state_dict(), "config": {k: cfg[k] for k in ARCH_KEYS}},
                os.path.join(out, "encoder.pt"))


# ----------------------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------------------
def augment_geometry(x, m, g):
    """Joint geometric augmentation for fine-tuning: x (B, 1, H, W) bilinear, m (B, H, W) nearest (or None).

    Zoom 0.7-1.3, any rotation, flip, shift up to 1/8 of the side: with one labeled volume this generalises far
    better than light augmentation (README, "Decisions").
    """
    theta = random_affine(x.shape[0], g, x.device, scale=(0.7, 1.3), rotate=math.pi, shift=0.25)
    return warp(x, theta), None if m is None else warp(m[:, None].float(), theta, mode="nearest")[:, 0].long()


def augment_intensity(x, g):
    """Strong intensity augmentation for fine-tuning: gamma, contrast, brightness and noise."""
    return jitter_intensity(x, g, gamma=(0.6, 1.6), contrast=(0.7, 1.3), brightness=0.1, noise=0.05)


def augment_pair(x, m, g):
    """The fine-tuning augmentation, geometry then intensity: (x, m) -> (view, mask of the view or None)."""
    x, m = augment_geometry(x, m, g)
    return augment_intensity(x, g), m


def read_pretrained(cfg):
    """The state of E in a pre-training run's encoder.pt, after checking that its architecture is this run's."""
    ckpt = load_checkpoint(cfg["pretrained"], ("encoder", "config"))
    check_arch(ckpt["config"], cfg, cfg["pretrained"])
    return ckpt["encoder"]


def load_encoder(encoder, state, path):
    """Load E, asserting exactly which keys are missing or unexpected (MoCo main_lincls style)."""
    missing = sorted(set(encoder.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(encoder.state_dict()))
    if missing or unexpected:
        raise data.DataError(f"{path}: encoder keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    load_state(encoder, state, path)


def finetune_step(model, opt, xl, ml, xu=None, xw=None, weight=0.0, forward="separate", threshold=0.0):
    """One step of Eq. 3 on a labeled batch (xl, ml) and an unlabeled batch xu (None: supervised only).

    forward: "joint", one pass over cat(xl, xu), so BatchNorm normalises both with the statistics of the mix;
    "separate", one pass each, so the labeled loss sees labeled statistics only.
    xw: a weak view of xu with the same geometry that makes the pseudo-labels (None: xu's own predictions).
    threshold: confidence below which a pseudo-labelled pixel is ignored.
    Returns the detached {"loss", "sup", "unsup", "fg": fraction of unlabeled pixels pseudo-labelled foreground}.
    """
    b = xl.shape[0]
    with autocast(xl.device):
        if xu is None:
            (l1, l2), (u1, u2) = model(xl), (None, None)
        elif forward == "joint":
            l1, l2 = model(torch.cat([xl, xu]))
            (l1, u1), (l2, u2) = l1.split([b, len(xu)]), l2.split([b, len(xu)])
        else:
            (l1, l2), (u1, u2) = model(xl), model(xu)
        y1, y2 = weak_pseudo_labels(model, xw, threshold) if xw is not None else (
            (pseudo_label(u1, threshold), pseudo_label(u2, threshold)) if u1 is not None else (None, None))
        loss, sup, unsup = cross_consistency_loss(l1, l2, ml, u1, u2, y1, y2, weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    fg = sup.new_zeros(()) if y1 is None else ((y1 > 0).float().mean() + (y2 > 0).float().mean()) / 2
    return {"loss": loss.detach(), "sup": sup.detach(), "unsup": unsup.detach(), "fg": fg}


@torch.no_grad()
def weak_pseudo_labels(model, xw, threshold):
    """Both decoders' pseudo-labels (y1, y2) on the weak view xw (B_u, 1, H, W), without gradient."""
    w1, w2 = model(xw)
    return pseudo_label(w1, threshold), pseudo_label(w2, threshold)


def unlabeled_views(x_u, n, g_cpu, g_dev, pseudo="same"):
    """n random unlabeled slices augmented for Eq. 3: (strong view, weak view or None).

    pseudo: "same", the pseudo-labels come from the strong view itself (weak view None); "weak", from the
    weak view, the same geometry without the intensity changes.
    """
    x = x_u[torch.randint(len(x_u), (n,), generator=g_cpu).to(x_u.device)]
    xw, _ = augment_geometry(x, None, g_dev)
    return augment_intensity(xw, g_dev), xw if pseudo == "weak" else None


@torch.no_grad()
def predict_slices(model, x, mode, batch_size):
    """Probabilities (N, C, H, W) float32 on the CPU for preprocessed slices x (N, 1, H, W), in batches."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for chunk in x.split(batch_size):
        with autocast(device):
            out.append(predict(model, to_device(chunk, device), mode).float().cpu())
    model.train()
    return torch.cat(out)


def validate(model, x_val, m_val, cfg):
    """Mean foreground Dice on the validation slices, on the preprocessed grid (for model selection)."""
    pred = predict_slices(model, x_val, cfg["predict"], cfg["batch_size"]).argmax(1).numpy()
    gt = m_val.numpy()
    return float(np.mean([metrics.dice(pred == c, gt == c) for c in range(1, int(cfg["num_classes"]))]))


def finetune_data(cfg, device):
    """Labeled slices, unlabeled slices (training volumes outside the labeled subset) and validation slices."""
    layout, volumes, split = load_split_volumes(cfg)
    cfg["num_classes"] = data.num_classes(layout, volumes)
    cfg["class_names"] = list(data.CLASS_NAMES.get(layout, [str(c) for c in range(cfg["num_classes"])]))
    x_l, m_l = slices_of(volumes, split["labeled"], cfg)
    x_u = slices_of(volumes, split["unlabeled"] or split["train"], cfg, labels=False)
    x_v, m_v = slices_of(volumes, split["val"], cfg)
    note(cfg, f"finetune: {len(split['labeled'])} labeled volumes ({len(x_l)} slices), "
              f"{len(split['unlabeled'])} unlabeled ({len(x_u)} slices), {len(split['val'])} val")
    return split, (to_device(x_l, device), m_l.to(device), to_device(x_u, device), x_v, m_v)


def finetune(cfg):
    """Semi-supervised fine-tuning with the two decoders supervising each other (Eq. 3)."""
    cfg, ckpt = resume_or_new(cfg, ("model", "optimizer", "epoch", "config", "best"), "finetune")
    out, device = cfg["out"], torch.device(cfg["device"])
    encoder_state = None if ckpt or cfg["no_pretrain"] else read_pretrained(cfg)
    split, (x_l, m_l, x_u, x_v, m_v) = finetune_data(cfg, device)
    torch.manual_seed(cfg["seed"])
    model = IDEALSegmenter(cfg["num_classes"], cfg["depth"], cfg["width"], cfg["same_decoders"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    start, best = 0, -1.0
    if ckpt:
        load_state(model, ckpt["model"], out)
        opt.load_state_dict(ckpt["optimizer"])
        start, best = ckpt["epoch"], ckpt["best"]
    else:
        if encoder_state is not None:
            load_encoder(model.encoder, encoder_state, cfg["pretrained"])
        start_run(cfg, split)
    model = to_device(model, device)
    step_fn = torch.compile(model) if cfg["compile"] else model
    b, bu, steps = cfg["batch_size"], cfg["unlabeled_batch"], cfg["steps_per_epoch"]
    total = cfg["epochs"] * steps
    progress = Progress((cfg["epochs"] - start) * steps, cfg["quiet"])
    for epoch in range(start, cfg["epochs"]):
        g_cpu, g_dev = generators(cfg["seed"], epoch, device)
        gu_cpu, gu_dev = generators(cfg["seed"], epoch, device, stream=1)
        sums = {}
        for step in range(steps):
            t = epoch * steps + step
            lr = learning_rate(cfg["lr"], t, total, cfg["schedule"])
            for group in opt.param_groups:
                group["lr"] = lr
            weight = cfg["unlabeled_weight"] * rampup(t, total, cfg["rampup"], cfg["warmup"])
            i_l = torch.randint(len(x_l), (b,), generator=g_cpu).to(device)
            xl, ml = augment_pair(x_l[i_l], m_l[i_l], g_dev)
            xu, xw = unlabeled_views(x_u, bu, gu_cpu, gu_dev, cfg["pseudo"]) if bu and t >= cfg["warmup"] * total \
                else (None, None)
            parts = finetune_step(step_fn, opt, xl, ml, xu, xw, weight, cfg["forward"], cfg["threshold"])
            values = dict(zip(parts, torch.stack(list(parts.values())).tolist()))      # one sync per step
            check_finite(values["loss"], epoch + 1, step + 1, out)                    # stop on a non-finite loss
            sums = {k: sums.get(k, 0.0) + v for k, v in values.items()}
            progress.update((epoch - start) * steps + step + 1, epoch + 1, step + 1, values["loss"],
                            b if xu is None else b + bu)
        val_dice = validate(model, x_v, m_v, cfg)
        best = save_finetune(out, model, opt, epoch + 1, cfg, best, val_dice)
        record = {k: round(v / steps, 5) for k, v in sums.items()}
        record.update(epoch=epoch + 1, val_dice=round(val_dice, 4), best_val_dice=round(best, 4),
                      unlabeled_weight=round(weight, 5), images_per_s=round(progress.rate(), 1), lr=lr)
        log_epoch(out, record, cfg["quiet"])
    write_json({"finished": True, "epochs": cfg["epochs"], "best_val_dice": best}, os.path.join(out, "done.json"))
    return model


def save_finetune(out, model, opt, epoch, cfg, best, val_dice):
    """best.pt when the validation Dice improves, then last.pt; returns the best Dice so far."""
    if val_dice > best:
        best = val_dice
        atomic_save({"model": model.state_dict(), "epoch": epoch, "val_dice": val_dice, "config": cfg},
                    os.path.join(out, "best.pt"))
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best,
                 "config": cfg}, os.path.join(out, "last.pt"))
    return best


# ----------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------
COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 60], [60, 120, 240], [240, 200, 40], [200, 80, 220],
                    [40, 220, 220], [250, 140, 40]], dtype=np.float32)


def write_png(path, rgb):
    """A minimal PNG writer (8-bit RGB, zlib from the standard library): rgb (H, W, 3) uint8."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))        # filter type 0 per row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def overlay_png(path, vol, pred, n_slices=3):
    """Image | ground truth | prediction for a few mid slices of a native volume (like the paper's Fig. 3); image |
    prediction when vol has no label. vol.image (X, Y, Z), pred (X, Y, Z) class indices."""
    z = vol.image.shape[2]
    rows = []
    for k in np.linspace(z * 0.3, z * 0.7, n_slices).astype(int):
        img = vol.image[:, :, k].T
        img = (img - img.min()) / max(float(np.ptp(img)), 1e-6) * 255
        grey = np.repeat(img[..., None], 3, -1)
        panels = [grey]
        for lab in ([] if vol.label is None else [vol.label]) + [pred]:
            lab_k = lab[:, :, k].T.astype(int)
            alpha = (lab_k > 0)[..., None] * 0.5
            panels.append(grey * (1 - alpha) + COLOURS[lab_k % len(COLOURS)] * alpha)
        rows.append(np.concatenate(panels, 1))
    write_png(path, np.concatenate(rows, 0).clip(0, 255).astype(np.uint8))


class Stopwatch:
    """Wall time per stage: `with watch("network"): ...` adds the block's seconds to watch.seconds["network"]."""

    def __init__(self):
        self.seconds, self.stage, self.t0 = {}, None, 0.0

    def __call__(self, stage):
        self.stage = stage
        return self

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + time.perf_counter() - self.t0


# What eval and predict read from best.pt's config: a run folder alone is enough to segment.
RUN_KEYS = ("depth", "width", "size", "spacing", "num_classes", "class_names", "predict", "batch_size",
            "same_decoders")


def load_run(run, device):
    """(training config, IDEALSegmenter with the run's best.pt weights on device), from the run folder alone."""
    path = os.path.join(run, "best.pt")
    ckpt = load_checkpoint(path, ("model", "config"))
    run_cfg = ckpt["config"]
    missing = [k for k in RUN_KEYS if not isinstance(run_cfg, dict) or k not in run_cfg]
    if missing:
        raise data.DataError(f"{path}: its config lacks {', '.join(missing)} (not a fine-tuning checkpoint)")
    model = IDEALSegmenter(run_cfg["num_classes"], run_cfg["depth"], run_cfg["width"], run_cfg["same_decoders"])
    load_state(model, ckpt["model"], path)
    return run_cfg, to_device(model, torch.device(device))


def segment(model, vols, run_cfg, mode, batch_size, watch, probabilities=False):
    """Labels (X, Y, Z) uint8 on each volume's native grid and, with `probabilities`, class probabilities
    (X, Y, Z, C) float32 (else None). The slices of all vols go through the network in shared batches of
    batch_size (a cine's frames together); watch (Stopwatch) gets the preprocess, network and inverse seconds."""
    spacing, size = run_cfg["spacing"], run_cfg["size"]
    with watch("preprocess"):
        images = [data.preprocess(v, spacing, size)[0] for v in vols]
        x = torch.from_numpy(np.concatenate(images))[:, None]
    with watch("network"):
        probs = predict_slices(model, x, mode, batch_size).numpy()
    with watch("inverse"):
        parts = np.split(probs, np.cumsum([len(i) for i in images])[:-1])
        labels = [data.to_native(p, v, spacing, size) for p, v in zip(parts, vols)]
        native = [data.native_probabilities(p, v, spacing, size) for p, v in zip(parts, vols)] \
            if probabilities else None
    return labels, native


def eval_setup(cfg, run_cfg):
    """(data folder, layout, volumes to score, results folder). --split test|val|train: the run's split.json (ACDC
    by patient, whatever --frames) into RUN/eval-SPLIT, RUN/eval-SPLIT-FRAMES when --frames differs from the run's;
    --split all: every labeled volume into RUN/eval-<data folder name>-all. --layout, --frames and --label-map
    default to the run's; a ground-truth class the run does not predict is an error."""
    opts = {k: run_cfg[k] if cfg[k] is None else cfg[k] for k in ("layout", "frames", "label_map")}
    root = cfg["data"] or run_cfg["data"] or resolve_data(run_cfg)
    layout, volumes = data.load_volumes(root, **opts)
    name = cfg["split_name"]
    if name == "all":
        chosen = [v for v in volumes if v.label is not None]
        folder = f"eval-{os.path.basename(os.path.abspath(root))}-all"
    else:
        split_file = os.path.join(cfg["run"], "split.json")
        chosen = [v for v in data.select(volumes, data.load_split(split_file)[name], split_file) if v.label is not None]
        other_frames = layout == "acdc" and opts["frames"] != run_cfg["frames"]
        folder = f"eval-{name}" + (f"-{opts['frames']}" if other_frames else "")
    if not chosen:
        raise data.DataError(f"{root}: no labeled volume in split {name!r} to evaluate")
    for vol in chosen:
        if vol.label.max() >= run_cfg["num_classes"]:
            raise data.DataError(f"{vol.path}: the ground truth of this image holds class {vol.label.max()}, the "
                                 f"run predicts 0-{run_cfg['num_classes'] - 1}; pass --label-map")
    return root, layout, chosen, os.path.join(cfg["run"], folder)


def evaluate_run(cfg):
    """Predict every slice of each volume, map back to the native grid; per volume and class DSC/ASD/HD/HD95 in mm
    and the structure's volume in ml (metrics.csv, summary.json); for ACDC patients with ED and ES frames the
    clinical indices (clinical.csv, summary.json "clinical")."""
    run_cfg, model = load_run(cfg["run"], cfg["device"])
    root, layout, volumes, out = eval_setup(cfg, run_cfg)
    os.makedirs(out, exist_ok=True)
    for sub in ("pred", "png"):
        if cfg[f"save_{sub}"]:
            os.makedirs(os.path.join(out, sub), exist_ok=True)
    mode, labels = cfg["predict"] or run_cfg["predict"], list(range(1, run_cfg["num_classes"]))
    per_volume, rows, measured = [], [], []
    for vol in volumes:
        (pred,), _ = segment(model, [vol], run_cfg, mode, run_cfg["batch_size"], Stopwatch())
        if cfg["save_pred"]:
            data.save_label_nifti(pred, vol, os.path.join(out, "pred", f"{vol.id}.nii.gz"))
        if cfg["save_png"]:
            overlay_png(os.path.join(out, "png", f"{vol.id}.png"), vol, pred)
        result = metrics.evaluate(pred, vol.label, vol.spacing, labels)
        ml = {c: (metrics.volume_ml(pred == c, vol.spacing), metrics.volume_ml(vol.label == c, vol.spacing))
              for c in labels}
        per_volume.append(result)
        measured.append((vol, ml))
        rows += [dict(id=vol.id, label=c, **result[c], volume_ml_pred=ml[c][0], volume_ml_gt=ml[c][1])
                 for c in labels]
    write_csv(rows, os.path.join(out, "metrics.csv"))
    summary = metrics.summarize(per_volume)
    summary.update(run=cfg["run"], split=cfg["split_name"], data=root, predict=mode, volumes=len(per_volume),
                   units="mm")
    clinical = clinical_rows(measured) if layout == "acdc" else []
    if clinical:
        write_csv(clinical, os.path.join(out, "clinical.csv"))
        summary["clinical"] = clinical_agreement(clinical)
    write_json(summary, os.path.join(out, "summary.json"))
    print_summary(summary, run_cfg["class_names"])
    if clinical:
        print_clinical(summary["clinical"])
    return summary


# ACDC challenge definitions (classes 1 RV, 2 MYO, 3 LV): index -> unit; myocardial mass = MYO volume at ED x 1.05.
CLINICAL = {"lv_edv": "ml", "lv_esv": "ml", "lv_ef": "%", "rv_edv": "ml", "rv_esv": "ml", "rv_ef": "%",
            "myo_mass": "g"}
MYO_DENSITY = 1.05  # g/ml


def clinical_indices(ed, es):
    """The indices of CLINICAL for one patient from its class volumes in ml ({class: ml}) at ED and ES: LV and RV
    end-diastolic and end-systolic volume (ml), ejection fraction 100 (EDV - ESV) / EDV (%), myocardial mass at
    ED (g). A NaN volume makes the indices that use it NaN."""
    out = {}
    for name, c in (("lv", 3), ("rv", 1)):
        out[f"{name}_edv"], out[f"{name}_esv"] = ed[c], es[c]
        out[f"{name}_ef"] = metrics.ejection_fraction(ed[c], es[c])
    out["myo_mass"] = ed[2] * MYO_DENSITY
    return out


def clinical_rows(measured):
    """One row {case, INDEX_pred, INDEX_gt for INDEX in CLINICAL} per patient (Volume.case) with an ED and an ES
    volume. measured: [(Volume, {class: (ml predicted, ml ground truth)})]; an empty ground-truth structure
    counts as NaN (the index is undefined, and metrics.agreement counts it)."""
    phases = {}
    for vol, ml in measured:
        phases.setdefault(vol.case, {})[vol.frame] = ml
    rows = []
    for case, ml in phases.items():
        if "ED" in ml and "ES" in ml:
            pred = clinical_indices(*({c: v[0] for c, v in ml[p].items()} for p in ("ED", "ES")))
            gt = clinical_indices(*({c: v[1] or math.nan for c, v in ml[p].items()} for p in ("ED", "ES")))
            rows.append({"case": case, **{f"{k}_{side}": idx[k] for k in CLINICAL
                                          for side, idx in (("pred", pred), ("gt", gt))}})
    return rows


def clinical_agreement(rows):
    """{INDEX: unit, n, n_nan, r, bias, sd, loa_low, loa_high}: prediction against ground truth over the patients."""
    return {k: dict(unit=unit, **metrics.agreement([r[f"{k}_pred"] for r in rows], [r[f"{k}_gt"] for r in rows]))
            for k, unit in CLINICAL.items()}


def print_summary(summary, names):
    """A table: one row per class and the mean over classes, mean +- std over volumes (NaNs left out)."""
    print(f"{'class':12s} {'DSC':>15s} {'ASD mm':>15s} {'HD mm':>15s} {'HD95 mm':>15s}  NaNs left out")
    for key, row in summary.items():
        if not isinstance(row, dict) or "dsc" not in row:
            continue
        name = "mean" if key == "mean" else names[int(key)]
        cells = [f"{row[m]['mean']:7.3f} ± {row[m]['std']:5.3f}" for m in ("dsc", "assd", "hd", "hd95")]
        print(f"{name:12s} " + " ".join(f"{c:>15s}" for c in cells) + f"  {sum(row[m]['n_nan'] for m in row)}")


def print_clinical(clinical):
    """A table of the clinical indices: patients used, Pearson r, bias and 95 % limits of agreement (pred - gt)."""
    print(f"\n{'index':10s} {'unit':>4s} {'n':>4s} {'r':>7s} {'bias':>9s} {'limits of agreement':>21s}  NaNs left out")
    for k, a in clinical.items():
        print(f"{k:10s} {a['unit']:>4s} {a['n']:4d} {a['r']:7.3f} {a['bias']:9.2f} {a['loa_low']:9.2f} to "
              f"{a['loa_high']:8.2f}  {a['n_nan']}")


def write_csv(rows, path):
    with open(f"{path}.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(f"{path}.tmp", path)


# ----------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------
def nifti_name(path):
    """NAME of a NAME.nii.gz / NAME.nii file, else None."""
    base = os.path.basename(path)
    ext = next((e for e in (".nii.gz", ".nii") if base.endswith(e) and len(base) > len(e)), None)
    return base[:-len(ext)] if ext else None


def walk_nifti(folder, out):
    """Sorted .nii/.nii.gz files below folder; hidden files and folders, and the --out folder, are skipped."""
    files, skip = [], os.path.realpath(out)
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != skip)
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and nifti_name(n)]
    return files


def find_inputs(paths, out):
    """[(NAME, path)] of --input: files as given, folders searched recursively, each file once. DataError for a
    missing path, a file that is not .nii/.nii.gz, a folder without one, or an input inside --out."""
    found = {}
    for path in paths:
        if os.path.isdir(path):
            files = walk_nifti(path, out)
        elif os.path.isfile(path):
            files = [path] if nifti_name(path) else []
        else:
            raise data.DataError(f"{path}: no such file or folder")
        if not files:
            raise data.DataError(f"{path}: not a .nii or .nii.gz file, nor a folder holding one")
        for file in files:
            if os.path.commonpath([os.path.realpath(file), os.path.realpath(out)]) == os.path.realpath(out):
                raise data.DataError(f"{file}: input inside --out {out}; choose another --out")
            found.setdefault(os.path.realpath(file), file)
    return [(nifti_name(file), file) for file in found.values()]


def plan(inputs, cfg):
    """[(NAME, path, {kind: output path})] of the outputs still to write ("labels" OUT/NAME.nii.gz, "prob"
    OUT/NAME_prob.nii.gz, "png" OUT/NAME.png; existing ones only with --overwrite), inputs with none left out.
    DataError naming both inputs when two would write one file."""
    owner, todo = {}, []
    for name, path in inputs:
        files = {"labels": f"{name}.nii.gz", "prob": f"{name}_prob.nii.gz" if cfg["probabilities"] else None,
                 "png": f"{name}.png" if cfg["save_png"] else None}
        files = {k: os.path.join(cfg["out"], v) for k, v in files.items() if v}
        for file in files.values():
            if file in owner:
                raise data.DataError(f"{path} and {owner[file]}: both would write {file}; inputs need distinct names")
            owner[file] = path
        missing = {k: v for k, v in files.items() if cfg["overwrite"] or not os.path.exists(v)}
        if missing:
            todo.append((name, path, missing))
    return todo


def write_atomic(path, write):
    """write(tmp) to a hidden temporary file beside path (same extension), then os.replace: no half-written output."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}-{base}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def predict_file(model, run_cfg, path, files, mode, batch_size, watch):
    """Segment one 3D (X, Y, Z) or 4D (X, Y, Z, T) image and write files ({kind: path} of plan): uint8 labels of
    the input's shape, float32 probabilities (*shape, C), the overlay PNG of the first frame. Returns the shape."""
    with watch("read"):
        frames, img = data.read_scan(path, warn=False)
    labels, probs = segment(model, frames, run_cfg, mode, batch_size, watch, "prob" in files)
    with watch("write"):
        if "labels" in files:
            write_atomic(files["labels"], lambda tmp: data.save_like(np.stack(labels, 3).reshape(img.shape), img, tmp))
        if "prob" in files:
            write_atomic(files["prob"],
                         lambda tmp: data.save_like(np.stack(probs, 3).reshape(*img.shape, -1), img, tmp))
        if "png" in files:
            write_atomic(files["png"], lambda tmp: overlay_png(tmp, frames[0], labels[0]))
    return img.shape


def predict_run(cfg):
    """Segment every --input into --out (predict_file). The run folder and every input still to segment are read
    and checked before the first output is written; finished outputs are kept unless --overwrite."""
    run_cfg, model = load_run(cfg["run"], cfg["device"])
    out = cfg["out"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise data.DataError(f"{out}: --out exists and is not a folder")
    inputs = find_inputs(cfg["input"], out)
    todo = plan(inputs, cfg)
    if len(todo) < len(inputs):
        note(cfg, f"predict: {len(inputs) - len(todo)} of {len(inputs)} inputs already have their outputs in {out}, "
                  "skipped (--overwrite replaces them)")
    if not todo:
        return
    t0 = time.perf_counter()
    for _, path, _ in todo:
        data.read_scan(path)
    mode, batch_size = cfg["predict"] or run_cfg["predict"], cfg["predict_batch_size"] or run_cfg["batch_size"]
    note(cfg, f"predict: {len(todo)} inputs checked in {time.perf_counter() - t0:.1f} s; run {cfg['run']}: ResNet-"
              f"{run_cfg['depth']} width {run_cfg['width']}, {run_cfg['size']}x{run_cfg['size']} at "
              f"{run_cfg['spacing']} mm, classes {', '.join(run_cfg['class_names'])}, predict {mode}, "
              f"batch {batch_size}, {cfg['device']}")
    os.makedirs(out, exist_ok=True)
    total = {}
    for i, (name, path, files) in enumerate(todo, 1):
        watch = Stopwatch()
        shape = predict_file(model, run_cfg, path, files, mode, batch_size, watch)
        total = {k: total.get(k, 0.0) + v for k, v in watch.seconds.items()}
        stages = ", ".join(f"{k} {v:.2f}" for k, v in watch.seconds.items())
        note(cfg, f"predict {i}/{len(todo)} {name} {'x'.join(map(str, shape))}: {sum(watch.seconds.values()):.2f} s "
                  f"({stages} s)")
    spent = max(sum(total.values()), 1e-9)
    note(cfg, f"predict: {len(todo)} inputs in {spent:.1f} s, {spent / len(todo):.2f} s each, "
              f"{100 * (1 - total['network'] / spent):.0f} % of it outside the network; outputs in {out}")


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
# Table 1 of the paper (IDEAL, mean of 5 runs; the paper gives no units for ASD and HD).
PAPER_TABLE1 = {
    "acdc": {"1.25": (0.738, 0.677, 2.409), "2.5": (0.846, 0.614, 2.209), "10": (0.879, 0.556, 2.094),
             "100": (0.882, 0.489, 1.999)},
    "mmwhs": {"10": (0.626, 2.397, 5.001), "20": (0.791, 1.798, 3.499), "40": (0.815, 1.355, 2.221),
              "100": (0.826, 1.317, 2.183)},
}
ROW_NAMES = {"ideal": "IDEAL (local+global pre-training, two decoders)", "supervised": "supervised only, random init",
             "global": "global-only pre-training + our fine-tuning", "local": "local-only pre-training + our fine-tuning",
             "same-decoders": "IDEAL with two ConvTranspose decoders",
             "pretrained-supervised": "IDEAL pre-training, supervised fine-tuning only",
             "ideal-w1": "IDEAL, unlabeled weight 1 reached after 40 % of the steps"}
METRICS = (("dsc", "DSC"), ("assd", "ASD mm"), ("hd", "HD mm"), ("hd95", "HD95 mm"))


def collect(runs, rows=None):
    """{row: {fraction: [run record of each seed]}} from RUNS/<row>/L<fraction>/seed<k>/ (eval-test/summary.json
    and log.jsonl), for the rows named in `rows` (default: every row found), in that order."""
    table = {}
    for path in sorted(glob.glob(os.path.join(runs, "*", "L*", "seed*", "eval-test", "summary.json"))):
        row, frac = path.split(os.sep)[-5:-3]
        if rows is None or row in rows:
            with open(path) as f:
                record = dict(json.load(f), validation=validation_curve(os.path.dirname(os.path.dirname(path))))
            table.setdefault(row, {}).setdefault(frac[1:], []).append(record)
    order = rows or list(ROW_NAMES)
    return {row: dict(sorted(table[row].items(), key=lambda kv: float(kv[0])))
            for row in sorted(table, key=lambda r: order.index(r) if r in order else len(order))}


def validation_curve(run):
    """Best validation Dice of a fine-tuning run and its spread (max - min) over the last 10 epochs."""
    with open(os.path.join(run, "log.jsonl")) as f:
        dice = [json.loads(line)["val_dice"] for line in f if line.strip()]
    return {"best": max(dice), "spread": max(dice[-10:]) - min(dice[-10:])}


def cell(values):
    """(mean, std, text) of one value per run; a single run's value comes with its std over test volumes."""
    if len(values) == 1 and isinstance(values[0], dict):
        return values[0]["mean"], values[0]["std"], f"{values[0]['mean']:.3f} ± {values[0]['std']:.3f}"
    means = np.array([v["mean"] if isinstance(v, dict) else v for v in values])
    return float(means.mean()), float(means.std()), f"{means.mean():.3f} ± {means.std():.3f}"


def report(cfg):
    """results/<name>.md and .json from the runs under --runs: test metrics, validation Dice, and the paper's
    Table 1 beside IDEAL for the datasets the paper used."""
    table = collect(cfg["runs"], cfg["rows"].split() if cfg["rows"] else None)
    if not table:
        raise data.DataError(f"{cfg['runs']}: no <row>/L<fraction>/seed<k>/eval-test/summary.json found")
    paper = PAPER_TABLE1.get(cfg["dataset"])
    columns = [name for _, name in METRICS] + ["val best", "val spread", "runs"] + (["paper DSC / ASD / HD"] if paper
                                                                                   else [])
    lines = [f"# {cfg['title']}", "", f"Made by `{cfg['made_by']}` at commit {cfg['commit']}.", "",
             "Test set: mean ± std over test volumes of the per-volume mean over foreground classes for one run, "
             "mean ± std of the runs' means over several; distances in mm on the native grid (metrics.py, medpy "
             "0.5.2 convention). val best: best validation Dice of a run (the checkpoint evaluated); val spread: "
             "max - min of its validation Dice over the last 10 epochs (means over runs).", "",
             "| row | L % | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    results = []
    for row, fractions in table.items():
        for frac, runs in fractions.items():
            cells = {m: cell([r["mean"][m] for r in runs]) for m, _ in METRICS}
            cells.update({f"val_{k}": cell([r["validation"][k] for r in runs]) for k in ("best", "spread")})
            texts = [c[2] for c in cells.values()][:len(METRICS)] + [f"{cells[f'val_{k}'][0]:.3f}"
                                                                    for k in ("best", "spread")] + [str(len(runs))]
            if paper:
                texts.append(" / ".join(map(str, paper[frac])) if row == "ideal" and frac in paper else "")
            lines.append(f"| {ROW_NAMES.get(row, row)} | {frac} | " + " | ".join(texts) + " |")
            results.append(dict(row=row, labeled_percent=float(frac), runs=len(runs),
                                **{m: {"mean": c[0], "std": c[1]} for m, c in cells.items()}))
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(f"{cfg['out']}.md", "w") as f:
        f.write(text)
    write_json(dict(title=cfg["title"], made_by=cfg["made_by"], commit=cfg["commit"], units="mm", results=results),
               f"{cfg['out']}.json")
    print(text, end="")


# ----------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------
def images_per_second(step, images, device, steps):
    """Throughput of step() after two warm-up calls."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images * steps / (time.perf_counter() - t0)


def bare_step(model, opt, x):
    """The bare model on ready-made images: forward -> mean of the outputs -> backward -> Adam, nothing else."""
    with autocast(x.device):
        loss = sum(out.float().mean() for out in model(x))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_pretrain(cfg, device, pool, g):
    """The training loop's pre-training step (sampling, views, encoder, heads, both losses, backward, Adam, the
    per-step finiteness check) vs the bare encoder+heads on 2B images of the same shape. Counts slices (B)."""
    b = cfg["batch_size"]
    model = to_device(PretrainNet(cfg["depth"], cfg["width"], cfg["proj_dim"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    def full():
        pretrain_step(model, opt, pool[torch.randint(len(pool), (b,), device=device)], g, cfg)["loss"].item()

    return (images_per_second(full, b, device, cfg["steps"]),
            images_per_second(lambda: bare_step(model, opt, pool[:2 * b]), b, device, cfg["steps"]))


def bench_finetune(cfg, device, pool, g):
    """The training loop's fine-tuning step (labeled + unlabeled batch, augmentation, two decoders, Eq. 3,
    backward, Adam, finiteness check) vs the bare network on the same 2B images. Counts images (2B)."""
    b = cfg["batch_size"]
    model = to_device(IDEALSegmenter(4, cfg["depth"], cfg["width"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    masks = (pool[:, 0] * 4).long().clamp(max=3)

    def full():
        i = torch.randint(len(pool), (2 * b,), device=device)
        xl, ml = augment_pair(pool[i[:b]], masks[i[:b]], g)
        xu, _ = augment_pair(pool[i[b:]], None, g)
        finetune_step(model, opt, xl, ml, xu, None, cfg["unlabeled_weight"], "joint")["loss"].item()

    return (images_per_second(full, 2 * b, device, cfg["steps"]),
            images_per_second(lambda: bare_step(model, opt, pool[:2 * b]), 2 * b, device, cfg["steps"]))


def bench(cfg):
    """images/s of the real training steps against the bare model on the same shapes, and their ratio."""
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    pool = to_device(torch.rand(4 * cfg["batch_size"], 1, cfg["size"], cfg["size"], device=device, generator=g),
                     device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench: preset {cfg['preset']}, ResNet-{cfg['depth']} width {cfg['width']}, "
          f"{cfg['size']}x{cfg['size']}, batch {cfg['batch_size']}, {name}")
    results = {}
    for kind, fn in (("pretrain", bench_pretrain), ("finetune", bench_finetune)):
        full, bare = fn(cfg, device, pool, g)
        results[kind] = dict(step_images_per_s=round(full, 1), bare_images_per_s=round(bare, 1),
                             ratio=round(full / bare, 3))
        print(f"{kind:9s} step {full:8.1f} img/s   bare model {bare:8.1f} img/s   ratio {full / bare:.3f}")
    print(json.dumps(dict(results, device=name, preset=cfg["preset"], batch_size=cfg["batch_size"])))
    return results


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line on stderr (exit 2) instead of usage + error."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def number(kind, low=0.0, inclusive=False, high=None):
    """argparse type: a number > low (>= low if inclusive) and <= high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if (value < low if inclusive else value <= low) or (high is not None and value > high) \
                or not math.isfinite(value):
            bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


def preset_help(key, text):
    return f"{text} (preset: " + ", ".join(f"{p} {v[key]}" for p, v in PRESETS.items()) + ")"


def common_parser():
    """Options shared by every sub-command."""
    p = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: paper with a GPU, cpu without")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, split and augmentation")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--data", help="dataset folder (default: the synthetic phantom in cache/phantom)")
    p.add_argument("--layout", default="auto", choices=("auto", "acdc", "mmwhs", "own"), help="dataset layout")
    p.add_argument("--frames", default="ed", choices=("ed", "es", "both"), help="ACDC frames used")
    p.add_argument("--label-map", help="remap raw label values, e.g. 1:3,3:1")
    p.add_argument("--depth", type=int, choices=sorted(RESNETS), help=preset_help("depth", "ResNet depth"))
    p.add_argument("--width", type=number(int), help=preset_help("width", "ResNet stem width"))
    p.add_argument("--size", type=number(int), help=preset_help("size", "slice size in pixels"))
    p.add_argument("--spacing", type=number(float), help=preset_help("spacing", "in-plane spacing in mm"))
    p.add_argument("--batch-size", type=number(int), help=preset_help("batch_size", "slices per batch"))
    p.add_argument("--lr", type=number(float), help=preset_help("pretrain_lr", "Adam learning rate of pretrain")
                   + "; " + preset_help("finetune_lr", "of finetune"))
    return p


def training_parser():
    """Options of pretrain and finetune."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--epochs", type=number(int), help=preset_help("pretrain_epochs", "epochs of pretrain") + "; " +
                   preset_help("finetune_epochs", "of finetune") + "; with --resume: extends the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def build_parser():
    parser = Parser(prog="ideal.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    kw = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common, training = common_parser(), training_parser()
    p = sub.add_parser("pretrain", parents=[common, training], help="self-supervised pre-training of E", **kw)
    p.add_argument("--loss", default="both", choices=("both", "local", "global"), help="L_g + L_loc, or one")
    p.add_argument("--tau", type=number(float), default=0.1, help="softmax temperature of Eq. 1 and 2")
    p.add_argument("--lambda-loc", type=number(float, inclusive=True), default=1.0, help="weight of L_loc")
    p.add_argument("--negatives", default="same", choices=("same", "all"), help="negatives of Eq. 2")
    p.add_argument("--proj-dim", type=number(int), help=preset_help("proj_dim", "projection size"))
    p = sub.add_parser("finetune", parents=[common, training], help="semi-supervised fine-tuning (Eq. 3)", **kw)
    p.add_argument("--pretrained", help="encoder.pt of a pre-training run (required unless --no-pretrain)")
    p.add_argument("--no-pretrain", action="store_true", help="random encoder initialisation")
    p.add_argument("--labeled", type=number(float, high=100.0), default=1.25, help="L: %% of training volumes")
    p.add_argument("--split", help="split.json to reuse instead of drawing one")
    p.add_argument("--unlabeled-weight", type=number(float, inclusive=True), default=0.1,
                   help="weight of the unlabeled term of Eq. 3 after ramp-up (0: supervised only)")
    p.add_argument("--rampup", type=number(float, inclusive=True, high=1.0), default=1.0,
                   help="fraction of the steps over which the unlabeled weight ramps up")
    p.add_argument("--warmup", type=number(float, inclusive=True, high=1.0), default=0.0,
                   help="fraction of the steps trained on labeled slices only, before the ramp-up starts")
    p.add_argument("--unlabeled-batch", type=number(int, inclusive=True),
                   help="unlabeled slices per step (default: --batch-size, 0 when --unlabeled-weight is 0)")
    p.add_argument("--forward", default="joint", choices=("joint", "separate"),
                   help="labeled and unlabeled slices in one forward pass (shared BatchNorm statistics) or two")
    p.add_argument("--pseudo", default="same", choices=("same", "weak"),
                   help="pseudo-labels from the strongly augmented view itself or from its weak view")
    p.add_argument("--threshold", type=number(float, inclusive=True, high=1.0), default=0.0,
                   help="confidence below which pseudo-labelled pixels are ignored")
    p.add_argument("--schedule", default="constant", choices=("constant", "poly"), help="learning-rate schedule")
    p.add_argument("--same-decoders", action="store_true", help="ablation: both decoders ConvTranspose")
    p.add_argument("--predict", default="mean", choices=("mean", "d1", "d2"), help="prediction used for val")
    p.add_argument("--steps-per-epoch", type=number(int), help=preset_help("steps_per_epoch", "steps per epoch"))
    p = sub.add_parser("eval", parents=[common_parser()], help="metrics of a fine-tuned run on the native grid",
                       description="Scores a fine-tuned run on its own split or on every labeled volume of any "
                       "dataset. --data, --layout, --frames and --label-map default to the run's (shown as None).", **kw)
    p.set_defaults(layout=None, frames=None)
    p.add_argument("--run", required=True, help="fine-tuning run folder")
    p.add_argument("--split", dest="split_name", default="test", choices=("test", "val", "train", "all"),
                   help="test|val|train: the run's split.json (ACDC by patient, so --frames both scores ED and ES), "
                   "results in RUN/eval-SPLIT (eval-SPLIT-FRAMES when --frames differs from the run's); all: every "
                   "labeled volume of --data, results in RUN/eval-<data folder name>-all")
    p.add_argument("--predict", choices=("mean", "d1", "d2"), help="default: the run's")
    p.add_argument("--save-pred", action="store_true", help="write eval-SPLIT/pred/ID.nii.gz")
    p.add_argument("--save-png", action="store_true", help="write eval-SPLIT/png/ID.png overlays")
    p = sub.add_parser("predict", help="segment new scans with a fine-tuned run", description="Segments 3D and 4D "
                       "NIfTI scans with a fine-tuning run's best.pt (architecture, preprocessing and classes come "
                       "from it; no dataset needed) into OUT/NAME.nii.gz: uint8 labels with the input's shape, "
                       "affine and header. Every input is checked before the first output is written; existing "
                       "outputs are kept unless --overwrite, so an interrupted batch continues.", **kw)
    p.add_argument("--run", required=True, help="fine-tuning run folder (holding best.pt)")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH", help=".nii/.nii.gz files, or folders "
                   "searched recursively; 3D (x, y, z) or 4D cine (x, y, z, t), segmented frame by frame")
    p.add_argument("--out", required=True, help="output folder: NAME.nii.gz for input NAME.nii(.gz)")
    p.add_argument("--probabilities", action="store_true", help="also write NAME_prob.nii.gz, float32 class "
                   "probabilities on the native grid: (x, y, z, C) for 3D inputs, (x, y, z, t, C) for 4D")
    p.add_argument("--save-png", action="store_true", help="also write NAME.png: image | prediction for three mid "
                   "slices (of the first frame of a 4D input)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--predict", choices=("mean", "d1", "d2"), help="default: the run's")
    p.add_argument("--batch-size", dest="predict_batch_size", type=number(int), metavar="N",
                   help="slices per forward pass (default: the run's)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(preset=None, size=None)  # read by resolve(); predict takes every model value from the run
    p = sub.add_parser("report", help="results table from the eval summaries of run.sh's run folders", **kw)
    p.add_argument("--runs", required=True, help="folder with <row>/L<fraction>/seed<k>/eval-test/summary.json")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    p.add_argument("--dataset", default="acdc", help="whose Table 1 numbers to show beside IDEAL (acdc, mmwhs; "
                   "any other name shows none)")
    p.add_argument("--rows", help="the rows to tabulate, space-separated, in this order (default: every row found)")
    p.add_argument("--title", default="IDEAL results", help="heading of the table")
    p.add_argument("--made-by", default="", help="the command that made the runs")
    p.add_argument("--commit", default="", help="the commit that made the runs")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p = sub.add_parser("bench", parents=[common], help="training-step throughput vs the bare model", **kw)
    p.add_argument("--steps", type=number(int), default=5, help="timed steps")
    p.set_defaults(loss="both", tau=0.1, lambda_loc=1.0, negatives="same", proj_dim=None, unlabeled_weight=0.1)
    return parser


def resolve(args, parser):
    """The run's configuration: preset values, overridden by every flag given."""
    cfg = vars(args).copy()
    if args.command == "report":
        return cfg
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg["preset"] = cfg["preset"] or ("paper" if cfg["device"].startswith("cuda") else "cpu")
    preset = PRESETS[cfg["preset"]]
    for key, value in preset.items():
        if cfg.get(key, "absent") is None:
            cfg[key] = value
    if cfg.get("lr") is None:
        cfg["lr"] = preset["finetune_lr" if args.command == "finetune" else "pretrain_lr"]
    if cfg["size"] % 32:
        parser.error(f"argument --size: must be a multiple of 32 (the encoder's stride), got {cfg['size']}")
    if args.command == "finetune" and not (cfg["pretrained"] or cfg["no_pretrain"] or cfg["resume"]):
        parser.error("finetune: --pretrained ENCODER.pt is required unless --no-pretrain is given")
    if args.command == "finetune" and cfg["unlabeled_batch"] is None:
        cfg["unlabeled_batch"] = cfg["batch_size"] if cfg["unlabeled_weight"] > 0 else 0
    if args.command != "bench":
        note(cfg, f"{args.command}: preset {cfg['preset']} on {cfg['device']}")
    return cfg


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = resolve(args, parser)
    command = {"pretrain": pretrain, "finetune": finetune, "eval": evaluate_run, "predict": predict_run,
               "bench": bench, "report": report}[args.command]
    try:
        command(cfg)
    except data.DataError as e:
        print(f"ideal.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"ideal.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
