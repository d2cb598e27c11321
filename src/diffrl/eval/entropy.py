"""Entropy of a policy from its samples: the k-nearest-neighbour estimator, and the TF port's GMM one for comparison.

DPOER (DPPO plus a SAC-style temperature, ``reference/dppo-baselines.md``) needs ``H(pi(.|s))`` over action chunks
for its temperature loss. A diffusion policy has no closed-form density, so the entropy is estimated from samples:

- :func:`knn_entropy` — Kozachenko–Leonenko k-NN estimator over ``M`` samples of each distribution;
- :func:`policy_entropy` — draws ``M`` chunks per state from a sampler and applies :func:`knn_entropy` to the
  flattened ``Ta * Da`` chunks, optionally whitened first (the estimator's small-``M`` bias grows with anisotropy);
- :func:`gmm_rows_entropy` — the TF port's estimator (a 3-component GMM fitted to the ``Ta`` rows of ONE chunk),
  kept only to compare against; it does not estimate the policy's entropy.

Shapes: ``B`` distributions (states), ``M`` samples per distribution, ``D`` sample dim (``Ta * Da`` for a chunk),
``Ta`` chunk length, ``Da`` action dim, ``K`` mixture components. Entropies are differential, in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["knn_entropy", "policy_entropy", "gmm_rows_entropy", "MIN_DIST", "REG_COVAR"]

MIN_DIST = 1e-10  # floor on a neighbour distance: duplicate samples would otherwise give log(0) = -inf
REG_COVAR = 1e-6  # added to each GMM covariance's diagonal, as sklearn's GaussianMixture(reg_covar=1e-6)


def _digamma(x: float) -> float:
    return torch.special.digamma(torch.tensor(x, dtype=torch.float64)).item()


def _log_unit_ball_volume(d: int) -> float:
    """log V_d, V_d = pi^(d/2) / Gamma(d/2 + 1) the volume of the Euclidean unit ball in d dims."""
    return 0.5 * d * math.log(math.pi) - torch.special.gammaln(torch.tensor(0.5 * d + 1, dtype=torch.float64)).item()


def _checked(samples: torch.Tensor, k: int) -> torch.Tensor:
    """Validate ``knn_entropy``'s input; return it as (B, M, D) in float32 or float64."""
    if not isinstance(samples, torch.Tensor) or samples.dim() not in (2, 3) or not samples.is_floating_point():
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"knn_entropy needs a float tensor of shape (B, M, D) or (M, D), got {shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"knn_entropy needs an integer k >= 1 (which neighbour), got k={k!r}")
    x = samples.unsqueeze(0) if samples.dim() == 2 else samples  # (B, M, D)
    if x.shape[1] <= k:
        raise ValueError(f"knn_entropy needs more samples than k per distribution, got M={x.shape[1]} and k={k}; "
                         "draw more samples or lower k")
    if x.shape[2] < 1:
        raise ValueError("knn_entropy needs samples of dimension D >= 1, got D=0")
    if not torch.isfinite(x).all():
        raise ValueError("knn_entropy got NaN or inf samples; check the sampler that produced them")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()  # half-precision distances are too coarse


def knn_entropy(samples: torch.Tensor, k: int = 1, *, min_dist: float = MIN_DIST) -> torch.Tensor:
    """Kozachenko–Leonenko k-nearest-neighbour estimate of differential entropy (nats), batched.

    ``H = psi(M) - psi(k) + log V_D + (D / M) * sum_i log eps_i``, with ``eps_i`` the Euclidean distance from sample
    ``i`` to its ``k``-th nearest other sample and ``V_D`` the volume of the unit ball in ``D`` dims (Kozachenko &
    Leonenko 1987; the form of Kraskov, Stögbauer & Grassberger 2004, https://arxiv.org/abs/cond-mat/0305641,
    eq. (20), whose ``eps`` is twice our distance and whose ``c_d`` is the unit-diameter ball, which is the same).
    Consistent as ``M`` grows; at small ``M`` in many dims it is biased (see ``tests/unit/test_entropy.py``).

    Distances below ``min_dist`` are raised to it, so duplicate samples give a finite, very negative estimate
    instead of ``-inf`` (a collapsed policy's true entropy is ``-inf``); above the floor the estimate is exactly
    scale-equivariant, ``H(cX) = H(X) + D log c``. Half-precision input is computed in float32.

    Args:
        samples: ``(B, M, D)`` — ``M`` samples from each of ``B`` distributions — or ``(M, D)`` for one.
        k: which neighbour (``1 <= k < M``); larger ``k`` lowers the variance and changes the small-``M`` bias.
        min_dist: floor on the neighbour distance, in the samples' units.
    Returns:
        ``(B,)`` estimates, or a scalar for ``(M, D)`` input; differentiable in ``samples``.
    """
    x = _checked(samples, k)  # (B, M, D)
    _, m, d = x.shape
    # the direct difference, not the |x|^2 - 2xy + |y|^2 matmul form: exact zeros for duplicates, no cancellation
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (B, M, M)
    self_pair = torch.eye(m, dtype=torch.bool, device=x.device)
    dist = dist.masked_fill(self_pair, math.inf)  # a sample is not its own neighbour
    eps = dist.kthvalue(k, dim=-1).values.clamp_min(min_dist)  # (B, M)
    const = _digamma(float(m)) - _digamma(float(k)) + _log_unit_ball_volume(d)
    h = const + d * eps.log().mean(-1)  # (B,)
    return h[0] if samples.dim() == 2 else h


