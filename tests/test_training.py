"""Training pieces without a launcher: the loss, the random draws, the trainable set, masks on the latent grid,
clip sampling and path lists, buckets, the dataset, checkpoint folders. About 10 s."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from flashportrait.training.buckets import BucketBatchSampler, parse_resolution
from flashportrait.training.losses import (
    choose_mask_weighting,
    flow_matching_loss,
    masks_to_latent_grid,
    sample_sigmas,
    shift_sigmas,
)

# --- the objective ---------------------------------------------------------------------------------------------


def _loss_inputs():
    # [B=1, C=1, F=2, h=1, w=2]: latent frame 0 = (pred 1, 2 | target 0, 2), frame 1 = (3, 5 | 1, 1)
    pred = torch.tensor([1.0, 2.0, 3.0, 5.0]).view(1, 1, 2, 1, 2)
    target = torch.tensor([0.0, 2.0, 1.0, 1.0]).view(1, 1, 2, 1, 2)
    face = torch.tensor([1.0, 0.0, 1.0, 0.5]).view(1, 1, 2, 1, 2)
    lip = torch.tensor([0.0, 0.0, 0.5, 1.0]).view(1, 1, 2, 1, 2)
    return pred, target, face, lip


@pytest.mark.parametrize(
    ("weighting", "main"),
    [
        ("all", (1 * 2 + 0 + 4 * 2.5 + 16 * 2.5) / 4),  # e = (1, 0, 4, 16) times 1 + face + lip
        ("face", (1 * 1 + 0 + 4 * 1 + 16 * 0.5) / 4),
        ("lip", (0 + 0 + 4 * 0.5 + 16 * 1) / 4),
    ],
)
def test_loss_equals_hand_computed_value(weighting, main):
    pred, target, face, lip = _loss_inputs()
    # motion: d pred = (2, 3), d target = (1, -1) -> squared differences (1, 16), mean 8.5
    out = flow_matching_loss(pred, target, face, lip, weighting, motion_ratio=0.25)
    assert out["loss_main"].item() == pytest.approx(main)
    assert out["loss_motion"].item() == pytest.approx(8.5)
    assert out["loss"].item() == pytest.approx(0.75 * main + 0.25 * 8.5)
    assert out["mse"].item() == pytest.approx(21 / 4)
    without = flow_matching_loss(pred, target, face, lip, weighting, motion_ratio=None)
    assert without["loss"].item() == pytest.approx(main) and without["loss_motion"].item() == 0


def test_loss_weighting_draw_follows_the_generator_and_the_released_probabilities():
    for seed in range(20):
        r = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        expected = "all" if r < 0.5 else "face" if r < 0.7 else "lip"
        assert choose_mask_weighting(torch.Generator().manual_seed(seed)) == expected
    g = torch.Generator().manual_seed(0)
    draws = [choose_mask_weighting(g) for _ in range(4000)]
    for name, p in (("all", 0.5), ("face", 0.2), ("lip", 0.3)):
        assert draws.count(name) / len(draws) == pytest.approx(p, abs=0.03)


def test_sigmas_are_uniform_training_steps_with_shift():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sigmas = sample_sigmas(64, g1, shift=5.0, num_train_timesteps=1000)
    index = torch.randint(0, 1000, (64,), generator=g2)
    u = (index.double() + 1) / 1000
    assert torch.allclose(sigmas, (5 * u / (1 + 4 * u)).float())
    assert shift_sigmas(torch.tensor(1.0), 5.0) == 1.0 and shift_sigmas(torch.tensor(0.5), 5.0) == pytest.approx(5 / 6)
    # --uniform_sampling: rank k of K draws only from its part of the index range
    for k in range(4):
        s = sample_sigmas(200, torch.Generator().manual_seed(k), shift=1.0, num_train_timesteps=1000, stratum=(k, 4))
        assert s.min() > k / 4 and s.max() <= (k + 1) / 4


def test_masks_to_latent_grid_is_the_covered_fraction():
    masks = torch.zeros(1, 9, 16, 16)  # 9 frames -> 3 latent frames of 2 x 2
    masks[0, 0, :8, :8] = 1  # frame 0: top-left cell full
    masks[0, 1:5, :4, 8:] = 1  # frames 1-4: top-right cell half covered
    masks[0, 5, 8:, 8:] = 1  # frame 5 only of frames 5-8: bottom-right cell, a quarter of the time
    grid = masks_to_latent_grid(masks, 3)
    assert grid.shape == (1, 1, 3, 2, 2)
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 0], expected[1, 0, 1], expected[2, 1, 1] = 1.0, 0.5, 0.25
    assert torch.allclose(grid[0, 0], expected)
    assert torch.allclose(masks_to_latent_grid((masks * 255).to(torch.uint8), 3), grid)
    with pytest.raises(ValueError, match="latent frames"):
        masks_to_latent_grid(masks, 2)


# --- the trainable set -------------------------------------------------------------------------------------------


def _tiny_pair():
    from flashportrait.tiny import build_tiny_portrait_encoder, build_tiny_transformer

    return build_tiny_transformer(0), build_tiny_portrait_encoder(0)


def test_trainable_set_is_the_attention_parameters_in_blocks_plus_the_portrait_encoder():
    from flashportrait.checkpoints import convert_transformer_state_dict_to_original
    from flashportrait.training.trainable import select_trainable

    transformer, encoder = _tiny_pair()
    names = select_trainable(transformer, encoder)
    trained = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert {"transformer." + n for n in trained} | {"portrait_encoder." + n for n, _ in encoder.named_parameters()} \
        == set(names)
    assert all(p.requires_grad for p in encoder.parameters())
    # in the released file's naming: exactly the blocks' self_attn.* and cross_attn.* tensors
    original = convert_transformer_state_dict_to_original({n: n for n, _ in transformer.named_parameters()})
    attention = {ours for theirs, ours in original.items() if re.match(r"^blocks\.\d+\.(self_attn|cross_attn)\.", theirs)}
    assert trained == attention
    per_block = {re.sub(r"^blocks\.\d+\.", "", n) for n in trained}
    assert per_block == {
        *(f"attn{i}.{m}.{p}" for i in (1, 2) for m in ("to_q", "to_k", "to_v", "to_out.0") for p in ("weight", "bias")),
        "attn1.norm_q.weight", "attn1.norm_k.weight", "attn2.norm_q.weight", "attn2.norm_k.weight",
        "attn2.add_k_proj.weight", "attn2.add_k_proj.bias", "attn2.add_v_proj.weight", "attn2.add_v_proj.bias",
        "attn2.norm_added_k.weight", "attn2.emo_k_proj.weight", "attn2.emo_v_proj.weight",
    }
    frozen = {n for n, p in transformer.named_parameters() if not p.requires_grad}
    for name in ("patch_embedding.weight", "blocks.0.ffn.net.0.proj.weight", "blocks.0.norm2.weight",
                 "blocks.0.scale_shift_table", "proj_out.weight", "condition_embedder.time_proj.weight"):
        assert name in frozen


def test_dropped_expression_tokens_give_finite_gradients_and_ignore_the_features():
    """Condition dropout zeroes a sample's tokens: the NFEB then renormalises a constant tensor (std 0); the
    gradients must stay finite, and the output must not depend on that sample's features."""
    from flashportrait.training.trainable import FlashPortraitTrainModel, select_trainable

    transformer, encoder = _tiny_pair()
    select_trainable(transformer, encoder)
    model = FlashPortraitTrainModel(transformer, encoder).train()
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 20, 2, 4, 4, generator=g)
    text, image = torch.randn(2, 5, 32, generator=g), torch.randn(2, 257, 160, generator=g)
    features = torch.randn(2, 5, 554, generator=g)
    keep = torch.tensor([1.0, 0.0])
    out = model(x, cond, torch.tensor([500.0, 250.0]), text, image, features, keep)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    again = model(x, cond, torch.tensor([500.0, 250.0]), text, image, features + 1.0, keep)
    assert torch.equal(out[1], again[1])  # dropped: the features do not matter
    assert not torch.equal(out[0], again[0])  # kept: they do


