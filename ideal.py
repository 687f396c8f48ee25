"""IDEAL: Improved DEnse locAL contrastive learning for semi-supervised cardiac MRI segmentation.

Reference implementation of Basak et al., ICASSP 2023 (paper Fig. 2):

  (a) pre-training   x -> two views x_q, x_k -> E (ResNetEncoder) -> G (DenseHead, one 1x1 conv)
                     -> local InfoNCE over exactly corresponding locations (Eq. 2)
                     (+ GAP+MLP GlobalHead -> global InfoNCE, Eq. 1)
  (b) fine-tuning    x -> E -> D(theta1) (ConvTranspose U-Net decoder) -> p1 -> y1
                             -> D(theta2) (bilinear U-Net decoder)      -> p2 -> y2
                     Eq. 3: CE + soft Dice of p1 and p2 against the mask on labeled slices,
                     CE(p1, y2) + CE(p2, y1) on unlabeled ones (pseudo-labels of a weak view, confident pixels)

Commands (python ideal.py COMMAND --help): pretrain, finetune, eval, predict, report, bench. Without --data the
synthetic phantom of data.py is written once to cache/phantom and used.
"""
import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F

# ==========================================================================================================
# THE METHOD: from the imports above down to "END OF THE METHOD", this block uses nothing but PyTorch and runs
# when pasted alone into another file (tested). Everything below it is the program around it.
# ==========================================================================================================


# ----------------------------------------------------------------------------------------------------------
# Processes: Eq. 1 and Eq. 2 take negatives from every torchrun process (in one process these are no-ops)
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
    depth: 10/18/34 (basic blocks) or 50/101 (bottlenecks; the paper uses 50); width: stem and first-stage channels."""

    def __init__(self, depth, width):
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

    def __init__(self, cin, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cin, cin), nn.ReLU(inplace=True), nn.Linear(cin, dim))

    def forward(self, f):                            # f: (B, C, h, w)
        return self.mlp(f.mean((2, 3)))              # (B, dim)


class DenseHead(nn.Module):
    """G: the paper's dense projection head, a single 1x1 convolution -> (B, dim, h, w)."""

    def __init__(self, cin, dim):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, 1)

    def forward(self, f):                            # f: (B, C, h, w)
        return self.proj(f)


class PretrainNet(nn.Module):
    """Fig. 2a: E followed by the dense head G (and the global head for Eq. 1)."""

    def __init__(self, depth, width, proj_dim):
        super().__init__()
        self.encoder = ResNetEncoder(depth, width)
        self.global_head = GlobalHead(self.encoder.channels[-1], proj_dim)
        self.dense_head = DenseHead(self.encoder.channels[-1], proj_dim)

    def forward(self, x):                            # x: (B, 1, H, W)
        f = self.encoder(x)[-1]                      # (B, C, H/32, W/32)
        return self.global_head(f), self.dense_head(f)


# ----------------------------------------------------------------------------------------------------------
# Views: with known geometry for pre-training (Eq. 2's correspondence), weak and strong for fine-tuning
# ----------------------------------------------------------------------------------------------------------
def random_affine(n, g, device, scale=(0.7, 1.0), rotate=math.pi / 6, shift=None):
    """Random affines theta (n, 2, 3), view -> image in F.affine_grid's coordinates: zoom `scale`, rotation up to
    +-`rotate`, an x flip half the time, shift up to +-`shift` (default 1 - scale: an unrotated view stays inside)."""
    u = torch.rand(n, 4, generator=g, device=device)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    a = (2 * u[:, 1] - 1) * rotate
    fx = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(a) * s, torch.sin(a) * s
    shift = (2 * torch.rand(n, 2, generator=g, device=device) - 1) * ((1 - s)[:, None] if shift is None else shift)
    return torch.stack([torch.stack([cos * fx, -sin, shift[:, 0]], 1),
                        torch.stack([sin * fx, cos, shift[:, 1]], 1)], 1)


def affine_grid(theta, h, w):
    """F.affine_grid(theta, (B, C, h, w), align_corners=False) built from planes: theta (B, 2, 3) -> grid (B, h, w, 2),
    equal to it to float rounding (tested) in a third of its time."""
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
    """Query-view to key-view coordinates, inv(M_k) @ M_q (B, 2, 3); inv(A_k) by the 2x2 adjugate, so that no
    torch.linalg.inv or host-made constant makes a GPU step synchronise."""
    a, b, c, d = theta_k[:, 0, 0], theta_k[:, 0, 1], theta_k[:, 1, 0], theta_k[:, 1, 1]
    inv_a = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / (a * d - b * c)[:, None, None]
    return torch.cat([inv_a @ theta_q[:, :, :2], inv_a @ (theta_q[:, :, 2:] - theta_k[:, :, 2:])], 2)


