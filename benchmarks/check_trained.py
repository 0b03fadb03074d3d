"""The CUDA backend on a trained anomalib checkpoint: train PatchCore (WRN50, CPU) on the generated inspection
data set, then compare every precision and search mode with the FP32 deploy model on its test images.

Usage: python benchmarks/check_trained.py WORKDIR OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from patchcore_trt.bench.matrix import reference_predictions
from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.compare import compare
from patchcore_trt.demo.training import TrainSettings, train_patchcore
from patchcore_trt.images import collect_images, load_batch
from patchcore_trt.runtime.cuda_backend import CudaBackend
from patchcore_trt.synthetic_data import make_synthetic_dataset


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    dataset = make_synthetic_dataset(work / "data", n_train=16, n_test_good=8, n_test_defect=8, size=(256, 256))
    checkpoint = train_patchcore(dataset, work / "train", TrainSettings(image_size=(256, 256)))
    spec = read_checkpoint(checkpoint)
    paths, _ = collect_images([str(dataset.root / "test")])
    images = load_batch(paths)  # float32 [N, 3, 256, 256]
    uint8 = np.round(images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    reference = reference_predictions(spec, uint8)
    rows = []
    for precision in ("fp32", "tf32", "fp16", "bf16"):
        for search in ("certified", "fp16"):
            with CudaBackend(checkpoint, backbone_dtype=precision, search=search) as backend:
                prediction = backend.predict(uint8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
                figures = compare(prediction, reference, threshold=backend.image_threshold)
            rows.append({"precision": precision, "search": search, "bank": spec.bank_size, **figures.__dict__})
            print(rows[-1], flush=True)
    out.write_text(json.dumps({"checkpoint": str(checkpoint), "images": len(paths), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
