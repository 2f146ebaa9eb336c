r"""The vanilla sparse autoencoder and its view as the joint problem (Chapter 1).

A vanilla SAE with parameters in the SAELens layout ``W_enc`` (d_in, d_sae), ``b_enc``
(d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,) computes

.. math::
    z = \mathrm{ReLU}\big((x - b_{dec}) W_{enc} + b_{enc}\big),\qquad \hat x = z W_{dec} + b_{dec},

and is trained on :math:`\tfrac12\|x - \hat x\|^2 + \lambda\sum_k \|W_{dec}[k]\|\, z_k`
(Chapter 1, eq. ``sae-loss``). Chapter 1's rescaling lemma shows that scaling decoder row
``k`` by ``c > 0`` and the code ``z_k`` by ``1/c`` changes nothing, so every SAE is
equivalent to one with unit-norm decoder rows: the dictionary ``D = W_dec / ‖W_dec‖`` with
codes ``z_k ‖W_dec[k]‖`` on the centred data ``x - b_dec``. In that form the SAE loss *is*
the joint loss :math:`L(D, Z)` (eq. ``joint-problem``) evaluated at the encoder's codes, and
the encoder is an amortised, one-step approximation of the exact nonnegative-lasso code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ._validation import ArrayKind, as_tensor, check_columns, check_positive, check_positive_int
from .coding import encode as exact_encode
from .losses import joint_loss, sae_codes
from .runtime import cpu_threads, generator, progress_bar

__all__ = [
    "AmortisationGap",
    "JointView",
    "SAEDictionary",
    "SAEOutput",
    "SAETrainResult",
    "VanillaSAE",
    "amortisation_gap",
    "plateau_fall",
    "train_sae",
]


class SAEOutput(NamedTuple):
    """What :meth:`VanillaSAE.forward` returns: ``reconstruction`` :math:`\\hat x` and ``codes`` :math:`z`."""

    reconstruction: Any
    codes: Any


class SAEDictionary(NamedTuple):
    """The decoder split into directions and lengths: ``W_dec = norms[:, None] * D``.

    ``D`` (d_sae, d_in) has unit-norm rows (the atoms); ``norms`` (d_sae,) are the row norms.
    """

    D: torch.Tensor
    norms: torch.Tensor


class JointView(NamedTuple):
    """An SAE seen as a point of the joint problem (Chapter 1, rescaling lemma).

    ``X`` is the centred data ``x - b_dec``; ``D`` the unit-normalised decoder rows; ``Z`` the
    encoder's codes multiplied by the decoder-row norms. Then ``Z @ D + b_dec`` is the SAE's
    reconstruction and ``joint_loss(X, D, Z, lam)`` equals the SAE loss.
    """

    X: Any
    D: Any
    Z: Any


class VanillaSAE(torch.nn.Module):
    r"""A vanilla (ReLU, L1) sparse autoencoder in the SAELens parameter layout (Chapter 1).

    .. math::
        z = \mathrm{ReLU}\big((x - b_{dec}) W_{enc} + b_{enc}\big),\qquad
        \hat x = z W_{dec} + b_{dec},\qquad
        \ell(x) = \tfrac12\|x - \hat x\|^2 + \lambda \sum_k \|W_{dec}[k]\|\, z_k .

    Parameters
    ----------
    d_in : int
        Dimension of the data (``n_features``).
    d_sae : int
        Number of latents (``n_atoms``): the rows of ``W_dec`` are the dictionary.
    device : torch.device or str, optional
        Where the parameters live. Default CPU.
    dtype : torch.dtype
        ``torch.float32`` (default) or ``torch.float64``.

    Notes
    -----
    The parameters start at zero; :func:`train_sae` initialises them. Inputs may be torch
    tensors (same device and dtype as the parameters; gradients flow) or numpy arrays
    (converted to the parameters' device and dtype; answers are numpy, detached).
    """

    def __init__(self, d_in: int, d_sae: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d_in = check_positive_int(d_in, "d_in")
        self.d_sae = check_positive_int(d_sae, "d_sae")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        kw = {"device": device, "dtype": dtype}
        self.W_enc = torch.nn.Parameter(torch.zeros(self.d_in, self.d_sae, **kw))
        self.b_enc = torch.nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.W_dec = torch.nn.Parameter(torch.zeros(self.d_sae, self.d_in, **kw))
        self.b_dec = torch.nn.Parameter(torch.zeros(self.d_in, **kw))

    def _input(self, value: Any, name: str, width: int) -> tuple[torch.Tensor, ArrayKind]:
        """Validate a 2-D input of ``width`` columns and bring numpy inputs to the parameters."""
        if isinstance(value, torch.Tensor):
            if value.dtype in (torch.float32, torch.float64) and value.dtype != self.W_dec.dtype:
                raise TypeError(
                    f"{name} is a {value.dtype} tensor but this SAE's parameters are "
                    f"{self.W_dec.dtype}: pass {name}.to({self.W_dec.dtype}), or convert the SAE "
                    f"with sae.to({value.dtype})")
            t, kind = as_tensor(value, name, ndim=2, like=self.W_dec)
        else:
            t, kind = as_tensor(value, name, ndim=2)
            t = t.to(device=self.W_dec.device, dtype=self.W_dec.dtype)
        if t.shape[1] != width:
            raise ValueError(f"{name} must have {width} columns, got shape {tuple(t.shape)}")
        return t, kind

    def encode(self, X: Any) -> Any:
        r"""Codes :math:`z = \mathrm{ReLU}((x - b_{dec})W_{enc} + b_{enc})`, one row per sample."""
        Xt, kind = self._input(X, "X", self.d_in)
        return kind.out(sae_codes(Xt, self.W_enc, self.b_enc, self.b_dec))

    def decode(self, Z: Any) -> Any:
        r"""Reconstruction :math:`\hat x = z W_{dec} + b_{dec}` of codes ``Z`` (n_samples, d_sae)."""
        Zt, kind = self._input(Z, "Z", self.d_sae)
        return kind.out(Zt @ self.W_dec + self.b_dec)

    def forward(self, X: Any) -> SAEOutput:
        """Return :class:`SAEOutput` ``(reconstruction, codes)`` for the rows of ``X``."""
        Xt, kind = self._input(X, "X", self.d_in)
        Z = sae_codes(Xt, self.W_enc, self.b_enc, self.b_dec)
        return SAEOutput(kind.out(Z @ self.W_dec + self.b_dec), kind.out(Z))

    def _loss(self, X: torch.Tensor, lam: float) -> torch.Tensor:
        Z = sae_codes(X, self.W_enc, self.b_enc, self.b_dec)
        R = X - (Z @ self.W_dec + self.b_dec)
        return (0.5 * (R * R).sum(1) + lam * (Z * self.W_dec.norm(dim=1)).sum(1)).mean()

    def loss(self, X: Any, lam: float) -> torch.Tensor:
        r"""The SAE loss (Chapter 1, eq. ``sae-loss``) as a differentiable scalar tensor.

        .. math::
            \frac1N \sum_n \tfrac12\|x_n - \hat x_n\|^2 + \lambda \sum_k \|W_{dec}[k]\|\, z_{nk}

        Same value as :func:`companion.sae_loss` on this module's parameters.
        """
        lam = check_positive(lam, "lam")
        Xt, _ = self._input(X, "X", self.d_in)
        return self._loss(Xt, lam)

    @torch.no_grad()
    def dictionary(self) -> SAEDictionary:
        """The decoder as unit-norm atoms ``D`` and their lengths ``norms`` (``W_dec = norms[:, None] * D``).

        Raises
        ------
        ValueError
            If a decoder row is exactly zero (it has no direction).
        """
        norms = self.W_dec.norm(dim=1)
        zero = torch.nonzero(norms == 0).flatten()
        if zero.numel():
            raise ValueError(f"W_dec has zero rows at indices {zero[:10].tolist()}; they have no direction")
        return SAEDictionary(self.W_dec / norms[:, None], norms.clone())

    @torch.no_grad()
    def joint_view(self, X: Any) -> JointView:
        r"""This SAE as a point :math:`(D, Z)` of the joint problem on the centred data (Chapter 1).

        Returns :class:`JointView` ``(X - b_dec, D, Z)`` with ``D = W_dec / ‖W_dec‖`` (rows) and
        ``Z = codes * ‖W_dec‖``. By the rescaling lemma ``Z @ D = codes @ W_dec`` and
        ``λ 1ᵀZ = λ Σ_k ‖W_dec[k]‖ z_k``, so ``joint_loss(*view, lam)`` equals the SAE loss, and
        ``certify(*view, lam)`` checks the SAE's codes against T1 for its own dictionary.
        Answers in the kind of ``X``; everything is detached.
        """
        Xt, kind = self._input(X, "X", self.d_in)
        D, norms = self.dictionary()
        Z = sae_codes(Xt, self.W_enc, self.b_enc, self.b_dec) * norms
        return JointView(kind.out(Xt - self.b_dec), kind.out(D), kind.out(Z))


@dataclass
class SAETrainResult:
    """What :func:`train_sae` returns.

    Attributes
    ----------
    sae : VanillaSAE
        The trained autoencoder.
    loss_history : list of float
        The minibatch SAE loss at every step, before that step's update.
    final_loss : float
        The SAE loss on the whole of ``X`` after training.
    lam : float
        The penalty it was trained with.
    seed : int
        The seed of its initialisation and minibatch order.
    eval_history : list of (int, float)
        ``(steps done, SAE loss on eval_X)`` every ``eval_every`` steps and at the end (empty
        without ``eval_X``): the held-out curve.
    """

    sae: VanillaSAE
    loss_history: list[float] = field(repr=False)
    final_loss: float
    lam: float
    seed: int
    eval_history: list[tuple[int, float]] = field(default_factory=list, repr=False)


# Below this many decoder entries a training step is a few dozen tiny kernels; on the CPU,
# handing each to several threads costs more than the arithmetic (tens of times more on a
# busy machine), so such models train on one thread.
_SMALL_MODEL = 1 << 16


def train_sae(
    X: Any,
    n_latents: int,
    lam: float,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    init: str = "data",
    decoder_bias: str = "mean",
    learn_decoder_bias: bool = True,
    num_threads: int | None = None,
    progress: bool = True,
    eval_X: Any = None,
    eval_every: int = 100,
) -> SAETrainResult:
    r"""Train a :class:`VanillaSAE` with Adam on the SAE loss of Chapter 1 (eq. ``sae-loss``).

    Minimises :math:`\frac1N\sum_n \tfrac12\|x_n - \hat x_n\|^2 + \lambda\sum_k\|W_{dec}[k]\|\,z_{nk}`
    over all four parameters (the decoder norms are free: the norm-weighted penalty makes
    them irrelevant, by the rescaling lemma).

    Initialisation: ``b_dec`` is the mean of ``X`` (or zero, see ``decoder_bias``); with
    ``init="data"`` the decoder rows are ``n_latents`` distinct random rows of the centred data
    ``X - b_dec``, normalised (each atom starts pointing at a data point), with
    ``init="random"`` they are normalised Gaussian vectors; ``W_enc = W_decᵀ`` (tied at the
    start only) and ``b_enc = 0``.

    With ``decoder_bias="zero", learn_decoder_bias=False`` the SAE is exactly the amortised
    form of the joint problem of Chapter 1 (no bias anywhere but ``b_enc``), as Chapter 3
    trains it.

    Parameters
    ----------
    X : array (n_samples, n_features)
        Training data, samples as rows; numpy or torch.
    n_latents : int
        Number of latents (atoms), ``d_sae``.
    lam : float
        The penalty :math:`\lambda > 0`.
    steps : int
        Number of Adam steps.
    batch_size : int
        Minibatch size; batches walk through a fresh random permutation of the rows every
        epoch. A batch size of at least ``n_samples`` trains on the full data (in its own
        row order, without permutations).
    lr : float
        Adam learning rate.
    seed : int
        Seed of the CPU generator that draws the initialisation and the minibatch order;
        the same seed on the same device gives identical weights.
    device : torch.device or str, optional
        Where to train. Default: the device of ``X`` (CPU for numpy input).
    dtype : torch.dtype, optional
        Parameter dtype. Default: the dtype of ``X``.
    init : {"data", "random"}
        How to initialise the decoder rows (see above).
    decoder_bias : {"mean", "zero"}
        Initial ``b_dec``: the mean of ``X`` or zero.
    learn_decoder_bias : bool
        If False, ``b_dec`` stays at its initial value (and keeps ``requires_grad=False``).
    num_threads : int, optional
        Intra-op CPU threads while training (restored afterwards; ignored off the CPU).
        Default: one thread for small models (``n_latents * n_features <= 65536``), whose
        kernels are too small to share, and torch's setting otherwise. The thread count
        does not change the result on a given machine beyond floating-point reduction order.
    progress : bool
        Show a tqdm bar on stderr (also silenced by the environment variable ``TQDM_DISABLE``).
    eval_X : array (m, n_features), optional
        Held-out rows: the SAE loss on them is recorded before the first step, every
        ``eval_every`` steps and after the last (:attr:`SAETrainResult.eval_history`), so that
        training can be stopped at a plateau of the held-out loss rather than of the training
        loss (Chapter 8).
    eval_every : int
        Steps between two evaluations on ``eval_X``.

    Returns
    -------
    SAETrainResult
    """
    lam = check_positive(lam, "lam")
    n_latents = check_positive_int(n_latents, "n_latents")
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive(lr, "lr")
    if init not in ("data", "random"):
        raise ValueError(f"init must be 'data' or 'random', got {init!r}")
    if decoder_bias not in ("mean", "zero"):
        raise ValueError(f"decoder_bias must be 'mean' or 'zero', got {decoder_bias!r}")
    Xt, _ = as_tensor(X, "X", ndim=2)
    if Xt.shape[0] < 1 or Xt.shape[1] < 1:
        raise ValueError(f"X must have at least one row and one column, got shape {tuple(Xt.shape)}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if num_threads is not None:
        num_threads = check_positive_int(num_threads, "num_threads")
    eval_every = check_positive_int(eval_every, "eval_every")
    if eval_X is not None:
        eval_X, _ = as_tensor(eval_X, "eval_X", ndim=2)
        check_columns(eval_X, "eval_X", Xt.shape[1], "X")
    if init == "data" and n_latents > Xt.shape[0]:
        raise ValueError(f"n_latents={n_latents} exceeds the {Xt.shape[0]} rows of X that init='data' draws atoms from")
    dev = torch.device(device) if device is not None else Xt.device
    Xt = Xt.to(device=dev, dtype=dtype or Xt.dtype)
    n, d = Xt.shape
    if dev.type != "cpu":
        num_threads = None
    elif num_threads is None and n_latents * d <= _SMALL_MODEL:
        num_threads = 1
    if eval_X is not None:
        eval_X = eval_X.to(device=dev, dtype=Xt.dtype)
    with cpu_threads(num_threads):
        return _train(Xt, n_latents, lam, steps, min(batch_size, n), lr, seed, init,
                      decoder_bias, learn_decoder_bias, progress, eval_X, eval_every)


def _train(Xt: torch.Tensor, n_latents: int, lam: float, steps: int, bs: int, lr: float,
           seed: int, init: str, decoder_bias: str, learn_decoder_bias: bool,
           progress: bool, eval_X: torch.Tensor | None = None,
           eval_every: int = 100) -> SAETrainResult:
    """The training loop of :func:`train_sae` (inputs validated, ``Xt`` on its device)."""
    dev = Xt.device
    n, d = Xt.shape
    g = generator(seed)
    sae = VanillaSAE(d, n_latents, device=dev, dtype=Xt.dtype)
    with torch.no_grad():
        mean = Xt.mean(0) if decoder_bias == "mean" else Xt.new_zeros(d)
        if init == "data":
            rows = torch.randperm(n, generator=g)[:n_latents].to(dev)
            W = Xt[rows] - mean
        else:
            W = torch.randn(n_latents, d, generator=g, dtype=torch.float64).to(dev, Xt.dtype)
        norms = W.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError("init='data' drew a row of X equal to the initial decoder bias; "
                             "use init='random'")
        sae.W_dec.copy_(W / norms)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(mean)
    sae.b_dec.requires_grad_(learn_decoder_bias)

    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history = torch.empty(steps, dtype=Xt.dtype, device=dev)
    evals: list[tuple[int, float]] = []

    def evaluate(done: int) -> None:
        if eval_X is not None:
            with torch.no_grad():
                evals.append((done, float(sae._loss(eval_X, lam))))

    evaluate(0)
    perm, pos = torch.randperm(n, generator=g).to(dev), 0
    bar = progress_bar(range(steps), progress=progress, desc="train_sae", unit="step", file=sys.stderr,
                       leave=True)
    for step in bar:
        if bs == n:                       # full batch: no permutation needed
            batch = Xt
        else:
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=g).to(dev), 0
            batch = Xt[perm[pos:pos + bs]]
            pos += bs
        loss = sae._loss(batch, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history[step] = loss.detach()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            evaluate(step + 1)
    bar.close()
    with torch.no_grad():
        final = float(sae._loss(Xt, lam))
    return SAETrainResult(sae=sae, loss_history=history.cpu().tolist(), final_loss=final,
                          lam=lam, seed=seed, eval_history=evals)


@dataclass
class AmortisationGap:
    """The price of an amortised encoder, on one dataset (Chapter 1).

    Attributes
    ----------
    sae_loss : float
        The SAE loss, i.e. the joint loss :math:`L(D, Z_{SAE})` of its joint view.
    exact_loss : float
        :math:`F(D)`: the joint loss with exact nonnegative-lasso codes for the same
        (normalised) decoder on the same centred data.
    gap : float
        ``sae_loss - exact_loss``, nonnegative because exact codes minimise every row's cost.
    """

    sae_loss: float
    exact_loss: float
    gap: float


def plateau_fall(loss_history: Any, tail: float = 0.2) -> float:
    """Relative fall of the mean training loss between the last two ``tail`` shares of training.

    With ``m = ⌊tail · steps⌋``, the mean ``b`` of the minibatch losses of steps
    ``[-2m, -m)`` and the mean ``a`` of the last ``m``: returns ``(b - a) / a``. Chapter 8
    calls an SAE on a loss plateau when this is below 1% (about the noise of those means) at
    a constant learning rate. ``loss_history`` is e.g. :attr:`SAETrainResult.loss_history`
    or the history of :func:`companion.lm.train_saelens_sae`.
    """
    h = torch.as_tensor(loss_history, dtype=torch.float64).flatten()
    m = int(len(h) * tail)
    if not 0 < tail <= 0.5 or m < 1:
        raise ValueError(f"plateau_fall: need 0 < tail <= 0.5 and at least one step in each share, "
                         f"got tail={tail} with {len(h)} steps")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("plateau_fall: loss_history holds NaN or Inf")
    before, last = float(h[-2 * m:-m].mean()), float(h[-m:].mean())
    return (before - last) / last


def amortisation_gap(sae: VanillaSAE, X: Any, lam: float, **encode_kwargs: Any) -> AmortisationGap:
    r"""SAE loss minus the loss of exact codes for the SAE's own dictionary (Chapter 1).

    .. math::
        \text{gap} = L(D, Z_{SAE}) - F(D) \;\ge\; 0,\qquad F(D) = \min_{Z\ge0} L(D, Z),

    with :math:`(X - b_{dec}, D, Z_{SAE})` the :meth:`VanillaSAE.joint_view`. Exact codes
    come from :func:`companion.encode` (keyword arguments are passed on to it). Use a float64
    SAE (``sae.double()``) for a certified gap.
    """
    if not isinstance(sae, VanillaSAE):
        raise TypeError(f"sae must be a VanillaSAE, got {type(sae).__name__}")
    lam = check_positive(lam, "lam")
    Xc, D, Z = sae.joint_view(X)
    Z_exact = exact_encode(Xc, D, lam, **encode_kwargs)
    sae_value = joint_loss(Xc, D, Z, lam)
    exact_value = joint_loss(Xc, D, Z_exact, lam)
    return AmortisationGap(sae_loss=sae_value, exact_loss=exact_value, gap=sae_value - exact_value)
