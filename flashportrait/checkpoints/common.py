"""Reading checkpoint files and loading them strictly.

Every loader in the project goes through two functions here:

* :func:`read_state_dict` turns a file (or a sharded index) into a flat ``{name: tensor}`` dict without
  materialising it twice: ``.safetensors`` are memory-mapped, ``.pt`` / ``.pth`` / ``.bin`` are read
  with ``torch.load(weights_only=True, mmap=True)``.
* :func:`load_state_dict_strict` puts such a dict into a module (usually one built on the meta device by
  :func:`empty_model`) after checking that the keys and shapes fit exactly; otherwise it raises
  :class:`CheckpointError` naming the file and every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PathLike",
    "CheckpointError",
    "read_state_dict",
    "list_checkpoint_keys",
    "unwrap_state_dict",
    "check_state_dict",
    "load_state_dict_strict",
    "empty_model",
    "format_key_report",
    "expected_shapes",
    "config_dict",
    "layer_indices",
    "require_key",
    "meta_like",
    "cast_once",
    "check_then_load",
    "load_transformers_folder",
    "diffusers_weights_file",
    "to_device",
]

PathLike = str | os.PathLike

#: wrapper keys some trainers put around a state dict (``{"state_dict": {...}}``, DeepSpeed's ``module``)
WRAPPER_KEYS = ("state_dict", "module", "model", "model_state_dict")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model it is loaded into.

    The message always names the file and says what is wrong (missing keys, unexpected keys, shape
    mismatches, unreadable format) and how to fix it.
    """


def _as_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path)).expanduser()


def _read_safetensors(path: Path, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy did not finish. "
                              "Download it again.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = [k for k in f.keys() if keys is None or k in keys]
            return {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}).") from exc


def list_checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """Names of the tensors in a checkpoint without reading them (torch files are memory-mapped).

    Accepts the same paths as :func:`read_state_dict`. Raises :class:`CheckpointError` likewise.
    """
    path = _as_path(path)
    if path.is_dir():
        return list_checkpoint_keys(_single_checkpoint_in(path))
    if path.name.endswith(".index.json"):
        try:
            return list(json.loads(path.read_text())["weight_map"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a valid sharded-checkpoint index ({exc}).") from exc
    if path.name.endswith(".safetensors") and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc}).") from exc
    return list(read_state_dict(path))


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_PICKLE_MAGIC = b"\x80"  # the legacy torch format starts with a pickle protocol opcode


def _unreadable_torch_file(path: Path, exc: BaseException) -> CheckpointError:
    """A clear error for a torch file that ``torch.load(weights_only=True)`` refused.

    torch's own message advises retrying with ``weights_only=False``, which runs arbitrary code from the
    file: never the right advice for a downloaded checkpoint, so it is not repeated here.
    """
    size = path.stat().st_size
    if size == 0:
        return CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy did not finish. "
                               "Download it again.")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        return CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts with "
                               f"{head!r}); the file is corrupt or something else. Download it again.")
    message = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found or "Weights only load failed" in message:
        what = f" ({found.group(1)})" if found else ""
        return CheckpointError(
            f"{path}: holds Python objects other than tensors{what}, which are never unpickled from a downloaded "
            "file (that could run code). Expected a plain state dict; if you made the file yourself, re-save it "
            "with torch.save(model.state_dict())."
        )
    return CheckpointError(f"{path}: the checkpoint is corrupt or incomplete ({size} bytes; {type(exc).__name__}: "
                           f"{message.splitlines()[0][:200]}). Download it again.")


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        # Old (non-zip) pickles cannot be memory-mapped; they are small legacy files, read them plainly.
        if "mmap" not in str(exc):
            raise _unreadable_torch_file(path, exc) from exc
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc2:  # noqa: BLE001 - reported with the file name
            raise _unreadable_torch_file(path, exc2) from exc2
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise _unreadable_torch_file(path, exc) from exc
    return unwrap_state_dict(obj, path)


