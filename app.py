"""FlashPortrait web demo: drop a portrait and a driving video into a page, watch the progress, get a video.

    python app.py --wan_model_name checkpoints/Wan2.1-I2V-14B-720P \
        --transformer_path checkpoints/FlashPortrait/transformer.pt \
        --portrait_encoder_path checkpoints/FlashPortrait/portrait_encoder.pt \
        --pd_fpg_model_path checkpoints/FlashPortrait/pd_fpg.pth          # then open http://127.0.0.1:7860

    python app.py --tiny              # random tiny models: the page and the whole job on a CPU

A thin page (Gradio Blocks) over the same pipeline as ``infer.py``, with the same model, sampling and hardware
flags; the events are :class:`flashportrait.app_logic.DemoApp`'s. The models are loaded once at start; one job
runs at a time (Gradio's queue, concurrency 1); uploads are deleted after each run; results go to
``--save_path`` (default ``outputs/``) with their settings as JSON beside them.
"""

import argparse
import atexit
import gc
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from flashportrait import args as flag_groups
from flashportrait.args import resolve_settings

#: page element ids (the browser test finds the page's parts by them)
ELEM_IDS = ("reference", "driving", "prompt", "preview-button", "generate", "cancel", "preview-strip", "preview-info",
            "status", "result", "downloads")


def fast_call_kwargs(args) -> dict:
    """Pipeline keyword arguments of the accelerated sampler for ``--fast``: ALP with its measured defaults
    (:class:`flashportrait.alp.ALPConfig`, 6 of 30 model evaluations per window; see ``fast_infer.py``)."""
    from flashportrait.alp import ALPConfig

    return {"alp": ALPConfig()}


def check_start_inputs(args) -> None:
    """``--reference_image`` / ``--driving_video`` (the page's first values) must open, before models load."""
    if args.output is not None:
        raise ValueError("--output names one file; app.py writes one file per run into --save_path (default outputs/)")
    if args.reference_image is not None:
        from flashportrait.reference_image import load_reference_image

        load_reference_image(args.reference_image)
    if args.driving_video is not None:
        from flashportrait.video_io import probe_video

        probe_video(args.driving_video)


def example_pairs(cache_dir: Path) -> list[list[str]]:
    """The bundled demo pair (as ``--tiny`` makes it) and the authors' cases found under ``examples/``."""
    from flashportrait.demo import write_demo_inputs

    pairs = [[str(p) for p in write_demo_inputs(cache_dir / "demo")]]
    for case in sorted(Path(__file__).resolve().parent.glob("examples/case-*")):
        reference, driving = case / "reference.png", case / "driven_video.mp4"
        if reference.is_file() and driving.is_file():
            pairs.append([str(reference), str(driving)])
    return pairs


def serve_copies(paths: list[str], folder) -> list[str]:
    """Copies of ``paths`` in a new random folder inside ``folder`` (Gradio's temporary folder), which the page
    serves as they are (Gradio would otherwise make the same copy itself, and only from the working or temporary
    folder): ``outputs/`` is never served, so nobody fetches another user's results by their names."""
    if not paths:
        return []
    target = Path(tempfile.mkdtemp(prefix="result-", dir=folder))
    return [str(shutil.copy2(path, target / Path(path).name)) for path in paths]


