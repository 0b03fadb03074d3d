"""anomalib training and the built-in demo on generated data (synthetic_data.py): what runs without any user file.

- training.py: real anomalib PatchCore training on a folder data set, offline;
- synthetic_model.py: a fitted-looking PatchCore model from random parts, for benchmarks without a checkpoint;
- pipeline.py: the demo, every stage end to end.
"""