def align(k, theta_q, theta_k):
    """Resample the key map k (B, C, h, w) onto the query's grid, given the views' affines (B, 2, 3).
    Returns (k_aligned (B, C, h, w), valid (B, h, w) bool: the query location lies inside the key view)."""
    rel = relative_affine(theta_q.float(), theta_k.float())
    grid = affine_grid(rel, *k.shape[2:])                                  # (B, h, w, 2) key coords
    valid = (grid.abs() <= 1).all(-1)
    k = F.grid_sample(k, grid.to(k.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return k, valid


def augment_geometry(x, m, g):
    """Joint geometric augmentation for fine-tuning, x (B, 1, H, W) bilinear, m (B, H, W) nearest (or None): zoom
    0.7-1.3, any rotation, flip, shift up to 1/8 of the side (README, "Decisions")."""
    theta = random_affine(x.shape[0], g, x.device, scale=(0.7, 1.3), rotate=math.pi, shift=0.25)
    return warp(x, theta), None if m is None else warp(m[:, None].float(), theta, mode="nearest")[:, 0].long()


def augment_intensity(x, g):
    """Strong intensity augmentation for fine-tuning: gamma, contrast, brightness and noise."""
    return jitter_intensity(x, g, gamma=(0.6, 1.6), contrast=(0.7, 1.3), brightness=0.1, noise=0.05)


def augment_pair(x, m, g):
    """The fine-tuning augmentation, geometry then intensity: (x, m) -> (view, mask of the view or None)."""
    x, m = augment_geometry(x, m, g)
    return augment_intensity(x, g), m


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def global_infonce(q, k, tau):
    """Eq. 1, symmetric (NT-Xent): q, k (B, D) projections of the two views of B images (normalised here).
    Positive of q_b is k_b; negatives the other images' views in the global batch (2 W B - 2). tau: temperature."""
    b = q.shape[0]
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = torch.cat([gather(q), gather(k)])                                # (2WB, D): every view, every rank
    logits = torch.cat([q, k]) @ keys.t() / tau                             # (2B, 2WB)
    n = keys.shape[0] // 2
    own = torch.arange(b, device=q.device) + rank() * b                     # global index of this rank's images
    itself = torch.cat([own, own + n])[:, None] == torch.arange(2 * n, device=q.device)   # (2B, 2WB): no host copy
    logits = logits.masked_fill(itself, float("-inf"))
    return F.cross_entropy(logits, torch.cat([own + n, own]))


def local_infonce(q, k, valid, tau, negatives):
    """Eq. 2, dense local InfoNCE: q, k (B, C, h, w) L2-normalised maps, k aligned to q's grid; valid (B, h, w) bool
    (or (B, V, ...): V instances, e.g. both directions, averaged). Positive of q_{b,i}: k_{b,i}; negatives "same"
    (Eq. 2): k_{b',i} of the global batch's other images b'; "all": all their valid locations. tau: temperature."""
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


def pretrain_loss(model, views, thetas, loss, tau, lambda_loc, negatives):
    """L = L_g + lambda_loc * L_loc, Eq. 2 both ways: views (2B, 1, H, W) query views then key views, thetas
    (2B, 2, 3); loss "global" | "local" | "both". Returns (total, {"global", "local"} detached)."""
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

    def __init__(self, num_classes, depth, width, same_decoders=False):
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
def pseudo_label(logits, threshold):
    """y = one-hot argmax of softmax(logits) as class indices (B, H, W), detached; IGNORE where the top probability
    is below threshold (0 keeps every pixel)."""
    confidence, y = logits.detach().float().softmax(1).max(1)              # (B, H, W) each
    return y.masked_fill(confidence < threshold, IGNORE)


def soft_dice_loss(logits, mask):
    """1 - the soft Dice 2 sum(p y) / (sum(p) + sum(y)) over a batch's pixels, averaged over the foreground classes
    (Milletari et al. 2016): logits (B, C, H, W), mask (B, H, W) class indices; 0 for a perfect prediction."""
    p = logits.float().softmax(1)[:, 1:]                                   # (B, C - 1, H, W)
    y = F.one_hot(mask, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    dice = (2 * (p * y).sum((0, 2, 3)) + 1e-5) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1e-5)
    return 1 - dice.mean()


def cross_consistency_loss(logits1_lab, logits2_lab, mask, logits1_unl, logits2_unl, y1, y2, weight, dice):
    """Eq. 3: CE(p1, m) + CE(p2, m) on labeled slices (B_l, C, H, W), weight * (CE(p1, y2) + CE(p2, y1)) on unlabeled
    ones (or None), IGNORE pixels counting 0; dice adds soft Dice to the labeled term. Returns (loss, sup, unsup)."""
    sup = sum(F.cross_entropy(z.float(), mask) + (soft_dice_loss(z, mask) if dice else 0)
              for z in (logits1_lab, logits2_lab))
    if logits1_unl is None:
        return sup, sup, sup.new_zeros(())
    unsup = (F.cross_entropy(logits1_unl.float(), y2, ignore_index=IGNORE, reduction="none").mean() +
             F.cross_entropy(logits2_unl.float(), y1, ignore_index=IGNORE, reduction="none").mean())
    return sup + weight * unsup, sup, unsup


def rampup(step, total, fraction):
    """Sigmoid ramp-up exp(-5 (1 - t)^2), t = step / (fraction total) up to 1 (Laine & Aila 2017); fraction 0: 1."""
    if fraction <= 0:
        return 1.0
    return math.exp(-5.0 * (1.0 - min(step / (fraction * total), 1.0)) ** 2)


def predict(model, x, mode="mean"):
    """Class probabilities (B, C, H, W): mean of the two decoders' softmax, or one decoder's."""
    l1, l2 = model(x)
    p1, p2 = l1.float().softmax(1), l2.float().softmax(1)
    return {"mean": (p1 + p2) / 2, "d1": p1, "d2": p2}[mode]


# ==========================================================================================================
# END OF THE METHOD. The program around it: defaults, run folders, training loops, eval, predict, report, bench.
# ==========================================================================================================
import argparse
import contextlib
import functools
import json
import os
import sys
import time
import warnings
import zipfile

import numpy as np

import data
import metrics

# -------------- Defaults, each written once: argparse shows them, run.sh's rows pin only what differs, README quotes it
PRESETS = {  # model, input and schedule by budget; the flag of the same name overrides any value
    # the paper's ResNet-50 and Adam lr 1e-5; it gives no batch, input size or schedule: these are ours
    "paper": dict(depth=50, width=64, size=192, spacing=1.367, batch_size=32, proj_dim=128, steps_per_epoch=100,
                  pretrain_lr=1e-5, finetune_lr=1e-5, pretrain_epochs=100, finetune_epochs=100),
    # ResNet-18 of width 16 at 128x128 (the paper's field of view): minutes per run on a laptop, where lr 1e-5
    # would learn nothing
    "cpu": dict(depth=18, width=16, size=128, spacing=2.05, batch_size=16, proj_dim=64, steps_per_epoch=50,
                pretrain_lr=1e-3, finetune_lr=3e-3, pretrain_epochs=100, finetune_epochs=30),
    # the cpu model on a schedule of minutes, for run.sh's synthetic phantom
    "demo": dict(depth=18, width=16, size=128, spacing=2.05, batch_size=16, proj_dim=64, steps_per_epoch=10,
                 pretrain_lr=1e-3, finetune_lr=3e-3, pretrain_epochs=15, finetune_epochs=4),
}
DEFAULTS = dict(           # the method's settings, the same for every preset
    seed=0,                # weights, labeled subset and augmentation; run.sh's seed k also pre-trains encoder k
    loss="both",           # pre-training loss L = L_g + lambda_loc L_loc (Eq. 1 + Eq. 2), the paper's
    tau=0.1,               # temperature of Eq. 1 and Eq. 2, SimCLR's
    lambda_loc=1.0,        # the paper weighs the two terms alike
    negatives="same",      # Eq. 2 as written: the other images' keys at the same location
    labeled=1.25,          # L, % of the training volumes labeled: one ACDC volume, the paper's hardest setting
    sup_loss="dice-ce",    # labeled term: CE + soft Dice, which weighs the small RV as much as the background
    unlabeled_weight=1.0,  # weight of Eq. 3's unlabeled term after the ramp-up; 0 is supervised fine-tuning
    rampup=0.4,            # that weight ramps up (sigmoid) over the first 40 % of the steps (Laine & Aila 2017)
    forward="separate",    # labeled and unlabeled batches in passes of their own: one shared pass broke BatchNorm
    pseudo="weak",         # pseudo-labels from a weak view (geometry only), the loss on its strong view
    threshold=0.9,         # pixels whose top probability is below it are left out of Eq. 3
    predict="mean",        # prediction: the mean of the two decoders' probabilities
)
ARCH_KEYS = ("depth", "width", "size", "spacing")
HERE = os.path.dirname(os.path.abspath(__file__))
PHANTOM_DIR = os.path.join(HERE, "cache", "phantom")


# ----------------------------------------------------------------------------- Run folders, checkpoints and processes
def init_distributed(device):
    """Join torchrun's process group (nccl on cuda:LOCAL_RANK, gloo on the CPU), if any; returns the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave_distributed(clean=True):
    """Leave torchrun's process group, if any: at a barrier after a clean finish (an early leaver aborts the others),
    at once after an error (a rank that failed otherwise would never reach it)."""
    if world() > 1:
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def atomic_save(obj, path):
    """torch.save through write_atomic (torch reports a full disk as RuntimeError: made an OSError here)."""
    def save(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            raise OSError(str(e).split("\n")[0]) from None
    data.write_atomic(path, save)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, of another command or architecture, or holds an invalid config."""


def load_checkpoint(path, keys, kind=None):
    """A checkpoint dict holding `keys`, written by `kind`, CRC-checked and loaded with weights_only=True."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True) if damaged is None else None
    except Exception as e:                            # not a zip, truncated, unpickling refused ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first[:160]})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: the CRC of its entry {damaged} does not match")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: not an IDEAL checkpoint (expected keys {', '.join(keys)})")
    if kind and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path}: written by {ckpt.get('kind') or 'another program'}, not by {kind}")
    return ckpt


# A stored config is checked with the command line's own rules (type, range, choices) and these for what it derives.
DERIVED = {"world_size": lambda v, c: type(v) is int and 1 <= v <= 65536,
           "num_classes": lambda v, c: type(v) is int and 2 <= v <= 256,
           "class_names": lambda v, c: isinstance(v, list) and len(v) == c.get("num_classes") and all(
               isinstance(n, str) for n in v),
           "predict": lambda v, c: v in ("mean", "d1", "d2"),
           "epochs": lambda v, c: type(v) is int and 1 <= v <= 10 ** 6}


def check_config(cfg, command, path, keys):
    """CheckpointError unless cfg holds each of keys with a value that `command`'s command line (or DERIVED) takes."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices[command]._actions}
    bad = [f"{k}={cfg.get(k, 'missing')!r}" for k in keys if k not in cfg or not valid(cfg[k], actions.get(k), k, cfg)]
    if bad:
        raise CheckpointError(f"{path}: holds an invalid config ({', '.join(bad[:5])[:300]})")


def valid(value, action, key, cfg):
    """Whether the command line would accept value for option action (or DERIVED's rule for key, if no option)."""
    if action is None:
        return DERIVED.get(key, lambda v, c: True)(value, cfg)
    if isinstance(action, argparse._StoreTrueAction):
        return type(value) is bool
    if value is None:
        return not action.required and action.default is None
    try:
        parsed = action.type(str(value)) if action.type else value
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False
    size_ok = key != "size" or parsed % 32 == 0
    return type(value) is not bool and parsed == value and size_ok and (not action.choices or value in action.choices)


def load_state(obj, state, path, what="weights"):
    """obj.load_state_dict(state) (strict for a module), turning a mismatch into one line naming the keys."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError, KeyError) as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: its {what} do not fit this run: {detail[:300]}") from None


def claimed(out):
    """The lock on the run folder `out` for the whole command (data.locked_folder), taken by rank 0, the only writer."""
    return data.locked_folder(out) if rank() == 0 else contextlib.nullcontext()


RESUME_NEW = ("data", "compile")                            # may change on resume, and the new value holds
RESUME_FREE = ("out", "resume", "quiet", "device", "epochs", "pretrained", *RESUME_NEW)   # "pretrained": read at start
OLD_FORMAT = "7f27063"  # the last commit that resumes runs with the options retired since (--align, --ema, ...)


def open_run(cfg, command, given):
    """(cfg, last.pt or None) of --out: a new run, or with --resume the stored one, whose checked options the command
    line (`given`) may not change; --epochs may only extend it."""
    out, last = cfg["out"], os.path.join(cfg["out"], "last.pt")
    if not os.path.exists(last):                              # also a run that died before its first checkpoint
        if cfg["resume"]:
            note(cfg, f"{out}: no checkpoint yet; starting the run")
        epochs = cfg["epochs"] or PRESETS[cfg["preset"]][f"{command}_epochs"]
        return dict(cfg, resume=False, epochs=epochs, world_size=world()), None
    if not cfg["resume"]:
        raise data.DataError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    ckpt = load_checkpoint(last, ("model", "optimizer", "epoch", "config", "log"), command)
    stored = ckpt["config"]
    other = sorted((set(stored) ^ set(cfg)) - set(DERIVED))
    if other:
        raise data.DataError(f"{last}: made by another version of ideal.py (options {', '.join(other)} differ); resume "
                             f"it with that version (a run made before the retired options: git checkout {OLD_FORMAT})")
    check_config(stored, command, last, [k for k in stored if k not in RESUME_FREE or k == "epochs"])
    log, epoch = ckpt["log"], ckpt["epoch"]
    fine = ckpt.get("kind") != "finetune" or type(ckpt.get("best_val_dice")) is float
    if not (isinstance(log, list) and all(isinstance(r, dict) for r in log) and type(epoch) is int
            and 1 <= epoch == len(log) <= stored["epochs"] and fine):
        raise CheckpointError(f"{last}: holds an invalid training state (epoch {epoch!r} of {stored['epochs']!r}, "
                              f"a log of {type(log).__name__})")
    changed = [f"--{k.replace('_', '-')} {cfg[k]} (the run's: {stored.get(k)})" for k in sorted(given)
               if k not in RESUME_FREE and k in cfg and cfg[k] != stored.get(k)]
    if changed:
        raise data.DataError(f"{last}: a resumed run keeps its stored options; drop {', '.join(changed)} or start "
                             "a new --out")
    if stored["world_size"] != world():
        raise data.DataError(f"{last}: trained by {stored['world_size']} process(es), resumed by {world()}; the global "
                             "batch and its sampling would change (resume it with as many, or start a new --out)")
    epochs = cfg["epochs"] if "epochs" in given else stored["epochs"]
    if epochs < stored["epochs"]:
        raise data.DataError(f"{last}: --epochs {epochs} is fewer than the run's {stored['epochs']}; a resumed run "
                             "may be extended, never shortened")
    if epochs > stored["epochs"]:
        note(cfg, f"{out}: extended from {stored['epochs']} to {epochs} epochs; the ramp-up now spans the longer run")
    new = {k: cfg[k] for k in RESUME_NEW if k in given}
    return dict(stored, **new, out=out, quiet=cfg["quiet"], device=cfg["device"], resume=True, epochs=epochs), ckpt


def start_run(cfg, split, ckpt):
    """Write config.json, split.json and log.jsonl (a resumed run's from last.pt); returns the log (epoch records)."""
    log = ckpt["log"] if ckpt else []
    if rank() == 0:
        if ckpt and ckpt["epoch"] < cfg["epochs"]:                   # extended: no longer done, final.pt stale
            for name in ("done.json", "final.pt"):
                if os.path.exists(os.path.join(cfg["out"], name)):
                    os.remove(os.path.join(cfg["out"], name))
        if not ckpt:
            data.write_json(cfg, os.path.join(cfg["out"], "config.json"))
            data.write_atomic(os.path.join(cfg["out"], "split.json"), lambda tmp: data.save_split(split, tmp))
        data.write_text(os.path.join(cfg["out"], "log.jsonl"), "".join(json.dumps(r) + "\n" for r in log))
    return log


def end_epoch(cfg, model, record, log, files):
    """Refuse non-finite weights, save `files` ({name: checkpoint}; last.pt gets the log), log `record`; the log."""
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
    """A run's training steps: each epoch's detached values summed on the device and checked for NaN/Inf every `every`
    steps (as DINO stops), the images counted, and a progress line on stderr every 10 s unless quiet."""

    def __init__(self, cfg, total_steps, quiet, every=20):
        self.cfg, self.total, self.quiet, self.every = cfg, total_steps, quiet or rank() != 0, every
        self.t0 = self.shown = time.time()
        self.images = self.done = 0
        self.start(1)

    def start(self, epoch):
        self.epoch, self.steps, self.sums, self.keys = epoch, 0, None, []

    def add(self, values, images):                    # one step's {name: tensor} and images on this rank
        stacked = torch.stack([v.double() for v in values.values()])
        self.keys, self.steps = list(values), self.steps + 1
        self.sums = stacked if self.sums is None else self.sums + stacked
        if self.steps % self.every == 0:
            self.check()
        self.images, self.done = self.images + images * world(), self.done + 1
        now = time.time()
        if not self.quiet and now - self.shown >= 10.0:
            self.shown = now
            loss = self.sums[self.keys.index("loss")].item() / self.steps
            rate = self.images / max(now - self.t0, 1e-9)
            eta = (now - self.t0) / self.done * (self.total - self.done)
            print(f"epoch {self.epoch} step {self.steps} loss {loss:.4f} {rate:.1f} img/s ETA {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)

    def check(self):
        if not bool(torch.isfinite(self.sums).all()):
            raise FloatingPointError(f"non-finite loss in epoch {self.epoch} by step {self.steps}; "
                                     f"{last_good(self.cfg)}")

    def means(self):
        """{name: epoch mean}, averaged over the ranks too."""
        self.check()
        sums = self.sums.clone()
        if world() > 1:
            dist.all_reduce(sums)
            sums /= world()
        return {k: round(v / self.steps, 5) for k, v in zip(self.keys, sums.tolist())}


def generators(seed, epoch, device, stream=0):
    """(CPU, device) RNGs of (seed, epoch, stream, the device's also of rank): a resumed run draws as a whole one."""
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


def model_and_optimizer(cfg, ckpt, model, device):
    """The model on the device and its Adam optimizer, both restored from last.pt when resuming (ckpt)."""
    model = to_device(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    if ckpt:
        last = os.path.join(cfg["out"], "last.pt")
        load_state(model, ckpt["model"], last)
        load_state(opt, ckpt["optimizer"], last, "optimizer states")
    return model, opt


def parallel(model, cfg, device, find_unused=False):
    """The model a training step calls: with SyncBatchNorm, DistributedDataParallel and torch.compile as asked."""
    if world() > 1:
        if cfg["sync_bn"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                    find_unused_parameters=find_unused)
    return torch.compile(model) if cfg["compile"] else model


# -------------------------------------------------------------------------------------------------- Data for training
def resolve_data(cfg):
    """--data, or the synthetic phantom, written once to cache/phantom."""
    return cfg["data"] or data.cached_phantom(PHANTOM_DIR, lambda text: note(cfg, text))


def load_split_volumes(cfg):
    """Read the volumes and the split: the run's own split.json when resuming, --split-file, or a new one."""
    layout, volumes = data.load_volumes(resolve_data(cfg), cfg["layout"], cfg["frames"], cfg["label_map"])
    split_file = os.path.join(cfg["out"], "split.json") if cfg["resume"] else cfg.get("split_file")
    if split_file:
        return layout, volumes, data.load_split(split_file, volumes)
    return layout, volumes, data.make_split(volumes, layout, cfg.get("labeled", 100.0), cfg["seed"])


def slices_of(volumes, ids, cfg, labels=True):
    """Preprocessed slices of the volumes named in ids: images (N, 1, H, W) float32, labels (N, H, W) long."""
    wanted = set(ids)
    images, masks, _ = data.stack_slices([v for v in volumes if v.id in wanted], cfg["spacing"], cfg["size"])
    x = torch.from_numpy(images)[:, None]
    return (x, torch.from_numpy(masks).long()) if labels else x


# ----------------------------------------------------------------------------------------------------------- pretrain
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
    model, opt = model_and_optimizer(cfg, ckpt, PretrainNet(cfg["depth"], cfg["width"], cfg["proj_dim"]), device)
    log, start = start_run(cfg, split, ckpt), ckpt["epoch"] if ckpt else 0
    step_fn = parallel(model, cfg, device, find_unused=cfg["loss"] != "both")
    note(cfg, f"pretrain: {hardware(cfg)}; {n} slices of {len(split['train']) + len(split['val'])} train+val volumes, "
              f"{steps} steps of {b} x {world()} slices per epoch, epochs {start}->{cfg['epochs']}")
    meter = Meter(cfg, (cfg["epochs"] - start) * steps, cfg["quiet"])
    for epoch in range(start, cfg["epochs"]):
        g_cpu, g_dev = generators(cfg["seed"], epoch, device)
        order = torch.randperm(n, generator=g_cpu).to(device)
        meter.start(epoch + 1)
        t0 = time.time()
        for step in range(steps):
            batch = images[share(order[step * b * world():(step + 1) * b * world()])]
            meter.add(pretrain_step(step_fn, opt, batch, g_dev, **{k: cfg[k] for k in LOSS_KEYS}), b)
        record = dict(meter.means(), epoch=epoch + 1, images_per_s=round(steps * b * world() / (time.time() - t0), 1),
                      lr=cfg["lr"])
        log = end_epoch(cfg, model, record, log, {
            "encoder.pt": {"encoder": model.encoder.state_dict(), "config": {k: cfg[k] for k in ARCH_KEYS}},
            "last.pt": {"kind": "pretrain", "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "config": cfg}})
    if rank() == 0:
        data.write_json({"finished": True, "epochs": cfg["epochs"]}, os.path.join(cfg["out"], "done.json"))
    return model


def pretrain_step(model, opt, x, g, loss, tau, lambda_loc, negatives):
    """x (B, 1, H, W) -> two views -> L_g + lambda_loc * L_loc -> backward -> Adam; the detached losses."""
    views, thetas = make_view(torch.cat([x, x]), g)                         # both views in one batch
    with autocast(x.device):
        total, parts = pretrain_loss(model, views, thetas, loss, tau, lambda_loc, negatives)
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return dict(parts, loss=total.detach())


# ----------------------------------------------------------------------------------------------------------- finetune
def read_pretrained(cfg):
    """The state of E in a pre-training run's encoder.pt, after checking that its architecture is this run's."""
    path = cfg["pretrained"]
    ckpt = load_checkpoint(path, ("encoder", "config"))
    check_config(ckpt["config"], "pretrain", path, ARCH_KEYS)
    if not isinstance(ckpt["encoder"], dict):
        raise CheckpointError(f"{path}: not an IDEAL checkpoint (its encoder is not a state dict)")
    diff = [f"{k}={ckpt['config'].get(k)} (this run: {cfg[k]})" for k in ARCH_KEYS if ckpt["config"].get(k) != cfg[k]]
    if diff:
        raise CheckpointError(f"{path}: made with another architecture: {', '.join(diff)}")
    return ckpt["encoder"]


def load_encoder(encoder, state, path):
    """Load E, asserting exactly which keys are missing or unexpected (MoCo main_lincls style)."""
    missing = sorted(set(encoder.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(encoder.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{path}: encoder keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    load_state(encoder, state, path)


def finetune_step(model, opt, xl, ml, xu, xw, weight, forward, threshold, dice):
    """One step of Eq. 3 on labeled (xl, ml) and unlabeled xu slices (None: supervised only), in one pass (forward
    "joint") or one each; pseudo-labels of the weak view xw (None: of xu). Returns the detached {"loss", "sup",
    "unsup", "fg", "kept"} (fg, kept: the pseudo-labels' foreground share and the share the threshold keeps)."""
    b = xl.shape[0]
    with autocast(xl.device):
        if xu is None:
            (lab1, lab2), (unl1, unl2) = model(xl), (None, None)
        elif forward == "joint":
            out1, out2 = model(torch.cat([xl, xu]))                         # logits (B + B_u, C, H, W) twice
            (lab1, unl1), (lab2, unl2) = out1.split([b, len(xu)]), out2.split([b, len(xu)])
        else:
            (lab1, lab2), (unl1, unl2) = model(xl, xu)
        y1 = y2 = None
        if xu is not None:
            with torch.no_grad():                                           # targets: no gradient flows into them
                z1, z2 = model(xw) if xw is not None else (unl1, unl2)
            y1, y2 = pseudo_label(z1, threshold), pseudo_label(z2, threshold)
        loss, sup, unsup = cross_consistency_loss(lab1, lab2, ml, unl1, unl2, y1, y2, weight, dice)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    fg = kept = sup.new_zeros(())
    if y1 is not None:
        fg = ((y1 > 0).float().mean() + (y2 > 0).float().mean()) / 2
        kept = ((y1 != IGNORE).float().mean() + (y2 != IGNORE).float().mean()) / 2
    return {"loss": loss.detach(), "sup": sup.detach(), "unsup": unsup.detach(), "fg": fg, "kept": kept}


def labeled_views(x_l, m_l, n, g_cpu, g_dev):
    """This rank's n random labeled slices and masks, jointly augmented: (x (n, 1, H, W), m (n, H, W))."""
    i = share(torch.randint(len(x_l), (n * world(),), generator=g_cpu)).to(x_l.device)
    return augment_pair(x_l[i], m_l[i], g_dev)


def unlabeled_views(x_u, n, g_cpu, g_dev, pseudo):
    """This rank's n random unlabeled slices: (strong view, weak view (geometry only) for pseudo "weak", else None)."""
    x = x_u[share(torch.randint(len(x_u), (n * world(),), generator=g_cpu)).to(x_u.device)]
    xw, _ = augment_geometry(x, None, g_dev)
    return augment_intensity(xw, g_dev), xw if pseudo == "weak" else None


@torch.no_grad()
def predict_slices(model, x, mode, batch_size):
    """Probabilities (N, C, H, W) float32 on the CPU for preprocessed slices x (N, 1, H, W), in batches."""
    model.eval()
    device = next(model.parameters()).device
    with autocast(device):
        out = [predict(model, to_device(chunk, device), mode).float().cpu() for chunk in x.split(batch_size)]
    model.train()
    return torch.cat(out)


def validate(model, x_val, m_val, cfg):
    """Mean foreground Dice on the validation slices, on the preprocessed grid (for model selection)."""
    pred = predict_slices(model, x_val, cfg["predict"], cfg["batch_size"]).argmax(1).numpy()
    gt = m_val.numpy()
    return float(np.mean([metrics.dice(pred == c, gt == c) for c in range(1, int(cfg["num_classes"]))]))


@contextlib.contextmanager
def batchnorm_restored(model):
    """Yields model's BatchNorm layers, whose running statistics and momentum are put back when the block ends."""
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
    """Inside the block BatchNorm holds the statistics of at most `limit` slices of x (N, 1, H, W) (precise BatchNorm,
    Wu & Johnson 2021), the same on every process; on exit the running ones come back."""
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
def pseudo_label_quality(model, x_v, m_v, cfg, g):
    """Eq. 3's pseudo-labels made on the validation slices as on unlabeled ones, scored against the masks (mean of both
    decoders): pl_dice, pl_dice_kept (kept pixels), pl_kept, pl_fg_ratio (kept/true foreground), pl_disagree."""
    device = next(model.parameters()).device
    xw, mw = augment_geometry(to_device(x_v, device), m_v.to(device), g)
    with batchnorm_restored(model), autocast(device):
        pairs = [model(x) for x in xw.split(cfg["batch_size"])]
    scores, argmax = [], []
    for d in range(2):
        confidence, y = torch.cat([pair[d] for pair in pairs]).float().softmax(1).max(1)   # (N, H, W) each
        keep = confidence >= cfg["threshold"]
        fg = (mw > 0).sum().clamp(min=1)
        scores.append([foreground_dice(y, mw, cfg["num_classes"]), foreground_dice(y, mw, cfg["num_classes"], keep),
                       keep.float().mean(), ((y > 0) & keep).sum() / fg])
        argmax.append(y)
    means = torch.tensor(scores).mean(0).tolist()
    names = ("pl_dice", "pl_dice_kept", "pl_kept", "pl_fg_ratio")
    return dict(zip(names, (round(v, 4) for v in means)),
                pl_disagree=round((argmax[0] != argmax[1]).float().mean().item(), 4))


def foreground_dice(y, m, num_classes, where=None):
    """Mean foreground Dice of label maps y and m, pooled over the pixels `where` is True (absent from both: 1)."""
    where = torch.ones_like(y, dtype=torch.bool) if where is None else where
    dice = []
    for c in range(1, num_classes):
        a, b = (y == c) & where, (m == c) & where
        total = a.sum() + b.sum()
        dice.append(1.0 if total == 0 else (2 * (a & b).sum() / total).item())
    return float(np.mean(dice))


def judge(model, x_v, m_v, x_l, cfg):
    """(validation Dice, state_dict, log fields) under BatchNorm statistics recomputed on the labeled slices x_l, the
    statistics that the labeled term trains under (its batch has a forward pass of its own)."""
    running = validate(model, x_v, m_v, cfg)
    b = cfg["batch_size"]
    with recomputed_bn(model, x_l, b, cfg["seed"], limit=cfg["steps_per_epoch"] * b):
        val_dice = validate(model, x_v, m_v, cfg)
        buffers = dict(model.named_buffers())                       # the only entries put back on exit
        state = {k: v.clone() if k in buffers else v for k, v in model.state_dict().items()}
    return val_dice, state, {"val_dice_running": round(running, 4)}


def finetune_data(cfg, device):
    """(split, classes, slices: labeled with masks, unlabeled, validation with masks)."""
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
    note(cfg, f"finetune: {hardware(cfg)}; {len(split['labeled'])} labeled volumes ({len(x_l)} slices), "
              f"{len(unlabeled)} unlabeled ({len(x_u)} slices), {len(split['val'])} val")
    return split, classes, (to_device(x_l, device), m_l.to(device), to_device(x_u, device), x_v, m_v)


def finetune(cfg, given=()):
    """Semi-supervised fine-tuning with the two decoders supervising each other (Eq. 3)."""
    cfg, ckpt = open_run(cfg, "finetune", given)
    device = torch.device(cfg["device"])
    encoder_state = None if ckpt or cfg["pretrained"] == "none" else read_pretrained(cfg)
    split, classes, (x_l, m_l, x_u, x_v, m_v) = finetune_data(cfg, device)
    cfg.update(classes)
    torch.manual_seed(cfg["seed"])
    net = IDEALSegmenter(cfg["num_classes"], cfg["depth"], cfg["width"], cfg["same_decoders"])
    model, opt = model_and_optimizer(cfg, ckpt, net, device)
    if encoder_state is not None:
        load_encoder(model.encoder, encoder_state, cfg["pretrained"])
    log, start = start_run(cfg, split, ckpt), ckpt["epoch"] if ckpt else 0
    best = ckpt["best_val_dice"] if ckpt else -1.0                           # exact, not the log's rounding
    step_fn = parallel(model, cfg, device)
    b, steps = cfg["batch_size"], cfg["steps_per_epoch"]
    bu = b if cfg["unlabeled_weight"] else 0                                 # unlabeled slices per step
    meter = Meter(cfg, (cfg["epochs"] - start) * steps, cfg["quiet"])
    for epoch in range(start, cfg["epochs"]):
        g_cpu, g_dev = generators(cfg["seed"], epoch, device)
        gu_cpu, gu_dev = generators(cfg["seed"], epoch, device, stream=1)
        meter.start(epoch + 1)
        t0, seen = time.time(), meter.images
        for step in range(steps):
            weight = cfg["unlabeled_weight"] * rampup(epoch * steps + step, cfg["epochs"] * steps, cfg["rampup"])
            xl, ml = labeled_views(x_l, m_l, b, g_cpu, g_dev)
            xu, xw = unlabeled_views(x_u, bu, gu_cpu, gu_dev, cfg["pseudo"]) if bu else (None, None)
            meter.add(finetune_step(step_fn, opt, xl, ml, xu, xw, weight, cfg["forward"], cfg["threshold"],
                                    cfg["sup_loss"] == "dice-ce"), b + bu)
        images_per_s = (meter.images - seen) / (time.time() - t0)             # the training steps alone
        val_dice, state, fields = judge(model, x_v, m_v, x_l, cfg)          # every process: --sync-bn
        fields.update(pseudo_label_quality(model, x_v, m_v, cfg, generators(cfg["seed"], epoch, device, 2)[1]))
        record = dict(meter.means(), epoch=epoch + 1, val_dice=round(val_dice, 4), **fields,
                      best_val_dice=round(max(best, val_dice), 4), unlabeled_weight=round(weight, 5),
                      images_per_s=round(images_per_s, 1), lr=cfg["lr"])
        judged = {"model": state, "epoch": epoch + 1, "val_dice": val_dice, "config": cfg}
        files = dict({"best.pt": judged} if val_dice > best else {},
                     **{"final.pt": judged} if epoch + 1 == cfg["epochs"] else {})
        best = max(best, val_dice)
        log = end_epoch(cfg, model, record, log, dict(files, **{"last.pt": {
            "kind": "finetune", "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
            "config": cfg, "best_val_dice": best}}))
    if rank() == 0:
        data.write_json({"finished": True, "epochs": cfg["epochs"], "best_val_dice": best},
                        os.path.join(cfg["out"], "done.json"))
    return model


# --------------------------------------------------------------------------------------------------------------- eval
@contextlib.contextmanager
def stopwatch(seconds, stage):
    """Adds the block's wall time to seconds[stage]."""
    t0 = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0


RUN_KEYS = ("depth", "width", "size", "spacing", "num_classes", "class_names", "predict", "batch_size", "same_decoders")


def load_run(run, device, checkpoint="best"):
    """(config, IDEALSegmenter on device) of the run's best.pt or final.pt: a run folder alone is enough to segment."""
    path = os.path.join(run, f"{checkpoint}.pt")
    ckpt = load_checkpoint(path, ("model", "config"))
    run_cfg = ckpt["config"]
    check_config(run_cfg, "finetune", path, RUN_KEYS)
    model = IDEALSegmenter(run_cfg["num_classes"], run_cfg["depth"], run_cfg["width"], run_cfg["same_decoders"])
    load_state(model, ckpt["model"], path)
    return run_cfg, to_device(model, torch.device(device))


def segment(model, vols, run_cfg, mode, batch_size, seconds, probabilities=False):
    """(per volume uint8 labels (X, Y, Z) on its native grid, float32 probabilities (X, Y, Z, C) or None); all slices
    in shared batches, each stage's time added to seconds."""
    spacing, size = run_cfg["spacing"], run_cfg["size"]
    with stopwatch(seconds, "preprocess"):
        images = [data.preprocess(v, spacing, size)[0] for v in vols]
        x = torch.from_numpy(np.concatenate(images))[:, None]
    with stopwatch(seconds, "network"):
        probs = predict_slices(model, x, mode, batch_size).numpy()
    with stopwatch(seconds, "inverse"):
        parts = np.split(probs, np.cumsum([len(i) for i in images])[:-1])
        labels = [data.to_native(p, v, spacing, size) for p, v in zip(parts, vols)]
        native = [data.native_probabilities(p, v, spacing, size) for p, v in zip(parts, vols)] \
            if probabilities else None
    return labels, native


def eval_setup(cfg, run_cfg):
    """(layout, labeled volumes to score, results folder, the evaluation's identity), as --split's help says."""
    check_config(run_cfg, "finetune", os.path.join(cfg["run"], f"{cfg['checkpoint']}.pt"),
                 ("data", "layout", "frames", "label_map"))
    opts = {k: run_cfg[k] if cfg[k] is None else cfg[k] for k in ("layout", "frames", "label_map")}
    root = cfg["data"] or run_cfg["data"] or resolve_data(run_cfg)
    layout, volumes = data.load_volumes(root, **opts)
    name, split_file = cfg["split_name"], os.path.join(cfg["run"], "split.json")
    if name != "all":
        volumes = data.select(volumes, data.load_split(split_file)[name], split_file)
    chosen = [v for v in volumes if v.label is not None]
    if not chosen:
        raise data.DataError(f"{root}: no labeled volume in split {name!r} to evaluate")
    for vol in chosen:
        if vol.label.max() >= run_cfg["num_classes"]:
            raise data.DataError(f"{vol.path}: the ground truth of this image holds class {vol.label.max()}, the "
                                 f"run predicts 0-{run_cfg['num_classes'] - 1}; pass --label-map")
    folder = f"eval-{os.path.basename(os.path.abspath(root))}-all" if name == "all" else f"eval-{name}"
    folder += (f"-{opts['frames']}" if layout == "acdc" and opts["frames"] != run_cfg["frames"] else "") + \
        ("-final" if cfg["checkpoint"] == "final" else "")
    predict = cfg["predict"] or run_cfg["predict"]
    identity = dict(run=os.path.abspath(cfg["run"]), checkpoint=cfg["checkpoint"], split=name,
                    data=os.path.abspath(root), predict=predict, **dict(opts, layout=layout))
    return layout, chosen, cfg["out"] or os.path.join(cfg["run"], folder), identity


def evaluate_run(cfg):
    """DSC/ASD/HD/HD95 in mm and volumes in ml per volume and class on the native grid; ACDC's clinical indices."""
    run_cfg, model = load_run(cfg["run"], cfg["device"], cfg["checkpoint"])
    layout, volumes, out, identity = eval_setup(cfg, run_cfg)
    data.claim_results(out, identity)
    for sub in ("pred", "png"):
        if cfg[f"save_{sub}"]:
            data.make_folder(os.path.join(out, sub))
    labels = list(range(1, run_cfg["num_classes"]))
    per_volume, rows, measured = [], [], []
    for i, vol in enumerate(volumes, 1):
        (pred,), _ = segment(model, [vol], run_cfg, identity["predict"], run_cfg["batch_size"], {})
        if cfg["save_pred"]:
            data.write_atomic(os.path.join(out, "pred", f"{vol.id}.nii.gz"),
                              lambda tmp: data.save_label_nifti(pred, vol, tmp))
        if cfg["save_png"]:
            data.write_atomic(os.path.join(out, "png", f"{vol.id}.png"),
                              lambda tmp: data.overlay_png(tmp, vol, pred))
        result = metrics.evaluate(pred, vol.label, vol.spacing, labels)
        ml = {c: (metrics.volume_ml(pred == c, vol.spacing), metrics.volume_ml(vol.label == c, vol.spacing))
              for c in labels}
        per_volume.append(result)
        measured.append((vol.case, vol.frame, ml))
        note(cfg, f"eval {i}/{len(volumes)} {vol.id}: DSC " + " ".join(f"{result[c]['dsc']:.3f}" for c in labels))
        rows += [dict(id=vol.id, label=c, **result[c], volume_ml_pred=ml[c][0], volume_ml_gt=ml[c][1]) for c in labels]
    data.write_csv(rows, os.path.join(out, "metrics.csv"))
    summary = dict(metrics.summarize(per_volume), **identity, volumes=len(per_volume), units="mm",
                   volume_ratio=metrics.volume_ratios(measured, labels))
    frames = {f: [r for r, m in zip(per_volume, measured) if m[1] == f] for f in ("ED", "ES")}
    if all(frames.values()):
        summary["frames"] = {f: metrics.summarize(r) for f, r in frames.items()}
    clinical = metrics.clinical_rows(measured) if layout == "acdc" else []
    if clinical:
        data.write_csv(clinical, os.path.join(out, "clinical.csv"))
        summary["clinical"] = metrics.clinical_agreement(clinical)
        for index, svg in metrics.bland_altman_svgs(clinical, summary["clinical"]).items():
            data.write_text(os.path.join(out, f"bland-altman-{index}.svg"), svg)
    data.write_json(summary, os.path.join(out, "summary.json"))
    print(metrics.summary_table(summary, run_cfg["class_names"]))
    if clinical:
        print("\n" + metrics.clinical_table(summary["clinical"]))
    return summary


# ------------------------------------------------------------------------------------------------------------ predict
def predict_file(model, run_cfg, path, files, mode, batch_size, seconds):
    """Segment one 3D or 4D (cine) image and write `files` (data.plan_outputs); (shape, a cine's indices or None)."""
    with stopwatch(seconds, "read"):
        frames, img = data.read_scan(path, warn=False)
    labels, probs = segment(model, frames, run_cfg, mode, batch_size, seconds, "prob" in files)
    with stopwatch(seconds, "write"):
        if "labels" in files:
            data.write_atomic(files["labels"],
                              lambda tmp: data.save_like(np.stack(labels, 3).reshape(img.shape), img, tmp))
        if "prob" in files:
            data.write_atomic(files["prob"],
                              lambda tmp: data.save_like(np.stack(probs, 3).reshape(*img.shape, -1), img, tmp))
        if "png" in files:
            data.write_atomic(files["png"], lambda tmp: data.overlay_png(tmp, frames[0], labels[0]))
        indices = write_volumes(files.get("volumes"), frames, labels, run_cfg["class_names"], path)
    return img.shape, indices


def write_volumes(csv_path, frames, labels, names, source):
    """NAME_volumes.csv, NAME_summary.json and, for an ACDC cine, NAME_volumes.svg (metrics.volume_summary); the
    cine's indices or None."""
    ml = [{c: metrics.volume_ml(lab == c, f.spacing) for c in range(1, len(names))} for f, lab in zip(frames, labels)]
    rows, summary, indices = metrics.volume_summary(ml, names)
    if csv_path is not None:
        stem = csv_path[:-len("_volumes.csv")]
        data.write_csv(rows, csv_path)
        if indices:
            data.write_text(f"{stem}_volumes.svg", metrics.volume_curve_svg(ml, indices, os.path.basename(stem)))
        data.write_json(dict(input=os.path.abspath(source), **summary), f"{stem}_summary.json")
    return indices


def predict_run(cfg):
    """Segment every --input into --out, each input checked before the first output; kept unless --overwrite."""
    run_cfg, model = load_run(cfg["run"], cfg["device"])
    out = cfg["out"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise data.DataError(f"{out}: --out exists and is not a folder")
    inputs = data.find_inputs(cfg["input"], out)
    todo = data.plan_outputs(inputs, out, cfg["probabilities"], cfg["save_png"], cfg["overwrite"])
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
    data.make_folder(out)
    data.remove_stale_temporaries(out)
    total = {}
    for i, (name, path, files) in enumerate(todo, 1):
        seconds = {}
        shape, indices = predict_file(model, run_cfg, path, files, mode, batch_size, seconds)
        total = {k: total.get(k, 0.0) + v for k, v in seconds.items()}
        stages = ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
        ef = ""
        if indices:
            alerts = "".join(f"; warning: {w}" for w in metrics.cine_warnings(indices))
            ef = f"; LV EF {indices['lv_ef']:.1f} % (ED frame {indices['ed'] + 1}, ES frame {indices['es'] + 1}), " \
                 f"RV EF {indices['rv_ef']:.1f} %{alerts}"
        note(cfg, f"predict {i}/{len(todo)} {name} {'x'.join(map(str, shape))}: {sum(seconds.values()):.2f} s "
                  f"({stages} s){ef}")
    spent = max(sum(total.values()), 1e-9)
    note(cfg, f"predict: {len(todo)} inputs in {spent:.1f} s, {spent / len(todo):.2f} s each, "
              f"{100 * (1 - total.get('network', 0) / spent):.0f} % of it outside the network; outputs in {out}")


# ------------------------------------------------------------------------------------------------------------- report
def write_report(cfg, title, lines, results, **fields):
    """OUT.md (the heading, who made the runs, then lines) and OUT.json (fields and results); prints the text."""
    text = "\n".join([f"# {title}", "", f"Made by `{cfg['made_by']}` at commit {cfg['commit']}.", "", *lines]) + "\n"
    data.write_text(f"{cfg['out']}.md", text)
    data.write_json(dict(title=cfg["title"], made_by=cfg["made_by"], commit=cfg["commit"], **fields, results=results),
                    f"{cfg['out']}.json")
    print(text, end="")


def report(cfg):
    """OUT.md, .json and .svg (DSC against the labeled fraction) of the runs under --runs, Table 1 beside IDEAL."""
    if cfg["clinical"]:
        return clinical_report(cfg)
    split, rows = cfg["split_name"], cfg["rows"].split() if cfg["rows"] else None
    table = data.collect_runs(cfg["runs"], split, metrics.METRICS, rows, order=list(metrics.ROW_NAMES))
    if not table:
        raise data.DataError(f"{' '.join(cfg['runs'])}: no <row>/L<fraction>/seed<k>/eval-{split}/summary.json found")
    paper = metrics.PAPER_TABLE1.get(cfg["dataset"]) if "ideal" in table and split == "test" else None
    lines, results = metrics.results_table(table, paper, split, os.path.basename(cfg["out"]))
    data.make_folder(os.path.dirname(os.path.abspath(cfg["out"])))
    data.write_text(f"{cfg['out']}.svg", metrics.results_svg(results, split, cfg["title"]))
    write_report(cfg, cfg["title"], lines, results, split=split, units="mm")


def clinical_report(cfg):
    """OUT.md, .json and Bland-Altman SVGs: DSC on ED and ES, each index's agreement, per row and fraction."""
    table = data.collect_clinical(cfg["runs"], metrics.METRICS, cfg["rows"].split() if cfg["rows"] else None)
    if not table:
        raise data.DataError(f"{' '.join(cfg['runs'])}: no run evaluated on ED and ES frames found")
    lines, results, pooled = metrics.clinical_results_table(table, os.path.basename(cfg["out"]))
    for index, svg in metrics.bland_altman_svgs(pooled, metrics.clinical_agreement(pooled)).items():
        data.write_text(f"{cfg['out']}-bland-altman-{index}.svg", svg)
    write_report(cfg, f"{cfg['title']}: volumes, ejection fraction and mass", lines, results)


# -------------------------------------------------------------------------------------------------------------- bench
def images_per_second(full, bare, images, device, steps, rounds=10):
    """(full's images/s, bare's, their median ratio), timed in alternating rounds after two warm-up calls each."""
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
    """The bare network on ready-made images: a pass per batch -> mean of the outputs -> backward -> Adam."""
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
    """Throughput of the whole pre-training step vs the bare encoder and heads on its 2B views (counts B slices)."""
    b = cfg["batch_size"]
    model = to_device(PretrainNet(cfg["depth"], cfg["width"], cfg["proj_dim"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=PRESETS[cfg["preset"]]["pretrain_lr"])
    meter = Meter(cfg, cfg["steps"], quiet=True)

    def full():
        x = pool[torch.randint(len(pool), (b,), device=device, generator=g)]
        meter.add(pretrain_step(model, opt, x, g, **{k: cfg[k] for k in LOSS_KEYS}), b)

    return images_per_second(full, functools.partial(bare_step, model, opt, pool[:2 * b]), b, device, cfg["steps"])


def bench_finetune(cfg, device, pool, g):
    """Throughput of the whole fine-tuning step vs the bare network making the same passes (counts all images)."""
    b = cfg["batch_size"]
    model = to_device(IDEALSegmenter(4, cfg["depth"], cfg["width"]), device)
    opt = torch.optim.Adam(model.parameters(), lr=PRESETS[cfg["preset"]]["finetune_lr"])
    masks = (pool[:, 0] * 4).long().clamp(max=3)
    meter, g_cpu = Meter(cfg, cfg["steps"], quiet=True), torch.Generator().manual_seed(DEFAULTS["seed"])

    def full():
        xl, ml = labeled_views(pool, masks, b, g_cpu, g)
        xu, xw = unlabeled_views(pool, b, g_cpu, g, cfg["pseudo"])
        meter.add(finetune_step(model, opt, xl, ml, xu, xw, DEFAULTS["unlabeled_weight"], cfg["forward"],
                                DEFAULTS["threshold"], cfg["sup_loss"] == "dice-ce"), 2 * b)

    xl, xu = pool[:b], pool[b:2 * b]
    batches = (torch.cat([xl, xu]),) if cfg["forward"] == "joint" else (xl, xu)
    weak = (xu,) if cfg["pseudo"] == "weak" else ()
    bare = functools.partial(bare_step, model, opt, *batches, no_grad=weak)
    return images_per_second(full, bare, 2 * b, device, cfg["steps"])


def bench(cfg):
    """images/s of the real training steps against the bare model on the same shapes, and their ratio."""
    cfg = dict(DEFAULTS, **cfg)                      # the loss settings bench does not offer, as training has them
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    pool = to_device(torch.rand(4 * cfg["batch_size"], 1, cfg["size"], cfg["size"], device=device, generator=g), device)
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


# ------------------------------------------------------------------------------------------------------- Command line
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


def add_process_options(p, quiet=True):
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; one GPU per rank under "
                   "torchrun); CPU threads: OMP_NUM_THREADS (two jobs on one machine: half the cores each)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_data_options(p, of_run=False):
    run = " (default: the run's)" if of_run else ""
    p.add_argument("--data", type=text, help="dataset folder" + (run or " (default: the phantom in cache/phantom)"))
    p.add_argument("--layout", default=None if of_run else "auto", choices=("auto", *data.LAYOUTS), help="layout" + run)
    p.add_argument("--frames", default=None if of_run else "ed", choices=("ed", "es", "both"),
                   help="ACDC frames used; with both, a labeled patient gives both of its frames" + run)
    p.add_argument("--label-map", type=text, help="remap raw label values, e.g. 1:3,3:1" + run)


def add_model_options(p, command):
    """Preset, seed, architecture, input and optimiser, each with the presets' values (bench: what it times)."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper with a GPU, cpu without")
    if command != "bench":
        p.add_argument("--seed", type=number(int, inclusive=True, high=2 ** 32 - 1), default=DEFAULTS["seed"],
                       help="seed of weights, labeled subset and augmentation")
    p.add_argument("--depth", type=int, choices=sorted(RESNETS), help=preset_help("depth", "ResNet depth"))
    p.add_argument("--width", type=number(int, high=1024), help=preset_help("width", "ResNet stem width"))
    p.add_argument("--size", type=number(int, high=2048), help=preset_help("size", "slice size, a multiple of 32"))
    p.add_argument("--batch-size", type=number(int, high=65536), help=preset_help("batch_size", "slices per batch and "
                   "process (fine-tuning: as many labeled and as many unlabeled)"))
    if command != "bench":
        p.add_argument("--spacing", type=number(float, high=100.0), help=preset_help("spacing", "in-plane spacing, mm"))
        p.add_argument("--lr", type=number(float), help=preset_help(f"{command}_lr", "Adam learning rate"))


def add_training_options(p, command):
    p.add_argument("--out", type=text, required=True, help="run folder")
    p.add_argument("--epochs", type=number(int, high=10 ** 6), help=preset_help(f"{command}_epochs", "epochs"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (--epochs extends it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes (CUDA only)")


def add_pretrain_loss_options(p, bench=False):
    p.add_argument("--loss", default=DEFAULTS["loss"], choices=("both", "local", "global"),
                   help="L_g + lambda_loc L_loc, or one of them")
    if not bench:
        p.add_argument("--tau", type=number(float), default=DEFAULTS["tau"], help="softmax temperature of Eq. 1, 2")
        p.add_argument("--lambda-loc", type=number(float, inclusive=True), default=DEFAULTS["lambda_loc"],
                       help="weight of L_loc")
    p.add_argument("--negatives", default=DEFAULTS["negatives"], choices=("same", "all"),
                   help="negatives of Eq. 2: the other images' keys at the same location, or at every location")
    p.add_argument("--proj-dim", type=number(int, high=8192), help=preset_help("proj_dim", "projection size"))


def add_finetune_loss_options(p, bench=False):
    """Eq. 3 and its batches, defaults chosen on the validation split (results/EXPERIMENTS.md); the paper-literal
    setting: --forward joint --pseudo same --threshold 0 --rampup 0 --sup-loss ce."""
    p.add_argument("--sup-loss", default=DEFAULTS["sup_loss"], choices=("ce", "dice-ce"),
                   help="labeled term of Eq. 3: CE, or CE + soft Dice over the foreground classes")
    if not bench:
        p.add_argument("--unlabeled-weight", type=number(float, inclusive=True), default=DEFAULTS["unlabeled_weight"],
                       help="weight of the unlabeled term of Eq. 3 after ramp-up (0: supervised, no unlabeled slices)")
        p.add_argument("--rampup", type=number(float, inclusive=True, high=1.0), default=DEFAULTS["rampup"],
                       help="fraction of the steps over which the unlabeled weight ramps up")
        p.add_argument("--threshold", type=number(float, inclusive=True, high=1.0), default=DEFAULTS["threshold"],
                       help="confidence below which pseudo-labelled pixels are left out")
    p.add_argument("--forward", default=DEFAULTS["forward"], choices=("separate", "joint"),
                   help="labeled and unlabeled slices in a forward pass each, or in one (shared BatchNorm statistics)")
    p.add_argument("--pseudo", default=DEFAULTS["pseudo"], choices=("weak", "same"),
                   help="pseudo-labels from a weak view (geometry only) of the strongly augmented slice, or from it")


def add_finetune_options(p):
    p.add_argument("--pretrained", type=text, metavar="ENCODER.pt|none", help="encoder.pt of a pre-training run, "
                   "or none for a random initialisation (required unless --resume continues a run)")
    p.add_argument("--labeled", type=number(float, high=100.0),
                   help=f"L: %% of the training patients labeled (default: {DEFAULTS['labeled']})")
    p.add_argument("--split-file", type=text, help="split.json to reuse (its labeled volumes replace --labeled)")
    add_finetune_loss_options(p)
    p.add_argument("--same-decoders", action="store_true", help="ablation: both decoders ConvTranspose")
    p.add_argument("--steps-per-epoch", type=number(int, high=10 ** 7),
                   help=preset_help("steps_per_epoch", "steps per epoch"))


def add_eval_options(p):
    p.add_argument("--run", type=text, required=True, help="fine-tuning run folder (holding best.pt)")
    p.add_argument("--split", dest="split_name", default="test", choices=("test", "val", "train", "all"),
                   help="the run's test|val|train volumes (split.json, ACDC by patient) into RUN/eval-SPLIT, or all "
                   "labeled ones of --data into RUN/eval-<folder>-all; -FRAMES for other --frames, -final for final.pt")
    p.add_argument("--predict", choices=("mean", "d1", "d2"), help="decoders' prediction (default: the run's)")
    p.add_argument("--checkpoint", default=["best"], nargs="+", choices=("best", "final"),
                   help="best.pt (best validation Dice) and/or final.pt (the last epoch's), each into its own folder")
    p.add_argument("--out", type=text, help="results folder (default: RUN/eval-SPLIT..., see --split)")
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
    p.add_argument("--runs", type=text, required=True, nargs="+", help="folders with <row>/L<fraction>/seed<k>/")
    p.add_argument("--clinical", action="store_true", help="the clinical table: each run's evaluation on ED and ES "
                   "frames (eval-test of runs trained on both, eval-test-both of runs trained on ED)")
    p.add_argument("--split", dest="split_name", default="test", choices=("test", "val", "train", "all"),
                   help="whose evaluations to tabulate (eval --split)")
    p.add_argument("--out", type=text, required=True, help="writes OUT.md and OUT.json")
    p.add_argument("--dataset", default="acdc", help="whose Table 1 to show beside IDEAL (acdc, mmwhs; else none)")
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
    add_finetune_options(p), add_process_options(p)
    p = sub.add_parser("eval", help="metrics of a fine-tuned run on the native grid", description="Scores a "
                       "fine-tuned run on its own split or on every labeled volume of any dataset.")
    add_eval_options(p), add_data_options(p, of_run=True), add_process_options(p)
    p = sub.add_parser("predict", help="segment new scans with a fine-tuned run", description="Segments 3D and 4D "
                       "NIfTI scans with a run's best.pt into OUT/NAME.nii.gz (uint8 labels, the input's shape, affine "
                       "and header); every input is checked first, existing outputs are kept unless --overwrite.")
    add_predict_options(p), add_process_options(p)
    add_report_options(sub.add_parser("report", help="results table from the eval summaries of run.sh's run folders"))
    p = sub.add_parser("bench", help="training-step throughput vs the bare model (the default losses)")
    add_model_options(p, "bench"), add_pretrain_loss_options(p, bench=True), add_finetune_loss_options(p, bench=True)
    p.add_argument("--steps", type=number(int), default=60, help="timed steps of each kind (10 alternating rounds)")
    add_process_options(p, quiet=False)
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
    if "device" in cfg:
        cfg["device"] = check_device(cfg["device"], parser)
    if cfg.get("out") and len(set(cfg.get("checkpoint", ()))) > 1:
        parser.error("argument --out: one results folder holds one --checkpoint's evaluation")
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
    if args.command == "finetune":                  # --pretrained unless resuming; --labeled or --split-file
        resumable = cfg["resume"] and os.path.exists(os.path.join(cfg["out"], "last.pt"))
        if not (cfg["pretrained"] or resumable):
            parser.error("argument --pretrained: ENCODER.pt (or none, a random initialisation) is required" +
                         (f" ({cfg['out']} holds no checkpoint to resume)" if cfg["resume"] else ""))
        if cfg["split_file"] and cfg["labeled"] is not None:
            parser.error("argument --labeled: not with --split-file, whose labeled volumes the run uses")
        if not cfg["split_file"] and cfg["labeled"] is None:
            cfg["labeled"] = DEFAULTS["labeled"]
        cfg["predict"] = DEFAULTS["predict"]
    if cfg.get("sync_bn") and not cfg["device"].startswith("cuda"):
        parser.error(f"argument --sync-bn: SyncBatchNorm needs CUDA devices, this run is on {cfg['device']}")
    return cfg


def hardware(cfg):
    """'preset P on DEVICE (N threads)' for a training command's first note."""
    threads = f" ({torch.get_num_threads()} threads)" if cfg["device"] == "cpu" else ""
    return f"preset {cfg['preset']} on {cfg['device']}{threads}"


def given_options(argv):
    """The options named on the command line, as config keys (a resumed run refuses changed ones)."""
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


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
            command = {"eval": evaluate_run, "predict": predict_run, "bench": bench, "report": report}[args.command]
            for checkpoint in dict.fromkeys(cfg.get("checkpoint", [None])):     # eval: each checkpoint in turn
                command(dict(cfg, checkpoint=checkpoint) if checkpoint else cfg)
    except (data.DataError, CheckpointError, FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        if int(os.environ.get("RANK", "0")) == 0:       # one line, from rank 0 only
            print(f"ideal.py {args.command}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2 if isinstance(e, (data.DataError, CheckpointError)) else 1
    finally:
        leave_distributed(clean=False)               # after an error; a no-op once left
    return 0


if __name__ == "__main__":
    sys.exit(main())
