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
import contextlib
import csv
import fcntl
import functools
import glob
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import data
import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
PHANTOM_DIR = os.path.join(HERE, "cache", "phantom")

# Every value can be overridden by the flag of the same name (--lr and --epochs set the sub-command's own).
# demo: the cpu model on a schedule of minutes, for the embedded run.sh on the synthetic phantom.
# lr 1e-5 is the paper's; the cpu preset uses 1e-3 / 3e-3 because its budget is minutes, not GPU-days
# (README, "Decisions and deviations").
PRESETS = {
    "paper": dict(depth=50, width=64, size=192, spacing=1.367, batch_size=32, proj_dim=128, steps_per_epoch=100,
                  pretrain_lr=1e-5, finetune_lr=1e-5, pretrain_epochs=100, finetune_epochs=100),
    "cpu": dict(depth=18, width=16, size=128, spacing=2.05, batch_size=16, proj_dim=64, steps_per_epoch=50,
                pretrain_lr=1e-3, finetune_lr=3e-3, pretrain_epochs=100, finetune_epochs=30),
    "demo": dict(depth=18, width=16, size=128, spacing=2.05, batch_size=16, proj_dim=64, steps_per_epoch=10,
                 pretrain_lr=1e-3, finetune_lr=3e-3, pretrain_epochs=15, finetune_epochs=4),
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
def random_affine(n, g, device, scale=(0.7, 1.0), rotate=math.pi / 6, shift=None):
    """Random affines theta (n, 2, 3) in normalised coordinates, view -> image (F.affine_grid's convention).

    A view covers `scale` of the image side, rotated by up to +-`rotate` radians, flipped in x half the time, and
    shifted by up to +-`shift` (default: as far as an unrotated view stays inside the image, 1 - scale).
    """
    u = torch.rand(n, 4, generator=g, device=device)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    a = (2 * u[:, 1] - 1) * rotate
    fx = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(a) * s, torch.sin(a) * s
    shift = (2 * torch.rand(n, 2, generator=g, device=device) - 1) * ((1 - s)[:, None] if shift is None else shift)
    return torch.stack([torch.stack([cos * fx, -sin, shift[:, 0]], 1),
                        torch.stack([sin * fx, cos, shift[:, 1]], 1)], 1)


def affine_grid(theta, h, w):
    """F.affine_grid(theta, (B, C, h, w), align_corners=False), separably: theta (B, 2, 3) -> grid (B, h, w, 2).

    grid[b, i, j] = theta[b] @ (x_j, y_i, 1) at the pixel centres x_j = (2 j + 1) / w - 1 (torch's linspace form),
    each output coordinate made as a plane (x_j theta[:, r, 0] + theta[:, r, 2]) + y_i theta[:, r, 1]: without the
    (h w, 3) @ (3, 2) product per image, a third of the time, equal to F.affine_grid to float rounding (tested).
    """
    x, y = (torch.linspace(-1, 1, n, dtype=theta.dtype, device=theta.device) * (n - 1) / n for n in (w, h))
    planes = [(x * t[:, 0, None] + t[:, 2, None])[:, None] + y[:, None] * t[:, 1, None, None]   # (B, h, w)
              for t in theta.unbind(1)]
    return torch.stack(planes, -1)                                          # (B, h, w, 2): x then y


def warp(x, theta, mode="bilinear"):
    """Resample x (B, C, H, W) through theta (B, 2, 3); zeros outside the image."""
    grid = affine_grid(theta.to(x.dtype), *x.shape[2:])
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def jitter_intensity(x, g, gamma=(0.7, 1.5), contrast=(0.8, 1.2), brightness=0.1, noise=0.05):
    """Per-image gamma, contrast, brightness and Gaussian noise on images in [0, 1]."""
    u = torch.rand(x.shape[0], 4, 1, 1, 1, generator=g, device=x.device)
    x = x.clamp(min=0).pow_(gamma[0] + (gamma[1] - gamma[0]) * u[:, 0])   # a new tensor: in place from here on
    x.mul_(contrast[0] + (contrast[1] - contrast[0]) * u[:, 1]).add_(brightness * (2 * u[:, 2] - 1))
    return x.add_(torch.randn(x.shape, generator=g, device=x.device).mul_(noise * u[:, 3]))


def make_view(x, g):
    """One random view of each slice: x (B, 1, H, W) -> (view (B, 1, H, W), theta (B, 2, 3))."""
    theta = random_affine(x.shape[0], g, x.device)
    return jitter_intensity(warp(x, theta), g), theta


def relative_affine(theta_q, theta_k):
    """The affine mapping query-view coordinates to key-view coordinates: inv(M_k) @ M_q, (B, 2, 3).

    With M = [A t; 0 1], inv(M_k) M_q = [inv(A_k) A_q, inv(A_k) (t_q - t_k)], inv(A_k) by the 2x2 adjugate: no
    torch.linalg.inv and no host-made constant, each of which would stop a GPU step to synchronise.
    """
    a, b, c, d = theta_k[:, 0, 0], theta_k[:, 0, 1], theta_k[:, 1, 0], theta_k[:, 1, 1]
    inv_a = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / (a * d - b * c)[:, None, None]
    return torch.cat([inv_a @ theta_q[:, :, :2], inv_a @ (theta_q[:, :, 2:] - theta_k[:, :, 2:])], 2)


def align(k, theta_q, theta_k):
    """Resample the key's dense map onto the query's feature grid.

    k: (B, C, h, w) key-view features; theta_q, theta_k: (B, 2, 3) the two views' affines.
    Returns (k_aligned (B, C, h, w), valid (B, h, w) bool: the query location lies inside the key view).
    """
    rel = relative_affine(theta_q.float(), theta_k.float())
    grid = affine_grid(rel, *k.shape[2:])                                  # (B, h, w, 2) key coords
    valid = (grid.abs() <= 1).all(-1)
    k = F.grid_sample(k, grid.to(k.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return k, valid


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def global_infonce(q, k, tau=0.1):
    """Eq. 1, symmetric (NT-Xent): global InfoNCE over a batch of view pairs.

    q, k: (B, D) projections of the two views of B images (normalised here).
    Positive of q_b is k_b; negatives are the 2B - 2 views of the other images, of the whole global batch under
    torchrun (gathered from every rank: 2 W B - 2).
    tau: softmax temperature (default: 0.1).
    """
    b = q.shape[0]
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = torch.cat([gather(q), gather(k)])                                # (2WB, D): every view, every rank
    logits = torch.cat([q, k]) @ keys.t() / tau                             # (2B, 2WB)
    n = keys.shape[0] // 2
    own = torch.arange(b, device=q.device) + rank() * b                     # global index of this rank's images
    itself = torch.cat([own, own + n])[:, None] == torch.arange(2 * n, device=q.device)   # (2B, 2WB): no host copy
    logits = logits.masked_fill(itself, float("-inf"))
    return F.cross_entropy(logits, torch.cat([own + n, own]))


def local_infonce(q, k, valid, tau=0.1, negatives="same"):
    """Eq. 2: dense local InfoNCE over exactly corresponding locations.

    q: (B, C, h, w) L2-normalised query map; k: (B, C, h, w) L2-normalised key map aligned to q's grid;
    valid: (B, h, w) bool, locations with a counterpart in the key view. Or q, k: (B, V, C, h, w) and valid:
    (B, V, h, w): V instances of Eq. 2 (the two directions, q -> k and k -> q) in one product, averaged.
    Positive of q_{b,i} is k_{b,i}, read off the same product as the negatives. negatives: "same" (Eq. 2):
    k_{b',i} of the other images b' at the same location i; "all": every valid location of the other images' key
    maps. Other images: of the whole global batch under torchrun (key maps gathered from every rank).
    Negatives that are not valid are left out; the loss is averaged over valid query locations (under torchrun
    divided by the global batch's count per rank, so that the mean over ranks is the loss of the global batch).
    tau: softmax temperature (default: 0.1).
    """
    if q.dim() == 4:
        q, k, valid = q[:, None], k[:, None], valid[:, None]
    b, v, c, h, w = q.shape
    q, k, valid = q.flatten(3), k.flatten(3), valid.flatten(2)              # (B, V, C, L), (B, V, L)
    keys, keys_valid = gather(k), gather(valid)                             # (WB, V, C, L), (WB, V, L)
    own = torch.arange(b, device=q.device) + rank() * b
    other = own[:, None] != torch.arange(len(keys), device=q.device)[None]  # (B, WB): another image
    if negatives == "same":
        logits = torch.einsum("bvcl,evcl->bvle", q, keys)                   # B x V x L x WB (same location)
        keep = keys_valid.permute(1, 2, 0)[None] & other[:, None, None]     # k_{e,l} valid, e another image
        positive = own.view(b, 1, 1, 1)                                     # k_{b,l}: at e = b
    elif negatives == "all":
        logits = torch.einsum("bvcl,evcm->bvlem", q, keys).flatten(3)       # B x V x L x (WB L)
        keep = (keys_valid.transpose(0, 1).flatten(1)[None, :, None] &      # k_{e,m} valid, e another image
                other.repeat_interleave(h * w, 1)[:, None, None])
        positive = (own[:, None] * h * w + torch.arange(h * w, device=q.device)).view(b, 1, -1, 1)
    else:
        raise ValueError(f"negatives must be 'same' or 'all', got {negatives!r}")
    positive = positive.expand(b, v, h * w, 1)
    keep = keep | torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, positive, True)
    logits = logits.masked_fill(~keep, float("-inf")).float() / tau
    loss = -F.log_softmax(logits, -1).gather(-1, positive)[..., 0]          # B x V x L
    count = keys_valid.sum((0, 2)).clamp(min=1) / world()                   # (V,): the global batch's valid
    return ((loss * valid).sum((0, 2)) / count).mean()


def pretrain_loss(model, views, thetas, loss="both", tau=0.1, lambda_loc=1.0, negatives="same"):
    """L = L_g + lambda_loc * L_loc, with both directions of Eq. 2 (q -> k and k -> q).

    views: (2B, 1, H, W), the query views of B images then their key views, one batch through the model;
    thetas: (2B, 2, 3) their affines. loss: "global" | "local" | "both".
    Returns (total loss, {"global": ..., "local": ...} as detached tensors).
    """
    z_global, z_dense = model(views)                                        # (2B, D), (2B, D, h, w)
    b = len(z_dense) // 2
    parts, total = {}, 0.0
    if loss in ("global", "both"):
        parts["global"] = global_infonce(*z_global.chunk(2), tau)
        total = total + parts["global"]
    if loss in ("local", "both"):
        d = F.normalize(z_dense.float(), dim=1)                             # queries, then keys
        other, valid = align(d.roll(b, 0), thetas, thetas.roll(b, 0))       # each view's other view on its grid
        pairs = [x.unflatten(0, (2, b)).transpose(0, 1) for x in (d, F.normalize(other, dim=1), valid)]
        parts["local"] = local_infonce(*pairs, tau, negatives)              # (B, 2, ...): both directions
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

    def forward(self, *batches):                     # each x: (B_i, 1, H, W)
        """Each batch in a pass of its own, so BatchNorm normalises it with its own statistics: (logits of
        D(theta1), logits of D(theta2)), each (B_i, C, H, W), for one batch; a list of such pairs for several."""
        outs = []
        for x in batches:
            feats = self.encoder(x)
            outs.append((self.d1(feats), self.d2(feats)))
        return outs[0] if len(outs) == 1 else outs


IGNORE = -1                                          # pseudo-label of a pixel left out of Eq. 3


@torch.no_grad()
def pseudo_label(logits, threshold=0.0, alignment=None):
    """y = one-hot argmax of softmax(logits) as class indices (B, H, W), detached: no gradient flows into it.

    threshold: pixels whose top probability is below it get IGNORE (default: 0.0, every pixel is kept); a tensor
    (C,) gives each class its own, applied by the class a pixel's argmax picks (class_thresholds).
    alignment: a DistributionAlignment applied to the probabilities first (None: the softmax itself).
    """
    p = logits.detach().float().softmax(1)                                  # (B, C, H, W)
    confidence, y = (p if alignment is None else alignment(p)).max(1)
    return y.masked_fill(confidence < (threshold[y] if torch.is_tensor(threshold) else threshold), IGNORE)


class DistributionAlignment(nn.Module):
    """Distribution alignment of the pseudo-labels (Berthelot et al., ReMixMatch, ICLR 2020): probabilities are
    multiplied by prior / mean and renormalised, where prior (C,) is the class distribution of the labeled slices'
    pixels and mean (C,) a running average (momentum per step) of the predicted class distribution on unlabeled
    batches, so that the argmax keeps the labeled class proportions instead of drifting towards background."""

    def __init__(self, prior, momentum=0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("prior", prior.float())                           # (C,)
        self.register_buffer("mean", prior.float().clone())                    # (C,)

    def forward(self, p):                            # p: (B, C, H, W) probabilities
        q = p * (self.prior / self.mean).view(1, -1, 1, 1)
        return q / q.sum(1, keepdim=True)

    def factors(self):
        """prior / mean per class, rounded for the log: above 1 where the predictions hold less than the prior."""
        return [round(r, 3) for r in (self.prior / self.mean).tolist()]

    @torch.no_grad()
    def update(self, *logits):                       # each (B, C, H, W): the predictions that make pseudo-labels
        batch = torch.stack([x.float().softmax(1).mean((0, 2, 3)) for x in logits]).mean(0)
        self.mean.lerp_(gather(batch[None]).mean(0), 1 - self.momentum)       # the same on every rank


def class_thresholds(cfg, device):
    """(C,) thresholds: --background-threshold for class 0 and --threshold for the others, or --threshold for every
    class in a run made before --background-threshold existed."""
    if cfg.get("background_threshold") is None:
        return cfg["threshold"]
    return torch.tensor([cfg["background_threshold"]] + [cfg["threshold"]] * (cfg["num_classes"] - 1), device=device)


def class_prior(masks, num_classes):
    """Fraction of the pixels of masks (N, H, W) in each class (C,), at least 1e-4 so that no ratio divides by 0."""
    counts = torch.bincount(masks.flatten(), minlength=num_classes).float()
    prior = (counts / counts.sum()).clamp_min(1e-4)
    return prior / prior.sum()


def soft_dice_loss(logits, mask):
    """1 - the soft Dice 2 sum(p y) / (sum(p) + sum(y)) over a batch's pixels, averaged over the foreground classes
    (Milletari et al. 2016): logits (B, C, H, W), mask (B, H, W) class indices; 0 for a perfect prediction."""
    p = logits.float().softmax(1)[:, 1:]                                   # (B, C - 1, H, W)
    y = F.one_hot(mask, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    dice = (2 * (p * y).sum((0, 2, 3)) + 1e-5) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1e-5)
    return 1 - dice.mean()


def cross_consistency_loss(logits1_lab, logits2_lab, mask, logits1_unl, logits2_unl, y1, y2, weight=1.0,
                           dice=False):
    """Eq. 3: CE(p1, m) + CE(p2, m) on labeled slices, weight * (CE(p1, y2) + CE(p2, y1)) on unlabeled ones.

    logits*_lab: (B_l, C, H, W) of D(theta1)/D(theta2) on labeled slices; mask: (B_l, H, W) class indices.
    logits*_unl: (B_u, C, H, W) on unlabeled slices (None: supervised only); y1, y2: (B_u, H, W) the two decoders'
    pseudo-labels (pseudo_label), IGNORE pixels count as zero in the mean over all B_u H W pixels.
    weight: unlabeled weight at this step (the ramp-up is applied by the caller).
    dice: the labeled term is CE + soft_dice_loss for each decoder (--sup-loss dice-ce); the unlabeled one stays CE.
    Returns (loss, supervised term, unsupervised term).
    """
    sup = sum(F.cross_entropy(z.float(), mask) + (soft_dice_loss(z, mask) if dice else 0)
              for z in (logits1_lab, logits2_lab))
    if logits1_unl is None:
        return sup, sup, sup.new_zeros(())
    unsup = (F.cross_entropy(logits1_unl.float(), y2, ignore_index=IGNORE, reduction="none").mean() +
             F.cross_entropy(logits2_unl.float(), y1, ignore_index=IGNORE, reduction="none").mean())
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
# Run folders, checkpoints and processes
# ----------------------------------------------------------------------------------------------------------
def world():
    """Number of torchrun processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    """This process's rank (0 without torchrun); only rank 0 writes files and prints."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather(x):
    """x (B, ...) of every rank concatenated in rank order (W B, ...); x itself in one process. Differentiable
    when x requires grad: the gradient of each rank's part flows back to the rank that made it."""
    if world() == 1:
        return x
    if x.requires_grad:                              # the gradient of the whole is summed back onto each part
        all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
        return all_gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)          # torch >= 2.13, else >= 2.4
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def init_distributed(device):
    """Process group from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE): nccl on CUDA (one GPU per rank,
    cuda:LOCAL_RANK), gloo on the CPU. Without torchrun nothing happens. Returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave_distributed(clean=True):
    """Tear the torchrun process group down (nothing without one, or once left). After a clean finish every rank
    first meets at a barrier, so that none tears gloo/nccl down while another still uses it (one such teardown
    aborted with SIGABRT); after an error no barrier, which a rank that failed differently would never reach."""
    if world() > 1:
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def write_atomic(path, write):
    """write(tmp) to a hidden temporary file beside path, then os.replace: never a half-written file. A failed write
    (full disk, read-only folder) removes the temporary file and is a DataError naming path."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}-{base}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise data.DataError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_folder(path):
    """os.makedirs(path, exist_ok=True); DataError naming path if it cannot be made (under a file, read-only)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise data.DataError(f"{path}: cannot create this folder ({e.strerror or e})") from None


def atomic_save(obj, path):
    """torch.save through write_atomic (torch reports a full disk as RuntimeError: made an OSError here)."""
    def save(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            raise OSError(str(e).split("\n")[0]) from None
    write_atomic(path, save)


def write_json(obj, path):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


class CheckpointError(ValueError):
    """A checkpoint that is missing, unloadable, of another command or another architecture (one line)."""


def load_checkpoint(path, keys, kind=None):
    """A plain-dict checkpoint, loaded with weights_only=True; CheckpointError naming the file if it is not one, lacks
    one of `keys` or was written by another command than `kind` (pretrain, finetune)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                            # unpickling refused, not a zip, truncated ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: not an IDEAL checkpoint (expected keys {', '.join(keys)})")
    if kind and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path}: written by {ckpt.get('kind') or 'another program'}, not by {kind}")
    return ckpt


def restore(cfg, ckpt, model, opt):
    """A resumed run's model and optimizer from its last.pt (CheckpointError if they do not fit)."""
    last = os.path.join(cfg["out"], "last.pt")
    load_state(model, ckpt["model"], last)
    load_state(opt, ckpt["optimizer"], last, "optimizer states")


def check_arch(found, wanted, path):
    """CheckpointError naming every architecture value that differs between a checkpoint and this run."""
    diff = [f"{k}={found.get(k)} (this run: {wanted[k]})" for k in ARCH_KEYS if found.get(k) != wanted[k]]
    if diff:
        raise CheckpointError(f"{path}: made with another architecture: {', '.join(diff)}")


def load_state(obj, state, path, what="weights"):
    """obj.load_state_dict(state) (strict for a module; an optimizer, an averaged model), turning a mismatch into one
    line naming the offending keys."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError, KeyError) as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: its {what} do not fit this run: {detail[:300]}") from None


@contextlib.contextmanager
def claimed(out):
    """Hold an exclusive lock (fcntl) on the run folder `out`, created if missing, for the whole command: a second
    process on the same --out stops at once. A folder created here is removed again if the command fails before
    writing anything into it. Only rank 0 claims (other ranks never write)."""
    if rank() != 0:
        yield
        return
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a")
    except OSError as e:
        raise data.DataError(f"{out}: cannot create the run folder there ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise data.DataError(f"{out}: another process is running in this folder") from None
    try:
        yield
    finally:
        lock.close()
        if created and os.listdir(out) == [".lock"]:
            shutil.rmtree(out)


RESUME_NEW = ("data", "compile", "threads")                 # may change on resume, and the new value holds
RESUME_FREE = ("out", "resume", "quiet", "device", "epochs", "pretrained", *RESUME_NEW)   # "pretrained": read at start


def predated_options(stored):
    """A fine-tuning run's stored options with those it was made before set to how it ran: no distribution
    alignment, CE for the labeled term, and --threshold for background too; so the flags that pin them resume it."""
    before = dict(align="none", sup_loss="ce", background_threshold=stored["threshold"])
    return dict(stored, **{k: v for k, v in before.items() if stored.get(k) is None})


def open_run(cfg, command, given):
    """(cfg, last checkpoint or None) of the run in --out, whose lock the caller holds.

    last.pt present: --resume continues it with its stored options (an option in `given`, the options named on the
    command line, that differs from the stored one is refused; --epochs may extend it, never shorten it; with as
    many processes as it was trained with). No last.pt: a new run, also in a folder left by a run that died before its
    first checkpoint (nothing to lose).
    """
    out, last = cfg["out"], os.path.join(cfg["out"], "last.pt")
    if not os.path.exists(last):
        if cfg["resume"]:
            note(cfg, f"{out}: no checkpoint yet; starting the run")
        epochs = cfg["epochs"] or PRESETS[cfg["preset"]][f"{command}_epochs"]
        return dict(cfg, resume=False, epochs=epochs, world_size=world()), None
    if not cfg["resume"]:
        raise data.DataError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    ckpt = load_checkpoint(last, ("model", "optimizer", "epoch", "config", "log"), command)
    stored = predated_options(ckpt["config"]) if command == "finetune" else ckpt["config"]
    changed = [f"--{k.replace('_', '-')} {cfg[k]} (the run's: {stored.get(k)})" for k in sorted(given)
               if k not in RESUME_FREE and k in cfg and cfg[k] != stored.get(k)]
    if changed:
        raise data.DataError(f"{last}: a resumed run keeps its stored options; drop {', '.join(changed)} or start "
                             "a new --out")
    if stored.get("world_size", world()) != world():
        raise data.DataError(f"{last}: trained by {stored['world_size']} process(es), resumed by {world()}; the global "
                             "batch and its sampling would change (resume it with as many, or start a new --out)")
    epochs = cfg["epochs"] if "epochs" in given else stored["epochs"]
    if epochs < ckpt["epoch"]:
        raise data.DataError(f"{last}: --epochs {epochs} is fewer than the {ckpt['epoch']} epochs the run holds")
    if epochs > stored["epochs"]:
        note(cfg, f"{out}: extended from {stored['epochs']} to {epochs} epochs; the learning-rate schedule and the "
                  "ramp-up now span the longer run")
    new = {k: cfg[k] for k in RESUME_NEW if k in given}
    return dict(stored, **new, out=out, quiet=cfg["quiet"], device=cfg["device"], resume=True, epochs=epochs), ckpt


def start_run(cfg, split, ckpt):
    """New run: config.json (every resolved option), split.json and an empty log.jsonl. Resumed run: log.jsonl
    rewritten from the checkpoint, one line per epoch it holds, and no done.json while epochs are left (an extended
    run). Returns the log (a list of epoch records)."""
    log = ckpt["log"] if ckpt else []
    if rank() == 0:
        if ckpt and ckpt["epoch"] < cfg["epochs"]:                   # extended: no longer done, final.pt stale
            for name in ("done.json", "final.pt", "final-labeled.pt"):
                if os.path.exists(os.path.join(cfg["out"], name)):
                    os.remove(os.path.join(cfg["out"], name))
        if not ckpt:
            write_json(cfg, os.path.join(cfg["out"], "config.json"))
            write_atomic(os.path.join(cfg["out"], "split.json"), lambda tmp: data.save_split(split, tmp))
        write_atomic(os.path.join(cfg["out"], "log.jsonl"),
                     lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log)))
    return log


def end_epoch(cfg, model, record, log, files):
    """The epoch bookkeeping of both training loops: refuse to keep non-finite weights, write `files` ({name:
    checkpoint dict}, in order, last.pt last and holding the log), append `record` to log.jsonl. Returns the log."""
    if not all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point()):
        raise FloatingPointError(f"non-finite weights after epoch {record['epoch']}; nothing of it was saved, "
                                 f"{last_good(cfg)}")
    log = log + [record]
    if rank() == 0:
        for name, obj in files.items():
            atomic_save(dict(obj, log=log) if name == "last.pt" else obj, os.path.join(cfg["out"], name))
        with open(os.path.join(cfg["out"], "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if not cfg["quiet"]:
            print(json.dumps(record), flush=True)
    return log


def last_good(cfg):
    """Where a stopped run can continue from, for error messages."""
    if not cfg.get("out"):
        return "nothing was written"                # bench
    last = os.path.join(cfg["out"], "last.pt")
    return f"the last good checkpoint is {last} (--resume)" if os.path.exists(last) else \
        "no checkpoint was written; the same command starts the run again"


def note(cfg, text):
    """An informational line on stderr, unless --quiet (rank 0 only)."""
    if not cfg["quiet"] and rank() == 0:
        print(text, file=sys.stderr, flush=True)


class Meter:
    """Sums of a training epoch's detached values, kept on the device: one synchronisation every `every` steps
    checks them for NaN/Inf (DINO's stop on a non-finite loss) instead of one per step."""

    def __init__(self, cfg, epoch, every=20):
        self.cfg, self.epoch, self.every, self.steps, self.sums, self.keys = cfg, epoch, every, 0, None, []

    def add(self, values):
        stacked = torch.stack([v.double() for v in values.values()])
        self.keys, self.steps = list(values), self.steps + 1
        self.sums = stacked if self.sums is None else self.sums + stacked
        if self.steps % self.every == 0:
            self.check()

    def check(self):
        if not bool(torch.isfinite(self.sums).all()):
            raise FloatingPointError(f"non-finite loss in epoch {self.epoch} by step {self.steps}; "
                                     f"{last_good(self.cfg)}")

    def loss(self):
        return self.sums[self.keys.index("loss")].item() / self.steps

    def means(self):
        """{name: epoch mean}, averaged over the ranks too."""
        self.check()
        sums = self.sums.clone()
        if world() > 1:
            dist.all_reduce(sums)
            sums /= world()
        return {k: round(v / self.steps, 5) for k, v in zip(self.keys, sums.tolist())}


class Progress:
    """One progress line on stderr per `every` seconds (epoch, step, loss, images/s, ETA); quiet silences it."""

    def __init__(self, total_steps, quiet=False, every=10.0):
        self.total, self.quiet, self.every = total_steps, quiet or rank() != 0, every
        self.t0 = self.last = time.time()
        self.images = self.steps = 0

    def update(self, meter, images):
        self.images, self.steps = self.images + images * world(), self.steps + 1
        now = time.time()
        if self.quiet or now - self.last < self.every:
            return
        self.last = now
        eta = (now - self.t0) / self.steps * (self.total - self.steps)
        print(f"epoch {meter.epoch} step {meter.steps} loss {meter.loss():.4f} {self.rate():.1f} img/s "
              f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def rate(self):
        return self.images / max(time.time() - self.t0, 1e-9)


def generators(seed, epoch, device, stream=0):
    """Per-epoch RNGs derived from (seed, epoch, stream): CPU for the sample order (the same on every rank),
    device for augmentation (one per rank), so a resumed run draws exactly what an uninterrupted one would.
    Fine-tuning draws labeled batches from stream 0 and unlabeled ones from stream 1: the labeled sequence is the
    same with or without them."""
    base = seed * 100003 + epoch + 1000003 * stream
    g_dev = torch.Generator(device=device).manual_seed(base + 7919 + 104729 * rank())
    return torch.Generator().manual_seed(base), g_dev


def share(indices):
    """This rank's share (B,) of a global batch of indices (W B,) drawn identically on every rank."""
    return indices.view(world(), -1)[rank()]


def autocast(device):
    """bf16 autocast on CUDA, a no-op on CPU: one code path."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(x, device):
    """Move a batch or a model to the device, channels_last on CUDA."""
    x = x.to(device)
    if device.type == "cuda" and (isinstance(x, nn.Module) or x.dim() == 4):
        x = x.to(memory_format=torch.channels_last)
    return x


def parallel(model, cfg, device, find_unused=False):
    """The model a training step calls: SyncBatchNorm with --sync-bn, DistributedDataParallel under torchrun,
    torch.compile with --compile; the plain model otherwise."""
    if world() > 1:
        if cfg["sync_bn"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                    find_unused_parameters=find_unused)
    return torch.compile(model) if cfg["compile"] else model


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
        try:
            data.write_phantom(tmp, n=100, seed=0)
            os.replace(tmp, PHANTOM_DIR)             # a killed run never leaves half a phantom
        except OSError as e:                         # unless another process has just written the same phantom
            if not os.path.isdir(PHANTOM_DIR):
                raise data.DataError(f"{PHANTOM_DIR}: cannot write the synthetic phantom ({e.strerror or e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
LOSS_KEYS = ("loss", "tau", "lambda_loc", "negatives")


def pretrain(cfg, given=()):
    """Self-supervised pre-training of E with L = L_g + lambda_loc * L_loc on train+val images."""
    cfg, ckpt = open_run(cfg, "pretrain", given)
    device = torch.device(cfg["device"])
    _, volumes, split = load_split_volumes(cfg)
    images = to_device(slices_of(volumes, split["train"] + split["val"], cfg, labels=False), device)
    b, n = cfg["batch_size"], len(images)
    steps = n // (b * world())
    if steps == 0:
        raise data.DataError(f"--batch-size {b} x {world()} processes is larger than the {n} pre-training slices")
    torch.manual_seed(cfg["seed"])
    model = to_device(PretrainNet(cfg["depth"], cfg["width"], cfg["proj_dim"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    if ckpt:
        restore(cfg, ckpt, model, opt)
    log, start = start_run(cfg, split, ckpt), ckpt["epoch"] if ckpt else 0
    step_fn = parallel(model, cfg, device, find_unused=cfg["loss"] != "both")
    note(cfg, f"pretrain: {n} slices of {len(split['train']) + len(split['val'])} train+val volumes, {steps} steps "
              f"of {b} x {world()} slices per epoch, epochs {start}->{cfg['epochs']}")
    progress = Progress((cfg["epochs"] - start) * steps, cfg["quiet"])
    for epoch in range(start, cfg["epochs"]):
        g_cpu, g_dev = generators(cfg["seed"], epoch, device)
        order = torch.randperm(n, generator=g_cpu).to(device)
        meter, t0 = Meter(cfg, epoch + 1), time.time()
        for step in range(steps):
            batch = images[share(order[step * b * world():(step + 1) * b * world()])]
            meter.add(pretrain_step(step_fn, opt, batch, g_dev, **{k: cfg[k] for k in LOSS_KEYS}))
            progress.update(meter, b)
        record = dict(meter.means(), epoch=epoch + 1, images_per_s=round(steps * b * world() / (time.time() - t0), 1),
                      lr=cfg["lr"])
        log = end_epoch(cfg, model, record, log, {
            "encoder.pt": {"encoder": model.encoder.state_dict(), "config": {k: cfg[k] for k in ARCH_KEYS}},
            "last.pt": {"kind": "pretrain", "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "config": cfg}})
    if rank() == 0:
        write_json({"finished": True, "epochs": cfg["epochs"]}, os.path.join(cfg["out"], "done.json"))
    return model


def pretrain_step(model, opt, x, g, loss="both", tau=0.1, lambda_loc=1.0, negatives="same"):
    """One step: two views -> forward -> L_g + lambda_loc * L_loc -> backward -> Adam.

    x: (B, 1, H, W) slices; g: the device generator of the views; the rest as pretrain_loss.
    Returns the detached losses {"global", "local", "loss"} (tensors on the device)."""
    views, thetas = make_view(torch.cat([x, x]), g)                         # both views in one batch
    with autocast(x.device):
        total, parts = pretrain_loss(model, views, thetas, loss, tau, lambda_loc, negatives)
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return dict(parts, loss=total.detach())


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
    if not isinstance(ckpt["encoder"], dict):
        raise CheckpointError(f"{cfg['pretrained']}: not an IDEAL checkpoint (its encoder is not a state dict)")
    check_arch(ckpt["config"], cfg, cfg["pretrained"])
    return ckpt["encoder"]


def load_encoder(encoder, state, path):
    """Load E, asserting exactly which keys are missing or unexpected (MoCo main_lincls style)."""
    missing = sorted(set(encoder.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(encoder.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{path}: encoder keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    load_state(encoder, state, path)


def finetune_step(model, opt, xl, ml, xu=None, xw=None, weight=0.0, forward="separate", threshold=0.0,
                  alignment=None, dice=False):
    """One step of Eq. 3 on a labeled batch (xl, ml) and an unlabeled batch xu (None: supervised only).

    forward: "joint", one pass over cat(xl, xu), so BatchNorm normalises both with the statistics of the mix;
    "separate", one pass each, so the labeled loss sees labeled statistics only.
    xw: a weak view of xu with the same geometry that makes the pseudo-labels (None: xu's own predictions).
    threshold: confidence below which a pseudo-labelled pixel is ignored (a float, or per class: pseudo_label).
    alignment: a DistributionAlignment of the pseudo-labels, updated with this step's predictions (None: none).
    dice: CE + soft Dice for the labeled term (cross_consistency_loss).
    Returns the detached {"loss", "sup", "unsup", "fg": fraction of unlabeled pixels pseudo-labelled foreground,
    "kept": fraction of them that the threshold keeps}.
    """
    b = xl.shape[0]
    with autocast(xl.device):
        if xu is None:
            (lab1, lab2), (unl1, unl2) = model(xl), (None, None)
        elif forward == "joint":
            out1, out2 = model(torch.cat([xl, xu]))                         # logits (B + B_u, C, H, W) twice
            (lab1, unl1), (lab2, unl2) = out1.split([b, len(xu)]), out2.split([b, len(xu)])
        else:
            (lab1, lab2), (unl1, unl2) = model(xl, xu)
        y1, y2 = weak_pseudo_labels(model, xw, threshold, alignment) if xw is not None else (
            pseudo_labels(unl1, unl2, threshold, alignment) if unl1 is not None else (None, None))
        loss, sup, unsup = cross_consistency_loss(lab1, lab2, ml, unl1, unl2, y1, y2, weight, dice)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    fg = kept = sup.new_zeros(())
    if y1 is not None:
        fg = ((y1 > 0).float().mean() + (y2 > 0).float().mean()) / 2
        kept = ((y1 != IGNORE).float().mean() + (y2 != IGNORE).float().mean()) / 2
    return {"loss": loss.detach(), "sup": sup.detach(), "unsup": unsup.detach(), "fg": fg, "kept": kept}


@torch.no_grad()
def pseudo_labels(logits1, logits2, threshold, alignment=None):
    """Both decoders' pseudo-labels (y1, y2), after updating alignment (if any) with both decoders' predictions."""
    if alignment is not None:
        alignment.update(logits1, logits2)
    return pseudo_label(logits1, threshold, alignment), pseudo_label(logits2, threshold, alignment)


@torch.no_grad()
def weak_pseudo_labels(model, xw, threshold, alignment=None):
    """Both decoders' pseudo-labels (y1, y2) on the weak view xw (B_u, 1, H, W), without gradient."""
    return pseudo_labels(*model(xw), threshold, alignment)


def labeled_views(x_l, m_l, n, g_cpu, g_dev):
    """This rank's n random labeled slices and masks, jointly augmented: (x (n, 1, H, W), m (n, H, W))."""
    i = share(torch.randint(len(x_l), (n * world(),), generator=g_cpu)).to(x_l.device)
    return augment_pair(x_l[i], m_l[i], g_dev)


def unlabeled_views(x_u, n, g_cpu, g_dev, pseudo="same"):
    """This rank's n random unlabeled slices augmented for Eq. 3: (strong view, weak view or None).

    pseudo: "same", the pseudo-labels come from the strong view itself (weak view None); "weak", from the
    weak view, the same geometry without the intensity changes.
    """
    x = x_u[share(torch.randint(len(x_u), (n * world(),), generator=g_cpu)).to(x_u.device)]
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


@contextlib.contextmanager
def batchnorm_restored(model):
    """Yields model's BatchNorm layers; when the block ends, each gets its running statistics and momentum back, so
    that training goes on as if the block had never run."""
    layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))]
    saved = [(m.momentum, {k: v.clone() for k, v in m.named_buffers()}) for m in layers]
    try:
        yield layers
    finally:
        for m, (momentum, buffers) in zip(layers, saved):
            m.momentum = momentum
            for k, v in m.named_buffers():
                v.copy_(buffers[k])


@contextlib.contextmanager
def recomputed_bn(model, x, batch_size, seed, limit):
    """Inside the block, every BatchNorm of model holds the mean over batches of x (N, 1, H, W) of each batch's
    statistics (precise BatchNorm, Wu & Johnson 2021), the weights as they are; on exit its running statistics
    are put back, so training goes on as if nothing happened. The batches are a shuffle of at most `limit` slices
    drawn by seed; every process draws the same ones, so synchronised BatchNorm agrees."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit].to(x.device)
    was_training = model.training
    with batchnorm_restored(model) as layers:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None                                          # a cumulative mean over the batches
        model.train()
        with torch.no_grad(), autocast(x.device):
            for i in order.split(batch_size):
                model(x[i])
        model.train(was_training)
        yield model


@torch.no_grad()
def pseudo_label_quality(model, x_v, m_v, cfg, threshold, g):
    """Eq. 3's pseudo-labels made on the labeled validation slices as on unlabeled ones (a weak view by generator g,
    BatchNorm with batch statistics, the confidence threshold) and scored against their masks, for the log. Means
    over both decoders of: pl_dice, the foreground Dice of the argmax (pooled over the slices); pl_dice_kept, the
    same over the pixels the threshold keeps; pl_kept, the fraction it keeps; pl_fg_ratio, kept pseudo-labelled
    foreground over true foreground (below 1: the pseudo-labels shrink the heart); and pl_disagree, the fraction of
    pixels where the two decoders' argmax differ. BatchNorm's running statistics are put back afterwards."""
    device = next(model.parameters()).device
    xw, mw = augment_geometry(to_device(x_v, device), m_v.to(device), g)
    with batchnorm_restored(model), autocast(device):
        pairs = [model(x) for x in xw.split(cfg["unlabeled_batch"] or cfg["batch_size"])]
    scores, argmax = [], []
    for d in range(2):
        confidence, y = torch.cat([pair[d] for pair in pairs]).float().softmax(1).max(1)   # (N, H, W) each
        keep = confidence >= (threshold[y] if torch.is_tensor(threshold) else threshold)
        fg = (mw > 0).sum().clamp(min=1)
        scores.append([foreground_dice(y, mw, cfg["num_classes"]), foreground_dice(y, mw, cfg["num_classes"], keep),
                       keep.float().mean(), ((y > 0) & keep).sum() / fg])
        argmax.append(y)
    means = torch.tensor(scores).mean(0).tolist()
    names = ("pl_dice", "pl_dice_kept", "pl_kept", "pl_fg_ratio")
    return dict(zip(names, (round(v, 4) for v in means)),
                pl_disagree=round((argmax[0] != argmax[1]).float().mean().item(), 4))


def foreground_dice(y, m, num_classes, where=None):
    """Mean over the foreground classes of the Dice of label maps y and m (any shape), pooled over their pixels or
    those where `where` is True; a class absent from both counts 1 (metrics.dice's convention)."""
    where = torch.ones_like(y, dtype=torch.bool) if where is None else where
    dice = []
    for c in range(1, num_classes):
        a, b = (y == c) & where, (m == c) & where
        total = a.sum() + b.sum()
        dice.append(1.0 if total == 0 else (2 * (a & b).sum() / total).item())
    return float(np.mean(dice))


def judge(model, x_v, m_v, x_train, cfg):
    """(validation Dice, state_dict for best.pt, log fields) of model: with x_train None (--bn-stats running) under
    its own running BatchNorm statistics; else under statistics recomputed on the un-augmented training slices
    x_train (the Dice with the running ones is logged as val_dice_running), from at most as many slices as an
    epoch's labeled batches hold, so that recomputing costs a fraction of the epoch."""
    if x_train is None:
        return validate(model, x_v, m_v, cfg), model.state_dict(), {}
    running = validate(model, x_v, m_v, cfg)
    b = cfg["batch_size"]
    with recomputed_bn(model, x_train, b, cfg["seed"], limit=cfg["steps_per_epoch"] * b):
        val_dice = validate(model, x_v, m_v, cfg)
        buffers = dict(model.named_buffers())                       # the only entries put back on exit
        state = {k: v.clone() if k in buffers else v for k, v in model.state_dict().items()}
    return val_dice, state, {"val_dice_running": round(running, 4)}


def bn_slices(cfg, split, x_l, x_u):
    """The un-augmented training slices that --bn-stats recomputed takes BatchNorm's statistics from: the labeled
    ones and, when the run uses them, the unlabeled ones; None for --bn-stats running (and a run from before it)."""
    if cfg.get("bn_stats", "running") == "running":
        return None
    if not cfg["unlabeled_batch"]:
        return x_l
    return torch.cat([x_l, x_u]) if split["unlabeled"] else x_u      # at L = 100 % x_u holds every training slice


def finetune_data(cfg, device):
    """(split, classes {num_classes, class_names}, slices): labeled, unlabeled (training volumes outside the
    labeled subset; at L = 100 % all training volumes, labels unused) and validation slices. DataError without a
    labeled validation volume (model selection)."""
    layout, volumes, split = load_split_volumes(cfg)
    n = data.num_classes(layout, volumes)
    classes = {"num_classes": n, "class_names": list(data.CLASS_NAMES.get(layout, [str(c) for c in range(n)]))}
    if not split["val"] or any(v.label is None for v in volumes if v.id in set(split["val"])):
        raise data.DataError(f"{resolve_data(cfg)}: the split has no labeled validation volume; the best checkpoint "
                             "is chosen on it (own layout: give at least 5 labeled cases, or pass --split)")
    x_l, m_l = slices_of(volumes, split["labeled"], cfg)
    unlabeled = split["unlabeled"] or split["train"]
    x_u = slices_of(volumes, unlabeled, cfg, labels=False)
    x_v, m_v = slices_of(volumes, split["val"], cfg)
    note(cfg, f"finetune: {len(split['labeled'])} labeled volumes ({len(x_l)} slices), "
              f"{len(unlabeled)} unlabeled ({len(x_u)} slices), {len(split['val'])} val")
    return split, classes, (to_device(x_l, device), m_l.to(device), to_device(x_u, device), x_v, m_v)


def finetune_model(cfg, ckpt, encoder_state, device):
    """The IDEALSegmenter and its Adam optimizer: from last.pt when resuming, else with the pre-trained E."""
    torch.manual_seed(cfg["seed"])
    model = to_device(IDEALSegmenter(cfg["num_classes"], cfg["depth"], cfg["width"], cfg["same_decoders"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    if ckpt:
        restore(cfg, ckpt, model, opt)
    elif encoder_state is not None:
        load_encoder(model.encoder, encoder_state, cfg["pretrained"])
    return model, opt


def averaged(model, cfg, ckpt):
    """The exponential moving average (decay --ema) of the weights and BatchNorm statistics, which validation, best.pt
    and so evaluation use; restored from last.pt when resuming. None with --ema 0 (the model itself is judged)."""
    if not cfg.get("ema"):
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]), use_buffers=True)
    if ckpt:
        load_state(ema, ckpt.get("ema"), os.path.join(cfg["out"], "last.pt"), "averaged weights")
    return ema


def distribution_alignment(cfg, m_l, ckpt):
    """The DistributionAlignment of --align prior, its prior from the labeled masks m_l and its running mean
    restored from last.pt when resuming; None with --align none (and a run from before the option)."""
    if cfg.get("align", "none") == "none":
        return None
    alignment = DistributionAlignment(class_prior(m_l, cfg["num_classes"])).to(m_l.device)
    if ckpt:
        load_state(alignment, ckpt.get("align"), os.path.join(cfg["out"], "last.pt"), "distribution alignment")
    return alignment


def finetune(cfg, given=()):
    """Semi-supervised fine-tuning with the two decoders supervising each other (Eq. 3)."""
    cfg, ckpt = open_run(cfg, "finetune", given)
    device = torch.device(cfg["device"])
    encoder_state = None if ckpt or cfg["no_pretrain"] else read_pretrained(cfg)
    split, classes, (x_l, m_l, x_u, x_v, m_v) = finetune_data(cfg, device)
    cfg.update(classes)
    model, opt = finetune_model(cfg, ckpt, encoder_state, device)
    ema, alignment = averaged(model, cfg, ckpt), distribution_alignment(cfg, m_l, ckpt)
    threshold = class_thresholds(cfg, device)
    judged = ema.module if ema else model                                   # what validation scores, best.pt holds
    log, start = start_run(cfg, split, ckpt), ckpt["epoch"] if ckpt else 0
    best = max([r["val_dice"] for r in log], default=-1.0)
    best_l = max([r.get("val_dice_labeled", -1.0) for r in log], default=-1.0)
    x_train = bn_slices(cfg, split, x_l, x_u)
    step_fn = parallel(model, cfg, device)
    b, bu, steps = cfg["batch_size"], cfg["unlabeled_batch"], cfg["steps_per_epoch"]
    total = cfg["epochs"] * steps
    progress = Progress((cfg["epochs"] - start) * steps, cfg["quiet"])
    for epoch in range(start, cfg["epochs"]):
        g_cpu, g_dev = generators(cfg["seed"], epoch, device)
        gu_cpu, gu_dev = generators(cfg["seed"], epoch, device, stream=1)
        meter, t0, seen = Meter(cfg, epoch + 1), time.time(), progress.images
        for step in range(steps):
            t = epoch * steps + step
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg["lr"], t, total, cfg["schedule"])
            weight = cfg["unlabeled_weight"] * rampup(t, total, cfg["rampup"], cfg["warmup"])
            xl, ml = labeled_views(x_l, m_l, b, g_cpu, g_dev)
            xu, xw = unlabeled_views(x_u, bu, gu_cpu, gu_dev, cfg["pseudo"]) if bu and t >= cfg["warmup"] * total \
                else (None, None)
            meter.add(finetune_step(step_fn, opt, xl, ml, xu, xw, weight, cfg["forward"], threshold, alignment,
                                    cfg.get("sup_loss") == "dice-ce"))
            if ema:
                ema.update_parameters(model)
            progress.update(meter, b if xu is None else b + bu)
        images_per_s = (progress.images - seen) / (time.time() - t0)          # the training steps alone
        val_dice, state, fields = judge(judged, x_v, m_v, x_train, cfg)     # every process: --sync-bn
        fields.update(pseudo_label_quality(model, x_v, m_v, cfg, threshold,
                                           generators(cfg["seed"], epoch, device, stream=2)[1]))
        labeled_files = {}
        if x_train is not None and x_train is not x_l:                  # issue 28's candidate: labeled-slice statistics
            val_l, state_l, _ = judge(judged, x_v, m_v, x_l, cfg)
            fields.update(val_dice_labeled=round(val_l, 4), best_val_dice_labeled=round(max(best_l, val_l), 4))
            judged_l = {"model": state_l, "epoch": epoch + 1, "val_dice": val_l, "config": cfg}
            labeled_files = dict({"best-labeled.pt": judged_l} if val_l > best_l else {},
                                 **{"final-labeled.pt": judged_l} if epoch + 1 == cfg["epochs"] else {})
            best_l = max(best_l, val_l)
        record = dict(meter.means(), epoch=epoch + 1, val_dice=round(val_dice, 4), **fields,
                      best_val_dice=round(max(best, val_dice), 4), unlabeled_weight=round(weight, 5),
                      images_per_s=round(images_per_s, 1), lr=opt.param_groups[0]["lr"],
                      **({"align": alignment.factors()} if alignment else {}))
        judged_ckpt = {"model": state, "epoch": epoch + 1, "val_dice": val_dice, "config": cfg}
        files = dict({"best.pt": judged_ckpt} if val_dice > best else {},
                     **{"final.pt": judged_ckpt} if epoch + 1 == cfg["epochs"] else {}, **labeled_files)
        best = max(best, val_dice)
        log = end_epoch(cfg, model, record, log, dict(files, **{"last.pt": {
            "kind": "finetune", "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
            "config": cfg, **{k: m.state_dict() for k, m in (("ema", ema), ("align", alignment)) if m is not None}}}))
    if rank() == 0:
        write_json({"finished": True, "epochs": cfg["epochs"], "best_val_dice": best},
                   os.path.join(cfg["out"], "done.json"))
    return model


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


def load_run(run, device, checkpoint="best"):
    """(training config, IDEALSegmenter with the run's best.pt (or final.pt) weights on device), from the run folder
    alone."""
    path = os.path.join(run, f"{checkpoint}.pt")
    ckpt = load_checkpoint(path, ("model", "config"))
    run_cfg = ckpt["config"]
    missing = [k for k in RUN_KEYS if not isinstance(run_cfg, dict) or k not in run_cfg]
    if missing:
        raise CheckpointError(f"{path}: its config lacks {', '.join(missing)} (not a fine-tuning checkpoint)")
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
    return root, layout, chosen, os.path.join(cfg["run"], folder + ("" if cfg["checkpoint"] == "best" else f"-{cfg['checkpoint']}"))


def evaluate_run(cfg):
    """Predict every slice of each volume, map back to the native grid; per volume and class DSC/ASD/HD/HD95 in mm
    and the structure's volume in ml (metrics.csv, summary.json); for ACDC patients with ED and ES frames the
    clinical indices (clinical.csv, summary.json "clinical")."""
    run_cfg, model = load_run(cfg["run"], cfg["device"], cfg["checkpoint"])
    root, layout, volumes, out = eval_setup(cfg, run_cfg)
    for sub in ("", "pred", "png"):
        if not sub or cfg[f"save_{sub}"]:
            make_folder(os.path.join(out, sub))
    mode, labels = cfg["predict"] or run_cfg["predict"], list(range(1, run_cfg["num_classes"]))
    per_volume, rows, measured = [], [], []
    for i, vol in enumerate(volumes, 1):
        (pred,), _ = segment(model, [vol], run_cfg, mode, run_cfg["batch_size"], Stopwatch())
        if cfg["save_pred"]:
            path = os.path.join(out, "pred", f"{vol.id}.nii.gz")
            write_atomic(path, lambda tmp: data.save_label_nifti(pred, vol, tmp))
        if cfg["save_png"]:
            write_atomic(os.path.join(out, "png", f"{vol.id}.png"), lambda tmp: overlay_png(tmp, vol, pred))
        result = metrics.evaluate(pred, vol.label, vol.spacing, labels)
        ml = {c: (metrics.volume_ml(pred == c, vol.spacing), metrics.volume_ml(vol.label == c, vol.spacing))
              for c in labels}
        per_volume.append(result)
        measured.append((vol, ml))
        note(cfg, f"eval {i}/{len(volumes)} {vol.id}: DSC " + " ".join(f"{result[c]['dsc']:.3f}" for c in labels))
        rows += [dict(id=vol.id, label=c, **result[c], volume_ml_pred=ml[c][0], volume_ml_gt=ml[c][1])
                 for c in labels]
    write_csv(rows, os.path.join(out, "metrics.csv"))
    summary = metrics.summarize(per_volume)
    summary.update(run=cfg["run"], split=cfg["split_name"], data=root, predict=mode, volumes=len(per_volume),
                   units="mm", volume_ratio=volume_ratios(measured, labels))
    clinical = clinical_rows(measured) if layout == "acdc" else []
    if clinical:
        write_csv(clinical, os.path.join(out, "clinical.csv"))
        summary["clinical"] = clinical_agreement(clinical)
    write_json(summary, os.path.join(out, "summary.json"))
    print_summary(summary, run_cfg["class_names"])
    if clinical:
        print_clinical(summary["clinical"])
    return summary