# --- clips, path lists, buckets --------------------------------------------------------------------------------


def test_sample_frame_indices_and_short_clips():
    from flashportrait.training.data import clip_span, sample_frame_indices

    assert clip_span(81, 2) == 161
    starts = set()
    for seed in range(200):
        idx = sample_frame_indices(20, 5, 3, np.random.default_rng(seed))
        assert np.array_equal(np.diff(idx), [3, 3, 3, 3]) and idx[0] >= 0 and idx[-1] <= 19
        starts.add(int(idx[0]))
    assert starts == set(range(8))  # every start where 13 frames fit
    with pytest.raises(ValueError, match="shorter"):
        sample_frame_indices(12, 5, 3, np.random.default_rng(0))


def _write_clip(folder, frames, size=(24, 16), masks=True, expression=False):
    for sub in ("images", "face_masks", "lip_masks") if masks else ("images",):
        (folder / sub).mkdir(parents=True)
        for i in range(frames):
            value = np.full((size[1], size[0]) + (() if sub != "images" else (3,)), (i * 10) % 256, np.uint8)
            Image.fromarray(value).save(folder / sub / f"frame_{i}.png")
    if expression:
        from flashportrait.expression import ExpressionFeatures

        ExpressionFeatures(features=torch.arange(frames * 554, dtype=torch.float32).view(frames, 554), fps=25.0,
                           frame_indices=torch.arange(frames), landmarks=torch.zeros(frames, 5, 2),
                           detected=torch.ones(frames, dtype=torch.bool)).save(folder / "expression.pt")


