"""Window, guidance and sequence parallelism (flashportrait.parallel) over gloo on the CPU, with the tiny model.

Two kinds of tests:

* in-process (milliseconds): the work plan, the per-rank line, the checks and their messages, and the
  window-parallel velocity on one rank against ``blended_velocity``;
* ``torchrun --nproc_per_node 2`` and ``3`` launches of this file as a worker (``_worker`` at the bottom, one launch
  per world size, every scenario inside it, OMP_NUM_THREADS=1, its own master port). Each rank computes the
  single-process result itself (``parallel=None``, same threads, same weights) and the parallel one, and writes
  what it found to ``rank<r>.json``; the tests below read those files.

What runs over gloo: window parallelism, guidance parallelism, Ulysses sequence parallelism (diffusers' real
all-to-all path, 2 ranks), ring sequence parallelism (3 ranks; PyTorch's CPU attention returns no log-sum-exp, so
the worker swaps diffusers' native attention op for a small one that does: a test shim, marked below), the
sharded NFEB statistics, the frame split and gather, and ``infer.py`` itself under ``torchrun`` (2 ranks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: master ports of the launches (distinct, so launches may run concurrently)
PORTS = {2: 29551, 3: 29552}

# --- in-process tests ----------------------------------------------------------------------------------------


def _grid(rank=0, world_size=1, ulysses=1, ring=1, device="cpu"):
    from flashportrait.parallel import ParallelGrid

    return ParallelGrid(rank, world_size, rank, ulysses, ring, torch.device(device), "gloo", None)


def test_plan_more_windows_than_groups():
    from flashportrait.parallel import WindowTask, plan_window_work

    work = plan_window_work(33, 2, 2)
    assert [len(w) for w in work] == [16, 17]  # the extra window goes to the last group
    assert [t.window for t in work[0] + work[1]] == list(range(33))  # contiguous, in order, each once
    assert all(t.branches is None for w in work for t in w)
    assert plan_window_work(4, 2, 3) == [[WindowTask(0)], [WindowTask(1)], [WindowTask(2), WindowTask(3)]]


def test_plan_fewer_windows_splits_guidance_branches():
    from flashportrait.parallel import WindowTask, plan_window_work

    assert plan_window_work(1, 2, 2) == [[WindowTask(0, (0,))], [WindowTask(0, (1,))]]
    # 2 windows x 2 branches over 3 groups: 1 + 1 + 2 passes; the last group gets window 1 whole
    assert plan_window_work(2, 2, 3) == [[WindowTask(0, (0,))], [WindowTask(0, (1,))], [WindowTask(1)]]
    assert plan_window_work(1, 3, 2) == [[WindowTask(0, (0,))], [WindowTask(0, (1, 2))]]
    # more groups than passes: the first groups idle; without a branch function windows stay whole
    assert plan_window_work(1, 2, 3) == [[], [WindowTask(0, (0,))], [WindowTask(0, (1,))]]
    assert plan_window_work(1, 2, 2, split_branches=False) == [[], [WindowTask(0)]]


def test_per_rank_line():
    from flashportrait.parallel import describe_work, plan_window_work

    assert describe_work(_grid(1, 2), plan_window_work(33, 2, 2), 33) == "rank 1/2: 17 of 33 windows per step"
    line = describe_work(_grid(1, 2), plan_window_work(1, 2, 2), 1, ("E", "P"))
    assert line == "rank 1/2: 1 of 1 windows per step (guidance branches window 0: P)"
    assert "idle" in describe_work(_grid(0, 3), plan_window_work(1, 2, 3), 1)
    line = describe_work(_grid(3, 4, ulysses=2), plan_window_work(5, 2, 2), 5)
    assert line == "rank 3/4: 3 of 5 windows per step, sequence group 1 = ranks 2-3 (ulysses 2 x ring 1)"


def test_degree_and_backend_errors():
    from flashportrait.parallel import check_degrees, check_window_split, enable_sequence_parallel, init_parallel

    with pytest.raises(ValueError, match="world size 6 does not divide .* = 4 ranks"):
        check_degrees(6, ulysses_degree=4)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        init_parallel(ulysses_degree=2, environ={})
    assert init_parallel(environ={}) is None  # one process: nothing to do
    if not torch.cuda.is_available():
        for environ in ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, {}):
            with pytest.raises(ValueError, match="nccl needs CUDA GPUs"):
                init_parallel(backend="nccl", environ=environ)
    with pytest.raises(ValueError, match="5 latent frames, fewer than the 8 ranks"):
        check_window_split(5, _grid(0, 8, ulysses=8))
    with pytest.raises(ValueError, match="split evenly over 4"):
        check_window_split(51, _grid(0, 4, ulysses=2, ring=2))
    check_window_split(51, _grid(0, 4, ulysses=4))  # uneven whole frames are fine for Ulysses alone

    from flashportrait.tiny import build_tiny_transformer

    transformer = build_tiny_transformer(0)  # 2 heads
    with pytest.raises(ValueError, match="--ulysses_degree 4 must divide the 2 attention heads"):
        enable_sequence_parallel(transformer, _grid(0, 4, ulysses=4))
    with pytest.raises(ValueError, match="--ring_degree > 1 needs an attention backend"):
        enable_sequence_parallel(transformer, _grid(0, 2, ring=2))
    assert transformer._parallel_config is None  # refused before anything was applied


def test_one_rank_velocity_equals_blended_velocity():
    from flashportrait.parallel import WindowParallelVelocity
    from flashportrait.sampling import blended_velocity
    from flashportrait.windows import context_windows

    def model(x, t, window):  # depends on the window and the values: a wrong slice or order changes the result
        return torch.sin(x * (window.start + 1)) + t / 1000

    latents = torch.randn(1, 4, 11, 2, 3, generator=torch.Generator().manual_seed(0))
    windows = context_windows(11, 5, 2)
    t = torch.tensor(700.0)
    for blend in (False, True):
        expected = blended_velocity(model, latents, t, windows, disable=True, blend=blend)
        got = WindowParallelVelocity(_grid(), verbose=False)(model, latents, t, windows, disable=True, blend=blend)
        assert torch.equal(got, expected)


# --- multi-process tests -------------------------------------------------------------------------------------


def _launch(world_size: int, folder: Path) -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node world_size`` on this file's worker (output into ``folder``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_port", str(PORTS[world_size]), str(Path(__file__).resolve()), str(folder)]
    # a session of its own: a hung launch is stopped with all its ranks (os.killpg), nothing else
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Both launches (2 and 3 ranks) started at once, so they share the machine instead of queueing."""
    started = {}
    for world_size in PORTS:
        folder = tmp_path_factory.mktemp(f"parallel{world_size}")
        started[world_size] = (_launch(world_size, folder), folder)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def launched(request, launches):
    """The finished launch on ``world_size`` ranks: ``(world_size, [rank results], stdout, folder)``."""
    world_size = request.param
    process, folder = launches[world_size]
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stdout[-3000:] + stderr[-6000:]
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world_size)]
    (folder / "stderr.txt").write_text(stderr)
    return world_size, ranks, stdout, folder


