"""PD-FGC motion encoder (``pd_fpg.pth``): aligned 224x224 face crop -> 554 expression numbers.

Architecture as in SPEC.md section 2 ("PD-FGC motion encoder architecture"): a FAN trunk (one
hourglass of depth 4 on 256 channels, 68 landmark heatmaps squeezed to a 512-d feature) followed by
four heads (head pose 6, eye 6, emotion 30, mouth 512). Module and attribute names follow the released
state dict (``model.conv2.bn1.weight``, ``model.m0.b2_plus_1.*``, ``to_mouth.0.weight``,
``headpose_embed.1.weight``, ...), so ``pd_fpg.pth`` loads without renaming. The encoder is frozen and
always run in eval mode (BatchNorm uses its running statistics, dropout is off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EXPRESSION_PARTS
from ._common import DeviceDtypeMixin

__all__ = ["ConvBlock", "HourGlass", "FANTrunk", "PDFGCMotionEncoder"]


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN residual block: ``[B, in_ch, H, W] -> [B, out_ch, H, W]`` (SPEC.md section 2, "ConvBlock").

    Three pre-activation (BN-ReLU-conv3x3) stages of widths out/2, out/4, out/4, concatenated to
    ``out_ch`` channels, plus the input (through BN-ReLU-conv1x1 when ``in_ch != out_ch``).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        half, quarter = out_ch // 2, out_ch // 4
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = _conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        self.downsample = None
        if in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
    """FAN hourglass of ``depth`` levels on ``channels`` channels: ``[B, C, H, W] -> [B, C, H, W]``.

    Level ``n`` (SPEC.md section 2): upper branch ``b1_n`` (+ dropout 0.5, inactive in eval); lower
    branch max-pool 2 -> ``b2_n`` -> level ``n-1`` (or ``b2_plus_1`` at the bottom) -> ``b3_n`` ->
    bilinear upsample (align_corners False) to the upper branch's size; the two branches are added.
    """

    def __init__(self, depth: int = 4, channels: int = 256):
        super().__init__()
        self.depth = depth
        self.dropout = nn.Dropout(0.5)
        # registration order of the released file: b1_4, b2_4, b1_3, ..., b2_1, b2_plus_1, b3_1, ..., b3_4
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(channels, channels))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels))
        self.add_module("b2_plus_1", ConvBlock(channels, channels))
        for level in range(1, depth + 1):
            self.add_module(f"b3_{level}", ConvBlock(channels, channels))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self.dropout(self.get_submodule(f"b1_{level}")(x))
        low = self.get_submodule(f"b2_{level}")(F.max_pool2d(x, 2, stride=2))
        low = self._level(level - 1, low) if level > 1 else self.b2_plus_1(low)
        low = self.get_submodule(f"b3_{level}")(low)
        low = F.interpolate(low, size=upper.shape[-2:], mode="bilinear", align_corners=False)
        return upper + low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FANTrunk(nn.Module):
    """FAN trunk of PD-FGC (state-dict prefix ``model.``): ``[B, 3, 224, 224] -> [B, 512]`` float32.

    conv7x7/2 (3->64) + BN + ReLU; ConvBlock 64->128 + max-pool 2; ConvBlock 128->128; ConvBlock
    128->256; hourglass (depth 4, 256 ch); ConvBlock ``top_m_0``; 1x1 conv ``conv_last0`` + BN
    ``bn_end0`` + ReLU; ReLU -> 1x1 conv ``l0`` to 68 heatmaps; BN ``bn5`` + ReLU; conv3x3/2 ``conv6``
    (68->1, 28x28 map for a 224 input); flatten (784); ReLU; Linear 784->512 ``fc`` (SPEC.md section 2).
    ``width`` scales the channel counts (64 / 128 / 256 released); only the ``--tiny`` family changes it.
    """

    def __init__(self, num_landmarks: int = 68, feature_dim: int = 512, input_size: int = 224, width: int = 64):
        super().__init__()
        if width % 4 != 0 or width < 4:
            raise ValueError(f"width must be a positive multiple of 4 (released 64), got {width}")
        w1, w2, w4 = width, 2 * width, 4 * width  # released: 64, 128, 256
        self.conv1 = nn.Conv2d(3, w1, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = ConvBlock(w1, w2)
        self.conv3 = ConvBlock(w2, w2)
        self.conv4 = ConvBlock(w2, w4)
        self.m0 = HourGlass(depth=4, channels=w4)
        self.top_m_0 = ConvBlock(w4, w4)
        self.conv_last0 = nn.Conv2d(w4, w4, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(w4)
        self.l0 = nn.Conv2d(w4, num_landmarks, kernel_size=1)
        self.bn5 = nn.BatchNorm2d(num_landmarks)
        self.conv6 = nn.Conv2d(num_landmarks, 1, kernel_size=3, stride=2, padding=1)
        side = input_size // 8  # /2 conv1, /2 max-pool, /2 conv6
        self.fc = nn.Linear(side * side, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2, stride=2)
        x = self.conv4(self.conv3(x))
        x = self.top_m_0(self.m0(x))
        x = F.relu(self.bn_end0(self.conv_last0(x)))
        heatmaps = self.l0(F.relu(x))
        x = self.conv6(F.relu(self.bn5(heatmaps)))
        return self.fc(F.relu(x.flatten(1)))


def _head(dim: int) -> nn.Sequential:
    """``to_<part>``: Linear(dim, dim) - ReLU - BatchNorm1d - Linear(dim, dim)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.BatchNorm1d(dim), nn.Linear(dim, dim))


