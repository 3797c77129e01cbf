"""The one device resolver: auto, explicit devices, and a clear error naming the setting."""

import pytest
import torch

from tasks.common.devices import compute_dtype, torch_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_names_the_setting():
    assert torch_device("auto", "text.device").type == "cpu"
    with pytest.raises(ValueError, match=r"text\.device=cuda.*no CUDA device"):
        torch_device("cuda", "text.device")


def test_half_precision_applies_on_cuda_only():
    assert compute_dtype(torch.device("cpu"), "float16") == torch.float32
    assert compute_dtype(torch.device("cuda"), "bfloat16") == torch.bfloat16
