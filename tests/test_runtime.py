"""Process set-up of compute steps (pipeline.runtime)."""

import torch

from pipeline.runtime import configure_torch


def test_configure_torch_is_deterministic_without_nan_filling():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        assert configure_torch(1) == 1
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        # deterministic mode would otherwise NaN-fill every new tensor: an extra pass per allocation
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill
