"""The CUDA fast path: FP16/BF16 fused backbone, tiled tensor-core nearest-neighbour search with FP32 re-rank.

``fast_model.FastPatchCore`` computes the deploy model's function (``model.PatchCoreDeploy`` is its
reference); ``runtime/cuda_backend.py`` wraps it in CUDA graphs behind the backend contract.
"""