def _embed(dim: int, out_dim: int) -> nn.Sequential:
    """``<part>_embed``: ReLU - Linear(dim, out_dim)."""
    return nn.Sequential(nn.ReLU(), nn.Linear(dim, out_dim))


class PDFGCMotionEncoder(DeviceDtypeMixin, nn.Module):
    """PD-FGC motion encoder: aligned face crops -> per-frame expression features (SPEC.md section 2).

    ``forward(faces)``: ``faces`` [B, 3, 224, 224] float32, RGB in [-1, 1], aligned with the 5-point
    template of :data:`flashportrait.config.FACE_TEMPLATE_5PTS`. Returns [B, 554] float32: head pose 6,
    eye 6, emotion 30, mouth 512 concatenated in that order (:data:`flashportrait.config.EXPRESSION_PARTS`).

    ``__init__`` builds the released size (``width`` 64) with random weights; use
    :func:`load_pdfgc_motion_encoder` for ``pd_fpg.pth``. A smaller ``width`` (trunk channels) is only
    for the ``--tiny`` model family. Meant for eval mode only (the loader returns it frozen and in eval mode).
    ``mouth_embed`` (512 -> 500) is held only because the released file has it; it is never used.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        dims = dict(EXPRESSION_PARTS)
        feat = dims["mouth"]  # 512: trunk feature width = mouth feature width
        self.model = FANTrunk(feature_dim=feat, width=width)
        self.to_mouth = _head(feat)
        self.mouth_embed = _embed(feat, feat - dims["headpose"] - dims["eye"])  # unused, in the file
        self.to_headpose = _head(feat)
        self.headpose_embed = _embed(feat, dims["headpose"])
        self.to_eye = _head(feat)
        self.eye_embed = _embed(feat, dims["eye"])
        self.to_emo = _head(feat)
        self.emo_embed = _embed(feat, dims["emotion"])

    def encode_parts(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """``faces`` [B, 3, 224, 224] in [-1, 1] -> {"headpose": [B, 6], "eye": [B, 6], "emotion": [B, 30],
        "mouth": [B, 512]} (float32 for float32 weights)."""
        if faces.ndim != 4 or faces.shape[1] != 3:
            raise ValueError(f"faces must be [B, 3, 224, 224] RGB crops, got shape {tuple(faces.shape)}.")
        feature = self.model(faces)
        return {
            "headpose": self.headpose_embed(self.to_headpose(feature)),
            "eye": self.eye_embed(self.to_eye(feature)),
            "emotion": self.emo_embed(self.to_emo(feature)),
            "mouth": self.to_mouth(feature),
        }

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``faces`` [B, 3, 224, 224] in [-1, 1] -> [B, 554] = cat(headpose 6, eye 6, emotion 30, mouth 512)."""
        parts = self.encode_parts(faces)
        return torch.cat([parts[name] for name, _ in EXPRESSION_PARTS], dim=-1)
