"""Similarity alignment of a face onto the PD-FGC 224x224 template (SPEC.md section 2).

Five points (eyes, nose tip, mouth corners; see `flashportrait.face.detector`) are mapped onto
`FACE_TEMPLATE_5PTS` x 224 by the least-squares similarity (rotation, uniform scale, translation) of
Umeyama (1991), the crop is warped with bicubic interpolation (outside the frame: black), and converted to
RGB in [-1, 1] for the motion encoder.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from flashportrait.config import FACE_CROP_SIZE, FACE_TEMPLATE_5PTS

__all__ = ["umeyama", "template_points", "estimate_alignment", "transform_points", "align_face", "to_model_input"]


def umeyama(src: np.ndarray, dst: np.ndarray, *, with_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform taking `src` points onto `dst` points.

    Implements S. Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", IEEE TPAMI 13(4), 1991, eqs. (34)-(43): with centred point sets, covariance
    S = dst_c^T src_c / K = U D V^T, rotation R = U diag(1, .., det(U V^T)) V^T (a proper rotation, never a
    reflection), scale c = trace(D diag(..)) / var(src), translation t = mean(dst) - c R mean(src).

    Args:
        src: float [K, d] points (K >= 2).
        dst: float [K, d] target points.
        with_scale: estimate the scale (False: rigid, c = 1).

    Returns:
        float64 [d + 1, d + 1] homogeneous matrix T with dst ~ T @ [src; 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[0] < 2:
        raise ValueError(f"umeyama needs two [K, d] point sets of the same shape with K >= 2, got {src.shape}, {dst.shape}")
    k, d = src.shape
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = (src_c**2).sum() / k
    cov = dst_c.T @ src_c / k
    u, sing, vt = np.linalg.svd(cov)
    sign = np.ones(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = float((sing * sign).sum() / var_src) if with_scale and var_src > 0 else 1.0
    out = np.eye(d + 1)
    out[:d, :d] = scale * rot
    out[:d, d] = mu_dst - scale * rot @ mu_src
    return out


def template_points(size: int = FACE_CROP_SIZE) -> np.ndarray:
    """The 5-point template in pixels of a `size` x `size` crop: float64 [5, 2] (x, y)."""
    return np.asarray(FACE_TEMPLATE_5PTS, dtype=np.float64) * size


def estimate_alignment(landmarks: np.ndarray, size: int = FACE_CROP_SIZE) -> np.ndarray:
    """Affine matrix mapping frame pixels onto the template crop.

    Args:
        landmarks: float [5, 2] (x, y) frame pixels in the template order.
        size: crop side in pixels.

    Returns:
        float64 [2, 3] matrix M: crop_xy = M @ [x, y, 1] (the form `cv2.warpAffine` takes).
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2) or not np.all(np.isfinite(landmarks)):
        raise ValueError(f"landmarks must be five finite (x, y) points [5, 2], got {landmarks.shape}")
    return umeyama(landmarks, template_points(size))[:2]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a [2, 3] affine matrix to float [K, 2] points; returns float64 [K, 2]."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(frame: np.ndarray, landmarks: np.ndarray, size: int = FACE_CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Warp the face of one frame onto the template.

    Args:
        frame: uint8 [H, W, 3] RGB.
        landmarks: float [5, 2] (x, y) pixels of `frame`.
        size: crop side in pixels (224 for PD-FGC).

    Returns:
        (crop uint8 [size, size, 3] RGB, matrix float64 [2, 3] frame -> crop).
    """
    matrix = estimate_alignment(landmarks, size)
    crop = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, matrix


def to_model_input(crops: np.ndarray, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 RGB crops [B, S, S, 3] -> tensor [B, 3, S, S] in [-1, 1] (x / 127.5 - 1)."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"crops must be uint8 [B, S, S, 3] RGB, got {crops.shape} {crops.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device=device).permute(0, 3, 1, 2).to(dtype)
    return x / 127.5 - 1.0
