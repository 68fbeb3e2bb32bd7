"""The micro-benchmarks draw their inputs from torch's global generator: seeded alike for every implementation, so
bench.outputs can compare what they computed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def same_inputs_for_every_implementation() -> None:
    torch.manual_seed(0)
