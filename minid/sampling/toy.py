"""An exact-score testbed: a Gaussian mixture in latent space whose noise prediction is known in
closed form.

It stands in for the UNet wherever a property of the sampler math is to be measured rather than
argued (docs/editedid.md, Open items O1 and O2; paper A.8 Fig. 14 and A.13 Table 11:
bench/solver_stability.py, bench/mixing.py). It has the UNet's call signature, `model(z, timestep,
context, controller=None) -> ε`, so `samplers.sample_loop` / `invert_loop`,
`mixing.adaptive_mixing_inversion` and `null_text.null_text_optimization` run on it unchanged.

The data. x_0 ∈ R^d with d = C·H·W (4×8×8 = 256 by default), drawn from K components,

    x_0 ~ Σ_k π_k(c) N(μ_k + s(c), Σ_k),   Σ_k = A_k A_kᵀ + diag(δ_k),   π(c) = softmax(logits(c))

A_k (d × r, r = 8) carries the "structure": a few large, correlated directions. diag(δ_k), small and
per coordinate, carries the "details": the directions in which the data vary least, where a sampler
that is too coarse at low noise loses them first. The responsibilities of the components change with
z, so the score is nonlinear in z.

The noised marginal and its exact ε. With z_t = α_t x_0 + σ_t n (schedule.py) each component stays
Gaussian, C_k(t) = α_t² Σ_k + σ_t² I, and with Σ_k = V_k diag(e_k) V_kᵀ (precomputed
eigendecomposition) and m_k = μ_k + s(c)

    p_t(z | c) = Σ_k π_k(c) N(z; α_t m_k, C_k(t))
    ε(z, t, c) = −σ_t ∇_z log p_t(z | c) = σ_t Σ_k γ_k(z) C_k(t)^{-1} (z − α_t m_k)
    γ_k(z) = softmax_k( logits_k(c) + log N(z; α_t m_k, C_k(t)) )
    (responsibilities)
    x̂_0 = (z − σ_t ε)/α_t = Σ_k γ_k (m_k + α_t Σ_k C_k(t)^{-1} (z − α_t m_k))                 (=
    E[x_0 | z_t])

The conditioning. A "prompt embedding" is a vector of component logits, followed
(`ToyConfig.offset`, default on) by a mean offset s ∈ R^d, shaped (B, 1, K + d) so that code written
for SD's (B, 77, 768) embeddings (concatenating and slicing along dim 0, `expand(b, −1, −1)`) takes
it as it is. `prompt(k)` favours component k; `null_prompt()` has equal logits (every component
equally likely), the "∅" of classifier-free guidance; both have s = 0. ε is differentiable in the
whole embedding, so null-text optimisation (Mokady et al. 2023; docs/editedid.md, Stage 2) optimises
the unconditional embedding exactly as it optimises ∅ on SD. Why the offset: with the K logits alone
∅ has K − 1 directions of control over a d-dimensional ε (SD's ∅ has 77·768), too few for Stage 2 to
follow a pivot that moved in any other direction; s gives it full rank, as on SD. Prompts never set
s, so the data of a prompt is the mixture above with s = 0.

The "image". There is no decoder: the image of a latent is the latent itself (`image`), and PSNR is
taken over `data_range` = 6 standard deviations of the data (±3 sd), with `metrics.psnr`.

The exact probability-flow ODE. In y = z/α and u = σ/α it reads dy/du = ε(α y, t(u)) (DDIM's ODE,
Song et al. 2021, Eq. 14); `flow` integrates it with classical Runge-Kutta on a grid uniform in
log(u + 0.01), which reaches u = 0 (CLEAN) with no singularity. Many tiny steps make it the
reference the samplers are measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minid.sampling.schedule import NoiseSchedule


@dataclass(frozen=True)
class ToyConfig:
    """The mixture's shape and scales (defaults: SD-like latents, roughly unit variance per
    coordinate)."""

    channels: int = 4  # latent channels, as SD's
    side: int = 8  # latent side: d = channels·side² = 256
    components: int = 6  # K: mixture components, i.e. prompt logits
    rank: int = 8  # r: large directions of each component's covariance ("structure")
    mean_scale: float = 0.6  # sd of the component means' entries
    structure_scale: float = 0.7  # sd per coordinate of the low-rank part A_k A_kᵀ
    # the diagonal part δ_k is uniform in [detail_min, detail_max] per coordinate:
    detail_min: float = 0.005
    detail_max: float = 0.03  # the "details", sd 0.07 … 0.17
    # logit of the favoured component in `prompt(k)`: weight e²/(e² + K − 1) ≈ 0.6
    prompt_strength: float = 2.0
    # the embedding carries a mean offset s after the logits (see the module docstring)
    offset: bool = True
    # 0: s is the embedding's d offset values themselves (full rank). m > 0: the embedding carries m
    # prompt features f and s = B tanh(f), B a fixed d × m matrix (drawn from `seed`): ∅ then acts
    # through the conditioning as a prompt's words do, nonlinearly and in m < d directions, and
    # null-text is no longer a linear least-squares fit of the pivots (bench/defaults.py)
    offset_rank: int = 0
    offset_scale: float = 1.0  # the sd of s per coordinate at |tanh| = 1, with offset_rank > 0
    seed: int = 0  # the mixture's parameters are drawn from this seed


class GaussianMixtureModel:
    """A Gaussian mixture with the UNet's call signature; see the module docstring for the formulas.

    Parameters are float64; ε is computed in the dtype of z (float64 in the benchmarks and tests).
    """

    def __init__(self, config: ToyConfig = ToyConfig(), schedule: NoiseSchedule | None = None):
        self.config = config
        self.schedule = NoiseSchedule.scaled_linear() if schedule is None else schedule
        c, k, r = config, config.components, config.rank
        d = c.channels * c.side * c.side
        g = torch.Generator().manual_seed(c.seed)
        f64 = torch.float64
        self.means = c.mean_scale * torch.randn(k, d, generator=g, dtype=f64)  # (K, d) μ_k
        # (K, d, r) A_k
        a = c.structure_scale / math.sqrt(r) * torch.randn(k, d, r, generator=g, dtype=f64)
        detail = c.detail_min + (c.detail_max - c.detail_min) * torch.rand(
            k, d, generator=g, dtype=f64
        )
        self.covariances = a @ a.transpose(1, 2) + torch.diag_embed(detail)  # (K, d, d) Σ_k
        # (K, d) e_k, (K, d, d) V_k
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.covariances)
        # (K·d, d): rows V_kᵀ
        self._stacked_eigenvectors = self.eigenvectors.transpose(1, 2).reshape(k * d, d)
        m = c.offset_rank
        # (d, m) B of s = B tanh(f); None: s is the offset itself
        self.offset_basis = (
            c.offset_scale / math.sqrt(m) * torch.randn(d, m, generator=g, dtype=f64)
            if c.offset and m > 0
            else None
        )
        self.data_range = 6.0 * math.sqrt(self._data_variance())  # ±3 sd: the "image" span for PSNR

    # ---- shapes ----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.side, self.config.side

    @property
    def embedding_width(self) -> int:
        """E = K logits, + d offset values when `config.offset` (+ m prompt features instead with
        `config.offset_rank` = m > 0)."""
        if not self.config.offset:
            return self.num_components
        return self.num_components + (self.config.offset_rank or self.dim)

    def offset(self, condition: torch.Tensor) -> torch.Tensor | None:
        """The mean offset s (B, d) of the embeddings' rows `condition` (B, E); None without one."""
        if condition.shape[1] <= self.num_components:
            return None
        values = condition[:, self.num_components :]
        if self.offset_basis is None:
            return values
        return torch.tanh(values) @ self.offset_basis.to(values.dtype).T

    def prompt(self, component: int | list[int], strength: float | None = None) -> torch.Tensor:
        """Prompt embeddings favouring the given component(s): (B, 1, E), `strength` on the
        component's logit, the others and the offset 0."""
        ks = [component] if isinstance(component, int) else list(component)
        s = self.config.prompt_strength if strength is None else strength
        embedding = torch.zeros(len(ks), 1, self.embedding_width, dtype=torch.float64)
        for row, k in enumerate(ks):
            embedding[row, 0, k] = s
        return embedding

    def null_prompt(self, batch: int = 1) -> torch.Tensor:
        """∅: equal logits and no offset, (B, 1, E) zeros."""
        return torch.zeros(batch, 1, self.embedding_width, dtype=torch.float64)

    def _condition(self, context: torch.Tensor, batch: int) -> torch.Tensor:
        """The embedding's one row, (B, E): logits, then the offset."""
        if context.ndim != 3 or context.shape[1] != 1 or context.shape[2] != self.embedding_width:
            parts = f"K = {self.num_components} logits"
            if self.config.offset:
                width = self.embedding_width - self.num_components
                parts += f", then {width} offset values"
            raise ValueError(
                f"a prompt embedding is (B, 1, E={self.embedding_width}), {parts}; found "
                f"{tuple(context.shape)}; build it with model.prompt(k) or model.null_prompt()"
            )
        if context.shape[0] not in (1, batch):
            raise ValueError(f"{context.shape[0]} prompt embeddings for a batch of {batch} latents")
        return context[:, 0].expand(batch, -1)  # (B, E)

    # ---- the model -------------------------------------------------------------------------------
    def __call__(
        self, z: torch.Tensor, timestep, context: torch.Tensor, controller=None
    ) -> torch.Tensor:
        """ε(z, t, c), the UNet's signature: z (B, C, H, W), timestep a time on [0, T−1] (int,
        float, or a (B,) tensor), context (B or 1, 1, E) embeddings. `controller` is accepted and
        ignored (no attention)."""
        b = z.shape[0]
        ts = (
            timestep.tolist()
            if isinstance(timestep, torch.Tensor) and timestep.ndim > 0
            else [timestep] * b
        )
        if len(ts) != b:
            raise ValueError(f"{len(ts)} timesteps for a batch of {b} latents")
        ts = [float(t) for t in ts]
        alpha = torch.tensor([self.schedule.alpha(t) for t in ts], dtype=z.dtype)
        sigma = torch.tensor([self.schedule.sigma(t) for t in ts], dtype=z.dtype)
        return self.eps_at(z, alpha, sigma, self._condition(context, b))

    def eps_at(
        self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, condition: torch.Tensor
    ) -> torch.Tensor:
        """ε at noise level (α, σ) (each (B,) or a float) under `condition` (B, E), the embeddings'
        rows: σ Σ_k γ_k C_k^{-1}(z − α m_k)."""
        b = z.shape[0]
        r, c, gamma = self._posterior(z, alpha, sigma, condition)
        sigma = torch.as_tensor(sigma, dtype=z.dtype).expand(b)
        # (B, K·d): γ_k C_k^{-1}(z − α μ_k), eigen-coords
        weighted = (gamma[:, :, None] * r / c).reshape(b, -1)
        # Σ_k V_k (·): (B, d)
        eps = weighted @ self._stacked_eigenvectors.to(z.dtype) * sigma[:, None]
        return eps.reshape(z.shape)

    def log_density(self, z: torch.Tensor, alpha, sigma, condition: torch.Tensor) -> torch.Tensor:
        """log p_t(z | c) at noise level (α, σ), (B,): the density whose −σ·gradient `eps_at` is."""
        r, c, _ = self._posterior(z, alpha, sigma, condition)
        log_n = (
            -0.5 * (r**2 / c).sum(-1)
            - 0.5 * torch.log(c).sum(-1)
            - 0.5 * self.dim * math.log(2 * math.pi)
        )
        logits = condition[:, : self.num_components].to(z.dtype)
        return torch.logsumexp(torch.log_softmax(logits, -1) + log_n, -1)

    def _posterior(self, z, alpha, sigma, condition):
        """Eigen-coordinates r_k = V_kᵀ(z − α m_k) (B, K, d), variances c_k = α² e_k + σ² (B, K, d),
        and the responsibilities γ (B, K)."""
        b = z.shape[0]
        dt = z.dtype
        alpha = torch.as_tensor(alpha, dtype=dt).expand(b)
        sigma = torch.as_tensor(sigma, dtype=dt).expand(b)
        logits = condition[:, : self.num_components].to(dt)  # (B, K)
        means = self.means.to(dt)[None]  # (1, K, d) μ_k
        offset = self.offset(condition)
        if offset is not None:  # m_k = μ_k + s
            means = means + offset[:, None].to(dt)  # (B, K, d)
        x = z.reshape(b, self.dim)  # (B, d)
        diff = x[:, None, :] - alpha[:, None, None] * means  # (B, K, d)
        r = torch.bmm(diff.transpose(0, 1), self.eigenvectors.to(dt)).transpose(0, 1)  # (B, K, d)
        # (B, K, d)
        c = alpha[:, None, None] ** 2 * self.eigenvalues.to(dt)[None] + sigma[:, None, None] ** 2
        log_n = -0.5 * (r**2 / c).sum(-1) - 0.5 * torch.log(c).sum(-1)  # (B, K), up to a constant
        gamma = torch.softmax(logits + log_n, dim=-1)
        return r, c, gamma

    # ---- data ------------------------------------------------------------------------------------
    def sample(
        self, context: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One x_0 per prompt embedding (B, 1, E): (B, C, H, W) float64 and the components drawn
        (B,)."""
        b = context.shape[0]
        condition = self._condition(context, b).double()
        probs = torch.softmax(condition[:, : self.num_components], -1)
        ks = torch.multinomial(probs, 1, generator=generator)[:, 0]
        n = torch.randn(b, self.dim, generator=generator, dtype=torch.float64)
        e, v = self.eigenvalues[ks], self.eigenvectors[ks]  # (B, d), (B, d, d)
        x = self.means[ks] + torch.einsum("bde,be->bd", v, e.clamp_min(0).sqrt() * n)
        offset = self.offset(condition)
        if offset is not None:
            x = x + offset  # the offset s
        return x.reshape(b, *self.latent_shape), ks

    def edit_region(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        component: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x with the region `mask` (C, H, W) bool redrawn from component k given the rest of x:
        x_F ~ N(μ_F + Σ_FN Σ_NN^{-1}(x_N − μ_N), Σ_FF − Σ_FN Σ_NN^{-1} Σ_NF), the Gaussian
        conditional; its mean when `generator` is None. Outside the region x is kept bit for bit: a
        pair that "differs only in the face" (paper A.8, Fig. 14) and stays on the data manifold of
        component k."""
        if mask.shape != self.latent_shape or mask.dtype != torch.bool:
            raise ValueError(
                f"the region mask must be a bool tensor of shape {self.latent_shape}, found "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        f, nf = mask.flatten(), ~mask.flatten()
        cov, mu = self.covariances[component], self.means[component]
        s_fn, s_nn = cov[f][:, nf], cov[nf][:, nf]
        xs = x.reshape(x.shape[0], self.dim).double()
        gain = torch.linalg.solve(s_nn, s_fn.T).T  # Σ_FN Σ_NN^{-1}, (|F|, |N|)
        mean_f = mu[f][None] + (xs[:, nf] - mu[nf][None]) @ gain.T  # (B, |F|)
        out = xs.clone()
        if generator is None:
            out[:, f] = mean_f
        else:
            cond_cov = cov[f][:, f] - gain @ s_fn.T
            chol = torch.linalg.cholesky(0.5 * (cond_cov + cond_cov.T))
            out[:, f] = (
                mean_f
                + torch.randn(xs.shape[0], int(f.sum()), generator=generator, dtype=torch.float64)
                @ chol.T
            )
        return out.reshape(x.shape).to(x.dtype)

    def _data_variance(self) -> float:
        """Variance per coordinate of x_0 under ∅ (equal weights), averaged over coordinates."""
        # (d,) E[x²]
        second = (torch.diagonal(self.covariances, dim1=1, dim2=2) + self.means**2).mean(0)
        return float((second - self.means.mean(0) ** 2).mean())

    # ---- the image view --------------------------------------------------------------------------
    @staticmethod
    def image(z: torch.Tensor) -> torch.Tensor:
        """The decoder-free "image" of a latent: the latent itself."""
        return z

    # ---- the exact probability-flow ODE ----------------------------------------------------------
    def flow(self, z: torch.Tensor, t, s, context: torch.Tensor, steps: int = 400) -> torch.Tensor:
        """The probability-flow ODE's solution from time (or level) t to s, either direction, under
        the prompt `context` (guidance 1): RK4 on dy/dv = (u + u_c) ε(α y, α, σ), y = z/α, u = σ/α,
        v = log(u + u_c), u_c = 0.01, `steps` steps uniform in v. t and s may be schedule.FINAL or
        schedule.CLEAN."""
        u_c = 0.01
        condition = self._condition(context, z.shape[0])

        def u_of(level):
            a = self.schedule.alphas_cumprod_at(level)
            return math.sqrt((1.0 - a) / a)

        def slope(y, u):  # dy/dv
            alpha = 1.0 / math.sqrt(1.0 + u * u)
            return (u + u_c) * self.eps_at(alpha * y, alpha, u * alpha, condition)

        u_t, u_s = u_of(t), u_of(s)
        y = z * math.sqrt(1.0 + u_t * u_t)  # z/α
        v0, v1 = math.log(u_t + u_c), math.log(u_s + u_c)
        h = (v1 - v0) / steps
        for i in range(steps):
            v = v0 + i * h
            u = [max(math.exp(v + f * h) - u_c, 0.0) for f in (0.0, 0.5, 1.0)]
            k1 = slope(y, u[0])
            k2 = slope(y + 0.5 * h * k1, u[1])
            k3 = slope(y + 0.5 * h * k2, u[1])
            k4 = slope(y + h * k3, u[2])
            y = y + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y / math.sqrt(1.0 + u_s * u_s)
