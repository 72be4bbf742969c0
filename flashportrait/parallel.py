"""More than one GPU: window, guidance and sequence parallelism over ``torch.distributed``.

Launch with ``torchrun`` (one process per GPU; NCCL on GPUs, gloo on CPUs)::

    torchrun --nproc_per_node 8 infer.py ...                                # 8 window groups of 1 rank
    torchrun --nproc_per_node 8 infer.py ... --ulysses_degree 2             # 4 window groups of 2 ranks

The ``world_size`` ranks form a 2-D grid ``window x sequence`` (:class:`ParallelGrid`); a *sequence group* is
``ulysses_degree x ring_degree`` consecutive ranks (so on a node of 8 GPUs a group shares NVLink), and there are
``world_size / (ulysses_degree x ring_degree)`` *window groups*:

* **Window parallelism** (:class:`WindowParallelVelocity`, the ``velocity_fn`` of
  :func:`flashportrait.sampling.sample_windows`). Within one sampling step the context windows are independent
  until they are blended (SPEC.md section 4). Each window group evaluates its contiguous share of the windows
  (:func:`plan_window_work`; the extra windows go to the last groups), the window velocities are broadcast in
  window order, and every rank blends them in that order with :class:`~flashportrait.windows.WindowBlender` and
  takes the same scheduler step: all ranks hold the same latent. The model callable is called only on the ranks
  that own the window, so per-window state of a wrapped callable (the ALP forecaster's caches) lives there.
* **Guidance parallelism**. When there are more window groups than windows, the guidance branches of a window
  (:mod:`flashportrait.guidance`) go to different groups (``WindowDenoiser.branch_outputs``), their raw outputs
  are broadcast and every rank combines them (``WindowDenoiser.combine``).
* **Sequence parallelism** inside a window (:func:`enable_sequence_parallel`): diffusers' context parallelism
  (``ContextParallelConfig``, ``enable_parallelism``; Ulysses all-to-all and / or ring attention) over the
  ranks of a sequence group, the sequence split into whole latent frames per rank (see
  :class:`flashportrait.models.transformer.LatentFrameTokens`) and the NFEB statistics all-reduced.

Rank 0 extracts the expression features and broadcasts them (:func:`run_on_main_rank`); it alone decodes and
writes the video. Every step's communication is one window velocity (``[1, 16, L, h, w]`` float32) per window
broadcast to the window groups: 20 MB at 480x832 with 51-frame windows, against about 30 s of compute for that
window (README, "More than one GPU").

Length: the grid, the three kinds of parallelism, their checks and the rank-0 helpers share one vocabulary (ranks,
groups, the mesh); split into modules they would import each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .windows import WindowBlender

__all__ = [
    "BACKENDS",
    "ParallelGrid",
    "WindowTask",
    "check_degrees",
    "init_parallel",
    "destroy_parallel",
    "context_parallel_config",
    "enable_sequence_parallel",
    "check_window_split",
    "plan_window_work",
    "describe_work",
    "run_on_main_rank",
    "broadcast_from_main_rank",
    "WindowParallelVelocity",
]

logger = logging.getLogger(__name__)

#: ``--dist_backend`` choices
BACKENDS = ("nccl", "gloo")
#: how long a collective may wait (rank 0 extracting the expressions of a long video while the others wait)
DIST_TIMEOUT = timedelta(minutes=60)


# --- the process grid ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelGrid:
    """This process's place in the ``window x sequence`` grid of ranks.

    Rank ``r`` is in window group ``r // S`` at position ``r % S`` of its sequence group, ``S = ulysses_degree x
    ring_degree``. ``mesh`` is a ``DeviceMesh`` of shape ``(window_degree, ring_degree, ulysses_degree)`` named
    ``("window", "ring", "ulysses")`` (``None`` for a single process); its ``"window"`` dimension connects the ranks
    at the same sequence position of every window group (the window broadcasts), its ``("ring", "ulysses")``
    dimensions are diffusers' context-parallel mesh.

    Attributes:
        rank, world_size, local_rank: from ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
        ulysses_degree, ring_degree: sequence parallelism inside a window.
        device: this rank's compute device (``cuda:LOCAL_RANK`` under NCCL).
        backend: ``"nccl"`` or ``"gloo"`` (``""`` for a single process).
    """

    rank: int
    world_size: int
    local_rank: int
    ulysses_degree: int
    ring_degree: int
    device: torch.device
    backend: str
    mesh: object | None = None

    @property
    def sequence_degree(self) -> int:
        """Ranks per sequence group (``ulysses_degree x ring_degree``)."""
        return self.ulysses_degree * self.ring_degree

    @property
    def window_degree(self) -> int:
        """Number of window groups."""
        return self.world_size // self.sequence_degree

    @property
    def window_rank(self) -> int:
        """Index of this rank's window group."""
        return self.rank // self.sequence_degree

    @property
    def is_main(self) -> bool:
        """Rank 0: extracts the expression features, decodes and writes."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors are put for collectives (NCCL: this GPU; gloo: the CPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def window_group(self):
        """The process group of the ranks at this sequence position in every window group (or ``None``)."""
        return None if self.mesh is None else self.mesh["window"].get_group()


def check_degrees(world_size: int, ulysses_degree: int = 1, ring_degree: int = 1) -> None:
    """Check that ``world_size`` ranks divide into sequence groups of ``ulysses_degree x ring_degree``.

    Raises:
        ValueError: a degree below 1, or a world size that is not a multiple of their product (the message names
            the flags and the launch that would fit).
    """
    for name, value in (("--ulysses_degree", ulysses_degree), ("--ring_degree", ring_degree)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    degree = ulysses_degree * ring_degree
    if world_size % degree != 0:
        hint = (
            f"launch with torchrun --nproc_per_node {degree} (or a multiple of {degree})"
            if world_size == 1
            else f"use a world size that is a multiple of {degree}, or degrees whose product divides {world_size}"
        )
        raise ValueError(
            f"the world size {world_size} does not divide into sequence groups of --ulysses_degree {ulysses_degree} x "
            f"--ring_degree {ring_degree} = {degree} ranks: {hint}"
        )


def init_parallel(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    backend: str | None = None,
    device: str | torch.device | None = None,
    environ: dict | None = None,
) -> ParallelGrid | None:
    """Join the ``torchrun`` process group and build the ``window x sequence`` grid.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``) as ``torchrun`` sets
    them. Everything is checked before any process group is joined, so every rank fails with the same message.

    Args:
        ulysses_degree, ring_degree: sequence-parallel degrees (``--ulysses_degree``, ``--ring_degree``).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (NCCL when computing on CUDA, else gloo).
        device: the compute device (``--device``; default CUDA when available, else the CPU); a CUDA device
            becomes ``cuda:LOCAL_RANK``, one GPU per local rank.
        environ: the environment (default ``os.environ``).

    Returns:
        ``None`` for a single process without sequence parallelism (nothing to do), else the grid.

    Raises:
        ValueError: a world size that does not divide into the degrees; degrees > 1 without ``torchrun``; an
            unknown backend; NCCL without GPUs or with a CPU device; fewer GPUs than local ranks.
    """
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    check_degrees(world_size, ulysses_degree, ring_degree)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--dist_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--dist_backend nccl needs CUDA GPUs and none is available; use --dist_backend gloo on CPUs")
    if world_size == 1:
        return None
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    compute = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if backend is None:
        backend = "nccl" if compute.type == "cuda" else "gloo"
    if backend == "nccl" and compute.type != "cuda":
        raise ValueError(f"--dist_backend nccl moves GPU tensors; with --device {compute} use --dist_backend gloo")
    if compute.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible on this node; launch at most "
                "that many processes per node (torchrun --nproc_per_node)"
            )
        compute = torch.device("cuda", local_rank)  # one GPU per local rank
        torch.cuda.set_device(compute)
    if not dist.is_initialized():
        kwargs = {"device_id": compute} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=DIST_TIMEOUT, **kwargs)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        "cuda" if backend == "nccl" else "cpu",
        (world_size // (ulysses_degree * ring_degree), ring_degree, ulysses_degree),
        mesh_dim_names=("window", "ring", "ulysses"),
    )
    return ParallelGrid(rank, world_size, local_rank, ulysses_degree, ring_degree, compute, backend, mesh)


def destroy_parallel(grid: ParallelGrid | None) -> None:
    """Leave the process group (no collective: rank 0 may still be writing the video)."""
    if grid is not None and dist.is_initialized():
        dist.destroy_process_group()


# --- sequence parallelism (diffusers' context parallelism) ----------------------------------------------------


def context_parallel_config(grid: ParallelGrid):
    """diffusers' ``ContextParallelConfig`` for the grid's sequence groups.

    The sequence is split into whole latent frames per rank, which rarely divide evenly (51 frames over 2 ranks), so
    Ulysses alone runs in diffusers' ``ulysses_anything`` mode and ring alone in ``ring_anything`` mode (unequal
    shards); with both degrees > 1 diffusers' unified attention needs equal shards (checked per window by the model).
    """
    from diffusers import ContextParallelConfig

    u, r = grid.ulysses_degree, grid.ring_degree
    return ContextParallelConfig(
        ulysses_degree=u,
        ring_degree=r,
        ulysses_anything=u > 1 and r == 1,
        ring_anything=r > 1 and u == 1,
        mesh=grid.mesh,
    )


@contextlib.contextmanager
def _accelerator_count_at_least_one() -> Iterator[None]:
    """diffusers 0.42 computes ``rank % torch.accelerator.device_count()`` in ``enable_parallelism`` (only to record a
    device); without an accelerator that is a ZeroDivisionError (ENVIRONMENT.md). Report one device meanwhile."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _uses_native_attention(transformer) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
            return AttentionBackendName(backend) == AttentionBackendName.NATIVE
    return False