def test_path_lists_and_scan_counts_what_it_skips(tmp_path):
    from flashportrait.training.data import read_path_list, scan_clips

    root = tmp_path / "data"
    _write_clip(root / "square/speech/ok", 9, expression=True)
    _write_clip(root / "square/singing/short", 4, expression=True)
    _write_clip(root / "square/speech/nomasks", 9, masks=False)
    _write_clip(root / "rec/dancing/noexpr", 9)
    _write_clip(root / "rec/other/unknown", 9, expression=True)
    (root / "video_square_path.txt").write_text(
        "# clips\nsquare/speech/ok\n\nsquare/singing/short\nsquare/speech/nomasks\nsquare/speech/missing\n")
    (root / "video_rec_path.txt").write_text(f"{root / 'rec/dancing/noexpr'}\nrec/other/unknown\n")
    assert read_path_list(root / "video_square_path.txt")[0] == root / "square/speech/ok"
    lists = {"square": root / "video_square_path.txt", "rec": root / "video_rec_path.txt"}
    records, report = scan_clips(lists, 5, 2, require_expression=True)
    assert [(r.path.name, r.bucket, r.category, r.num_frames) for r in records] == [
        ("ok", "square", "speech", 9), ("unknown", "rec", "other", 9)]
    assert report.listed == 6
    assert report.counts == {"shorter than 9 frames": 1, "without masks": 1, "missing folder": 1,
                             "without expression.pt": 1, "with an unknown category (default prompt)": 1}
    records, _ = scan_clips(lists, 5, 1, require_expression=False, max_clips=2)
    assert [r.path.name for r in records] == ["ok", "noexpr"]
    with pytest.raises(ValueError, match="4k \\+ 1"):
        scan_clips(lists, 6, 1, require_expression=False)


