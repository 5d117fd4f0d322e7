import pytest
import torch

from beit3 import Beit3Config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> Beit3Config:
    """A BEiT-3 small enough for a test: 2 layers, hidden 32, 32 px images of 16 patches, 100 text ids."""
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                  image_size=32, patch_size=8, max_position_embeddings=40)
    return Beit3Config(**{**fields, **overrides})