def test_window_parallel_equals_single_process_bit_for_bit(launched):
    """More windows than ranks: every window is the same transformer call as in one process, and every rank blends
    the same float32 velocities in the same order, so the latents are identical to the last bit, on every rank."""
    world_size, ranks, stdout, _ = launched
    for r in ranks:
        case = r["windows"]
        assert case["num_windows"] > world_size
        assert case["equal"], f"rank {r['rank']}: max difference {case['max_diff']}"
        assert case["same_on_all_ranks"]
    counts = {2: [1, 2], 3: [1, 1, 2]}[world_size]  # 3 (4) windows, the extra ones on the last ranks
    for r, count in enumerate(counts):
        assert f"rank {r}/{world_size}: {count} of {sum(counts)} windows per step\n" in stdout


def test_guidance_parallel_equals_single_process(launched):
    """Fewer windows than ranks: the guidance branches of a window run on different ranks, each as a batch of one.
    With ``batch_guidance=False`` (every branch a batch of one in both runs) that equals the single process bit for
    bit; with the default (branches batched in one process, whole windows batched on a rank) it may differ by float
    rounding only: the batch size changes the GEMM shapes."""
    world_size, ranks, stdout, _ = launched
    for r in ranks:
        case = r["guidance"]
        assert case["num_windows"] < world_size
        assert case["equal_sequential"], f"rank {r['rank']}: {case['max_diff_sequential']}"
        assert case["max_diff_batched"] <= 1e-5 * case["scale"], case
        assert case["same_on_all_ranks"]
    expected = {2: ["rank 0/2: 1 of 1 windows per step (guidance branches window 0: U)",
                    "rank 1/2: 1 of 1 windows per step (guidance branches window 0: E, P)"],
                3: ["rank 0/3: 1 of 2 windows per step (guidance branches window 0: E)",
                    "rank 1/3: 1 of 2 windows per step (guidance branches window 0: P)",
                    "rank 2/3: 1 of 2 windows per step\n"]}[world_size]
    for line in expected:
        assert line in stdout


