import hashlib

import pytest
import torch

from tasks.render.sampling import (
    SampleParams,
    batch_generators,
    pair_generators,
    sample_params,
)
from tasks.render.seeds import sample_seeds


def test_sample_params_deterministic_and_in_range():
    for seed in (0, 1, 123, 2**32 - 1):
        a = sample_params(seed)
        assert a == sample_params(seed)
        assert isinstance(a, SampleParams) and a.seed == seed
        assert 7.5 <= a.cfg_scale <= 15.0
        assert 0.1 <= a.p2p_p <= 0.9
    assert sample_params(1) != sample_params(2)


def test_sample_params_matches_reference_draw_order():
    """The reference: torch.manual_seed(seed); p = rand(); cfg = rand() (CPU generator)."""
    seed = 987654
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        p = 0.1 + torch.rand(()).item() * (0.9 - 0.1)
        cfg = 7.5 + torch.rand(()).item() * (15 - 7.5)
    params = sample_params(seed)
    assert params.p2p_p == p and params.cfg_scale == cfg


def test_sample_params_custom_ranges():
    params = sample_params(5, cfg_range=(2.0, 2.0), p_range=(0.0, 0.0))
    assert params.cfg_scale == 2.0 and params.p2p_p == 0.0
    with pytest.raises(ValueError):
        sample_params(5, p_range=(0.9, 0.1))
    with pytest.raises(ValueError):
        sample_params(-1)


def test_sample_seeds_stable_32_bit():
    seeds = sample_seeds("0123456789abcdef", 50)
    assert len(seeds) == 50 and len(set(seeds)) == 50
    assert all(0 <= s < 2**32 for s in seeds)
    assert seeds == sample_seeds("0123456789abcdef", 50)
    assert seeds[:7] == sample_seeds("0123456789abcdef", 7)  # independent of how many are asked for
    expected = int.from_bytes(hashlib.sha256(b"0:0123456789abcdef:3").digest()[:4], "big")
    assert seeds[3] == expected
    assert sample_seeds("0123456789abcdef", 5, base_seed=1) != seeds[:5]
    assert sample_seeds("fedcba9876543210", 5) != seeds[:5]
    assert sample_seeds("x", 0) == []


def test_pair_generators_lockstep():
    g_before, g_after = pair_generators(42)
    for shape in [(1, 4, 8, 8), (1, 4, 8, 8), (3,)]:
        assert torch.equal(torch.randn(shape, generator=g_before), torch.randn(shape, generator=g_after))
    other, _ = pair_generators(43)
    assert not torch.equal(torch.randn(5, generator=pair_generators(42)[0]), torch.randn(5, generator=other))


def test_batch_generators_pair_order():
    gens = batch_generators([1, 2])
    draws = [torch.randn(4, generator=g) for g in gens]
    assert len(gens) == 4
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[2], draws[3])
    assert not torch.equal(draws[0], draws[2])
    assert torch.equal(draws[0], torch.randn(4, generator=torch.Generator().manual_seed(1)))


def test_euler_ancestral_sigmas_match_k_diffusion_get_sigmas():
    """The reference samples on k-diffusion's CompVisDenoiser.get_sigmas(100): t = linspace(999, 0, 100),
    log-sigma interpolated between integer timesteps, then 0. diffusers' Euler ancestral scheduler (SD 1.5
    betas, linspace spacing) gives the same timesteps and sigmas within 1e-4 (relative)."""
    import numpy as np

    from tasks.common.models import make_scheduler

    scheduler = make_scheduler("euler_ancestral")
    scheduler.set_timesteps(100)
    alphas = scheduler.alphas_cumprod.double().numpy()
    sigmas = ((1 - alphas) / alphas) ** 0.5
    t = np.linspace(len(sigmas) - 1, 0, 100)
    low, high, w = np.floor(t).astype(int), np.ceil(t).astype(int), t - np.floor(t)
    k_sigmas = np.append(np.exp((1 - w) * np.log(sigmas[low]) + w * np.log(sigmas[high])), 0.0)
    np.testing.assert_allclose(scheduler.timesteps.double().numpy(), t, rtol=1e-6)
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), k_sigmas, rtol=1e-4)
