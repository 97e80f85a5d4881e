"""Sampler grids and correctness: REPA's grids on diffusers' FlowMatch schedulers, the SiT Euler-Maruyama scheduler,
and a known answer (Gaussian data, whose exact velocity field is closed-form)."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from diffusers_selftrans import SiTEulerMaruyamaScheduler
from diffusers_selftrans.pipelines.pipeline_sit import set_repa_timesteps
from diffusers_selftrans.schedulers import DEFAULT_LAST_STEP_SIZE
from diffusers_selftrans.transport import scheduler_to_model_time


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: threading only costs on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize("n", [1, 4, 50])
def test_euler_grid_is_repa_linspace(n):
    scheduler, timesteps = set_repa_timesteps(FlowMatchEulerDiscreteScheduler(), n)
    expected = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    torch.testing.assert_close(scheduler.sigmas.double(), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(timesteps.double(), expected[:-1] * 1000, atol=1e-4, rtol=0)
    assert len(timesteps) == n  # N model evaluations


@pytest.mark.parametrize("n", [1, 4, 25])
def test_heun_grid_is_repa_linspace(n):
    stock = FlowMatchHeunDiscreteScheduler()
    scheduler, timesteps = set_repa_timesteps(stock, n)
    grid = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    # first time once, inner times twice (predictor at t_i, corrector at t_{i+1}); the last interval is plain Euler
    expected_t = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2)])
    model_t = scheduler_to_model_time(timesteps.double(), scheduler.config.num_train_timesteps)
    torch.testing.assert_close(model_t, expected_t, atol=1e-6, rtol=0)
    assert len(timesteps) == 2 * n - 1
    assert stock.config.num_train_timesteps == 1000 and stock.timesteps.numel() == 1000  # the pipeline's own: untouched
    assert scheduler.sigmas[-1] == 0 and len(scheduler.sigmas) == 2 * n


@pytest.mark.parametrize("n", [1, 2, 250])
def test_sde_grid(n):
    scheduler, timesteps = set_repa_timesteps(SiTEulerMaruyamaScheduler(), n)
    expected = torch.cat([torch.linspace(1, DEFAULT_LAST_STEP_SIZE, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(scheduler.sigmas.double(), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(timesteps.double(), expected[:-1] * 1000, atol=1e-4, rtol=0)
    assert len(timesteps) == n  # N - 1 stochastic steps and one mean step: N evaluations
    assert DEFAULT_LAST_STEP_SIZE == 0.04  # SiT `--last-step-size`, REPA `linspace(1., 0.04, num_steps)`


def test_heun_shift_and_euler_dynamic_shifting_are_refused():
    with pytest.raises(ValueError, match="shift=1"):  # Heun's set_timesteps would shift its grid twice
        set_repa_timesteps(FlowMatchHeunDiscreteScheduler(shift=3.0), 2)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        set_repa_timesteps(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4)


def test_heun_grid_through_the_public_api_steps_as_repa_and_drift_is_an_error(monkeypatch):
    """The Heun grid comes from the scheduler's own `from_config` + `set_timesteps` (nothing written into it); its
    stock `step` then runs REPA's Heun, and a diffusers release with another grid is an error."""
    scheduler, timesteps = set_repa_timesteps(FlowMatchHeunDiscreteScheduler(), 2)
    assert scheduler.prev_derivative is None and scheduler.dt is None and scheduler.step_index is None
    x = torch.ones(1)
    x = scheduler.step(torch.full_like(x, 2.0), timesteps[0], x).prev_sample  # predictor, t 1 -> 0.5
    assert scheduler.dt == pytest.approx(-0.5) and torch.allclose(x, torch.tensor([0.0]))
    assert not scheduler.state_in_first_order
    x = scheduler.step(torch.full_like(x, 2.0), timesteps[1], x).prev_sample  # corrector with the same velocity
    torch.testing.assert_close(x, torch.tensor([0.0]))
    assert scheduler.state_in_first_order
    original = FlowMatchHeunDiscreteScheduler.set_timesteps

    def drifted(self, num_inference_steps, device=None):  # e.g. a release that spaces down to 1/1000 again
        original(self, num_inference_steps, device=device)
        self.sigmas = self.sigmas * 0.999

    monkeypatch.setattr(FlowMatchHeunDiscreteScheduler, "set_timesteps", drifted)
    with pytest.raises(RuntimeError, match="no longer spaces"):
        set_repa_timesteps(FlowMatchHeunDiscreteScheduler(), 4)


# ----------------------------------------------------------------------------- the SDE scheduler