def _pooled_whitening(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, M, D) -> (x L^-T, log|det L|), L L^T the within-distribution covariance pooled over B (ridged)."""
    b, m, d = x.shape
    centred = (x - x.mean(1, keepdim=True)).reshape(-1, d)  # (B * M, D)
    cov = centred.T @ centred / max(b * (m - 1), 1)  # (D, D)
    ridge = REG_COVAR * cov.diagonal().mean() + MIN_DIST**2  # keeps a collapsed or rank-deficient cov invertible
    chol = torch.linalg.cholesky(cov + ridge * torch.eye(d, dtype=x.dtype, device=x.device))
    z = torch.linalg.solve_triangular(chol, x.reshape(-1, d).T, upper=False).T.reshape(b, m, d)
    return z, chol.diagonal().log().sum()


@torch.no_grad()
def policy_entropy(sample_fn: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor, num_samples: int = 32,
                   k: int = 1, *, whiten: bool = False) -> torch.Tensor:
    """k-NN estimate of ``H(pi(.|s))`` over whole action chunks, one per state.

    Each state is repeated ``num_samples`` times (``repeat_interleave``: rows ``b * N .. (b + 1) * N - 1`` belong
    to state ``b``), ``sample_fn`` draws one chunk per row, and :func:`knn_entropy` is applied to each state's
    ``N`` flattened chunks (``D = Ta * Da``). Without gradient: the temperature loss treats the entropy as a
    constant, as SAC's does.

    The k-NN estimator is not affine-invariant: at small ``N`` its (positive) bias grows with how elongated the
    distribution is, and chunks are elongated (neighbouring time steps are correlated). ``whiten`` maps all
    ``B * N`` chunks by one linear map ``L^-1`` (``L L^T`` the within-state covariance pooled over the batch) and
    adds ``log|det L|`` back — the change of variables for entropy — so the estimator sees rounder samples; the
    map is shared by the batch, so states keep their relative spreads (not an idea of the TF port).

    Args:
        sample_fn: ``obs (B * N, ...) -> chunks (B * N, Ta, Da)``, e.g. ``lambda o: policy.sample(o)[0]``.
        obs: ``(B, ...)`` states.
        num_samples: ``N`` chunks per state; the estimator's small-``N`` bias grows with ``Ta * Da``.
        k: neighbour order passed to :func:`knn_entropy`.
        whiten: whiten with the batch-pooled covariance first (lower bias on anisotropic chunks).
    Returns:
        ``(B,)`` entropy estimates in nats.
    """
    b = obs.shape[0]
    chunks = sample_fn(obs.repeat_interleave(num_samples, dim=0))  # (B * N, Ta, Da)
    if chunks.shape[0] != b * num_samples:
        raise ValueError(f"policy_entropy: sample_fn returned {chunks.shape[0]} chunks for {b} states x "
                         f"{num_samples} samples; it must return one chunk per input row")
    x = chunks.reshape(b, num_samples, -1)  # (B, N, Ta * Da)
    if not whiten:
        return knn_entropy(x, k=k)
    z, log_det = _pooled_whitening(_checked(x, k))
    return knn_entropy(z, k=k) + log_det


def _gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """log N(x; mean_k, L_k L_k^T): x (B, T, D), mean (B, K, D), chol (B, K, D, D) -> (B, T, K)."""
    diff = (x.unsqueeze(2) - mean.unsqueeze(1)).unsqueeze(-1)  # (B, T, K, D, 1)
    z = torch.linalg.solve_triangular(chol.unsqueeze(1), diff, upper=False).squeeze(-1)  # (B, T, K, D)
    log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B, K), half the log-determinant
    return -0.5 * z.pow(2).sum(-1) - log_det.unsqueeze(1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def gmm_rows_entropy(chunks: torch.Tensor, components: int = 3, iters: int = 100,
                     reg_covar: float = REG_COVAR) -> torch.Tensor:
    """The TF port's DPOER entropy: a GMM fitted to the ``Ta`` rows of one chunk — for comparison only.

    For each batch element, a ``components``-component full-covariance Gaussian mixture is fitted by EM to the
    ``Ta`` rows of that element's chunk (``Ta`` points in ``Da`` dims; sklearn's ``GaussianMixture`` with
    ``reg_covar`` on the diagonal, here with a deterministic init: rows split into ``components`` contiguous runs
    of time steps, and a fixed ``iters`` EM steps instead of a tolerance). It returns the fitted mixture's
    weighted sum of component entropies ``sum_k w_k * H(N(mu_k, Sigma_k))`` (closed form; a lower bound of the
    mixture's entropy, which is at most that plus ``H(w)``) — the same approximation DPPO uses for its GMM policy.

    Why it is unsound, and not an estimate of ``H(pi(.|s))``:

    - it looks at ONE sample of the policy: the spread it measures is that of the actions over the chunk's time
      steps, not of the policy's chunks over repeated draws, and its dimension is ``Da``, not ``Ta * Da``;
    - ``Ta`` points (4 for gym) are fitted with ``K - 1 + K * Da + K * Da * (Da + 1) / 2`` parameters (29 for
      ``K = 3, Da = 3``), so components collapse onto one or two points and their covariances onto ``reg_covar``;
      the value is then mostly ``log(reg_covar)``, whatever the policy's spread.

    Args:
        chunks: ``(B, Ta, Da)``, one chunk per batch element; needs ``Ta >= components`` (as sklearn does).
        components: ``K`` mixture components.
        iters: EM iterations.
        reg_covar: added to each covariance's diagonal.
    Returns:
        ``(B,)`` entropies in nats.
    """
    if not isinstance(chunks, torch.Tensor) or chunks.dim() != 3 or not chunks.is_floating_point():
        shape = tuple(chunks.shape) if isinstance(chunks, torch.Tensor) else type(chunks).__name__
        raise ValueError(f"gmm_rows_entropy needs a float tensor of chunks (B, Ta, Da), got {shape}")
    b, t, d = chunks.shape
    if not isinstance(components, int) or components < 1 or t < components:
        raise ValueError(f"gmm_rows_entropy needs 1 <= components <= Ta, got components={components!r} and Ta={t}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"gmm_rows_entropy needs an integer iters >= 0 (EM steps), got {iters!r}")
    if not torch.isfinite(chunks).all():
        raise ValueError("gmm_rows_entropy got NaN or inf chunks; check the sampler that produced them")
    x = chunks.detach().double()  # (B, Ta, Da); float64 because the collapsed covariances are ~reg_covar
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    tiny = 10 * torch.finfo(x.dtype).eps  # sklearn adds this to each component's mass
    owner = torch.arange(t, device=x.device) * components // t  # contiguous runs of time steps
    resp = torch.nn.functional.one_hot(owner, components).to(x.dtype).expand(b, t, components)  # (B, Ta, K)
    for step in range(iters + 1):  # M-step first (from the init), E-step between M-steps
        # M-step: weights (B, K), means (B, K, Da), covariances (B, K, Da, Da)
        mass = resp.sum(1) + tiny
        weights = mass / t
        mean = resp.transpose(1, 2) @ x / mass.unsqueeze(-1)
        diff = x.unsqueeze(1) - mean.unsqueeze(2)  # (B, K, Ta, Da)
        cov = (resp.transpose(1, 2).unsqueeze(-1) * diff).transpose(-1, -2) @ diff / mass[..., None, None]
        chol = torch.linalg.cholesky(cov + reg_covar * eye)
        if step == iters:
            break
        # E-step: responsibilities (B, Ta, K)
        log_joint = weights.log().unsqueeze(1) + _gaussian_log_prob(x, mean, chol)
        resp = (log_joint - log_joint.logsumexp(-1, keepdim=True)).exp()
    half_log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B, K)
    component_entropy = 0.5 * d * (1 + math.log(2 * math.pi)) + half_log_det  # H(N(mu, Sigma)), (B, K)
    return (weights * component_entropy).sum(-1).to(chunks.dtype)