def volume_ratios(measured, labels):
    """{class: predicted / true volume summed over the volumes} (NaN where the truth is empty): below 1 a class is
    under-segmented on the whole, above 1 over-segmented. measured: [(volume, {class: (pred ml, true ml)})]."""
    sums = {c: np.sum([ml[c] for _, ml in measured], axis=0) for c in labels}
    return {str(c): float(p / t) if t > 0 else math.nan for c, (p, t) in sums.items()}


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
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_atomic(path, write)


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
    mode, batch_size = cfg["predict"] or run_cfg["predict"], cfg["batch_size"] or run_cfg["batch_size"]
    note(cfg, f"predict: {len(todo)} inputs checked in {time.perf_counter() - t0:.1f} s; run {cfg['run']}: ResNet-"
              f"{run_cfg['depth']} width {run_cfg['width']}, {run_cfg['size']}x{run_cfg['size']} at "
              f"{run_cfg['spacing']} mm, classes {', '.join(run_cfg['class_names'])}, predict {mode}, "
              f"batch {batch_size}, {cfg['device']}")
    make_folder(out)
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
             "pretrained-supervised": "IDEAL pre-training, supervised fine-tuning only",
             "global": "global-only pre-training + our fine-tuning",
             "local": "local-only pre-training + our fine-tuning",
             "same-decoders": "IDEAL with two ConvTranspose decoders",
             "e0-no-unlabeled": "E0: labeled slices only",
             "e1-joint-w0": "E1: + unlabeled slices in the same pass, weight 0",
             "e2-separate-w0": "E2: + unlabeled slices in a pass of their own, weight 0",
             "e3-separate-w0-poly": "E3: E2 with a poly learning-rate decay",
             "f1-separate-w0.1": "F1: separate passes, Eq. 3 weight 0.1 ramped over the run",
             "f2-weak": "F2: F1 with pseudo-labels from the weak view",
             "f4-weak-t0.9-w1": "F4: F2 with confidence >= 0.9, weight 1 after 40 %",
             "h5-bn-recomputed": "IDEAL, earlier default (F4, recomputed BN statistics, background threshold 0.9)",
             "i4-background0.97": "IDEAL, previous default (h5 with background threshold 0.97)",
             "i5-dice-ce-no-unlabeled": "IDEAL pre-training, supervised fine-tuning only, CE + Dice"}
