"""The interpolant: conversions between x_t, velocity, x0, eps and score, time sampling, time conventions."""

import math

import pytest
import torch

from diffusers_selftrans import transport as tr


@pytest.fixture
def draw():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05  # away from the singular ends
    return x0, noise, t


def test_interpolate_endpoints_and_velocity(draw):
    x0, noise, t = draw
    assert torch.equal(tr.interpolate(x0, noise, torch.zeros(6, dtype=x0.dtype)), x0)  # data at t=0
    assert torch.equal(tr.interpolate(x0, noise, torch.ones(6, dtype=x0.dtype)), noise)  # noise at t=1
    # velocity = d x_t / dt by a finite difference
    h = 1e-6
    fd = (tr.interpolate(x0, noise, t + h) - tr.interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(fd, tr.velocity_target(x0, noise), atol=1e-8, rtol=0)
    # a scalar t broadcasts like a per-sample one
    torch.testing.assert_close(tr.interpolate(x0, noise, 0.3), tr.interpolate(x0, noise, torch.full((6,), 0.3)))


def test_conversions_round_trip(draw):
    x0, noise, t = draw
    x_t = tr.interpolate(x0, noise, t)
    v = tr.velocity_target(x0, noise)
    torch.testing.assert_close(tr.x0_from_velocity(x_t, v, t), x0)
    torch.testing.assert_close(tr.noise_from_velocity(x_t, v, t), noise)
    torch.testing.assert_close(tr.velocity_from_x0(x_t, x0, t), v)
    torch.testing.assert_close(tr.velocity_from_noise(x_t, noise, t), v)
    # score of the Gaussian conditional p(x_t | x0) = N((1-t) x0, t^2 I) is -(x_t - (1-t) x0) / t^2 = -eps / t
    torch.testing.assert_close(tr.score_from_velocity(x_t, v, t), -noise / t.reshape(-1, 1, 1, 1))


def test_score_of_gaussian_marginal():
    # x0 ~ N(0, s^2): x_t ~ N(0, (1-t)^2 s^2 + t^2), so the exact score is -x_t / var and the exact velocity is
    # E[eps - x0 | x_t] = (t - (1-t) s^2) / var * x_t.
    s, t = 0.7, torch.tensor([0.3], dtype=torch.float64)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(1, 1, 3, 3)
    var = (1 - t) ** 2 * s**2 + t**2
    v = (t - (1 - t) * s**2) / var * x
    torch.testing.assert_close(tr.score_from_velocity(x, v, t), -x / var)


def test_sit_time_conventions(draw):
    x0, noise, t = draw
    t_sit = tr.to_sit_time(t)
    torch.testing.assert_close(tr.from_sit_time(t_sit), t)
    # SiT: x = t_sit * x1 + (1 - t_sit) * eps with x1 the data, velocity x1 - eps: the same point, negated velocity.
    x_sit = t_sit.reshape(-1, 1, 1, 1) * x0 + (1 - t_sit.reshape(-1, 1, 1, 1)) * noise
    torch.testing.assert_close(x_sit, tr.interpolate(x0, noise, t))
    torch.testing.assert_close(tr.sit_velocity(tr.velocity_target(x0, noise)), x0 - noise)
    torch.testing.assert_close(tr.sit_velocity(tr.sit_velocity(noise)), noise)


def test_scheduler_model_time():
    timesteps = torch.tensor([1000.0, 750.0, 2.5])
    t = tr.scheduler_to_model_time(timesteps)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.75, 0.0025]))
    torch.testing.assert_close(tr.model_to_scheduler_time(t), timesteps)
    torch.testing.assert_close(tr.scheduler_to_model_time(timesteps, num_train_timesteps=500), timesteps / 500)


def test_uniform_and_logit_normal_statistics():
    n = 20000
    g = torch.Generator().manual_seed(0)
    u = tr.sample_time(n, "uniform", generator=g)
    assert u.shape == (n,) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    ln = tr.sample_time(n, "logit_normal", logit_mean=0.5, logit_std=1.2, generator=torch.Generator().manual_seed(1))
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item() - 0.5) < 0.04 and abs(logits.std().item() - 1.2) < 0.04
    # REPA's "lognormal" (sigma = exp(N(0,1)), t = sigma / (1 + sigma)) is the logit-normal with mean 0, std 1
    ln0 = tr.sample_time(n, "logit_normal", generator=torch.Generator().manual_seed(2))
    assert abs(ln0.median().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="Unknown time sampling"):
        tr.sample_time(4, "lognormal")


def test_transport_sample_is_consistent():
    x0 = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    t, noise, x_t, target = tr.Transport().sample(x0, generator=torch.Generator().manual_seed(4))
    assert t.shape == (8,) and t.dtype == x0.dtype
    torch.testing.assert_close(x_t, tr.interpolate(x0, noise, t))
    torch.testing.assert_close(target, noise - x0)
    # same generator seed -> same draw
    again = tr.Transport().sample(x0, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip((t, noise, x_t, target), again))
    with pytest.raises(ValueError):
        tr.Transport(time_sampling="cosine")
    assert math.isclose(tr.Transport(time_sampling="logit_normal").logit_std, 1.0)