def test_dataset_item(tmp_path):
    from flashportrait.config import TRAIN_PROMPTS
    from flashportrait.training.data import (
        PortraitClipDataset,
        collate_clips,
        prompt_index,
        scan_clips,
        training_prompts,
    )

    _write_clip(tmp_path / "rec/singing/a", 12, expression=True)
    (tmp_path / "list.txt").write_text("rec/singing/a\n")
    records, _ = scan_clips({"rec": tmp_path / "list.txt"}, 5, 2, require_expression=True)
    dataset = PortraitClipDataset(records, {"rec": (32, 48)}, 5, 2, seed=1)
    item = dataset[(0, 3)]
    frames = dataset.frame_indices(0, 3)
    assert np.array_equal(item["frames"].numpy(), frames) and np.array_equal(np.diff(frames), [2] * 4)
    assert item["pixels"].shape == (3, 5, 32, 48) and item["pixels"].dtype == torch.uint8
    assert item["face_masks"].shape == (5, 32, 48) and item["lip_masks"].shape == (5, 32, 48)
    assert torch.equal(item["pixels"][0, :, 0, 0], torch.tensor([(f * 10) % 256 for f in frames], dtype=torch.uint8))
    assert torch.equal(item["features"][:, 0], torch.tensor(frames * 554, dtype=torch.float32))  # cached rows
    assert training_prompts()[item["prompt_index"]] == TRAIN_PROMPTS["singing"]
    assert prompt_index("no-such-category") == training_prompts().index("The protagonist is talking")
    assert torch.equal(dataset[(0, 3)]["frames"], item["frames"])  # a key always gives the same sample
    assert any(not np.array_equal(dataset.frame_indices(0, e), frames) for e in range(10))
    batch = collate_clips([item, dataset[(0, 4)]])
    assert batch["pixels"].shape == (2, 3, 5, 32, 48) and batch["prompt_index"].tolist() == [item["prompt_index"]] * 2


def test_bucket_batches_are_homogeneous_complete_and_seeded():
    from accelerate.data_loader import BatchSamplerShard

    buckets = ["square", "rec", "square", "vec", "square", "rec", "square", "square"]
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=5)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 3 + 1 + 1  # square 5 -> 3 batches, rec 2 -> 1, vec 1 -> 1
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    assert sampler.batches(0) == BucketBatchSampler(buckets, 2, seed=5).batches(0)
    assert any(sampler.batches(e) != batches for e in range(1, 5))
    sampler.set_epoch(2)
    assert list(sampler) == [[(i, 2) for i in b] for b in sampler.batches(2)]
    # accelerate's sharding over 2 processes hands out whole batches: still one bucket each
    for rank in range(2):
        for batch in BatchSamplerShard(sampler, num_processes=2, process_index=rank):
            assert len({buckets[i] for i, _ in batch}) == 1
    with pytest.raises(ValueError, match="unknown bucket"):
        BucketBatchSampler(["wide"], 1)
    assert parse_resolution("480x832") == (480, 832)
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_resolution("480x830")


# --- checkpoint folders ----------------------------------------------------------------------------------------


def test_resume_resolution_and_total_limit(tmp_path):
    from flashportrait.training.checkpointing import (
        list_checkpoints,
        prune_checkpoints,
        resolve_resume,
        write_train_info,
    )

    assert resolve_resume("latest", tmp_path) is None and resolve_resume(None, tmp_path) is None
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_train_info(tmp_path / f"checkpoint-{step}", {"global_step": step})
    (tmp_path / "checkpoint-12").mkdir()  # incomplete: no info file
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("checkpoint-4", tmp_path) == tmp_path / "checkpoint-4"
    assert resolve_resume(str(tmp_path / "checkpoint-2"), "elsewhere") == tmp_path / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume("checkpoint-12", tmp_path)
    assert prune_checkpoints(tmp_path, 2) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    assert json.loads((tmp_path / "checkpoint-10" / "flashportrait_train.json").read_text()) == {"global_step": 10}