METRICS = (("dsc", "DSC"), ("assd", "ASD mm"), ("hd", "HD mm"), ("hd95", "HD95 mm"))


def collect(runs, rows=None, split="test"):
    """{row: {fraction: [run record of each seed]}} from RUNS/<row>/L<fraction>/seed<k>/ (eval-SPLIT/summary.json
    and log.jsonl), for the rows named in `rows` (default: every row found), in that order."""
    table = {}
    for path in sorted(glob.glob(os.path.join(runs, "*", "L*", "seed*", f"eval-{split}", "summary.json"))):
        row, frac = path.split(os.sep)[-5:-3]
        if (rows is None or row in rows) and re.fullmatch(r"L\d+(\.\d+)?", frac):
            record = read_json(path)
            if not is_summary(record):
                raise data.DataError(f"{path}: not an eval summary (no mean {', '.join(m for m, _ in METRICS)})")
            record["validation"] = validation_curve(os.path.dirname(os.path.dirname(path)))
            record["seed"] = path.split(os.sep)[-3].removeprefix("seed")
            table.setdefault(row, {}).setdefault(frac[1:], []).append(record)
    order = rows or list(ROW_NAMES)
    return {row: dict(sorted(table[row].items(), key=lambda kv: float(kv[0])))
            for row in sorted(table, key=lambda r: order.index(r) if r in order else len(order))}


