r"""Load SAEs trained elsewhere, save ours, and know which :math:`\lambda` a checkpoint was trained at (Chapter 7).

Two checkpoint layouts are read, both into a :class:`companion.sae.VanillaSAE`
(:math:`z = \mathrm{ReLU}((x - b_{dec})W_{enc} + b_{enc})`, :math:`\hat x = zW_{dec} + b_{dec}`):

* **SAELens** — a directory holding ``sae_weights.safetensors`` (``W_enc`` (d_in, d_sae),
  ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,)) and ``cfg.json``. Only the
  ``"standard"`` architecture with a ReLU is a vanilla SAE; with ``apply_b_dec_to_input:
  false`` the encoder does not subtract ``b_dec``, which is folded exactly into the encoder
  bias (``b_enc ← b_enc + b_dec W_enc``).
* **dictionary_learning** — a file ``ae.pt`` (or a directory holding one) with the
  ``AutoEncoder`` state dict: ``encoder.weight`` (d_sae, d_in), ``encoder.bias`` (d_sae,),
  ``decoder.weight`` (d_in, d_sae), ``bias`` (d_in,); its encoder is
  ``ReLU(encoder(x - bias))``, the same map.

:func:`save_sae` writes our SAEs in the SAELens layout, and :func:`certify_sae` certifies any
of them twice: the SAE as it is (its encoder's codes for its own dictionary), and its
dictionary with exact codes (what a perfect encoder would reach); the difference of the two
losses is the amortisation gap. ``python -m companion certify`` (:mod:`companion.cli`) does
the same from the command line.

The penalty convention
----------------------
The book's penalty :math:`\lambda` is the one of the SAE loss of Chapter 1,

.. math::
    \ell(x) = \tfrac12\|x - \hat x\|^2 + \lambda\sum_k \|W_{dec}[k]\|\,z_k ,

the loss whose unit-norm form is the joint problem that :func:`companion.certify` checks.
SAELens trains on :math:`\|x-\hat x\|^2 + \alpha\sum_k \|W_{dec}[k]\|\,z_k` (squared error
summed over features, *not* halved; the L1 weighted by decoder norms when
``scale_sparsity_penalty_by_decoder_norm`` is true), so its ``l1_coefficient`` :math:`\alpha`
is :math:`2\lambda`. Rules, applied by :func:`checkpoint_lam`:

* ``cfg.json`` written by :func:`save_sae` records ``companion_lam`` (:math:`\lambda`) and
  ``l1_coefficient`` (:math:`2\lambda`); ``companion_lam`` wins.
* A SAELens ``cfg.json`` with ``l1_coefficient`` implies :math:`\lambda = \alpha/2` when
  ``lp_norm`` is 1 (or absent) and ``mse_loss_normalization`` is absent/null; any other
  setting trained a different loss and no :math:`\lambda` is implied.
* dictionary_learning checkpoints never imply a :math:`\lambda`: their trainers record
  ``l1_penalty`` but used different losses across versions (an unsquared error norm in the
  original ``StandardTrainer``; squared error with norm-weighted L1 in the April-update
  trainer), so the user must say which :math:`\lambda` to certify at.
* If the user passes :math:`\lambda` and the checkpoint implies one, they must agree to a
  relative ``1e-6``, else :class:`LamMismatchError` (a ``ValueError``) names both; pass
  ``override=True`` to certify deliberately at another :math:`\lambda` (the question "is this
  dictionary optimal at :math:`\lambda'`?" is legitimate, just a different one).
* If the checkpoint's L1 was *not* weighted by decoder norms and its decoder rows are not
  unit norm, it minimised a per-atom-weighted penalty :math:`\lambda/\|W_{dec}[k]\|` in the
  unit-norm form, not the joint problem at :math:`\lambda`: :func:`checkpoint_lam` raises
  unless ``override=True``.
* ``normalize_activations`` other than ``"none"``: the checkpoint was trained on rescaled
  activations, and :math:`\lambda` refers to that scale. Loading warns
  (:class:`CheckpointWarning`); the activations given to :func:`companion.certify` must be
  normalised the same way.
"""

from __future__ import annotations

import json
import math
import pathlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._validation import check_positive
from .certificates import CertificateReport, certify
from .sae import VanillaSAE

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "LamMismatchError",
    "SAECertificate",
    "certify_sae",
    "checkpoint_lam",
    "load_sae",
    "save_sae",
]

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
_LAM_RTOL = 1e-6


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or not a vanilla (ReLU, L1) SAE."""


class LamMismatchError(ValueError):
    """The λ asked for disagrees with the λ the checkpoint's training loss implies."""