def test_sequence_parallel_equals_single_process(launched):
    """Diffusers' context parallelism inside each window (2 ranks: Ulysses; 3 ranks: ring with the test shim), the
    window's 5 latent frames split 3 + 2 or 2 + 2 + 1: equal to the single process within float rounding."""
    world_size, ranks, stdout, _ = launched
    for r in ranks:
        case = r["sequence"]
        assert case["mode"] == ("ulysses" if world_size == 2 else "ring")
        assert case["max_diff"] <= 1e-5 * case["scale"], case
        assert case["same_on_all_ranks"]
    degrees = "ulysses 2 x ring 1" if world_size == 2 else "ulysses 1 x ring 3"
    windows = {2: 3, 3: 4}[world_size]
    for r in range(world_size):  # one window group: every rank evaluates every window, on its share of the frames
        line = f"rank {r}/{world_size}: {windows} of {windows} windows per step, sequence group 0 = ranks 0-{world_size - 1}"
        assert f"{line} ({degrees})\n" in stdout


def test_sharded_nfeb_and_frame_split(launched):
    """The NFEB renormalisation of a sequence split into 2 (3) frame shards, statistics all-reduced, equals the
    unsharded one; the split gives each rank whole frames in order and the gather restores the sequence exactly."""
    world_size, ranks, _, _ = launched
    for r in ranks:
        nfeb = r["nfeb"]
        assert nfeb["max_diff"] <= 1e-6 * nfeb["scale"], nfeb
        assert nfeb["max_diff_no_reduce"] > 1e-3 * nfeb["scale"]  # without the all-reduce the shard statistics differ
        split = r["frame_split"]
        assert split["frames"] == [list(f) for f in torch.arange(5).tensor_split(world_size)][r["rank"]]
        assert split["tokens_equal"] and split["rope_equal"] and split["expression_equal"] and split["gather_equal"]


def test_infer_under_torchrun_writes_one_file(launched):
    """``infer.py --tiny`` on 2 ranks (inside the 2-rank launch): rank 0 alone writes, exactly one file."""
    world_size, ranks, stdout, folder = launched
    if world_size != 2:
        pytest.skip("infer.py runs in the 2-rank launch only (time)")
    assert sorted(p.name for p in (folder / "infer_out").iterdir()) == ["out.mp4"]
    assert stdout.count("wrote ") == 1
    from flashportrait.video_io import probe_video

    assert probe_video(folder / "infer_out" / "out.mp4").num_frames == ranks[0]["infer"]["num_frames"]
    assert [r["infer"]["path"] is not None for r in ranks] == [True, False]
    log = (folder / "stderr.txt").read_text()
    # extracted (or loaded from the session cache) once, by rank 0
    assert log.count("expression features with") + log.count("expression features loaded from cache") == 1
    assert log.count("inputs checked") == world_size  # every rank checks its inputs before loading models