def is_summary(record):
    """An eval summary.json: {"mean": {metric: {"mean": ...}}} for every metric of METRICS."""
    return isinstance(record, dict) and isinstance(record.get("mean"), dict) and all(
        isinstance(record["mean"].get(m), dict) and "mean" in record["mean"][m] for m, _ in METRICS)


def read_json(path):
    """A JSON file of a run folder; DataError naming it if it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise data.DataError(f"{path}: not readable JSON ({' '.join(str(e).split())[:160]})") from None


def validation_curve(run):
    """The validation Dice of a fine-tuning run as curve_figures; with --bn-stats recomputed also those of the Dice
    with the running statistics, as running_*."""
    path = os.path.join(run, "log.jsonl")
    try:
        with open(path) as f:
            log = [json.loads(line) for line in f if line.strip()]
        curve = curve_figures([r["val_dice"] for r in log])
        if all("val_dice_running" in r for r in log):
            curve.update({f"running_{k}": v for k, v in curve_figures([r["val_dice_running"] for r in log]).items()})
        return curve
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise data.DataError(f"{path}: not a fine-tuning log ({' '.join(str(e).split())[:160]})") from None


def curve_figures(dice):
    """Best, spread (max - min) over the last 10 epochs and mean over the last 10 epochs of a validation curve."""
    last = dice[-10:]
    return {"best": max(dice), "spread": max(last) - min(last), "last10": float(np.mean(last))}


def cell(values):
    """(mean, std, text) of one value per run; a single run's value comes with its std over test volumes."""
    if len(values) == 1 and isinstance(values[0], dict):
        return values[0]["mean"], values[0]["std"], f"{values[0]['mean']:.3f} ± {values[0]['std']:.3f}"
    means = np.array([v["mean"] if isinstance(v, dict) else v for v in values])
    return float(means.mean()), float(means.std()), f"{means.mean():.3f} ± {means.std():.3f}"


