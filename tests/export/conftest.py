"""Fixture: one tiny pruned model per architecture."""

from __future__ import annotations

import pytest
import torch
from export_models import MODELS, random_masks


@pytest.fixture(params=sorted(MODELS))
def pruned_model(request):
    """(name, model, masks at 80%, inputs [16, ...]) for each tiny architecture."""
    torch.manual_seed(0)
    factory, shape = MODELS[request.param]
    model = factory().eval()
    masks = random_masks(model, 0.8)
    return request.param, model, masks, torch.randn(16, *shape)