class CheckpointWarning(UserWarning):
    """A checkpoint setting that changes what λ means (e.g. normalised activations)."""


@dataclass
class Checkpoint:
    """An SAE loaded by :func:`load_sae`, with what its files say about its training loss.

    Attributes
    ----------
    sae : VanillaSAE
        The autoencoder (float32 unless ``dtype`` was given).
    layout : str
        ``"saelens"`` or ``"dictionary_learning"``.
    path : pathlib.Path
        The directory (SAELens) or ``ae.pt`` file (dictionary_learning) it was read from.
    lam : float or None
        The book's :math:`\\lambda` implied by the recorded training loss (see the module
        docstring), or None when the files do not determine it.
    lam_source : str
        Where ``lam`` came from, in words (e.g. ``"cfg.json l1_coefficient / 2"``), or why
        there is none.
    l1_weighted_by_decoder_norm : bool or None
        Whether the training L1 was :math:`\\sum_k\\|W_{dec}[k]\\|z_k` (True), plain
        :math:`\\sum_k z_k` (False), or unknown (None).
    normalize_activations : str
        SAELens' ``normalize_activations`` (``"none"`` when absent).
    cfg : dict
        The parsed configuration file (empty when there is none).
    """

    sae: VanillaSAE
    layout: str
    path: pathlib.Path
    lam: float | None
    lam_source: str
    l1_weighted_by_decoder_norm: bool | None
    normalize_activations: str = "none"
    cfg: dict = field(default_factory=dict, repr=False)


def _read_json(path: pathlib.Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: pathlib.Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(
            f"{where} is missing the tensors {missing}; it holds {sorted(tensors)}"
        )


def _check_shapes(shapes: dict[str, tuple[torch.Tensor, tuple[int, ...]]], where: pathlib.Path,
                  d_in: int, d_sae: int) -> None:
    for name, (t, want) in shapes.items():
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(t.shape)}, expected {want} "
                f"for d_in={d_in}, d_sae={d_sae}"
            )


def _build(W_enc, b_enc, W_dec, b_dec, device, dtype) -> VanillaSAE:
    d_in, d_sae = W_enc.shape
    if dtype is None:
        dtype = W_dec.dtype if W_dec.dtype in (torch.float32, torch.float64) else torch.float32
    sae = VanillaSAE(d_in, d_sae, device=device, dtype=dtype)
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            t = t.to(device=sae.W_dec.device, dtype=torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{name} contains NaN or infinite entries")
            getattr(sae, name).copy_(t.to(dtype))
    return sae


def _is_false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.lower() == "false")


