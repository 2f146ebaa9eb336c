r"""Real learned representations without a download: the hidden layer of a small digit classifier (Chapter 7).

scikit-learn ships the UCI handwritten-digits data set (1797 images of 8×8 pixels, ten
classes) inside the package, so a representation *learned by a network* is seconds away on
any machine. :func:`digits_activations` trains a one-hidden-layer ReLU classifier

.. math::
    h(x) = \mathrm{ReLU}(x W_1 + b_1),\qquad \text{logits} = h(x) W_2 + b_2,

on a seeded split with full-batch Adam on the CPU, and returns the hidden activations of all
1797 images: the data on which Chapter 7 trains sparse autoencoders, as people do on the
residual streams and MLP layers of language models.

:func:`study_sae` is the chapter's unit of work: train one SAE, certify it as it is and with
exact codes, and descend from its dictionary to a certified stationary point of the joint
problem. :func:`class_groups` and :func:`label_purity` read the digit labels as the
hierarchy of concepts (groups of classes above classes) that absorption and splitting are
measured against.

scikit-learn is needed only by :func:`digits_activations` (it is in the package's ``test``
extra); it is imported when the function is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._validation import as_tensor, check_nonnegative_entries, check_positive, check_positive_int
from .bounds import huber_bound
from .coding import encode
from .dictionary import DictionaryFit, fit_dictionary
from .interop import SAECertificate, certify_sae
from .runtime import cpu_threads, generator
from .sae import VanillaSAE, train_sae

__all__ = [
    "DigitsActivations",
    "SAEStudy",
    "class_groups",
    "digits_activations",
    "label_purity",
    "study_sae",
]

_SITES = ("hidden", "preactivation")


@dataclass
class DigitsActivations:
    """What :func:`digits_activations` returns.

    Attributes
    ----------
    activations : torch.Tensor (1797, hidden)
        The hidden representation of every image (rows are images, in the data set's order).
    labels : torch.Tensor (1797,)
        The digit (0–9) of every image, ``torch.long``.
    is_train : torch.Tensor (1797,)
        ``True`` for the images the classifier was trained on.
    accuracy : float
        Classification accuracy on the held-out images.
    train_accuracy : float
        Classification accuracy on the training images.
    site : str
        ``"hidden"`` (after the ReLU) or ``"preactivation"`` (before it).
    seed : int
        The seed of the split and of the classifier's initialisation.
    """

    activations: torch.Tensor
    labels: torch.Tensor
    is_train: torch.Tensor
    accuracy: float
    train_accuracy: float
    site: str
    seed: int


def digits_activations(
    seed: int = 0,
    hidden: int = 32,
    *,
    site: str = "hidden",
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    test_fraction: float = 0.25,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> DigitsActivations:
    r"""Train a small MLP on scikit-learn's digits and return its hidden activations (Chapter 7).

    Pixels are scaled to ``[0, 1]`` (divided by 16). A seeded random ``test_fraction`` of the
    images is held out; the classifier :math:`\mathrm{ReLU}(xW_1+b_1)W_2+b_2` is trained with
    full-batch Adam on the cross-entropy of the rest. Everything runs on the CPU in float64
    from a seeded generator, so the activations are the same on every machine; only the
    result is moved to ``device`` and cast to ``dtype``.

    Parameters
    ----------
    seed : int
        Seeds the split and the initialisation.
    hidden : int
        Width of the hidden layer: the dimension of the returned activations.
    site : {"hidden", "preactivation"}
        Return :math:`h = \mathrm{ReLU}(xW_1+b_1)` (nonnegative, like an MLP layer of a
        language model after its nonlinearity) or :math:`xW_1+b_1` (signed).
    steps : int
        Full-batch Adam steps (300 take well under a second on one core).
    lr : float
        Adam learning rate.
    weight_decay : float
        L2 penalty on the weights (Adam's ``weight_decay``).
    test_fraction : float
        Fraction of images held out to measure ``accuracy``; in (0, 1).
    device : torch.device or str, optional
        Where to put the returned tensors. Default CPU.
    dtype : torch.dtype
        dtype of ``activations`` (float32 or float64).

    Returns
    -------
    DigitsActivations
    """
    from sklearn.datasets import load_digits

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    hidden = check_positive_int(hidden, "hidden")
    steps = check_positive_int(steps, "steps")
    lr = check_positive(lr, "lr")
    weight_decay = float(weight_decay)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if site not in _SITES:
        raise ValueError(f"site must be one of {_SITES}, got {site!r}")
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

    data = load_digits()
    X = torch.as_tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    n, d = X.shape
    n_classes = int(y.max()) + 1

    g = generator(seed)
    perm = torch.randperm(n, generator=g)
    n_test = max(1, int(round(test_fraction * n)))
    is_train = torch.ones(n, dtype=torch.bool)
    is_train[perm[:n_test]] = False

    # Kaiming-uniform-like initialisation drawn from our own generator, so that the
    # network does not depend on torch's global random stream.
    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.nn.Parameter:
        bound = 1.0 / fan_in ** 0.5
        return torch.nn.Parameter((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)

    W1, b1 = uniform((d, hidden), d), uniform((hidden,), d)
    W2, b2 = uniform((hidden, n_classes), hidden), uniform((n_classes,), hidden)
    params = [W1, b1, W2, b2]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    Xtr, ytr = X[is_train], y[is_train]
    # One thread: the summation order, hence every bit of the activations, is then the same
    # on machines with any number of cores (and these matrices are too small to gain from more).
    with cpu_threads(1):
        for _ in range(steps):
            logits = torch.relu(Xtr @ W1 + b1) @ W2 + b2
            loss = torch.nn.functional.cross_entropy(logits, ytr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pre = X @ W1 + b1
            h = torch.relu(pre)
            pred = (h @ W2 + b2).argmax(1)
    correct = pred == y
    acc = float(correct[~is_train].double().mean())
    train_acc = float(correct[is_train].double().mean())
    acts = (h if site == "hidden" else pre).detach()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return DigitsActivations(
        activations=acts.to(device=dev, dtype=dtype).contiguous(),
        labels=y.to(dev),
        is_train=is_train.to(dev),
        accuracy=acc,
        train_accuracy=train_acc,
        site=site,
        seed=seed,
    )


def label_purity(Z: Any, labels: Any, n_classes: int | None = None) -> float:
    r"""Activation-weighted label purity of a code (Chapter 7).

    For atom :math:`k` with activation mass :math:`m_{kc} = \sum_{n: y_n = c} z_{nk}` on class
    :math:`c`, its purity is :math:`\max_c m_{kc} / \sum_c m_{kc}`; the result is the mean
    purity weighted by each atom's total mass, :math:`\sum_k \max_c m_{kc} / \sum_{k,c} m_{kc}`:
    1 when every atom fires on one class only.
    """
    Zt, _ = as_tensor(Z, "Z", ndim=2)
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.to(Zt.device).long()
    if y.shape != (Zt.shape[0],):
        raise ValueError(f"labels must have shape (n_samples,) = {(Zt.shape[0],)}, got {tuple(y.shape)}")
    check_nonnegative_entries(Zt, "Z")
    c = int(y.max()) + 1 if n_classes is None else check_positive_int(n_classes, "n_classes")
    M = Zt.new_zeros(c, Zt.shape[1]).index_add_(0, y, Zt)   # (class, atom) activation mass
    total = float(M.sum())
    if total == 0:
        raise ValueError("Z is identically zero: no atom fires, purity is undefined")
    return float(M.max(0).values.sum()) / total


def class_groups(X: Any, labels: Any, n_groups: int) -> list[list[int]]:
    """Group the classes by Ward clustering of their mean representations (Chapter 7).

    The groups are the parent concepts of the hierarchy "group of classes → class" in which
    Chapter 7 measures absorption. Returns ``n_groups`` sorted lists of class labels, ordered
    by their smallest label.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    Xt, _ = as_tensor(X, "X", ndim=2)
    n_groups = check_positive_int(n_groups, "n_groups")
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.to(Xt.device).long()
    classes = sorted(set(y.tolist()))
    if n_groups > len(classes):
        raise ValueError(f"n_groups={n_groups} exceeds the {len(classes)} classes")
    means = torch.stack([Xt[y == c].mean(0) for c in classes]).detach().cpu().double().numpy()
    ids = fcluster(linkage(means, "ward"), n_groups, "maxclust")
    groups = [[c for c, g in zip(classes, ids) if g == gid] for gid in sorted(set(ids))]
    return sorted(groups, key=min)


@dataclass
class SAEStudy:
    r"""One SAE on one data set, certified and compared with a certified stationary point (Chapter 7).

    Attributes
    ----------
    n_latents, lam : int, float
        Width and penalty.
    sae : VanillaSAE
        The trained SAE.
    X, D, Z : torch.Tensor
        Its joint view: centred data ``x - b_dec``, unit-norm decoder rows, encoder codes
        times decoder norms.
    Z_exact : torch.Tensor
        Exact codes for ``D`` (Chapter 2).
    certificate : SAECertificate
        :func:`companion.certify_sae` of the SAE.
    fit : DictionaryFit or None
        :func:`companion.fit_dictionary` started from ``D`` on the same centred data: a
        certified stationary point reached by monotone descent from the SAE's dictionary.
    huber : float
        The wide-limit lower bound :math:`\frac1N\sum_n h_\lambda(\|x_n\|)` (T4) on ``X``.
    loss_history : list of float
        The SAE's minibatch loss after every Adam step (to judge whether training plateaued).
    """

    n_latents: int
    lam: float
    sae: VanillaSAE
    X: torch.Tensor
    D: torch.Tensor
    Z: torch.Tensor
    Z_exact: torch.Tensor
    certificate: SAECertificate
    fit: DictionaryFit | None
    huber: float
    loss_history: list

    @property
    def sae_loss(self) -> float:
        """:math:`L(D, Z_{SAE})`, the SAE loss."""
        return self.certificate.sae_codes.loss

    @property
    def exact_loss(self) -> float:
        """:math:`F(D)`, the loss of the SAE's dictionary with exact codes."""
        return self.certificate.exact_codes.loss


def study_sae(X: Any, n_latents: int, lam: float, *, steps: int = 1000, lr: float = 3e-3,
              batch_size: int = 256, seed: int = 0, fit: bool = True, fit_tol: float = 1e-6,
              fit_max_iter: int = 500) -> SAEStudy:
    r"""Train an SAE, certify it, and descend from its dictionary to a certified stationary point (Chapter 7).

    1. :func:`companion.train_sae` (Adam on the SAE loss; in the dtype of ``X``);
    2. :func:`companion.certify_sae`: certificates of its codes and of exact codes for its
       dictionary, hence the amortisation gap :math:`L(D,Z_{SAE}) - F(D)`;
    3. if ``fit``, :func:`companion.fit_dictionary` initialised at the SAE's dictionary on its
       centred data, to T2 violation ``fit_tol``.

    The ladder :math:`L(D,Z_{SAE}) \ge F(D) \ge L(D^\circ, Z^\circ) \ge \frac1N\sum_n h_\lambda(\|x_n\|)`
    then splits the SAE loss into amortisation, dictionary and width gaps.
    """
    lam = check_positive(lam, "lam")
    Xt, _ = as_tensor(X, "X", ndim=2)
    res = train_sae(Xt, n_latents, lam, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                    progress=False)
    sae = res.sae
    Xc, D, Z = sae.joint_view(Xt)
    cert = certify_sae(sae, Xt, lam)
    Z_exact = encode(Xc, D, lam)
    fitted = (fit_dictionary(Xc, n_latents, lam, init=D, tol=fit_tol, max_iter=fit_max_iter,
                             progress=False) if fit else None)
    return SAEStudy(n_latents=n_latents, lam=lam, sae=sae, X=Xc, D=D, Z=Z, Z_exact=Z_exact,
                    certificate=cert, fit=fitted, huber=huber_bound(Xc, lam),
                    loss_history=list(res.loss_history))