def enable_sequence_parallel(transformer, grid: ParallelGrid | None) -> bool:
    """Shard every window's sequence over the grid's sequence groups (diffusers' ``enable_parallelism``).

    Nothing happens for ``grid`` ``None`` or a sequence degree of 1. Ring attention merges partial attentions by
    their log-sum-exp, which PyTorch's plain SDPA (diffusers' ``"native"`` backend) does not return: on CUDA the
    backend is switched to ``"_native_cudnn"`` (cuDNN attention through PyTorch); on CPUs ring attention is refused.

    Args:
        transformer: a :class:`~flashportrait.models.transformer.FlashPortraitTransformer3DModel`.
        grid: from :func:`init_parallel`.

    Returns:
        True if context parallelism was enabled.

    Raises:
        ValueError: a Ulysses degree that does not divide the attention heads (40 released: 2, 4, 5, 8, 10 ...);
            ring attention without a GPU attention backend that returns the log-sum-exp.
    """
    if grid is None or grid.sequence_degree == 1:
        return False
    heads = transformer.config.num_attention_heads
    if heads % grid.ulysses_degree != 0:
        raise ValueError(
            f"--ulysses_degree {grid.ulysses_degree} must divide the {heads} attention heads (each rank attends with "
            f"{heads} / degree heads); choose one of {[d for d in range(2, heads + 1) if heads % d == 0][:8]} ..."
        )
    if grid.ring_degree > 1 and _uses_native_attention(transformer):
        if grid.device.type != "cuda":
            raise ValueError(
                "--ring_degree > 1 needs an attention backend that returns the log-sum-exp (cuDNN or flash attention "
                "on CUDA GPUs); PyTorch's CPU attention does not. Use --ulysses_degree instead."
            )
        transformer.set_attention_backend("_native_cudnn")
        logger.info("ring attention: attention backend set to _native_cudnn")
    with _accelerator_count_at_least_one():
        transformer.enable_parallelism(config=context_parallel_config(grid))
    return True