def test_sde_step_matches_formula():
    scheduler = SiTEulerMaruyamaScheduler()
    scheduler.set_timesteps(3)  # t: 1, 0.52, 0.04, then 0
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2)).double()
    t, t_next = 0.52, 0.04
    # step 2 of 3 (stochastic): x + d dt + sqrt(2t) sqrt(|dt|) eps with d = v + (x + (1 - t) v)
    scheduler.set_begin_index(1)
    out = scheduler.step(v, scheduler.timesteps[1], x, generator=torch.Generator().manual_seed(2)).prev_sample
    score = -(x + (1 - t) * v) / t
    drift = v - 0.5 * (2 * t) * score
    expected = x + drift * (t_next - t) + (2 * t) ** 0.5 * abs(t_next - t) ** 0.5 * noise
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert out.dtype == torch.float64
    # last step: deterministic mean step to 0, same drift, no noise
    out_last = scheduler.step(v, scheduler.timesteps[2], x).prev_sample
    drift = v - 0.5 * (2 * t_next) * (-(x + (1 - t_next) * v) / t_next)
    torch.testing.assert_close(out_last, x + drift * (0 - t_next), atol=1e-6, rtol=1e-6)
    assert scheduler.step_index == 3


def test_sde_per_sample_generators_and_determinism():
    def run(batch_generators):
        scheduler = SiTEulerMaruyamaScheduler()
        scheduler.set_timesteps(4)
        x = torch.ones(len(batch_generators), 2, 2, 2)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.zeros_like(x), t, x, generator=batch_generators).prev_sample
        return x

    batch = run([torch.Generator().manual_seed(s) for s in (0, 1, 2)])
    singles = torch.cat([run([torch.Generator().manual_seed(s)]) for s in (0, 1, 2)])
    torch.testing.assert_close(batch, singles, atol=0, rtol=0)
    assert not torch.allclose(batch[0], batch[1])  # different seeds, different noise
    torch.testing.assert_close(run([torch.Generator().manual_seed(5)]), run([torch.Generator().manual_seed(5)]))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        scheduler = SiTEulerMaruyamaScheduler()
        scheduler.set_timesteps(2)
        scheduler.step(torch.zeros(3, 1), scheduler.timesteps[0], torch.zeros(3, 1), generator=[torch.Generator()] * 2)


def test_sde_without_diffusion_is_euler_on_its_grid():
    scheduler = SiTEulerMaruyamaScheduler(diffusion_scale=0.0)
    scheduler.set_timesteps(5)
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    out = scheduler.step(v, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(2)).prev_sample
    # w = 0: the drift is the velocity itself
    torch.testing.assert_close(out, x + (0.76 - 1.0) * v, atol=1e-6, rtol=0)


def test_sde_config_round_trip(tmp_path):
    scheduler = SiTEulerMaruyamaScheduler(last_step_size=0.05, diffusion_scale=0.5)
    scheduler.save_pretrained(tmp_path)
    loaded = SiTEulerMaruyamaScheduler.from_pretrained(tmp_path)
    assert loaded.config.last_step_size == 0.05 and loaded.config.diffusion_scale == 0.5
    assert loaded.config.num_train_timesteps == 1000
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)


def test_sde_errors():
    with pytest.raises(ValueError, match="last_step_size"):
        SiTEulerMaruyamaScheduler(last_step_size=1.5)
    with pytest.raises(ValueError, match="diffusion_scale"):
        SiTEulerMaruyamaScheduler(diffusion_scale=-1.0)
    scheduler = SiTEulerMaruyamaScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 1), torch.tensor(1000.0), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="positive integer"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="Integer timesteps"):
        scheduler.step(torch.zeros(1, 1), 1, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(torch.zeros(1, 1), torch.tensor(123.0), torch.zeros(1, 1))


# ----------------------------------------------------------------------------- a known answer

# Data x0 ~ N(mu, s^2) per channel, eps ~ N(0, 1), x_t = (1 - t) x0 + t eps. With var_t = (1-t)^2 s^2 + t^2 and
# r = x_t - (1-t) mu (Gaussian conditioning):
#   E[eps | x_t] = t / var_t * r,   E[x0 | x_t] = mu + (1-t) s^2 / var_t * r,   v*(x_t, t) = E[eps - x0 | x_t].
MU = torch.tensor([1.5, -1.0, 0.5]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.5, 1.0, 2.0]).reshape(1, 3, 1, 1)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    var = (1 - t) ** 2 * STD**2 + t**2
    r = x - (1 - t) * MU
    return t / var * r - (MU + (1 - t) * STD**2 / var * r)


def run_sampler(scheduler, num_steps, x, generator=None):
    scheduler, timesteps = set_repa_timesteps(scheduler, num_steps)
    scheduler.set_begin_index(0)
    for t in timesteps:
        v = gaussian_velocity(x, scheduler_to_model_time(t, scheduler.config.num_train_timesteps))
        x = scheduler.step(v, t, x, generator=generator, return_dict=False)[0]
    return x


