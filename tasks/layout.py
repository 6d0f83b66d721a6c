"""Where each stage's outputs lie, relative to the repo root. dvc.yaml names the same paths as outs;
tests/test_layout.py holds the two equal."""

CORPUS_DIR = "data/prepared/corpus"  # train/val/test.parquet (token streams), vocab.parquet, documents.parquet
NGRAM_DIR = "data/models/ngram"  # counts_<n>.parquet, model.arpa
LM_DIR = "data/models/lm"  # <name>/model.pt (weights + config), <name>/checkpoint.pt (resumable, persisted)
SCENES_DIR = "data/prepared/scenes"  # <split>/images/*.png, <split>/annotations.json (COCO)
DETECTOR_DIR = "data/models/detector"  # <name>/model.pt, checkpoint.pt (persisted), predictions_test.json
ONNX_DIR = "data/models/onnx"  # <name>.onnx, <name>.int8.onnx
METRICS_DIR = "data/metrics"  # <stage>.json, for `dvc metrics`
PLOTS_DIR = "data/plots"  # <stage>_*.csv, for `dvc plots`

IMAGES_DIR = "data/prepared/images"  # train/val/test.parquet: label, pixels (C*H*W uint8 bytes), source
FID_NET_DIR = "data/models/fid_net"  # model.pt, checkpoint.pt (persisted)
VAE_DIR = "data/models/vae"  # model.pt, checkpoint.pt (persisted), reconstructions.png
LATENTS_DIR = "data/cache/latents"  # <split>.npy (N, c, h, w) float32, memory-mapped; <split>.parquet index
DIFFUSION_DIR = "data/models/diffusion"  # <name>/model.pt, checkpoint.pt (persisted), samples.png
GUIDANCE_DIR = "data/models/guidance"  # classifier.pt, checkpoint.pt (persisted), <kind>_samples.png
CONTROLNET_DIR = "data/models/controlnet"  # model.pt, checkpoint.pt (persisted), samples.png, edges/<split>.npy
NFLOW_DIR = "data/models/nflow"  # <name>/model.pt, checkpoint.pt (persisted), samples.png

REPORT_DIR = "data/report"  # report.md and its PNG plots: every family in one page

SPLITS = ("train", "val", "test")