def check_window_split(num_frames: int, grid: ParallelGrid | None) -> None:
    """Raise ``ValueError`` unless a window of ``num_frames`` latent frames splits into whole frames over the grid's
    sequence groups (at least one frame per rank; equal shares when Ulysses and ring are combined)."""
    if grid is None or grid.sequence_degree == 1:
        return
    degree = grid.sequence_degree
    if num_frames < degree:
        raise ValueError(
            f"a window has {num_frames} latent frames, fewer than the {degree} ranks of a sequence group (--ulysses_degree "
            f"{grid.ulysses_degree} x --ring_degree {grid.ring_degree}); each rank needs whole latent frames: lower the "
            "degrees or use longer windows (--context_size)"
        )
    if grid.ulysses_degree > 1 and grid.ring_degree > 1 and num_frames % degree != 0:
        raise ValueError(
            f"with both --ulysses_degree and --ring_degree > 1 the {num_frames} latent frames of a window must split "
            f"evenly over {degree} ranks; choose --context_size as a multiple of {degree}"
        )


# --- window and guidance parallelism --------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowTask:
    """One window's work for one window group: the whole guided window (``branches`` ``None``), or some of its
    guidance branches (indices into ``GuidancePlan.branches``)."""

    window: int
    branches: tuple[int, ...] | None = None


def _split_counts(total: int, parts: int) -> list[int]:
    """``total`` items in ``parts`` contiguous shares differing by at most one; the larger shares come last (rank 0
    also extracts, decodes and writes)."""
    base, extra = divmod(total, parts)
    return [base + (1 if p >= parts - extra else 0) for p in range(parts)]


