"""Training FlashPortrait (SPEC.md section 7): data, buckets, the objective, the trainable set, one step.

* :mod:`.data`: the authors' clip-folder layout, path lists, clip sampling, :class:`~.data.PortraitClipDataset`;
* :mod:`.buckets`: resolution buckets and :class:`~.buckets.BucketBatchSampler`;
* :mod:`.losses`: shifted uniform timesteps, the mask-weighted flow-matching loss, the motion term;
* :mod:`.trainable`: the trainable set and the one module DeepSpeed wraps;
* :mod:`.step`: frozen encoders and one training step;
* :mod:`.components`: loading the models of a run; :mod:`.checkpointing`: checkpoint folders;
* :mod:`.face_masks`: MediaPipe FaceMesh face / lip masks (data preparation);
* :mod:`.args`, :mod:`.flags`: ``train_portrait.py``'s flag policy and the authors' flags we refuse.

``train_portrait.py`` runs it under ``accelerate launch``; ``bin_convert_pt.py`` converts its checkpoints;
``python -m flashportrait.tools.prepare_data`` writes the data.
"""
