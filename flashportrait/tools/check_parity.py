"""Check that our models reproduce reference tensors ("golden" fixtures).

    python -m flashportrait.tools.check_parity ../shared/reference/golden [--tolerance 1e-4]

For every ``manifest_*.json`` in the folder, every fixture it lists (``<name>_weights.safetensors`` +
``<name>_io.safetensors``) is loaded through the same public loaders a user's checkpoint goes through,
run, and compared output by output. One line per output: fixture, output, relative L2 error, PASS/FAIL.
Exits 1 if any output fails or any fixture cannot be run, 2 if the folder holds no manifest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

Triples = list[tuple[str, torch.Tensor, torch.Tensor]]
Runner = Callable[[Path, dict[str, torch.Tensor], dict], Triples]


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``||ours - reference|| / ||reference||`` in float64 (0 when both are zero).

    Raises:
        ValueError: the shapes differ.
    """
    if ours.shape != reference.shape:
        raise ValueError(f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}")
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    denom = reference.norm().item()
    diff = (ours - reference).norm().item()
    return diff / denom if denom > 0 else diff


@torch.no_grad()
def run_transformer(weights_path: Path, io: dict[str, torch.Tensor], manifest: dict) -> Triples:
    """FlashPortrait transformer at every expression scale stored as ``out_ip<scale>``."""
    from ..checkpoints.transformer import load_flashportrait_transformer

    model = load_flashportrait_transformer(
        weights_path, config=manifest["transformer_config_original_naming"], dtype=torch.float32
    )
    hidden_states = torch.cat([io["latents"], io["condition"]], dim=1)
    triples = []
    for name in sorted(io):
        match = re.fullmatch(r"out_ip([0-9.]+)", name)
        if not match:
            continue
        out = model(
            hidden_states,
            io["timestep"],
            io["text_embeds"],
            io["clip_embeds"],
            expression_tokens=io["expression_tokens"],
            expression_scale=float(match.group(1)),
        ).sample
        triples.append((name, out, io[name]))
    return triples


def _runners() -> dict[str, Runner]:
    from ._parity_models import run_pdfgc_motion_encoder, run_portrait_encoder
    from ._parity_wan import run_wan_clip, run_wan_t5, run_wan_vae

    return {
        "transformer": run_transformer,
        "portrait_encoder": run_portrait_encoder,
        "pdfgc_motion_encoder": run_pdfgc_motion_encoder,
        "wan_t5": run_wan_t5,
        "wan_clip": run_wan_clip,
        "wan_vae": run_wan_vae,
    }


def runner_for(fixture: str, runners: dict[str, Runner]) -> Runner:
    """The runner whose name is the longest prefix of ``fixture`` (``transformer_tiny`` -> transformer).

    Raises:
        KeyError: no runner fits.
    """
    fits = [name for name in runners if fixture == name or fixture.startswith(name + "_")]
    if not fits:
        raise KeyError(f"no parity runner for fixture '{fixture}' (known: {', '.join(sorted(runners))})")
    return runners[max(fits, key=len)]


def check_folder(folder: Path, tolerance: float = 1e-4, out=sys.stdout) -> tuple[int, int]:
    """Run every fixture of every manifest in ``folder``; print a line per output.

    Returns:
        (number of outputs checked, number of failures, counting a fixture that cannot run as one).
    """
    from safetensors.torch import load_file

    runners = _runners()
    checked = failed = 0
    manifests = sorted(folder.glob("manifest_*.json"))
    for manifest_path in manifests:
        manifest = json.loads(manifest_path.read_text())
        for fixture in manifest.get("fixtures", []):
            try:
                runner = runner_for(fixture, runners)
                io = load_file(str(folder / f"{fixture}_io.safetensors"))
                triples = runner(folder / f"{fixture}_weights.safetensors", io, manifest)
                if not triples:
                    raise RuntimeError("the runner produced no output to compare")
            except Exception as exc:  # noqa: BLE001 - one broken fixture must not hide the others
                failed += 1
                print(f"{fixture:<28} {'(all)':<26} {'-':>12}  FAIL  {type(exc).__name__}: {exc}", file=out)
                if "-v" in sys.argv:
                    traceback.print_exc()
                continue
            for name, ours, reference in triples:
                checked += 1
                try:
                    err = relative_l2(ours, reference)
                    ok = err <= tolerance
                    shown = f"{err:.3e}"
                except ValueError as exc:
                    ok, shown = False, str(exc)
                failed += not ok
                print(f"{fixture:<28} {name:<26} {shown:>12}  {'PASS' if ok else 'FAIL'}", file=out)
    return checked, failed


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    folder = Path(args.folder)
    if not folder.is_dir() or not list(folder.glob("manifest_*.json")):
        print(f"{folder}: no manifest_*.json here; point at a golden-fixture folder.", file=sys.stderr)
        return 2
    checked, failed = check_folder(folder, args.tolerance)
    print(f"{checked} outputs checked, {failed} failed (tolerance {args.tolerance:g} relative L2)")
    return 1 if failed else 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder with manifest_*.json and <fixture>_{weights,io}.safetensors")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="maximum relative L2 error (default 1e-4)")
    parser.add_argument("-v", action="store_true", help="print tracebacks of fixtures that cannot run")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
