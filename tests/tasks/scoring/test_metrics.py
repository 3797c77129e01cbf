import math

import pytest
import torch

from tasks.scoring.metrics import clip_metrics, cosine, directional_similarity


def test_cosine_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    assert cosine(a, b).tolist() == pytest.approx([1.0, 0.0, -1.0])


def test_directional_similarity_known_values():
    i0 = torch.tensor([[1.0, 0.0, 0.0]])
    i1 = torch.tensor([[1.0, 1.0, 0.0]])  # image moved along +y
    t0 = torch.tensor([[0.0, 0.0, 1.0]])
    t_same = torch.tensor([[0.0, 2.0, 1.0]])  # caption moved along +y: aligned
    t_orth = torch.tensor([[3.0, 0.0, 1.0]])  # caption moved along +x: orthogonal
    t_opp = torch.tensor([[0.0, -1.0, 1.0]])  # opposite
    assert directional_similarity(i0, i1, t0, t_same).item() == pytest.approx(1.0)
    assert directional_similarity(i0, i1, t0, t_orth).item() == pytest.approx(0.0)
    assert directional_similarity(i0, i1, t0, t_opp).item() == pytest.approx(-1.0)
    t45 = torch.tensor([[1.0, 1.0, 1.0]])  # caption moved along (+x, +y): 45 degrees
    assert directional_similarity(i0, i1, t0, t45).item() == pytest.approx(math.cos(math.pi / 4))


def test_clip_metrics_batch():
    i0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    i1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    m = clip_metrics(i0, i1, t0, t1)
    assert m["clip_sim_image"].tolist() == pytest.approx([1.0, 0.0])
    assert m["clip_sim_0"].tolist() == pytest.approx([1.0, 1.0])
    assert m["clip_sim_1"].tolist() == pytest.approx([0.0, 1.0])
    assert m["clip_sim_dir"][1].item() == pytest.approx(1.0)
