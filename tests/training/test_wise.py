"""WiSE-FT weight interpolation of the stage-2 query encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from dashclip_core.training.stage2 import wise_interpolate


def test_interpolates_float_weights_and_keeps_integer_buffers():
    initial = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    trained = copy.deepcopy(initial)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    trained[1].num_batches_tracked.fill_(7)
    before = copy.deepcopy(trained.state_dict())
    wise_interpolate(trained, initial, 0.3)
    assert torch.allclose(trained[0].weight, 0.7 * initial[0].weight + 0.3 * before["0.weight"])
    assert torch.allclose(trained[0].weight, initial[0].weight + 0.3)
    assert int(trained[1].num_batches_tracked) == 7  # integer buffers are not averaged

    again = copy.deepcopy(before)
    model = copy.deepcopy(initial)
    model.load_state_dict(again)
    wise_interpolate(model, initial, 1.0)
    assert torch.equal(model[0].weight, before["0.weight"])
    wise_interpolate(model, initial, 0.0)
    assert torch.equal(model[0].weight, initial[0].weight)
    with pytest.raises(ValueError, match="stage2_wise_alpha"):
        wise_interpolate(model, initial, 1.5)
