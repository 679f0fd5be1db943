"""`train.py preprocess`: clips and captions (or prompts) to FastVideo's parquet, with the pipeline's own
VAE and umT5 (configs.PreprocessRun).

- `inputs`: the caption and prompt files read into items (id, file, caption), the output folder's
  settings (`preprocess.json`), the split over ranks, and the checks run before any model loads
  (stdlib only, so `train.py preprocess --help` and a bad command line stay fast);
- `media`: a clip's frames decoded, resampled to the fps, resized and centre-cropped to [-1, 1] pixels;
- `run`: the encoders (VAE posterior mean, umT5 trimmed to its tokens), the rows, files of a bounded
  size written atomically, the resume, the report of skipped clips, and `bench/preprocess.py`'s hooks.
"""
