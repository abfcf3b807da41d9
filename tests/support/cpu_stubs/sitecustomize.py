"""Loaded (through PYTHONPATH) by the ZeRO-3 test's processes only. DeepSpeed's ZeRO-3 `zero_grad` calls
`record_stream` on gradients, a CUDA-stream call that CPU tensors refuse; on CPU there is no stream to record."""

import torch

_record_stream = torch.Tensor.record_stream


def record_stream(tensor, stream):
    if tensor.device.type != "cpu":
        _record_stream(tensor, stream)


torch.Tensor.record_stream = record_stream