def _load_saelens(directory: pathlib.Path, device, dtype) -> Checkpoint:
    from safetensors.torch import load_file

    weights, cfg_path = directory / SAELENS_WEIGHTS, directory / SAELENS_CFG
    for p in (weights, cfg_path):
        if not p.is_file():
            raise CheckpointError(f"SAELens checkpoint {directory} has no {p.name}")
    cfg = _read_json(cfg_path)
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch != "standard" or act != "relu":
        raise CheckpointError(
            f"{cfg_path}: architecture={arch!r}, activation_fn={act!r}; only a vanilla SAE "
            "(architecture 'standard', activation 'relu') is the joint problem of this book"
        )
    if cfg.get("finetuning_scaling_factor") not in (None, False):
        raise CheckpointError(f"{cfg_path}: finetuning_scaling_factor is set; such SAEs are not supported")
    tensors = load_file(str(weights))
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), weights)
    W_enc, b_enc, W_dec, b_dec = (tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if W_enc.ndim != 2:
        raise CheckpointError(f"{weights}: W_enc must be 2-dimensional (d_in, d_sae), got shape {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and int(cfg[key]) != value:
            raise CheckpointError(f"{cfg_path} says {key}={cfg[key]} but W_enc has shape {tuple(W_enc.shape)}")
    _check_shapes({"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_in)),
                   "b_dec": (b_dec, (d_in,))}, weights, d_in, d_sae)
    if _is_false(cfg.get("apply_b_dec_to_input", True)):
        # ReLU(x W_enc + b_enc) = ReLU((x - b_dec) W_enc + b_enc + b_dec W_enc): fold exactly.
        b_enc = b_enc.double() + b_dec.double() @ W_enc.double()
    sae = _build(W_enc, b_enc, W_dec, b_dec, device, dtype)

    weighted = cfg.get("scale_sparsity_penalty_by_decoder_norm")
    weighted = None if weighted is None else bool(weighted)
    normalise = cfg.get("normalize_activations") or "none"
    lam, source = None, "cfg.json records no l1_coefficient"
    if "companion_lam" in cfg:
        lam, source = check_positive(cfg["companion_lam"], "cfg.json companion_lam"), "cfg.json companion_lam"
        if weighted is None:
            weighted = True
    elif "l1_coefficient" in cfg:
        lp = cfg.get("lp_norm", 1)
        mse_norm = cfg.get("mse_loss_normalization")
        if lp not in (1, 1.0) or mse_norm not in (None, "none"):
            source = (f"cfg.json has lp_norm={lp!r}, mse_loss_normalization={mse_norm!r}: "
                      "a different loss, no λ implied")
        else:
            lam = check_positive(cfg["l1_coefficient"], "cfg.json l1_coefficient") / 2
            source = "cfg.json l1_coefficient / 2 (SAELens' squared error is not halved)"
    if normalise != "none":
        warnings.warn(
            f"{cfg_path}: normalize_activations={normalise!r}; the SAE was trained on rescaled "
            "activations and λ refers to that scale: normalise activations the same way before "
            "certifying", CheckpointWarning, stacklevel=3)
    return Checkpoint(sae=sae, layout="saelens", path=directory, lam=lam, lam_source=source,
                      l1_weighted_by_decoder_norm=weighted, normalize_activations=normalise, cfg=cfg)


def _load_dictionary_learning(file: pathlib.Path, device, dtype) -> Checkpoint:
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"could not read {file} as a torch state dict: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} must hold a state dict, got {type(state).__name__}")
    names = ("encoder.weight", "encoder.bias", "decoder.weight", "bias")
    _require(state, names, file)
    enc_w, enc_b, dec_w, bias = (state[k] for k in names)
    if enc_w.ndim != 2:
        raise CheckpointError(f"{file}: encoder.weight must be 2-dimensional (d_sae, d_in), got shape {tuple(enc_w.shape)}")
    d_sae, d_in = enc_w.shape
    _check_shapes({"encoder.bias": (enc_b, (d_sae,)), "decoder.weight": (dec_w, (d_in, d_sae)),
                   "bias": (bias, (d_in,))}, file, d_in, d_sae)
    sae = _build(enc_w.T, enc_b, dec_w.T, bias, device, dtype)
    cfg_path = file.parent / "config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    return Checkpoint(sae=sae, layout="dictionary_learning", path=file, lam=None,
                      lam_source="dictionary_learning checkpoints do not determine λ (pass it)",
                      l1_weighted_by_decoder_norm=None, cfg=cfg)