@pytest.mark.parametrize(
    "scheduler_cls, num_steps, tol", [(FlowMatchEulerDiscreteScheduler, 100, 0.03), (FlowMatchHeunDiscreteScheduler, 20, 0.02)]
)
def test_ode_carries_noise_to_the_data_distribution(scheduler_cls, num_steps, tol):
    # With an affine velocity field both ODE samplers are affine maps per channel, x1 = a * noise + b, so the output
    # is exactly N(b, a^2): fit (a, b) by least squares (exact, no sampling error) and compare with (s, mu).
    noise = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = run_sampler(scheduler_cls(), num_steps, noise)
    for c in range(3):
        a_in, a_out = noise[:, c].flatten(), out[:, c].flatten()
        design = torch.stack([a_in, torch.ones_like(a_in)], dim=1)
        slope, intercept = torch.linalg.lstsq(design, a_out[:, None]).solution.flatten()
        assert torch.allclose(design @ torch.stack([slope, intercept]), a_out, atol=1e-4)  # affine indeed
        assert abs(slope.item() / STD.flatten()[c].item() - 1) < tol, (c, slope.item())
        assert abs(intercept.item() - MU.flatten()[c].item()) < tol * STD.flatten()[c].item(), (c, intercept.item())


def test_ode_error_shrinks_with_steps():
    noise = torch.randn(32, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for n in (10, 40):
        out = run_sampler(FlowMatchEulerDiscreteScheduler(), n, noise)
        errors.append((out - (MU + STD * noise)).abs().max().item())  # the exact flow map is x -> mu + s x
    heun = (run_sampler(FlowMatchHeunDiscreteScheduler(), 10, noise) - (MU + STD * noise)).abs().max().item()
    assert errors[1] < errors[0] / 3  # first order: ~4x smaller with 4x the steps
    assert heun < errors[0] / 3  # Heun beats Euler at the same number of steps


def test_sde_carries_noise_to_the_data_distribution():
    n_steps, t_last = 100, DEFAULT_LAST_STEP_SIZE
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 3, 2, 2, generator=g)
    out = run_sampler(SiTEulerMaruyamaScheduler(), n_steps, noise, generator=g)
    mean, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3))
    n = out.numel() // 3
    # The SDE ends at t_last and then takes a deterministic mean step, an affine map with slope
    # k = 1 - t_last (2 t_last - (1 - t_last) s^2) / var_{t_last}; so the exact sampler lands on N(mu, k^2 var_{t_last}).
    s2 = STD.flatten() ** 2
    var_last = (1 - t_last) ** 2 * s2 + t_last**2
    k = 1 - t_last * (2 * t_last - (1 - t_last) * s2) / var_last
    expected_var = k**2 * var_last
    assert torch.all((mean - MU.flatten()).abs() < 4 * STD.flatten() / n**0.5 + 0.01), mean
    assert torch.all((var / expected_var - 1).abs() < 4 * (2 / n) ** 0.5 + 0.02), var / expected_var
    assert torch.all((expected_var / s2 - 1).abs() < 0.025)  # the mean-step bias is small for these s
    # noise really was injected: the same start with other SDE noise ends elsewhere
    other = run_sampler(SiTEulerMaruyamaScheduler(), n_steps, noise[:8], generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(other, out[:8], atol=1e-2)


def test_sde_last_step_is_noise_free_in_distribution():
    # Narrow data (s = 0.1) makes the law after the final mean step sensitive to its noise: a noisy last step adds
    # variance 2 t_last |dt| = 2 * 0.04^2 = 0.0032, +54 % of the exact k^2 var_{t_last} = 0.0059 here. The exact
    # sampler is within the Euler-Maruyama bias (~4 % at 100 steps) of the closed form.
    mu, s, t_last, n_steps = 0.3, 0.1, DEFAULT_LAST_STEP_SIZE, 100

    def velocity(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        return t / var * r - (mu + (1 - t) * s**2 / var * r)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(65536, generator=g)
    scheduler = SiTEulerMaruyamaScheduler()
    scheduler, timesteps = set_repa_timesteps(scheduler, n_steps)
    scheduler.set_begin_index(0)
    for t in timesteps:
        x = scheduler.step(velocity(x, scheduler_to_model_time(t, scheduler.config.num_train_timesteps)), t, x, generator=g, return_dict=False)[0]
    var_last = (1 - t_last) ** 2 * s**2 + t_last**2
    k = 1 - t_last * (2 * t_last - (1 - t_last) * s**2) / var_last
    ratio = x.var().item() / (k**2 * var_last)
    assert abs(x.mean().item() - mu) < 0.005
    assert abs(ratio - 1) < 0.1, ratio  # a noisy last step gives ~1.57