def test_rank0_errors_reach_every_rank(launched):
    """An error while rank 0 works alone (e.g. extracting the expressions) stops every rank with its message."""
    _, ranks, _, _ = launched
    assert ranks[0]["rank0_error"] == "ValueError: no face in frames 3-9"
    for r in ranks[1:]:
        assert r["rank0_error"] == "ValueError: on rank 0: ValueError: no face in frames 3-9"


# --- the worker (run by torchrun) ----------------------------------------------------------------------------


def _lse_attention_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """TEST SHIM: diffusers' native attention forward op, but also returning the log-sum-exp that ring attention
    merges by (PyTorch's CPU SDPA does not return it; on GPUs cuDNN / flash attention do). [B, S, H, D] layout."""
    q, k, v = (t.permute(0, 2, 1, 3).float() for t in (query, key, value))
    logits = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    lse = logits.logsumexp(-1)
    out = ((logits - lse[..., None]).exp() @ v).permute(0, 2, 1, 3).to(query.dtype)
    return (out, lse.permute(0, 2, 1)) if return_lse else out


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    import torch.distributed as dist

    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _worker(folder: Path) -> None:
    import torch.distributed as dist

    from flashportrait.demo import demo_reference_image
    from flashportrait.factory import tiny_pipeline
    from flashportrait.parallel import init_parallel

    torch.set_num_threads(1)
    grid = init_parallel()  # window parallelism over every rank (gloo: no GPU here)
    world_size, rank = grid.world_size, grid.rank
    results: dict = {"rank": rank}
    image = demo_reference_image()
    features = torch.randn(45, 554, generator=torch.Generator().manual_seed(0))
    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)

    def run(p, frames, parallel, **kwargs) -> torch.Tensor:
        return p(image, expression_features=features[:frames], num_inference_steps=2, context_size=5,
                 context_overlap=2, max_size=32, output_type="latent", generator=torch.Generator().manual_seed(0),
                 parallel=parallel, **kwargs).latents

    def diff(a, b) -> float:
        return (a - b).abs().max().item()

    # more windows than ranks: 33 frames -> 9 latent frames -> 3 windows; 45 -> 12 -> 4
    frames = {2: 33, 3: 45}[world_size]
    single = run(pipe, frames, None)
    par = run(pipe, frames, grid)
    results["windows"] = dict(num_windows={33: 3, 45: 4}[frames], equal=torch.equal(par, single),
                              max_diff=diff(par, single), same_on_all_ranks=_same_on_all_ranks(par))

    # fewer windows than ranks: guidance branches on different ranks. 2 ranks: 1 window, text guidance (U, E, P)
    # -> [U] | [E, P]; 3 ranks: 2 windows x (E, P) -> window 0 E | window 0 P | window 1 whole
    frames, kwargs = {2: (13, {"text_cfg_scale": 2.0}), 3: (25, {})}[world_size]
    batched = run(pipe, frames, None, **kwargs)
    sequential = run(pipe, frames, None, batch_guidance=False, **kwargs)
    par = run(pipe, frames, grid, **kwargs)
    par_sequential = run(pipe, frames, grid, batch_guidance=False, **kwargs)
    results["guidance"] = dict(num_windows={13: 1, 25: 2}[frames], equal_sequential=torch.equal(par_sequential, sequential),
                               max_diff_sequential=diff(par_sequential, sequential), max_diff_batched=diff(par, batched),
                               equal_batched=torch.equal(par, batched), scale=batched.abs().max().item(),
                               same_on_all_ranks=_same_on_all_ranks(par) and _same_on_all_ranks(par_sequential))

    # sequence parallelism inside each window: every rank in one sequence group (windows of 5 latent frames: split
    # 3 + 2 over 2 ranks, 2 + 2 + 1 over 3), against the single-process result above
    import diffusers.models.attention_dispatch as attention_dispatch

    from flashportrait.parallel import (
        _accelerator_count_at_least_one,
        context_parallel_config,
        enable_sequence_parallel,
    )

    sp_pipe = tiny_pipeline(0)
    sp_pipe.set_progress_bar_config(disable=True)
    if world_size == 2:
        mode, sp_grid = "ulysses", init_parallel(ulysses_degree=2)
        enable_sequence_parallel(sp_pipe.transformer, sp_grid)  # the shipped path, unchanged
    else:
        mode, sp_grid = "ring", init_parallel(ring_degree=3)
        attention_dispatch._native_attention_forward_op = _lse_attention_op  # TEST SHIM (see its docstring)
        with _accelerator_count_at_least_one():
            sp_pipe.transformer.enable_parallelism(config=context_parallel_config(sp_grid))
    par = run(sp_pipe, {2: 33, 3: 45}[world_size], sp_grid)
    results["sequence"] = dict(mode=mode, max_diff=diff(par, single), scale=single.abs().max().item(),
                               same_on_all_ranks=_same_on_all_ranks(par))

    # the NFEB statistics of a frame-sharded sequence (all-reduced) vs the unsharded block
    from flashportrait.models.transformer import context_parallel_sum, gather_latent_frames, renormalize_to_reference

    g = torch.Generator().manual_seed(1)
    num_frames, per_frame, channels = 5, 6, 8
    e = torch.randn(2, num_frames * per_frame, channels, generator=g) * 3 + 1
    x = torch.randn(2, num_frames * per_frame, channels, generator=g) * 0.5 - 2
    shard = torch.arange(num_frames).tensor_split(world_size)[rank]
    tokens = slice(int(shard[0]) * per_frame, (int(shard[-1]) + 1) * per_frame)
    reduce = context_parallel_sum(sp_pipe.transformer._parallel_config)
    full = renormalize_to_reference(e, x)
    sharded = renormalize_to_reference(e[:, tokens], x[:, tokens], chunk_tokens=4, reduce=reduce)
    alone = renormalize_to_reference(e[:, tokens], x[:, tokens])
    results["nfeb"] = dict(max_diff=diff(sharded, full[:, tokens]), max_diff_no_reduce=diff(alone, full[:, tokens]),
                           scale=full.abs().max().item())

    # the frame split (diffusers' split hook on frame_tokens) and the gather back
    h, w = 2, 3
    grid5 = torch.randn(1, 4, num_frames, h, w, generator=g)
    cos, sin = torch.randn(2, 1, num_frames, h * w, 1, 6, generator=g)
    expression = torch.randn(1, num_frames, 7, 3, generator=g)
    local = sp_pipe.transformer.frame_tokens(grid5, cos, sin, expression)
    plain = sp_pipe.transformer.frame_tokens.__class__()(grid5, cos, sin, expression)  # no hook: the whole sequence
    token_range = slice(int(shard[0]) * h * w, (int(shard[-1]) + 1) * h * w)
    results["frame_split"] = dict(
        frames=shard.tolist(),
        tokens_equal=torch.equal(local[0], plain[0][:, token_range]),
        rope_equal=torch.equal(local[1], plain[1][:, token_range]) and torch.equal(local[2], plain[2][:, token_range]),
        expression_equal=torch.equal(local[3], expression[:, int(shard[0]) : int(shard[-1]) + 1]),
        gather_equal=torch.equal(plain[0], gather_latent_frames(
            local[0], num_frames, sp_pipe.transformer._parallel_config.context_parallel_config)),
    )

    # an error on rank 0 while it works alone reaches every rank (nobody waits forever)
    from flashportrait.parallel import run_on_main_rank

    def fail():
        raise ValueError("no face in frames 3-9")

    try:
        run_on_main_rank(fail, grid)
    except ValueError as exc:
        results["rank0_error"] = f"ValueError: {exc}"

    # infer.py under torchrun (last: it leaves the process group)
    if world_size == 2:
        sys.path.insert(0, str(REPO_ROOT))
        import infer

        out = folder / "infer_out"
        result = infer.main(infer.parse_args(["--tiny", "--output", str(out / "out.mp4"), "--num_inference_steps", "2",
                                              "--max_size", "32", "--max_frames", "21"]))
        results["infer"] = dict(path=result.path, num_frames=result.num_frames)
    else:
        dist.destroy_process_group()
    (folder / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