def load_sae(path: str | pathlib.Path, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a vanilla SAE checkpoint in the SAELens or dictionary_learning layout (Chapter 7).

    Parameters
    ----------
    path : str or path
        A SAELens directory (``sae_weights.safetensors`` + ``cfg.json``), a
        dictionary_learning ``ae.pt`` file, or a directory holding ``ae.pt``.
    device : torch.device or str, optional
        Where to put the parameters. Default CPU.
    dtype : torch.dtype, optional
        Parameter dtype (float32 or float64). Default: the stored dtype when it is float32 or
        float64, else float32 (e.g. for bfloat16 checkpoints). Certify in float64.

    Returns
    -------
    Checkpoint

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the files are incomplete, have inconsistent shapes, or hold another architecture.
    """
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        if (p / SAELENS_WEIGHTS).is_file() or (p / SAELENS_CFG).is_file():
            return _load_saelens(p, device, dtype)
        if (p / DICTIONARY_LEARNING_WEIGHTS).is_file():
            return _load_dictionary_learning(p / DICTIONARY_LEARNING_WEIGHTS, device, dtype)
        raise CheckpointError(
            f"{p} holds neither {SAELENS_WEIGHTS} + {SAELENS_CFG} (SAELens) nor "
            f"{DICTIONARY_LEARNING_WEIGHTS} (dictionary_learning)"
        )
    if p.name == SAELENS_WEIGHTS:
        return _load_saelens(p.parent, device, dtype)
    if p.suffix in (".pt", ".pth"):
        return _load_dictionary_learning(p, device, dtype)
    raise CheckpointError(
        f"{p} is neither a SAELens directory nor a dictionary_learning .pt file"
    )


def checkpoint_lam(checkpoint: Checkpoint, lam: float | None = None, *,
                   override: bool = False) -> float:
    r"""The :math:`\lambda` to certify ``checkpoint`` at, reconciling the user's and the checkpoint's.

    See the module docstring for the convention. ``lam`` (if given) must be positive; if the
    checkpoint implies a :math:`\lambda` too, the two must agree to a relative ``1e-6``.

    Parameters
    ----------
    checkpoint : Checkpoint
        From :func:`load_sae`.
    lam : float, optional
        The penalty asked for. Required when the checkpoint implies none.
    override : bool
        Certify at ``lam`` even when it disagrees with the checkpoint's, or when the
        checkpoint's L1 was not weighted by decoder norms and its decoder rows are not unit
        norm (then the certificate answers a question about the joint problem at ``lam``,
        not about the loss the SAE was trained on).

    Raises
    ------
    ValueError
        If ``lam`` is missing and the checkpoint implies none, or ``lam`` ≤ 0.
    LamMismatchError
        On disagreement without ``override``.
    """
    if lam is not None:
        lam = check_positive(lam, "lam")
    if lam is None and checkpoint.lam is None:
        raise ValueError(f"lam is required: {checkpoint.lam_source}")
    if lam is not None and checkpoint.lam is not None and not override:
        if abs(lam - checkpoint.lam) > _LAM_RTOL * max(abs(lam), abs(checkpoint.lam)):
            raise LamMismatchError(
                f"lam={lam:g} disagrees with the checkpoint's λ={checkpoint.lam:g} "
                f"({checkpoint.lam_source}); the book's λ multiplies the L1 of "
                "½‖x - x̂‖² + λ Σ_k ‖W_dec[k]‖ z_k. Pass override=True (--override-lam) to "
                "certify at another λ on purpose"
            )
    chosen = lam if lam is not None else checkpoint.lam
    if checkpoint.l1_weighted_by_decoder_norm is False and not override:
        norms = checkpoint.sae.W_dec.detach().norm(dim=1)
        if bool(((norms - 1).abs() > 1e-3).any()):
            raise ValueError(
                "the checkpoint's L1 was not weighted by decoder norms "
                "(scale_sparsity_penalty_by_decoder_norm=false) and its decoder rows have norms "
                f"in [{float(norms.min()):.4g}, {float(norms.max()):.4g}], not 1: it was trained on "
                "a per-atom penalty λ/‖W_dec[k]‖, not the joint problem at λ. Pass override=True "
                "(--override-lam) to certify the joint problem anyway"
            )
    return float(chosen)


def save_sae(sae: VanillaSAE, path: str | pathlib.Path, *, lam: float,
             extra_cfg: dict | None = None) -> pathlib.Path:
    r"""Write ``sae`` in the SAELens layout: ``path/sae_weights.safetensors`` and ``path/cfg.json`` (Chapter 7).

    ``cfg.json`` records ``d_in``, ``d_sae``, ``dtype``, the SAELens fields that make it a
    standard ReLU SAE (``architecture="standard"``, ``activation_fn="relu"``,
    ``apply_b_dec_to_input=true``, ``normalize_activations="none"``), the SAELens training
    fields of our loss (``l1_coefficient`` :math:`=2\lambda`, ``lp_norm=1``,
    ``scale_sparsity_penalty_by_decoder_norm=true``), and ``companion_lam`` :math:`=\lambda`
    with ``companion_loss`` stating the loss in words. :func:`load_sae` reads it back exactly.

    Parameters
    ----------
    sae : VanillaSAE
        The autoencoder to save (tensors are stored in its dtype, on the CPU).
    path : str or path
        The directory to write (created if needed; existing files of the layout are replaced).
    lam : float
        The λ it was trained at, in the book's convention.
    extra_cfg : dict, optional
        More JSON-serialisable entries for ``cfg.json`` (e.g. ``hook_name``); they may not
        overwrite the fields above.

    Returns
    -------
    pathlib.Path
        The directory.
    """
    from safetensors.torch import save_file

    if not isinstance(sae, VanillaSAE):
        raise TypeError(f"sae must be a VanillaSAE, got {type(sae).__name__}")
    lam = check_positive(lam, "lam")
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtype_name = {torch.float32: "float32", torch.float64: "float64"}[sae.W_dec.dtype]
    cfg = {
        "architecture": "standard",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype_name,
        "activation_fn": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "l1_coefficient": 2 * lam,
        "lp_norm": 1.0,
        "mse_loss_normalization": None,
        "scale_sparsity_penalty_by_decoder_norm": True,
        "companion_lam": lam,
        "companion_loss": "0.5 * ||x - x_hat||^2 + companion_lam * sum_k ||W_dec[k]|| z_k "
                          "(SAELens: ||x - x_hat||^2 + l1_coefficient * ..., so l1_coefficient = 2 * companion_lam)",
    }
    if extra_cfg:
        clash = sorted(set(extra_cfg) & set(cfg))
        if clash:
            raise ValueError(f"extra_cfg may not overwrite the fields {clash}")
        cfg.update(extra_cfg)
    tensors = {name: getattr(sae, name).detach().cpu().contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(tensors, str(directory / SAELENS_WEIGHTS))
    (directory / SAELENS_CFG).write_text(json.dumps(cfg, indent=2, allow_nan=False) + "\n")
    return directory


@dataclass
class SAECertificate:
    r"""What :func:`certify_sae` measured for one SAE on one batch of activations (Chapter 7).

    Attributes
    ----------
    lam : float
        The penalty :math:`\lambda` of the certificates.
    sae_codes : CertificateReport
        :func:`companion.certify` of the SAE's joint view :math:`(x - b_{dec}, D, Z_{SAE})`:
        its ``t1_violation`` is how far the encoder's codes are from exact codes for the
        SAE's own dictionary, its ``loss`` is the SAE loss.
    exact_codes : CertificateReport or None
        :func:`companion.certify` of the same dictionary with exact codes: its ``loss`` is
        :math:`F(D)`, its ``t2_violation`` says whether the dictionary is stationary, its
        ``new_atom_gain`` what one more atom would buy. None when not computed.
    amortisation_gap : float or None
        ``sae_codes.loss - exact_codes.loss`` :math:`= L(D, Z_{SAE}) - F(D) \ge 0`.
    relative_amortisation_gap : float or None
        The gap divided by the SAE loss.
    tol : float
        Threshold of the verdicts "T1/T2 satisfied": ``1e-6`` in float64, ``1e-3`` in float32.
    floor : float
        Magnitudes below it are rounding noise and print as ``< floor`` in :meth:`summary`:
        ``1e-9`` in float64, ``1e-5`` in float32.
    """

    lam: float
    sae_codes: CertificateReport
    exact_codes: CertificateReport | None
    amortisation_gap: float | None
    relative_amortisation_gap: float | None
    tol: float = 1e-6
    floor: float = 1e-9

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the reports through their own ``to_dict``)."""
        return {
            "lam": self.lam,
            "sae_codes": self.sae_codes.to_dict(),
            "exact_codes": None if self.exact_codes is None else self.exact_codes.to_dict(),
            "amortisation_gap": self.amortisation_gap,
            "relative_amortisation_gap": self.relative_amortisation_gap,
            "tol": self.tol,
        }

    def _fmt(self, x: float | None, digits: int) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        if abs(x) < self.floor:
            return f"< {self.floor:.0e}"
        return f"{x:.{digits}g}"

    def summary(self, top: int = 5, digits: int = 4) -> str:
        """A readable report: both certificates side by side, the amortisation gap, a verdict.

        Numbers are printed with ``digits`` significant digits; magnitudes below ``floor``
        (rounding noise at the certificate's precision) print as ``< floor``. ``top`` atoms
        with the largest T2 violation at exact codes (or T1 violation of the SAE's codes,
        without exact codes) are listed.
        """
        s, e = self.sae_codes, self.exact_codes
        f = lambda x: self._fmt(x, digits)  # noqa: E731
        get = (lambda name: f(getattr(e, name))) if e is not None else (lambda name: "-")
        rows = [
            ("loss", "loss"),
            ("T1 violation (codes)", "t1_violation"),
            ("T2 violation (dictionary)", "t2_violation"),
            ("duality gap", "duality_gap"),
            ("new-atom gain (lower bound)", "new_atom_gain"),
            ("max_n u.r_n - lambda", "new_atom_excess"),
            ("max residual norm", "max_residual_norm"),
        ]
        w = 30
        lines = [f"{'':<{w}}{'SAE codes':>14}{'exact codes':>14}"]
        lines += [f"{label:<{w}}{f(getattr(s, name)):>14}{get(name):>14}" for label, name in rows]
        used = lambda r: f"{r.n_atoms - len(r.dead_atoms)} / {len(r.dead_atoms)}"  # noqa: E731
        lines.append(f"{'atoms used / dead':<{w}}{used(s):>14}{used(e) if e is not None else '-':>14}")
        if e is not None:
            lines += ["", f"amortisation gap L(D, Z_SAE) - F(D) = {f(self.amortisation_gap)} "
                          f"({f(100 * self.relative_amortisation_gap)}% of the SAE loss)"]
        if top > 0 and s.n_atoms:
            key = np.asarray(_numpy(e.atom_t2 if e is not None else s.atom_t1), dtype=float)
            worst = np.argsort(-np.nan_to_num(key), kind="stable")[:min(top, s.n_atoms)]
            cols = [("usage", s, "usage"), ("T1", s, "atom_t1")]
            if e is not None:
                cols += [("usage*", e, "usage"), ("T2*", e, "atom_t2"), ("cos*", e, "centroid_cosine")]
            lines += ["", "atoms with the largest " + ("T2 violation at exact codes (*)" if e is not None
                                                       else "T1 violation")]
            lines.append(f"{'atom':>6}" + "".join(f"{c:>11}" for c, _, _ in cols))
            arrays = [np.asarray(_numpy(getattr(r, a)), dtype=float) for _, r, a in cols]
            for k in worst:
                lines.append(f"{int(k):>6}" + "".join(f"{f(float(arr[k])):>11}" for arr in arrays))
        lines += ["", "verdict",
                  f"  encoder codes exact for the dictionary (T1 <= {self.tol:g}): {s.t1_violation <= self.tol}"]
        if e is not None:
            lines += [
                f"  dictionary stationary at exact codes (T2 <= {self.tol:g}): {e.t2_violation <= self.tol}",
                f"  one more atom would lower the loss by at least {f(e.new_atom_gain)}"
                if e.new_atom_excess > 0 else "  no new atom lowers the loss (max_n u.r_n <= lambda)",
                f"  dead atoms at exact codes: {len(e.dead_atoms)} of {e.n_atoms}",
            ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def certify_sae(sae: VanillaSAE, X: Any, lam: float, *, exact: bool = True,
                chunk_size: int | None = None, progress: bool = False) -> SAECertificate:
    r"""Certify an SAE on activations ``X``: as it is, and with exact codes (Chapter 7).

    With the joint view :math:`(X - b_{dec}, D, Z_{SAE})` of Chapter 1 (``D`` the
    unit-normalised decoder rows, ``Z_SAE`` the encoder's codes times the decoder norms), this
    runs :func:`companion.certify` on the SAE's codes and, if ``exact``, on exact codes for the
    same ``D``. Their losses are the SAE loss :math:`L(D, Z_{SAE})` and :math:`F(D)`; the
    difference is the amortisation gap, nonnegative because exact codes minimise every row's
    cost.

    Parameters
    ----------
    sae : VanillaSAE
        Any vanilla SAE (e.g. from :func:`load_sae` or :func:`companion.train_sae`). Use float64
        for certificates at the ``1e-6`` level.
    X : array (n_samples, d_in)
        Activations, uncentred (the decoder bias is subtracted here); converted to the SAE's
        device and dtype when numpy.
    lam : float
        The penalty, in the book's convention (see :func:`checkpoint_lam`).
    exact : bool
        Also certify the dictionary with exact codes (the expensive part: one nonnegative
        lasso per row).
    chunk_size : int, optional
        Rows per chunk (memory ``O(chunk_size · d_sae)``).
    progress : bool
        tqdm bars on stderr.

    Returns
    -------
    SAECertificate
    """
    if not isinstance(sae, VanillaSAE):
        raise TypeError(f"sae must be a VanillaSAE, got {type(sae).__name__}")
    lam = check_positive(lam, "lam")
    Xc, D, Z = sae.joint_view(X)
    tol, floor = (1e-6, 1e-9) if sae.W_dec.dtype == torch.float64 else (1e-3, 1e-5)
    on_sae = certify(Xc, D, lam, Z, chunk_size=chunk_size, progress=progress)
    if not exact:
        return SAECertificate(lam, on_sae, None, None, None, tol, floor)
    on_exact = certify(Xc, D, lam, chunk_size=chunk_size, progress=progress)
    gap = on_sae.loss - on_exact.loss
    rel = gap / on_sae.loss if on_sae.loss > 0 else 0.0
    return SAECertificate(lam, on_sae, on_exact, gap, rel, tol, floor)


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