def _read_index(index_path: Path, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index ({exc}).") from exc
    state_dict: dict[str, torch.Tensor] = {}
    if keys is not None:
        weight_map = {k: v for k, v in weight_map.items() if k in keys}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(
                f"{index_path}: lists shard '{shard}', which is not in {index_path.parent}. "
                "Download every shard of the checkpoint into the same folder."
            )
        part = _read_safetensors(shard_path, set(weight_map)) if shard.endswith(".safetensors") else _read_torch(shard_path)
        for name, tensor in part.items():
            if keys is not None and name not in weight_map:
                continue
            if name in state_dict:
                raise CheckpointError(f"{index_path}: key '{name}' occurs in more than one shard.")
            state_dict[name] = tensor
    listed = set(weight_map)
    found = set(state_dict)
    if listed != found:
        missing = sorted(listed - found)
        extra = sorted(found - listed)
        raise CheckpointError(
            f"{index_path}: the shards do not match the index: "
            + format_key_report(missing=missing, unexpected=extra)
        )
    return state_dict


def unwrap_state_dict(obj: object, path: str | os.PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    """Return the flat tensor dict inside ``obj``.

    Accepts a plain ``{name: tensor}`` dict or one wrapped once or more in ``state_dict`` / ``module`` /
    ``model`` / ``model_state_dict`` (the wrappers training scripts and DeepSpeed exports use).

    Raises:
        CheckpointError: ``obj`` is not a dict of tensors (after unwrapping).
    """
    while isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
        wrapped = [k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)]
        if not wrapped:
            break
        obj = obj[wrapped[0]]
    if isinstance(obj, Mapping) and len(obj) == 0:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors.")
    raise CheckpointError(
        f"{path}: expected a state dict (a mapping of names to tensors, optionally wrapped in one of "
        f"{', '.join(WRAPPER_KEYS)}), found {type(obj).__name__}"
        + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else "")
        + "."
    )