def per_run(record):
    """One run of a report: seed, DSC on the evaluated split (mean and per class), predicted / true volume per class
    where its evaluation recorded it, and its validation curve's figures."""
    classes = {k: v["dsc"]["mean"] for k, v in record.items() if k.isdigit() and isinstance(v, dict) and "dsc" in v}
    return dict(seed=record["seed"], dsc=record["mean"]["dsc"]["mean"], dsc_per_class=classes,
                **({"volume_ratio": record["volume_ratio"]} if "volume_ratio" in record else {}),
                validation=record["validation"])


def report(cfg):
    """results/<name>.md and .json from the runs under --runs: test metrics (or those of another --split),
    validation Dice, and the paper's Table 1 beside IDEAL for the datasets the paper used (test split only)."""
    split = cfg["split_name"]
    table = collect(cfg["runs"], cfg["rows"].split() if cfg["rows"] else None, split)
    if not table:
        raise data.DataError(f"{cfg['runs']}: no <row>/L<fraction>/seed<k>/eval-{split}/summary.json found")
    paper = PAPER_TABLE1.get(cfg["dataset"]) if "ideal" in table and split == "test" else None
    scope = "Test set: mean ± std over test volumes" if split == "test" else \
        f"The {split} split (`eval --split {split}`): mean ± std over its volumes"
    columns = [name for _, name in METRICS] + ["val best", "val spread", "runs"] + (["paper DSC / ASD / HD"] if paper
                                                                                   else [])
    lines = [f"# {cfg['title']}", "", f"Made by `{cfg['made_by']}` at commit {cfg['commit']}.", "",
             f"{scope} of the per-volume mean over foreground classes for one run, "
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
                                **{m: {"mean": c[0], "std": c[1]} for m, c in cells.items()},
                                per_run=[per_run(r) for r in runs]))
    text = "\n".join(lines) + "\n"
    make_folder(os.path.dirname(os.path.abspath(cfg["out"])))
    write_atomic(f"{cfg['out']}.md", lambda tmp: Path(tmp).write_text(text))
    write_json(dict(title=cfg["title"], made_by=cfg["made_by"], commit=cfg["commit"], split=split, units="mm",
                    results=results),
               f"{cfg['out']}.json")
    print(text, end="")