def build_page(app, examples: list[list[str]], initial_image=None, initial_video=None, tiny: bool = False):
    """The Gradio Blocks page over ``app`` (a :class:`~flashportrait.app_logic.DemoApp`).

    (No ``from __future__ import annotations`` in this file: Gradio finds the ``gr.Request`` parameters of the
    event functions by their evaluated annotations.)"""
    import gradio as gr

    from flashportrait.app_logic import AppLimits
    from flashportrait.sampling import SAMPLERS

    defaults = app.default_settings()
    limits: AppLimits = app.limits
    with gr.Blocks(title="FlashPortrait", delete_cache=(3600, 3600)) as page:
        gr.Markdown("# FlashPortrait\nAnimate a portrait with a driving video: the person in the photo performs the "
                    "video's head pose, eyes, expression and mouth, for as long as the video lasts, with its audio. "
                    "One job runs at a time; your uploads are deleted from the server after each run.")
        if tiny:
            gr.Markdown("**Tiny random-weight models (`--tiny`)**: the result is noise-like; this checks the "
                        "installation end to end.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Reference portrait", type="filepath", sources=["upload"], value=initial_image,
                                 elem_id="reference", height=240)
                video = gr.Video(label="Driving video", sources=["upload"], value=initial_video, elem_id="driving",
                                 height=240)
                prompt = gr.Textbox(label="Prompt", value=defaults.prompt, elem_id="prompt")
                with gr.Accordion("Advanced", open=False):
                    steps = gr.Slider(1, 100, value=defaults.num_inference_steps, step=1, label="Sampling steps")
                    window = gr.Slider(1, 81, value=defaults.context_size, step=1,
                                       label="Window length (latent frames; 1 latent frame = 4 video frames)")
                    overlap = gr.Slider(0, 80, value=defaults.context_overlap, step=1,
                                        label="Window overlap (latent frames)")
                    emo_cfg = gr.Slider(0, 10, value=defaults.emo_cfg_scale, step=0.5, label="Expression guidance")
                    text_cfg = gr.Slider(0, 10, value=defaults.text_cfg_scale, step=0.5,
                                         label="Text guidance (1 = off, one model pass fewer)")
                    seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
                    max_size = gr.Slider(16, limits.max_size, value=defaults.max_size, step=16,
                                         label="Max size (longer output side, pixels)")
                    sampler = gr.Dropdown(list(SAMPLERS), value=defaults.sampler, label="Sampler")
                with gr.Row():
                    preview_button = gr.Button("Preview", elem_id="preview-button")
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                gr.Examples(examples=examples, inputs=[image, video], label="Examples (click to use)")
            with gr.Column():
                status = gr.Markdown("Upload a reference portrait and a driving video (or click an example).",
                                     elem_id="status")
                strip = gr.Image(label="What the model sees: aligned driving faces", interactive=False,
                                 elem_id="preview-strip", height=110)
                info = gr.Markdown(elem_id="preview-info")
                result = gr.Video(label="Result", interactive=False, elem_id="result", buttons=["download"], height=360)
                files = gr.File(label="Download (video + settings JSON)", file_count="multiple", interactive=False,
                                elem_id="downloads")

        advanced = [prompt, steps, window, overlap, emo_cfg, text_cfg, seed, max_size, sampler]

        def on_preview(image_path, video_path, prompt_text, steps_value, window_value, overlap_value, emo_value,
                       text_value, seed_value, size_value, sampler_name, progress=gr.Progress()):
            if not image_path and not video_path:  # cleared (after a run, or by the user): keep what is shown
                return gr.update(), gr.update(), gr.update()
            return app.on_preview(image_path, video_path, prompt_text, steps_value, window_value, overlap_value,
                                  emo_value, text_value, seed_value, size_value, sampler_name, progress=progress)

        def on_begin(request: gr.Request):
            return app.on_begin(request.session_hash), gr.update(interactive=False)

        def on_generate(image_path, video_path, prompt_text, steps_value, window_value, overlap_value, emo_value,
                        text_value, seed_value, size_value, sampler_name, request: gr.Request,
                        progress=gr.Progress()):
            out, downloads, message = app.on_generate(
                image_path, video_path, prompt_text, steps_value, window_value, overlap_value, emo_value, text_value,
                seed_value, size_value, sampler_name, session=request.session_hash, progress=progress)
            # uploads deleted after the run are cleared from the page too
            gone = [None if path and not os.path.exists(path) else gr.update() for path in (image_path, video_path)]
            served = serve_copies(downloads, app.upload_root)
            return (served[0] if served else None), served, message, *gone

        def on_cancel(request: gr.Request):
            return app.on_cancel(request.session_hash)

        preview_inputs = [image, video, *advanced]
        preview_outputs = [strip, info, status]
        for trigger in (image.change, video.change, preview_button.click):
            trigger(on_preview, preview_inputs, preview_outputs, concurrency_id="gpu", concurrency_limit=1,
                    show_progress_on=[strip])
        run = generate.click(on_begin, None, [status, generate], queue=False).then(
            on_generate, preview_inputs, [result, files, status, image, video], concurrency_id="gpu",
            concurrency_limit=1, show_progress_on=[result],
        )
        run.then(lambda: gr.update(interactive=True), None, generate, queue=False)
        # a failure outside the events' own error handling (the page's side) still gives the button back
        run.failure(lambda: (gr.update(interactive=True), "**Error:** the page could not show the result (details in "
                             "the server log)."), None, [generate, status], queue=False)
        cancel.click(on_cancel, None, status, queue=False)
    return page


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = resolve_settings(args)
    check_start_inputs(args)
    call_kwargs = fast_call_kwargs(args) if args.fast else {}
    if not args.share and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("app").warning("serving on %s: anyone who reaches this address can use the page", args.host)

    # Gradio's uploads and served files go to a folder of this process, removed at exit (unless GRADIO_TEMP_DIR
    # is set); set before Gradio is imported, which reads it then
    if not os.environ.get("GRADIO_TEMP_DIR"):
        upload_root = tempfile.mkdtemp(prefix="flashportrait-app-")
        os.environ["GRADIO_TEMP_DIR"] = upload_root
        atexit.register(shutil.rmtree, upload_root, ignore_errors=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    upload_root = os.environ["GRADIO_TEMP_DIR"]
    Path(upload_root).mkdir(parents=True, exist_ok=True)

    # models, once
    from flashportrait.app_logic import AppLimits, DemoApp
    from flashportrait.config import MAX_RELEASED_SIZE
    from flashportrait.factory import pipeline_from_checkpoints, tiny_pipeline
    from flashportrait.memory import configure_memory

    if args.tiny:
        pipe = tiny_pipeline(args.seed, sampler=args.sampler, shift=args.shift, dtype=settings.dtype)
        model = "tiny (random weights)"
    else:
        pipe = pipeline_from_checkpoints(args.wan_model_name, args.transformer_path, args.portrait_encoder_path,
                                         args.pd_fpg_model_path, sampler=args.sampler, shift=args.shift,
                                         dtype=settings.dtype)
        model = {k: str(getattr(args, k)) for k in ("wan_model_name", "transformer_path", "portrait_encoder_path",
                                                     "pd_fpg_model_path")}
    configure_memory(pipe, args.GPU_memory_mode, settings.device, compute_dtype=settings.dtype)

    limits = AppLimits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_frames=args.max_frames,
        max_size=max(MAX_RELEASED_SIZE, settings.max_size) if args.allow_large_size else MAX_RELEASED_SIZE,
    )
    outputs = Path(args.save_path).expanduser()
    app = DemoApp(pipe, args, outputs_dir=outputs, limits=limits, upload_root=upload_root,
                  model_description=model, call_kwargs=call_kwargs)
    examples = example_pairs(settings.cache_dir)
    page = build_page(app, examples, args.reference_image, args.driving_video, tiny=args.tiny)
    # exactly these files may be served besides Gradio's own temporary folder (results are served as copies)
    allowed = sorted({str(Path(p).resolve()) for p in [*sum(examples, []), args.reference_image, args.driving_video]
                      if p})
    # the models, the page and the imported libraries live as long as the server: keep them out of the garbage
    # collector's scans (shorter pauses while serving; interpreter exit does not walk them either)
    gc.collect()
    gc.freeze()
    try:
        page.queue(default_concurrency_limit=1, max_size=args.max_queue).launch(
            server_name=args.host, server_port=args.port, share=args.share, max_file_size=limits.max_upload_bytes,
            allowed_paths=allowed, ssr_mode=False, show_error=False, run_history=False,
        )
    finally:  # Ctrl-C / SIGTERM: stop the server and the queue now, not at interpreter exit
        page.close(verbose=False)


def make_app_parser() -> argparse.ArgumentParser:
    """``infer.py``'s input, checkpoint, sampling and hardware flags (:mod:`flashportrait.args`), plus the
    server's. (No parallel flags: the page runs in one process.)"""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    flag_groups.add_input_args(parser)
    flag_groups.add_checkpoint_args(parser)
    flag_groups.add_sampling_args(parser)
    flag_groups.add_hardware_args(parser)
    parser.set_defaults(save_path="outputs")
    g = parser.add_argument_group("web demo")
    g.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network interface)")
    g.add_argument("--port", type=flag_groups.int_at_least(1), default=7860)
    g.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    g.add_argument("--fast", action="store_true", help="sample with the accelerated sampler (flashportrait.alp)")
    g.add_argument("--max_upload_mb", type=flag_groups.float_at_least(0, strict=True), default=200.0,
                   help="largest accepted upload, in MB")
    g.add_argument("--max_queue", type=flag_groups.int_at_least(1), default=20,
                   help="jobs that may wait for their turn; more are refused with 'queue full'")
    add_alp_args = getattr(flag_groups, "add_alp_args", None)
    if add_alp_args is not None:
        add_alp_args(parser)
    return parser


def parse_args(argv=None):
    return make_app_parser().parse_args(argv)


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