def read_state_dict(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` dict on the CPU, memory-mapped where possible.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` / ``*.bin.index.json`` sharded index,
            a ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` torch file (optionally wrapped in ``state_dict``), or
            a folder that holds exactly one of these (an index is preferred over its shards).
        keys: read only these names (others are not loaded from safetensors files; torch files are
            memory-mapped, so unread tensors cost nothing either). Names absent from the file are ignored.

    Returns:
        Tensors in the dtype stored in the file (nothing is converted or copied here).

    Raises:
        CheckpointError: the path does not exist, the format is unknown, or the file is unreadable.
    """
    path = _as_path(path)
    wanted = None if keys is None else set(keys)
    if path.is_dir():
        return read_state_dict(_single_checkpoint_in(path), wanted)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Check the path (and that the download finished).")
    name = path.name
    if name.endswith(".index.json"):
        return _read_index(path, wanted)
    if name.endswith(".safetensors"):
        return _read_safetensors(path, wanted)
    if name.endswith(TORCH_SUFFIXES):
        state_dict = _read_torch(path)
        return state_dict if wanted is None else {k: v for k, v in state_dict.items() if k in wanted}
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected .safetensors, a .index.json of shards, or a torch "
        f"file ({', '.join(TORCH_SUFFIXES)})."
    )


def _single_checkpoint_in(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".safetensors",) + TORCH_SUFFIXES))
    if len(indexes) == 0 and len(files) == 1:
        return files[0]
    raise CheckpointError(
        f"{folder}: expected one checkpoint (a single weights file or one *.index.json), found "
        f"{[p.name for p in indexes + files] or 'none'}. Pass the file itself."
    )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def format_key_report(
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
) -> str:
    """Human-readable summary of key problems (each list capped at 20 names, with the total)."""
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) {_listing(unexpected)}")
    if mismatched:
        items = [f"{k}: checkpoint {tuple(got)} vs model {tuple(want)}" for k, got, want in mismatched]
        parts.append(f"{len(mismatched)} shape mismatch(es) {_listing(items)}")
    return "; ".join(parts) if parts else "no differences"


def check_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    state_dict: Mapping[str, torch.Tensor | tuple[int, ...]],
    source: str | os.PathLike,
    *,
    what: str = "the model",
    ignore_missing: Iterable[str] = (),
    hint: str = "",
) -> None:
    """Check that ``state_dict`` has exactly the keys and shapes of ``expected``.

    Args:
        expected: name -> shape of every tensor the model needs.
        state_dict: name -> tensor (or shape) found in the checkpoint, already renamed to model names.
        source: the file(s) it came from, named in the error.
        what: how to name the model in the error (e.g. "the FlashPortrait transformer").
        ignore_missing: names that may be absent (e.g. supplied by another file).
        hint: an extra sentence telling the user how to fix a mismatch.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys.
    """
    ignore = set(ignore_missing)
    missing = [k for k in expected if k not in state_dict and k not in ignore]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for k, v in state_dict.items():
        if k in expected:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
            want = tuple(expected[k])
            if got != want:
                mismatched.append((k, got, want))
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source}: does not fit {what}: {format_key_report(missing, unexpected, mismatched)}."
            + (f" {hint}" if hint else "")
        )


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of every entry of ``module.state_dict()`` (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_state_dict_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    what: str | None = None,
    dtype: torch.dtype | None = None,
    hint: str = "",
) -> torch.nn.Module:
    """Load ``state_dict`` into ``module`` only if every key and shape fits; assign tensors in place.

    The module may live on the meta device (see :func:`empty_model`): tensors are *assigned*, not copied,
    so a memory-mapped checkpoint is never duplicated in memory. Floating-point tensors are cast to
    ``dtype`` when given (integer buffers such as BatchNorm's ``num_batches_tracked`` are kept).

    Raises:
        CheckpointError: missing / unexpected / mis-shaped keys, naming ``source``.
    """
    what = what or type(module).__name__
    check_state_dict(expected_shapes(module), state_dict, source, what=what, hint=hint)
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    module.load_state_dict(dict(state_dict), strict=True, assign=True)
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{source}: {what} still has uninitialised tensors after loading: {_listing(leftover)}.")
    return module


@contextmanager
def empty_model():
    """Build modules with parameters on the meta device (no memory, no random init).

    Buffers are created normally, so non-persistent buffers (e.g. rotary tables) stay valid. Use with
    :func:`load_state_dict_strict`, which assigns the checkpoint's tensors.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


# --- shared by the component loaders (umt5.py, clip.py, vae.py) -----------------------------------------


def config_dict(config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in dict(config or {}).items() if k != "note"}


def layer_indices(state_dict: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def require_key(state_dict: Mapping[str, torch.Tensor], key: str, source: PathLike, what: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(
            f"{source}: no '{key}', so this is not {what} in the original Wan naming (found keys such as "
            f"{sorted(state_dict)[:5]}). Pass the original file or the Diffusers folder of this component."
        )
    return state_dict[key]


def meta_like(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def cast_once(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype``; a tensor listed under two names (tied weights) is cast once."""
    if dtype is None:
        return dict(state_dict)
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state_dict.items():
        if id(v) not in done:
            done[id(v)] = v.to(dtype) if v.is_floating_point() else v
        out[k] = done[id(v)]
    return out


def check_then_load(
    model: torch.nn.Module,
    file_state_dict: Mapping[str, torch.Tensor],
    to_original,
    to_model,
    source: PathLike,
    *,
    what: str,
    dtype: torch.dtype,
    hint: str,
) -> torch.nn.Module:
    """Check ``file_state_dict`` against the model's shapes in the file's naming, then convert and assign."""
    expected = {k: tuple(v.shape) for k, v in to_original(meta_like(expected_shapes(model))).items()}
    check_state_dict(expected, file_state_dict, source, what=what, hint=hint)
    converted = cast_once(to_model(file_state_dict), dtype)
    load_state_dict_strict(model, converted, source, what=what, hint=hint)
    return model


def load_transformers_folder(cls, folder: Path, *, dtype: torch.dtype, what: str, ignore_unexpected=None):
    """``cls.from_pretrained`` on a local folder; refuse missing / unexpected / mis-shaped keys."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json, so not a saved {what} (transformers format).")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would duplicate (or contradict) our error below
    try:
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot be loaded as {what} ({type(exc).__name__}: {exc}).") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [k for k in info.get("unexpected_keys", ()) if not (ignore_unexpected and ignore_unexpected.match(k))]
    missing = list(info.get("missing_keys", ()))
    mismatched = [(k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched or info.get("error_msgs"):
        raise CheckpointError(
            f"{folder}: does not fit {what} described by its config.json: "
            f"{format_key_report(missing, unexpected, mismatched)}"
            + (f"; errors: {info['error_msgs']}" if info.get("error_msgs") else "")
            + ". Re-download the folder or fix its config.json."
        )
    return model.eval()


def diffusers_weights_file(folder: Path) -> Path:
    """The weights file (or shard index) of a diffusers model folder."""
    for name in (
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin.index.json",
        "diffusion_pytorch_model.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin / sharded index) found.")


def to_device(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    return model if torch.device(device) == torch.device("cpu") else model.to(device)
