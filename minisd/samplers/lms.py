"""LMS: the linear multistep method in σ (Adams–Bashforth with uneven steps; k-diffusion `sample_lms`, order 4;
A1111 "LMS"). Each step reuses the slopes of up to 3 earlier steps: fit the polynomial through them and integrate
it over the step, so 4th order for one UNet call per step.

code          math                                              diffusers (LMSDiscreteScheduler)
sigma         σ_i                                               sigmas[step_index]
d             d_i = (x_i − D(x_i; σ_i)) / σ_i, dx/dσ at σ_i     derivatives[-1]
nodes         σ_i, σ_{i−1}, …, σ_{i−k+1}                        sigmas[t - k]
coeffs        c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ                 lms_coeffs (get_lms_coefficient)
ℓ_j           Lagrange basis: ∏_{k≠j} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k})

x_{i+1} = x_i + ∑_j c_j · d_{i−j}: the integral of dx/dσ from σ_i to σ_{i+1}, with dx/dσ replaced by its
interpolating polynomial through the last k slopes (k = 1: Euler).
"""

from torch import Generator, Tensor

from minisd.samplers.base import upcast
from minisd.samplers.sigmas import SigmaSampler, slope


def lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """∫_a^b ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j of `nodes` (1 at nodes[j], 0 at the others), exactly:
    expand ℓ_j in powers of s = τ − a, then integrate term by term (diffusers integrates numerically with
    scipy.integrate.quad; the closed form needs no scipy and no tolerance).

    >>> lagrange_integral([0.0], 0, 2.0, 1.0)  # one node: ℓ = 1, the Euler coefficient σ_{i+1} − σ_i
    -1.0
    >>> round(lagrange_integral([2.0, 3.0], 0, 2.0, 1.0), 12)  # ℓ_0(τ) = (τ − 3)/(2 − 3) = 3 − τ; ∫_2^1 = −1.5
    -1.5
    """
    poly = [1.0]  # coefficients of ℓ_j in powers of s = τ − a, lowest first
    for k, node in enumerate(nodes):
        if k == j:
            continue
        # multiply by (τ − node)/(nodes[j] − node) = (s + (a − node))/(nodes[j] − node)
        scale = nodes[j] - node
        shifted = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):
            shifted[p] += c * (a - node) / scale
            shifted[p + 1] += c / scale
        poly = shifted
    h = b - a
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))  # ∫_0^h s^p ds = h^(p+1)/(p+1)


def lms_coefficients(nodes: list[float], sigma_next: float) -> list[float]:
    """c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ for nodes = [σ_i, σ_{i−1}, …] (newest first); one per stored slope.

    >>> [round(c, 12) for c in lms_coefficients([2.0, 3.0], 1.0)]  # 2nd order, step 2 -> 1 after 3 -> 2
    [-1.5, 0.5]
    """
    return [lagrange_integral(nodes, j, nodes[0], sigma_next) for j in range(len(nodes))]


class LMSSampler(SigmaSampler):
    """Linear multistep, order up to 4; step-equal to diffusers' LMSDiscreteScheduler (SD v1.5 config: linspace,
    its default step(order=4)).

    Image-to-image: minisd starts every run at order 1 and raises the order as its own slopes accumulate.
    diffusers instead takes the order from the absolute step index (`min(step_index + 1, 4)`), so a run truncated
    by `strength` starts with order-4 coefficients but only one stored slope (it pairs the first coefficient with
    the one slope and drops the rest) for its first three steps: not a consistent method. minisd's result equals
    diffusers' when diffusers is given the right order (`step(..., order=k + 1)` at the run's k-th step).
    """

    name = "LMS"
    zero_snr = False  # diffusers' LMSDiscreteScheduler has no rescale_betas_zero_snr: no reference to prove it by
    max_order = 4  # diffusers' step(order=4) default; k-diffusion sample_lms order=4

    def reset(self) -> None:
        self.derivatives: list[Tensor] = []  # d of the last (up to max_order) steps, oldest first

    def step(self, model_output: Tensor, t: Tensor | float, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x at σ_i -> x at σ_{i+1}. model_output, x: (b, c, h, w); returns x's dtype (computed in >= float32)."""
        i = self.advance(t)
        sigma = self.sigmas[i].item()
        x_i = upcast(x)
        d = slope(x_i, sigma, self.denoised(upcast(model_output), x_i, sigma))  # dx/dσ at σ_i (Karras Alg. 1)
        self.derivatives = [*self.derivatives, d][-self.max_order :]
        order = len(self.derivatives)  # 1, 2, 3, 4, 4, …: only this run's own slopes
        nodes = self.sigmas[i - order + 1 : i + 1].flip(0).tolist()  # σ_i, σ_{i−1}, …
        coeffs = lms_coefficients(nodes, self.sigmas[i + 1].item())
        update = sum(c * d_j for c, d_j in zip(coeffs, reversed(self.derivatives), strict=True))
        return (x_i + update).to(x.dtype)
