"""Generated data, anomalib training and the built-in demo: what runs without any user file.

- data.py: a generated MVTec-layout inspection data set (images and masks);
- training.py: real anomalib PatchCore training on a folder data set, offline;
- synthetic_model.py: a fitted-looking PatchCore model from random parts, for benchmarks without a checkpoint;
- pipeline.py: the demo, every stage end to end.
"""