# ----------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------
def images_per_second(full, bare, images, device, steps, rounds=10):
    """Throughputs of the step functions full() and bare() after two warm-up calls each, timed in alternating rounds
    of steps // rounds calls, so that both meet the machine's slow and fast moments alike: the median round of each,
    and the median of the rounds' ratios (full / bare, timed back to back) as their ratio."""
    def timed(step, calls):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images * calls / (time.perf_counter() - t0)

    for step in (full, bare, full, bare):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rounds = min(rounds, steps)
    rates = np.array([[timed(step, steps // rounds) for step in (full, bare)] for _ in range(rounds)])
    return (*np.median(rates, 0).tolist(), float(np.median(rates[:, 0] / rates[:, 1])))


def bare_step(model, opt, *batches, no_grad=()):
    """The bare network on ready-made images: forward (each batch its own pass, as the training step makes them;
    the no_grad batches without gradient) -> mean of the outputs -> backward -> Adam, nothing else."""
    with autocast(batches[0].device):
        with torch.no_grad():
            for x in no_grad:
                model(x)
        outs = model(*batches)
        loss = sum(o.float().mean() for pair in (outs if len(batches) > 1 else [outs]) for o in pair)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_pretrain(cfg, device, pool, g):
    """The training loop's pre-training step (sampling, views, encoder, heads, both losses, backward, Adam, the
    finiteness bookkeeping) vs the bare encoder+heads on 2B images of the same shape. Counts slices (B)."""
    b = cfg["batch_size"]
    model = to_device(PretrainNet(cfg["depth"], cfg["width"], cfg["proj_dim"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    meter = Meter(cfg, 1)

    def full():
        x = pool[torch.randint(len(pool), (b,), device=device, generator=g)]
        meter.add(pretrain_step(model, opt, x, g, **{k: cfg[k] for k in LOSS_KEYS}))

    return images_per_second(full, functools.partial(bare_step, model, opt, pool[:2 * b]), b, device, cfg["steps"])


def bench_finetune(cfg, device, pool, g):
    """The training loop's fine-tuning step with the default Eq. 3 settings (labeled and unlabeled batches drawn and
    augmented, the passes the --forward and --pseudo settings make, Eq. 3, backward, Adam, finiteness bookkeeping)
    vs the bare network making the same passes on ready-made images. Counts labeled + unlabeled images."""
    b, bu = cfg["batch_size"], cfg["unlabeled_batch"]
    model = to_device(IDEALSegmenter(4, cfg["depth"], cfg["width"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    masks = (pool[:, 0] * 4).long().clamp(max=3)
    meter, g_cpu = Meter(cfg, 1), torch.Generator().manual_seed(cfg["seed"])
    threshold = class_thresholds(dict(cfg, num_classes=4), device)

    def full():
        xl, ml = labeled_views(pool, masks, b, g_cpu, g)
        xu, xw = unlabeled_views(pool, bu, g_cpu, g, cfg["pseudo"])
        meter.add(finetune_step(model, opt, xl, ml, xu, xw, cfg["unlabeled_weight"], cfg["forward"], threshold))

    xl, xu = pool[:b], pool[b:b + bu]
    batches = (torch.cat([xl, xu]),) if cfg["forward"] == "joint" else (xl, xu)
    weak = (xu,) if cfg["pseudo"] == "weak" else ()
    bare = functools.partial(bare_step, model, opt, *batches, no_grad=weak)
    return images_per_second(full, bare, b + bu, device, cfg["steps"])


def bench(cfg):
    """images/s of the real training steps against the bare model on the same shapes, and their ratio."""
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    pool = to_device(torch.rand(4 * max(cfg["batch_size"], cfg["unlabeled_batch"]), 1, cfg["size"], cfg["size"],
                                device=device, generator=g), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench: preset {cfg['preset']}, ResNet-{cfg['depth']} width {cfg['width']}, "
          f"{cfg['size']}x{cfg['size']}, batch {cfg['batch_size']}, {name}")
    results = {}
    for kind, fn in (("pretrain", bench_pretrain), ("finetune", bench_finetune)):
        full, bare, ratio = fn(cfg, device, pool, g)
        results[kind] = dict(step_images_per_s=round(full, 1), bare_images_per_s=round(bare, 1), ratio=round(ratio, 3))
        print(f"{kind:9s} step {full:8.1f} img/s   bare model {bare:8.1f} img/s   ratio {ratio:.3f}")
    print(json.dumps(dict(results, device=name, preset=cfg["preset"], batch_size=cfg["batch_size"])))
    return results


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line on stderr (exit 2) instead of usage + error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, formatter_class=Help, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class Help(argparse.HelpFormatter):
    """Help that shows an option's default unless it is None or False or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


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


def text(value):
    """argparse type: a non-empty string (a path)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def preset_help(key, what):
    return f"{what} (preset: " + ", ".join(f"{p} {v[key]}" for p, v in PRESETS.items()) + ")"


def add_process_options(p):
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; one GPU per rank under "
                   "torchrun)")
    p.add_argument("--threads", type=number(int, high=1024), help="CPU threads of this process (default: torch's, "
                   "all cores; give each of two jobs on one machine half of them)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_data_options(p, of_run=False):
    run = " (default: the run's)"
    p.add_argument("--data", type=text, help="dataset folder" + (run if of_run else " (default: the synthetic "
                   "phantom in cache/phantom)"))
    p.add_argument("--layout", default=None if of_run else "auto", choices=("auto", "acdc", "mmwhs", "own"),
                   help="dataset layout" + (run if of_run else ""))
    p.add_argument("--frames", default=None if of_run else "ed", choices=("ed", "es", "both"),
                   help="ACDC frames used" + (run if of_run else ""))
    p.add_argument("--label-map", help="remap raw label values, e.g. 1:3,3:1" + (run if of_run else ""))


def add_model_options(p, command):
    """Preset, seed, architecture, input and optimisation: each shows the presets' values for `command`."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper with a GPU, cpu without")
    p.add_argument("--seed", type=number(int, inclusive=True, high=2 ** 32 - 1), default=0,
                   help="seed of weights, split and augmentation")
    p.add_argument("--depth", type=int, choices=sorted(RESNETS), help=preset_help("depth", "ResNet depth"))
    p.add_argument("--width", type=number(int, high=1024), help=preset_help("width", "ResNet stem width"))
    p.add_argument("--size", type=number(int, high=2048), help=preset_help("size", "slice size in pixels, a "
                   "multiple of 32"))
    p.add_argument("--spacing", type=number(float, high=100.0), help=preset_help("spacing", "in-plane spacing in mm"))
    p.add_argument("--batch-size", type=number(int, high=65536), help=preset_help("batch_size", "slices per batch "
                   "and process"))
    p.add_argument("--lr", type=number(float), help=preset_help(f"{command}_lr", "Adam learning rate"))


def add_training_options(p, command):
    p.add_argument("--out", type=text, required=True, help="run folder")
    p.add_argument("--epochs", type=number(int, high=10 ** 6), help=preset_help(f"{command}_epochs", "epochs") +
                   "; with --resume: extends the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes")


def add_pretrain_loss_options(p):
    p.add_argument("--loss", default="both", choices=("both", "local", "global"), help="L_g + L_loc, or one")
    p.add_argument("--tau", type=number(float), default=0.1, help="softmax temperature of Eq. 1 and 2")
    p.add_argument("--lambda-loc", type=number(float, inclusive=True), default=1.0, help="weight of L_loc")
    p.add_argument("--negatives", default="same", choices=("same", "all"), help="negatives of Eq. 2")
    p.add_argument("--proj-dim", type=number(int, high=8192), help=preset_help("proj_dim", "projection size"))


def add_finetune_loss_options(p):
    """Eq. 3 and how its batches are formed, defaults chosen on the validation split (README, "Why the unlabeled
    slices hurt"); the paper-literal setting: --forward joint --pseudo same --threshold 0 --background-threshold 0
    --rampup 0 --sup-loss ce."""
    p.add_argument("--sup-loss", default="dice-ce", choices=("ce", "dice-ce"),
                   help="labeled term of Eq. 3: CE, or CE + soft Dice over the foreground classes")
    p.add_argument("--unlabeled-weight", type=number(float, inclusive=True), default=1.0,
                   help="weight of the unlabeled term of Eq. 3 after ramp-up (0: supervised only)")
    p.add_argument("--rampup", type=number(float, inclusive=True, high=1.0), default=0.4,
                   help="fraction of the steps over which the unlabeled weight ramps up")
    p.add_argument("--warmup", type=number(float, inclusive=True, high=1.0), default=0.0,
                   help="fraction of the steps trained on labeled slices only, before the ramp-up starts")
    p.add_argument("--unlabeled-batch", type=number(int, inclusive=True, high=65536),
                   help="unlabeled slices per step and process, 0: none (default: --batch-size; at "
                   "--unlabeled-weight 0 they still feed BatchNorm statistics)")
    p.add_argument("--forward", default="separate", choices=("separate", "joint"),
                   help="labeled and unlabeled slices in one forward pass (shared BatchNorm statistics) or two")
    p.add_argument("--pseudo", default="weak", choices=("weak", "same"),
                   help="pseudo-labels from the strongly augmented view itself or from its weak view")
    p.add_argument("--threshold", type=number(float, inclusive=True, high=1.0), default=0.9,
                   help="confidence below which pseudo-labelled pixels are ignored")
    p.add_argument("--background-threshold", type=number(float, inclusive=True, high=1.0), default=0.9,
                   help="the same for pixels pseudo-labelled background (give --threshold's value for one threshold)")
    p.add_argument("--schedule", default="constant", choices=("constant", "poly"), help="learning-rate schedule")
    p.add_argument("--bn-stats", default="recomputed", choices=("running", "recomputed"),
                   help="BatchNorm statistics that validation, best.pt and so evaluation use: recomputed before each "
                   "validation on the un-augmented training slices, or the running averages of training")
    p.add_argument("--align", default="none", choices=("none", "prior"),
                   help="pseudo-labels from probabilities aligned to the labeled slices' class distribution "
                        "(prior) or the softmax itself (none)")
    p.add_argument("--ema", type=number(float, inclusive=True, high=0.9999), default=0.0,
                   help="validate, keep and evaluate an exponential moving average of the weights with this decay "
                        "per step (0: the weights themselves)")


def add_eval_options(p):
    p.add_argument("--run", type=text, required=True, help="fine-tuning run folder (holding best.pt)")
    p.add_argument("--split", dest="split_name", default="test", choices=("test", "val", "train", "all"),
                   help="test|val|train: the run's split.json (ACDC by patient, so --frames both scores ED and ES), "
                   "results in RUN/eval-SPLIT (eval-SPLIT-FRAMES when --frames differs from the run's); all: every "
                   "labeled volume of --data, results in RUN/eval-<data folder name>-all")
    p.add_argument("--predict", choices=("mean", "d1", "d2"), help="decoders' prediction (default: the run's)")
    p.add_argument("--checkpoint", default="best", choices=("best", "final", "best-labeled", "final-labeled"), help="best.pt (best validation Dice) "
                   "or final.pt (the last epoch's), results in RUN/eval-.../ or RUN/eval-...-final/")
    p.add_argument("--save-pred", action="store_true", help="write eval-SPLIT/pred/ID.nii.gz")
    p.add_argument("--save-png", action="store_true", help="write eval-SPLIT/png/ID.png overlays")


def add_predict_options(p):
    p.add_argument("--run", type=text, required=True, help="fine-tuning run folder (holding best.pt)")
    p.add_argument("--input", type=text, required=True, nargs="+", metavar="PATH", help=".nii/.nii.gz files, or "
                   "folders searched recursively; 3D (x, y, z) or 4D cine (x, y, z, t), segmented frame by frame")
    p.add_argument("--out", type=text, required=True, help="output folder: NAME.nii.gz for input NAME.nii(.gz)")
    p.add_argument("--probabilities", action="store_true", help="also write NAME_prob.nii.gz, float32 class "
                   "probabilities on the native grid: (x, y, z, C) for 3D inputs, (x, y, z, t, C) for 4D")
    p.add_argument("--save-png", action="store_true", help="also write NAME.png: image | prediction for three mid "
                   "slices (of the first frame of a 4D input)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--predict", choices=("mean", "d1", "d2"), help="decoders' prediction (default: the run's)")
    p.add_argument("--batch-size", type=number(int, high=65536), help="slices per forward pass (default: the run's)")


def add_report_options(p):
    p.add_argument("--runs", type=text, required=True, help="folder with <row>/L<fraction>/seed<k>/eval-SPLIT/")
    p.add_argument("--split", dest="split_name", default="test", choices=("test", "val", "train", "all"),
                   help="whose evaluations to tabulate (eval --split; default: test)")
    p.add_argument("--out", type=text, required=True, help="writes OUT.md and OUT.json")
    p.add_argument("--dataset", default="acdc", help="whose Table 1 numbers to show beside IDEAL (acdc, mmwhs; "
                   "any other name shows none)")
    p.add_argument("--rows", help="the rows to tabulate, space-separated, in this order (default: every row found)")
    p.add_argument("--title", default="IDEAL results", help="heading of the table")
    p.add_argument("--made-by", default="", help="the command that made the runs")
    p.add_argument("--commit", default="", help="the commit that made the runs")


def build_parser():
    parser = Parser(prog="ideal.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("pretrain", help="self-supervised pre-training of E")
    add_model_options(p, "pretrain"), add_data_options(p), add_training_options(p, "pretrain")
    add_pretrain_loss_options(p), add_process_options(p)
    p = sub.add_parser("finetune", help="semi-supervised fine-tuning (Eq. 3)")
    add_model_options(p, "finetune"), add_data_options(p), add_training_options(p, "finetune")
    p.add_argument("--pretrained", type=text, help="encoder.pt of a pre-training run (required unless "
                   "--no-pretrain)")
    p.add_argument("--no-pretrain", action="store_true", help="random encoder initialisation")
    p.add_argument("--labeled", type=number(float, high=100.0), help="L: %% of training volumes (default: 1.25)")
    p.add_argument("--split-file", dest="split", type=text, help="split.json to reuse instead of drawing one (its "
                   "labeled volumes replace --labeled)")
    add_finetune_loss_options(p)
    p.add_argument("--same-decoders", action="store_true", help="ablation: both decoders ConvTranspose")
    p.add_argument("--predict", default="mean", choices=("mean", "d1", "d2"), help="prediction used for val")
    p.add_argument("--steps-per-epoch", type=number(int, high=10 ** 7), help=preset_help("steps_per_epoch",
                   "steps per epoch"))
    add_process_options(p)
    p = sub.add_parser("eval", help="metrics of a fine-tuned run on the native grid", description="Scores a "
                       "fine-tuned run on its own split or on every labeled volume of any dataset.")
    add_eval_options(p), add_data_options(p, of_run=True), add_process_options(p)
    p = sub.add_parser("predict", help="segment new scans with a fine-tuned run", description="Segments 3D and 4D "
                       "NIfTI scans with a fine-tuning run's best.pt (architecture, preprocessing and classes come "
                       "from it; no dataset needed) into OUT/NAME.nii.gz: uint8 labels with the input's shape, "
                       "affine and header. Every input is checked before the first output is written; existing "
                       "outputs are kept unless --overwrite, so an interrupted batch continues.")
    add_predict_options(p), add_process_options(p)
    p = sub.add_parser("report", help="results table from the eval summaries of run.sh's run folders")
    add_report_options(p)
    p = sub.add_parser("bench", help="training-step throughput vs the bare model (the default losses)")
    add_model_options(p, "pretrain"), add_pretrain_loss_options(p), add_finetune_loss_options(p)
    p.add_argument("--steps", type=number(int), default=60,
                   help="timed steps of each kind, in 10 rounds that alternate the training step and the bare model")
    add_process_options(p)
    return parser


def check_device(name, parser):
    """The torch device of --device (default: cuda if available, else cpu); one line for one this machine lacks."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: {name!r} is not a torch device")
    here = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if here.get(device.type, 0) <= (device.index or 0) or (device.type == "cpu" and device.index):
        parser.error(f"argument --device: {name} is not on this machine (it has cpu"
                     + (f", cuda:0-{here['cuda'] - 1}" if here["cuda"] else "") + ")")
    return name


def resolve(args, parser):
    """The command's configuration: preset values, overridden by every flag given."""
    cfg = vars(args).copy()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    if "device" in cfg:
        cfg["device"] = check_device(cfg["device"], parser)
    if "preset" not in cfg:                          # eval and predict take theirs from the run
        return cfg
    cfg["preset"] = cfg["preset"] or ("paper" if cfg["device"].startswith("cuda") else "cpu")
    preset = PRESETS[cfg["preset"]]
    for key, value in preset.items():
        if cfg.get(key, "absent") is None:
            cfg[key] = value
    if cfg.get("lr") is None:
        cfg["lr"] = preset["finetune_lr" if args.command == "finetune" else "pretrain_lr"]
    if cfg["size"] % 32:
        parser.error(f"argument --size: must be a multiple of 32 (the encoder's stride), got {cfg['size']}")
    if args.command == "finetune":
        check_finetune(cfg, parser)
    if "unlabeled_batch" in cfg and cfg["unlabeled_batch"] is None:
        cfg["unlabeled_batch"] = cfg["batch_size"]
    if args.command != "bench":
        threads = f" ({torch.get_num_threads()} threads)" if cfg["device"] == "cpu" else ""
        note(cfg, f"{args.command}: preset {cfg['preset']} on {cfg['device']}{threads}")
    return cfg


def check_finetune(cfg, parser):
    """finetune's rules across options: an encoder unless a checkpoint is resumed; --labeled (default 1.25) or
    --split-file, whose labeled volumes replace it."""
    resumable = cfg["resume"] and os.path.exists(os.path.join(cfg["out"], "last.pt"))
    if not (cfg["pretrained"] or cfg["no_pretrain"] or resumable):
        parser.error("argument --pretrained: ENCODER.pt is required unless --no-pretrain is given" +
                     (f" ({cfg['out']} holds no checkpoint to resume)" if cfg["resume"] else ""))
    if cfg["split"] and cfg["labeled"] is not None:
        parser.error("argument --labeled: not with --split-file, whose labeled volumes the run uses")
    if not cfg["split"] and cfg["labeled"] is None:
        cfg["labeled"] = 1.25


def given_options(argv):
    """The options named on the command line, as config keys (a resumed run refuses changed ones)."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {"split" if name == "split_file" else name for name in names}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("pretrain", "finetune") and int(os.environ.get("RANK", "0")) != 0:
        return 0                                     # under torchrun, eval, predict, report and bench run on rank 0
    cfg = resolve(args, parser)
    try:
        if args.command in ("pretrain", "finetune"):
            cfg["device"] = str(init_distributed(torch.device(cfg["device"])))
            with claimed(cfg["out"]):
                {"pretrain": pretrain, "finetune": finetune}[args.command](cfg, given_options(argv))
            leave_distributed()
        else:
            {"eval": evaluate_run, "predict": predict_run, "bench": bench, "report": report}[args.command](cfg)
    except (data.DataError, CheckpointError) as e:
        print(f"ideal.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        print(f"ideal.py {args.command}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        leave_distributed(clean=False)               # after an error; a no-op once left
    return 0


if __name__ == "__main__":
    sys.exit(main())
