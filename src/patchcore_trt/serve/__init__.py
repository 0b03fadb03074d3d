"""Serving on Triton Inference Server: model repositories, the server launcher and the client.

- repository.py: an artifact (.engine, .onnx, .ckpt) -> REPO/NAME/config.pbtxt + REPO/NAME/1/..., each config
  checked by parsing it with Triton's own ModelConfig protobuf.
- python_model.py: the Triton Python backend model that runs a checkpoint with patchcore-trt's backends.
- server.py: finds a tritonserver binary, starts it on a repository, waits for it, stops it with its children.
- client.py: a Backend that sends images to a Triton server (tritonclient, HTTP or gRPC).
"""