def plan_window_work(num_windows: int, num_branches: int, num_groups: int, split_branches: bool = True) -> list[list[WindowTask]]:
    """Assign a step's work to window groups (pure function).

    With at least as many windows as groups, each group gets a contiguous run of whole windows (counts differ by
    at most one, the larger counts last). With fewer windows and ``split_branches``, the ``num_windows x
    num_branches`` (window, branch) passes are split the same way, so the branches of a window go to different
    groups; a group whose passes cover all branches of a window gets that whole window. Groups beyond the number of
    passes stay idle.

    Returns:
        ``work[g]``: the tasks of group ``g`` in window order.

    Raises:
        ValueError: a count below 1.
    """
    for name, value in (("num_windows", num_windows), ("num_branches", num_branches), ("num_groups", num_groups)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_groups <= num_windows or num_branches == 1 or not split_branches:
        counts = _split_counts(num_windows, num_groups)
        starts = [sum(counts[:g]) for g in range(num_groups)]
        return [[WindowTask(k) for k in range(starts[g], starts[g] + counts[g])] for g in range(num_groups)]
    passes = [(k, b) for k in range(num_windows) for b in range(num_branches)]
    counts = _split_counts(len(passes), num_groups)
    work: list[list[WindowTask]] = []
    start = 0
    for count in counts:
        mine = passes[start : start + count]
        start += count
        tasks = []
        for k in dict.fromkeys(k for k, _ in mine):
            branches = tuple(b for kk, b in mine if kk == k)
            tasks.append(WindowTask(k, None if len(branches) == num_branches else branches))
        work.append(tasks)
    return work


def describe_work(grid: ParallelGrid, work: list[list[WindowTask]], num_windows: int,
                  branch_names: Sequence[str] | None = None) -> str:
    """The per-rank line, e.g. ``rank 1/2: 17 of 33 windows per step``, with the guidance branches when a window's
    branches are split and the sequence group when there is one."""
    tasks = work[grid.window_rank]
    line = f"rank {grid.rank}/{grid.world_size}: {len(tasks)} of {num_windows} windows per step"
    split = [t for t in tasks if t.branches is not None]
    if split:
        names = branch_names or []
        parts = [f"window {t.window}: {', '.join(names[b] if b < len(names) else str(b) for b in t.branches)}" for t in split]
        line += f" (guidance branches {'; '.join(parts)})"
    if not tasks:
        line += f" (idle: more window groups ({len(work)}) than window passes)"
    if grid.sequence_degree > 1:
        first = grid.window_rank * grid.sequence_degree
        line += (
            f", sequence group {grid.window_rank} = ranks {first}-{first + grid.sequence_degree - 1} "
            f"(ulysses {grid.ulysses_degree} x ring {grid.ring_degree})"
        )
    return line


def run_on_main_rank(fn: Callable[[], object], grid: ParallelGrid | None):
    """Run ``fn()`` on rank 0 only and give its (picklable) result to every rank.

    An exception on rank 0 is sent to the other ranks too (no rank waits forever): they raise a ``ValueError``
    (the input's fault, for rank 0's user errors) or a ``RuntimeError`` naming rank 0's error; rank 0 re-raises its
    own exception.
    """
    if grid is None or grid.world_size == 1:
        return fn()
    payload: list = [None]
    error: BaseException | None = None
    if grid.is_main:
        try:
            payload = [("ok", fn())]
        except BaseException as exc:  # noqa: BLE001 - forwarded, then re-raised below
            error = exc
            payload = [("user" if isinstance(exc, ValueError) else "error", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(payload, src=0, device=grid.comm_device)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "user":
        raise ValueError(f"on rank 0: {value}")
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def broadcast_from_main_rank(tensor: torch.Tensor, grid: ParallelGrid | None) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (same shape and dtype on every rank), on ``tensor``'s device."""
    if grid is None or grid.world_size == 1:
        return tensor
    buffer = tensor.to(grid.comm_device).contiguous()
    dist.broadcast(buffer, src=0)
    return buffer.to(tensor.device)


class WindowParallelVelocity:
    """Window- and guidance-parallel ``velocity_fn`` for :func:`flashportrait.sampling.sample_windows`.

    ``velocity_fn(model, latents [B, 16, F, h, w], timestep, windows, disable=None, blend=True) -> [B, 16, F, h, w]
    float32``, the same contract and result as :func:`flashportrait.sampling.blended_velocity`:

    1. this rank's window group evaluates its tasks (:func:`plan_window_work`): whole windows through ``model``
       (the callable the sampler was given, so a wrapper holding per-window state only ever sees this group's
       windows), guidance-split windows through ``branch_fn``;
    2. for every window in order, its float32 velocity (or each raw branch output, float32) is broadcast from the
       owning group over the ``"window"`` process group; guidance-split windows are combined with ``combine_fn``;
    3. every rank blends the velocities in window order (:class:`~flashportrait.windows.WindowBlender`).

    Every rank therefore runs exactly the single-process blending arithmetic on the same numbers: the result is
    bit-for-bit the single-process one whenever each window's velocity is (whole windows: the same transformer call
    on the same inputs). Guidance-split windows run each branch as its own batch, which equals the single process
    with ``batch_guidance=False`` bit for bit and the batched branches within float rounding.

    Args:
        grid: from :func:`init_parallel`.
        num_branches: guidance branches per window (``GuidancePlan.num_branches``).
        branch_fn: ``branch_fn(x, timestep, window, branches=[...]) -> [len(branches) * B, 16, L, h, w]`` raw outputs
            (``WindowDenoiser.branch_outputs``); ``None``: branches are never split.
        combine_fn: ``combine_fn(outputs [num_branches * B, ...]) -> velocity`` (``WindowDenoiser.combine``).
        branch_names: branch names for the per-rank line (``GuidancePlan.branches``).
        verbose: print the per-rank line (:func:`describe_work`) at the first step.
    """

    def __init__(
        self,
        grid: ParallelGrid,
        num_branches: int = 1,
        branch_fn: Callable[..., torch.Tensor] | None = None,
        combine_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        branch_names: Sequence[str] | None = None,
        verbose: bool = True,
    ):
        if (branch_fn is None) != (combine_fn is None):
            raise ValueError("give both branch_fn and combine_fn (guidance parallelism), or neither")
        self.grid = grid
        self.num_branches = num_branches
        self.branch_fn = branch_fn
        self.combine_fn = combine_fn
        self.branch_names = branch_names
        self.verbose = verbose
        self._planned: dict[int, list[list[WindowTask]]] = {}

    def work(self, num_windows: int) -> list[list[WindowTask]]:
        """The plan for ``num_windows`` windows (cached); prints the per-rank line the first time."""
        if num_windows not in self._planned:
            work = plan_window_work(num_windows, self.num_branches, self.grid.window_degree,
                                    split_branches=self.branch_fn is not None)
            self._planned[num_windows] = work
            if self.verbose:
                # one write per line: lines of different ranks sharing a terminal do not interleave
                sys.stdout.write(describe_work(self.grid, work, num_windows, self.branch_names) + "\n")
                sys.stdout.flush()
        return self._planned[num_windows]

    def _share(self, value: torch.Tensor | None, shape, owner: int, device) -> torch.Tensor:
        """``value`` (float32, present on the owner group) on every rank, broadcast over the window group."""
        if self.grid.window_degree == 1:
            return value
        if self.grid.window_rank == owner:
            buffer = value.to(self.grid.comm_device, torch.float32).contiguous()
        else:
            buffer = torch.empty(shape, dtype=torch.float32, device=self.grid.comm_device)
        dist.broadcast(buffer, group=self.grid.window_group(), group_src=owner)
        return buffer.to(device)

    def __call__(self, model, latents: torch.Tensor, timestep: torch.Tensor, windows: Sequence[range],
                 disable: bool | None = None, blend: bool = True) -> torch.Tensor:
        work = self.work(len(windows))
        check_window_split(len(windows[0]), self.grid)
        results: dict[tuple[int, int | None], torch.Tensor] = {}
        mine = work[self.grid.window_rank]
        for task in tqdm(mine, desc="windows", leave=False, disable=disable or len(mine) <= 1):
            window = windows[task.window]
            x = latents[:, :, window.start : window.stop]
            if task.branches is None:
                results[(task.window, None)] = model(x, timestep, window).float()
            else:
                outputs = self.branch_fn(x, timestep, window, branches=list(task.branches)).float()
                for b, out in zip(task.branches, outputs.chunk(len(task.branches))):
                    results[(task.window, b)] = out
        owners: dict[tuple[int, int | None], int] = {}
        for g, tasks in enumerate(work):
            for task in tasks:
                for b in [None] if task.branches is None else task.branches:
                    owners[(task.window, b)] = g
        blender = WindowBlender(latents.shape[2], dim=2, dtype=torch.float32, blend=blend)
        for k, window in enumerate(windows):
            shape = (latents.shape[0], latents.shape[1], len(window), *latents.shape[3:])
            if (k, None) in owners:
                velocity = self._share(results.get((k, None)), shape, owners[(k, None)], latents.device)
            else:
                outputs = [self._share(results.get((k, b)), shape, owners[(k, b)], latents.device)
                           for b in range(self.num_branches)]
                velocity = self.combine_fn(torch.cat(outputs))
            blender.add(window, velocity)
        return blender.result()
