r"""Load SAEs trained elsewhere, save ours, and know which :math:`\lambda` a checkpoint was trained at (Chapter 7).

Two checkpoint layouts are read, both into a :class:`companion.sae.VanillaSAE`
(:math:`z = \mathrm{ReLU}((x - b_{dec})W_{enc} + b_{enc})`, :math:`\hat x = zW_{dec} + b_{dec}`):

* **SAELens** (v5 and v6) — a directory holding ``sae_weights.safetensors`` (``W_enc``
  (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,)) and
  ``cfg.json``, and, when SAELens' training runner wrote it, ``runner_cfg.json``. Only the
  ``"standard"`` architecture with a ReLU is a vanilla SAE; TopK, BatchTopK and JumpReLU
  checkpoints are read into a :class:`companion.beyond_l1.SparseSAE` instead (Chapter 9),
  gated, Matryoshka and the rest are refused by name. With ``apply_b_dec_to_input: false`` the encoder does
  not subtract ``b_dec``, which is folded exactly into the encoder bias
  (``b_enc ← b_enc + b_dec W_enc``).
* **dictionary_learning** (saprmarks) — a file ``ae.pt`` (or a directory holding one, with
  its ``config.json``): the ``AutoEncoder`` state dict (``encoder.weight`` (d_sae, d_in),
  ``encoder.bias``, ``decoder.weight`` (d_in, d_sae), ``bias``; encoder
  ``ReLU(encoder(x - bias))``) or the ``AutoEncoderNew`` one (``decoder.bias`` instead of
  ``bias``, encoder ``ReLU(encoder(x))``, folded like ``apply_b_dec_to_input: false``).

A tensor beyond these (``threshold``, ``k``, ``b_gate``, ``r_mag``, ...) belongs to another
architecture, and the checkpoint is refused naming it, never silently dropped.

dictionary_learning's TopK, BatchTopK and JumpReLU checkpoints (``config.json``'s
``dict_class`` ``AutoEncoderTopK``, ``BatchTopKSAE``, ``JumpReluAutoEncoder``, or the trainers
``TopKTrainer``, ``BatchTopKTrainer``, ``JumpReluTrainer`` that save them) are read into a
:class:`companion.beyond_l1.SparseCheckpoint` holding a :class:`~companion.beyond_l1.SparseSAE`
(Chapter 9), parameter for parameter, with the same codes and reconstructions:

* ``AutoEncoderTopK`` — ``encoder.weight`` (d_sae, d_in), ``encoder.bias``,
  ``decoder.weight`` (d_in, d_sae), ``b_dec``, buffers ``k`` (an integer) and ``threshold`` (a
  scalar). Codes: the ``k`` largest of :math:`\mathrm{ReLU}(\mathrm{encoder}(x - b_{dec}))`,
  :math:`\hat x = \mathrm{decoder}(z) + b_{dec}` (the default ``encode``; its ``threshold`` is
  used only with ``use_threshold=True`` and is not read). Read as ``"topk"``: ``W_enc`` is
  the transpose of ``encoder.weight``, ``b_enc`` is ``encoder.bias``, ``W_dec`` the transpose
  of ``decoder.weight``, ``b_dec`` is ``b_dec`` and ``k`` the buffer's (``config.json``'s
  ``k``, when present, must agree).
* ``BatchTopKSAE`` — the same keys. Its inference ``encode`` keeps
  :math:`\mathrm{ReLU}(h)` where it exceeds the one scalar ``threshold``
  (:math:`h = \mathrm{encoder}(x - b_{dec})`; the batch top-k is training only): read as
  ``"batchtopk"`` with that threshold for every latent (``ReLU(h)[ReLU(h) > θ]`` and
  ``ReLU(h)[h > θ]`` agree for every θ). A negative threshold (the initial −1: training
  stopped before ``threshold_start_step``) leaves a plain ReLU encoder; it is read as it is,
  with a :class:`CheckpointWarning`. AutoEncoderTopK and BatchTopKSAE save the same keys and
  encode differently, so without ``config.json``'s ``dict_class`` (or ``trainer_class``) such
  a state dict is refused.
* ``JumpReluAutoEncoder`` — ``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in),
  ``b_dec``, ``threshold`` (d_sae,): the SAELens layout, with
  :math:`z = \mathrm{ReLU}(h\,[h > \theta])`, :math:`h = xW_{enc} + b_{enc}` (the trainer never
  subtracts ``b_dec``: its ``apply_b_dec_to_input`` is False and not saved), folded exactly
  into ``b_enc ← b_enc + b_dec W_enc``; :math:`\hat x = zW_{dec} + b_{dec}`. An early version of
  the class multiplied its codes by :math:`\|W_{dec}[k]\|` in ``encode`` and divided them back
  in ``decode``: the same reconstruction, and its codes are
  :meth:`~companion.beyond_l1.SparseSAE.joint_view`'s codes on unit atoms. A state dict with
  exactly these five keys is a JumpReLU one even without ``config.json``.

The trainers keep every decoder row at unit norm (``set_decoder_norm_to_unit_norm``, up to
float rounding), and no ``rescale_acts_by_decoder_norm`` applies. The budget and price of
Chapter 9: TopK's ``k``; BatchTopK's mean budget ``k`` (no price recorded);
JumpReLU's :math:`\varepsilon` in :math:`\tfrac12\|x-\hat x\|^2 + \varepsilon\|z\|_0` only where
the recorded loss is :math:`\|x-\hat x\|^2 + c\,\|z\|_0`: the early ``TrainerJumpRelu``
trained that loss, so :math:`\varepsilon = c/2` (the squared error is summed over features,
not halved), but its ``config.json`` does not record :math:`c`; it is read when a config of
that trainer records ``sparsity_penalty``. ``JumpReluTrainer`` penalises
:math:`c\,(\bar\ell_0/\ell_0^{target} - 1)^2` with :math:`\bar\ell_0` the batch's mean L0: a pull
towards ``target_l0``, not a price per latent. Linearised at a mean L0 :math:`\ell` its price
is :math:`\varepsilon = c\,(\ell/\ell_0^{target} - 1)/\ell_0^{target}` (zero or negative at or below
the target), and :math:`\ell` is not recorded: ``eps`` is None, with ``eps_source`` saying
why; pass ``eps`` to :func:`certify_checkpoint`. dictionary_learning's
``normalize_activations`` trains on :math:`x/s` and folds :math:`s` into the biases before
saving, so the weights act on raw activations as read here; :math:`s` is not written to
``config.json``, and a price learned on :math:`x/s` is :math:`s^2\varepsilon` on the raw scale.

:func:`save_sae` writes our SAEs in the SAELens layout (``sae_lens.SAE.load_from_disk``
reads them), and :func:`certify_sae` certifies any of them twice, streaming the activations
chunk by chunk: the SAE as it is (its encoder's codes for its own dictionary), and its
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
summed over features, *not* halved), so its ``l1_coefficient`` :math:`\alpha` is
:math:`2\lambda` and its loss is twice the book's. Rules, applied by :func:`load_sae` and
:func:`checkpoint_lam`:

* ``cfg.json`` written by :func:`save_sae` records ``companion_lam`` (:math:`\lambda`); it wins.
* SAELens' ``l1_coefficient`` is read from ``cfg.json`` (v5), from
  ``metadata.training_architecture_details`` (v6 ``save_inference_model``), or from
  ``runner_cfg.json``. It implies :math:`\lambda = \alpha/2` when ``lp_norm`` is 1 and
  ``mse_loss_normalization`` is absent/null; any other setting trained a different loss and
  no :math:`\lambda` is implied.
* **Activation normalisation.** ``expected_average_only_in`` trains on :math:`s\,x` with
  :math:`s = \sqrt{d_{in}}/\mathbb E\|x\|`. The SAE loss on the raw scale is then
  :math:`s^2(\|x-\hat x\|^2 + (\alpha/s)\sum_k\|W_{dec}[k]\|z_k)` for the folded weights
  (``W_enc·s``, ``W_dec/s``, ``b_dec/s``), so :math:`\lambda = \alpha/(2s)`. SAELens folds
  :math:`s` into the weights at the end of training and writes ``"none"`` in ``cfg.json``,
  recording the training normalisation only in ``runner_cfg.json`` and :math:`s` nowhere: pass
  ``activation_scale=s``. A checkpoint that still says ``expected_average_only_in`` (weights
  for :math:`s\,x`) is folded here when :math:`s` is known (``activation_scale`` or
  ``activation_scaler.json``), refused otherwise. ``layer_norm`` and
  ``constant_norm_rescale`` rescale each row by its own factor, so each row was trained at
  its own penalty: refused. ``covariance_whitening`` measures the error in whitened
  coordinates: refused.
* **dictionary_learning** ``config.json``'s ``trainer_class``: ``StandardTrainerAprilUpdate``
  (squared error, decoder-norm-weighted L1) implies :math:`\lambda` = ``l1_penalty``/2; the
  original ``StandardTrainer`` (unsquared error :math:`\|x-\hat x\|`, so the code condition
  T1 is not the one of this loss) and ``PAnnealTrainer`` (an :math:`L_p` penalty with
  :math:`p` annealed below 1) are refused, as are gated and Matryoshka trainers and a
  ``dict_class`` not read here; TopK, BatchTopK and JumpReLU have no :math:`\lambda` (see
  above, Chapter 9); with no config or an unknown trainer no :math:`\lambda` is implied.
* If the user passes :math:`\lambda` and the checkpoint implies one, they must agree to a
  relative ``1e-6``, else :class:`LamMismatchError` (a ``ValueError``) names both; pass
  ``override=True`` to certify deliberately at another :math:`\lambda`.
* If the checkpoint's L1 was *not* weighted by decoder norms and its decoder rows are not
  unit norm, it minimised a per-atom-weighted penalty :math:`\lambda/\|W_{dec}[k]\|` in the
  unit-norm form, not the joint problem at :math:`\lambda`: :func:`checkpoint_lam` raises
  unless ``override=True``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import stat
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._validation import ArrayKind, check_positive, check_positive_int
from .certificates import CertificateReport, _encode_options, _ExactCodes, _Running, check_nonempty, \
    default_certificate_tol
from .coding import default_chunk_size
from .losses import sae_codes
from .runtime import perturb_data, pick_device, progress_bar
from .sae import VanillaSAE
from .verdict import CertificateStatistics, _gather_rows, _Noise, assess, split_signs

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "LamMismatchError",
    "SAECertificate",
    "certify_checkpoint",
    "certify_sae",
    "checkpoint_eps",
    "checkpoint_lam",
    "load_sae",
    "open_activations",
    "save_sae",
]

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
SAELENS_RUNNER_CFG = "runner_cfg.json"
SAELENS_SCALER = "activation_scaler.json"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
_LAM_RTOL = 1e-6
_SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")

#: SAELens architectures that are not a vanilla ReLU + L1 SAE.
_SAELENS_OTHER = {
    "topk": "TopK", "batchtopk": "BatchTopK", "matryoshka_batchtopk": "Matryoshka BatchTopK",
    "jumprelu": "JumpReLU", "gated": "gated", "abstopk": "AbsTopK",
    "matching_pursuit": "matching pursuit", "temporal": "temporal", "transcoder": "transcoder",
}
#: SAELens architectures read into their own type by :func:`companion.beyond_l1.load_sparse_sae`
#: (Chapter 9); their certificates are :func:`companion.beyond_l1.certify_sparse_sae`'s.
_SPARSE_ARCHITECTURES = ("topk", "batchtopk", "jumprelu")
#: dictionary_learning trainers (and dictionary classes) of architectures not read here.
_DL_OTHER = {
    "MatryoshkaBatchTopKTrainer": "Matryoshka BatchTopK",
    "MatryoshkaBatchTopKSAE": "Matryoshka BatchTopK", "GatedSAETrainer": "gated",
    "GatedAutoEncoder": "gated", "GatedAnnealTrainer": "gated (annealed)",
}
#: dictionary_learning classes read into a VanillaSAE (Chapter 7) ...
_DL_VANILLA_CLASSES = ("AutoEncoder", "AutoEncoderNew")
#: ... and into a companion.beyond_l1.SparseSAE (Chapter 9), with the trainers that save them.
_DL_SPARSE_CLASSES = {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                      "JumpReluAutoEncoder": "jumprelu"}
_DL_SPARSE_TRAINERS = {"TopKTrainer": "topk", "BatchTopKTrainer": "batchtopk",
                       "JumpReluTrainer": "jumprelu", "TrainerJumpRelu": "jumprelu"}
#: state-dict keys of AutoEncoderTopK and BatchTopKSAE (the same), and of JumpReluAutoEncoder.
_DL_TOPK_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold")
_DL_JUMPRELU_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or not a vanilla (ReLU, L1) SAE."""


class LamMismatchError(ValueError):
    """The λ asked for disagrees with the λ the checkpoint's training loss implies."""


class CheckpointWarning(UserWarning):
    """A checkpoint setting worth knowing about that does not stop certification."""


@dataclass
class Checkpoint:
    """An SAE loaded by :func:`load_sae`, with what its files say about its training loss.

    Attributes
    ----------
    sae : VanillaSAE
        The autoencoder on the raw activation scale (float32 unless ``dtype`` was given).
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
        The activation normalisation of training (``"none"`` when none is recorded).
    activation_scale : float or None
        The factor :math:`s` the training activations were multiplied by
        (``expected_average_only_in``), when known; the SAE here acts on raw activations.
    trainer : str or None
        dictionary_learning's ``trainer_class`` (None for SAELens or without ``config.json``).
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
    activation_scale: float | None = None
    trainer: str | None = None
    cfg: dict = field(default_factory=dict, repr=False)


def _read_json(path: pathlib.Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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


def _refuse_extra(tensors: dict, known: tuple[str, ...], where: pathlib.Path) -> None:
    extra = sorted(set(tensors) - set(known))
    if extra:
        raise CheckpointError(
            f"{where} holds tensors {extra} beside the vanilla SAE's {list(known)}: they belong to "
            "another architecture (a threshold, k, gate or magnitude parameter changes the encoder), "
            "which is not the ReLU + L1 SAE of this book"
        )


def _check_shapes(shapes: dict[str, tuple[torch.Tensor, tuple[int, ...]]], where: pathlib.Path,
                  d_in: int, d_sae: int) -> None:
    for name, (t, want) in shapes.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: {name} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(t.shape)}, expected {want} "
                f"for d_in={d_in}, d_sae={d_sae}"
            )


def _build(W_enc, b_enc, W_dec, b_dec, device, dtype, scale: float = 1.0) -> VanillaSAE:
    """A VanillaSAE from the four tensors; ``scale`` s folds weights trained on ``s x``."""
    d_in, d_sae = W_enc.shape
    if dtype is None:
        dtype = W_dec.dtype if W_dec.dtype in (torch.float32, torch.float64) else torch.float32
    sae = VanillaSAE(d_in, d_sae, device=device, dtype=dtype)
    factors = {"W_enc": scale, "b_enc": 1.0, "W_dec": 1 / scale, "b_dec": 1 / scale}
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            t = t.to(device=sae.W_dec.device, dtype=torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{name} contains NaN or infinite entries")
            getattr(sae, name).copy_((t * factors[name]).to(dtype))
    return sae


def _is_false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.lower() == "false")


def _positive_scale(value: Any, name: str) -> float:
    try:
        return check_positive(value, name)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def _cfg_int(cfg: dict, key: str, where: pathlib.Path) -> int | None:
    if key not in cfg:
        return None
    v = cfg[key]
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise CheckpointError(f"{where}: {key} must be an integer, got {v!r}")
    return int(v)


def _load_safetensors(weights: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"could not read {weights} as safetensors: {e}") from None


def _saelens_training(cfg: dict, runner: dict) -> dict:
    """The training settings, wherever this SAELens version wrote them (v5 flat, v6 metadata, runner)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    details = meta.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    run_sae = runner.get("sae") if isinstance(runner.get("sae"), dict) else {}
    out = {}
    for key in ("l1_coefficient", "lp_norm", "mse_loss_normalization",
                "scale_sparsity_penalty_by_decoder_norm"):
        for src, where in ((cfg, "cfg.json"), (details, "cfg.json metadata.training_architecture_details"),
                           (run_sae, "runner_cfg.json sae"), (runner, "runner_cfg.json")):
            if key in src:
                out[key], out[key + "@"] = src[key], where
                break
    out["v6"] = bool(details) or bool(run_sae) or "training_architecture" in meta
    out["training_architecture"] = meta.get("training_architecture") or run_sae.get("architecture")
    out["normalize_activations"] = run_sae.get("normalize_activations", runner.get("normalize_activations"))
    return out


def _load_saelens(directory: pathlib.Path, device, dtype, activation_scale) -> Checkpoint:
    weights, cfg_path = directory / SAELENS_WEIGHTS, directory / SAELENS_CFG
    for p in (weights, cfg_path):
        if not p.is_file():
            raise CheckpointError(f"SAELens checkpoint {directory} has no {p.name}")
    cfg = _read_json(cfg_path)
    runner_path = directory / SAELENS_RUNNER_CFG
    runner = _read_json(runner_path) if runner_path.is_file() else {}
    train = _saelens_training(cfg, runner)
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch in _SPARSE_ARCHITECTURES or train["training_architecture"] in _SPARSE_ARCHITECTURES:
        from .beyond_l1 import load_sparse_sae   # imported here: beyond_l1 imports this module

        return load_sparse_sae(directory, device=device, dtype=dtype or torch.float64,
                               activation_scale=activation_scale)
    for a in (arch, train["training_architecture"]):
        if isinstance(a, str) and a in _SAELENS_OTHER:
            raise CheckpointError(
                f"{cfg_path}: architecture {a!r} ({_SAELENS_OTHER[a]} SAE) is not supported: only a "
                "vanilla SAE (architecture 'standard', ReLU, L1 penalty) is the joint problem of this book")
    if arch != "standard" or act != "relu":
        raise CheckpointError(
            f"{cfg_path}: architecture={arch!r}, activation_fn={act!r}; only a vanilla SAE "
            "(architecture 'standard', activation 'relu') is the joint problem of this book"
        )
    if cfg.get("finetuning_scaling_factor") not in (None, False):
        raise CheckpointError(f"{cfg_path}: finetuning_scaling_factor is set; such SAEs are not supported")
    tensors = _load_safetensors(weights)
    _require(tensors, _SAE_TENSORS, weights)
    _refuse_extra(tensors, _SAE_TENSORS, weights)
    W_enc, b_enc, W_dec, b_dec = (tensors[k] for k in _SAE_TENSORS)
    if W_enc.ndim != 2:
        raise CheckpointError(f"{weights}: W_enc must be 2-dimensional (d_in, d_sae), got shape {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        stated = _cfg_int(cfg, key, cfg_path)
        if stated is not None and stated != value:
            raise CheckpointError(f"{cfg_path} says {key}={stated} but W_enc has shape {tuple(W_enc.shape)}")
    _check_shapes({"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_in)),
                   "b_dec": (b_dec, (d_in,))}, weights, d_in, d_sae)

    in_cfg = cfg.get("normalize_activations") or "none"
    trained = train["normalize_activations"] or in_cfg
    for norm in {in_cfg, trained}:
        if norm in ("layer_norm", "constant_norm_rescale"):
            raise CheckpointError(
                f"{cfg_path}: normalize_activations={norm!r} rescales every activation vector by its "
                "own factor, so each row was trained at its own penalty (λ divided by that factor "
                "squared), not the joint problem at one λ: not supported")
        if norm == "covariance_whitening":
            raise CheckpointError(
                f"{cfg_path}: normalize_activations='covariance_whitening' measured the error in "
                "whitened coordinates, a different geometry from the raw activations: not supported")
        if norm not in ("none", "expected_average_only_in"):
            raise CheckpointError(f"{cfg_path}: unknown normalize_activations={norm!r}")
    scale = None
    if activation_scale is not None:
        scale = _positive_scale(activation_scale, "activation_scale")
        if "companion_lam" in cfg:
            raise CheckpointError(
                f"activation_scale={scale:g} was given but {cfg_path} was written by companion.save_sae, "
                "whose companion_lam is already the λ of the raw activations")
        if train["normalize_activations"] == "none" and in_cfg == "none":
            raise CheckpointError(
                f"activation_scale={scale:g} was given but {runner_path.name} records "
                "normalize_activations='none': the SAE was trained on raw activations")
    elif (directory / SAELENS_SCALER).is_file():
        rec = _read_json(directory / SAELENS_SCALER).get("scaling_factor")
        if rec is not None:
            scale = _positive_scale(rec, f"{SAELENS_SCALER} scaling_factor")
    fold = 1.0
    if in_cfg == "expected_average_only_in":
        if scale is None:
            raise CheckpointError(
                f"{cfg_path}: normalize_activations='expected_average_only_in' and the weights expect "
                "activations multiplied by SAELens' scale factor s = sqrt(d_in) / E||x||, which these "
                "files do not record: pass activation_scale=s (--activation-scale)")
        fold = scale                      # weights for s·x, folded to act on x
    if _is_false(cfg.get("apply_b_dec_to_input", True)):
        # ReLU(x W_enc + b_enc) = ReLU((x - b_dec) W_enc + b_enc + b_dec W_enc): fold exactly.
        b_enc = b_enc.double() + b_dec.double() @ W_enc.double()
    sae = _build(W_enc, b_enc, W_dec, b_dec, device, dtype, scale=fold)

    weighted = train.get("scale_sparsity_penalty_by_decoder_norm")
    if weighted is None:
        weighted = True if train["v6"] else None      # v6's standard SAE always weights by ‖W_dec‖
    else:
        weighted = bool(weighted)
    normalised = "expected_average_only_in" in (in_cfg, trained) or (scale is not None)
    lam, source = None, "cfg.json records no l1_coefficient (nor its metadata, nor runner_cfg.json)"
    if "companion_lam" in cfg:
        lam = _positive_scale(cfg["companion_lam"], "cfg.json companion_lam")
        source = "cfg.json companion_lam"
        if weighted is None:
            weighted = True
    elif "l1_coefficient" in train:
        where = train["l1_coefficient@"]
        lp = train.get("lp_norm", 1)
        mse_norm = train.get("mse_loss_normalization")
        alpha = _positive_scale(train["l1_coefficient"], f"{where} l1_coefficient")
        if lp not in (1, 1.0) or mse_norm not in (None, "none"):
            source = (f"{where} has lp_norm={lp!r}, mse_loss_normalization={mse_norm!r}: "
                      "a different loss, no λ implied")
        elif normalised and scale is None:
            source = (f"trained with normalize_activations='expected_average_only_in' "
                      f"({runner_path.name}) and the scale factor s folded into the weights; "
                      f"λ = l1_coefficient / (2 s) = {alpha:g} / (2 s) on the raw scale, but s is not "
                      "recorded: pass activation_scale=s (--activation-scale) or lam")
        elif scale is not None:
            lam = alpha / (2 * scale)
            source = (f"{where} l1_coefficient / (2 s), activation scale s = {scale:g} "
                      "(SAELens' squared error is not halved)")
        else:
            lam = alpha / 2
            source = f"{where} l1_coefficient / 2 (SAELens' squared error is not halved)"
            if train["v6"] and not runner:
                warnings.warn(
                    f"{cfg_path}: SAELens v6 writes normalize_activations='none' after folding an "
                    "'expected_average_only_in' scale s into the weights and records the training "
                    f"normalisation only in {SAELENS_RUNNER_CFG}, absent here; λ = l1_coefficient / 2 "
                    "assumes no normalisation (if there was one, pass activation_scale=s)",
                    CheckpointWarning, stacklevel=4)
    return Checkpoint(sae=sae, layout="saelens", path=directory, lam=lam, lam_source=source,
                      l1_weighted_by_decoder_norm=weighted,
                      normalize_activations="expected_average_only_in" if normalised else "none",
                      activation_scale=scale, cfg=cfg)


def _dl_trainer(cfg: dict) -> tuple[str | None, str | None, Any]:
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else cfg
    return trainer.get("trainer_class"), trainer.get("dict_class"), trainer.get("l1_penalty")


def _dl_architecture(cfg_path: pathlib.Path, trainer: Any, dict_class: Any) -> str | None:
    """The sparse architecture ``config.json`` names (None: a vanilla class, or nothing said)."""
    if dict_class is not None and (not isinstance(dict_class, str) or not (
            dict_class in _DL_VANILLA_CLASSES or dict_class in _DL_SPARSE_CLASSES)):
        raise CheckpointError(
            f"{cfg_path}: dict_class {dict_class!r} is not a dictionary class read here: the class "
            f"decides the encoder, and load_sae reads {', '.join(_DL_VANILLA_CLASSES)} (Chapter 7) "
            f"and {', '.join(_DL_SPARSE_CLASSES)} (Chapter 9)")
    by_class = _DL_SPARSE_CLASSES.get(dict_class) if dict_class is not None else None
    by_trainer = _DL_SPARSE_TRAINERS.get(trainer) if isinstance(trainer, str) else None
    if by_trainer is not None and dict_class is not None and by_class != by_trainer:
        raise CheckpointError(
            f"{cfg_path}: trainer_class {trainer!r} trains a {by_trainer} SAE but dict_class is "
            f"{dict_class!r}: the two disagree, so the encoder is not known")
    return by_class or by_trainer


def _load_dictionary_learning(file: pathlib.Path, device, dtype, activation_scale) -> Checkpoint:
    if activation_scale is not None:
        raise CheckpointError("activation_scale applies to SAELens checkpoints only; "
                              "dictionary_learning trains on the activations as given")
    cfg_path = file.parent / "config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    trainer, dict_class, l1 = _dl_trainer(cfg)
    for name in (trainer, dict_class):
        if isinstance(name, str) and name in _DL_OTHER:
            raise CheckpointError(
                f"{cfg_path}: {name} trains a {_DL_OTHER[name]} SAE, not supported: only a vanilla "
                "SAE (ReLU, L1 penalty) is the joint problem of this book, and TopK, BatchTopK and "
                "JumpReLU SAEs are read for Chapter 9")
    arch = _dl_architecture(cfg_path, trainer, dict_class)
    if arch is not None:
        return _load_dl_sparse(file, _dl_state(file), cfg, cfg_path, arch, trainer, device, dtype)
    if trainer == "StandardTrainer":
        raise CheckpointError(
            f"{cfg_path}: trainer_class 'StandardTrainer' (the original dictionary_learning trainer) "
            "minimises the unsquared error ||x - x_hat|| + l1_penalty ||f||_1; its code condition is "
            "not T1 of the squared-error loss, so the L1 theory of this book does not apply "
            "(StandardTrainerAprilUpdate's loss is supported)")
    if isinstance(trainer, str) and ("Anneal" in trainer or trainer.startswith("Lp")):
        raise CheckpointError(
            f"{cfg_path}: trainer_class {trainer!r} trains with an Lp sparsity penalty (p annealed "
            "below 1), not the L1 penalty that the joint problem and T1 are about: not supported")
    state = _dl_state(file)
    if dict_class is None:
        if set(state) == set(_DL_JUMPRELU_KEYS):
            return _load_dl_sparse(file, state, cfg, cfg_path, "jumprelu", trainer, device, dtype)
        if set(state) in (set(_DL_TOPK_KEYS), set(_DL_TOPK_KEYS) - {"threshold"}):
            where = (f"{cfg_path} has no dict_class or trainer_class to say which" if cfg else
                     f"there is no {cfg_path.name} beside it: put the one its trainer wrote there "
                     "(its dict_class says which)")
            raise CheckpointError(
                f"{file} holds the state dict of AutoEncoderTopK or BatchTopKSAE (the same keys "
                f"{sorted(state)}), which encode differently (TopK: the k largest latents; BatchTopK: "
                f"those above its threshold), and {where}")
    new = "decoder.bias" in state and "bias" not in state       # AutoEncoderNew
    names = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias" if new else "bias")
    _require(state, names, file)
    _refuse_extra(state, names, file)
    enc_w, enc_b, dec_w, bias = (state[k] for k in names)
    if not isinstance(enc_w, torch.Tensor) or enc_w.ndim != 2:
        raise CheckpointError(f"{file}: encoder.weight must be a 2-dimensional tensor (d_sae, d_in)")
    d_sae, d_in = enc_w.shape
    _check_shapes({"encoder.bias": (enc_b, (d_sae,)), "decoder.weight": (dec_w, (d_in, d_sae)),
                   names[3]: (bias, (d_in,))}, file, d_in, d_sae)
    if new:
        # AutoEncoderNew: ReLU(x W + b) = ReLU((x - b_dec) W + b + b_dec W), the exact fold.
        enc_b = enc_b.double() + bias.double() @ enc_w.double().T
    sae = _build(enc_w.T, enc_b, dec_w.T, bias, device, dtype)
    lam, weighted = None, None
    source = "dictionary_learning checkpoints without a known trainer_class do not determine λ (pass it)"
    if trainer == "StandardTrainerAprilUpdate" and l1 is not None:
        lam = _positive_scale(l1, "config.json l1_penalty") / 2
        weighted = True
        source = "config.json l1_penalty / 2 (StandardTrainerAprilUpdate: squared error, not halved)"
    elif trainer is not None:
        source = f"config.json trainer_class {trainer!r} is not one whose loss is known here (pass λ)"
    return Checkpoint(sae=sae, layout="dictionary_learning", path=file, lam=lam, lam_source=source,
                      l1_weighted_by_decoder_norm=weighted, trainer=trainer, cfg=cfg)


def _dl_state(file: pathlib.Path) -> dict:
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"could not read {file} as a torch state dict: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} must hold a state dict, got {type(state).__name__}")
    return state


def _dl_float(state: dict, name: str, shape: tuple[int, ...], file: pathlib.Path) -> torch.Tensor:
    """``state[name]`` as float64, checked: a floating tensor of ``shape``, finite."""
    t = state[name]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        kind = type(t).__name__ if not isinstance(t, torch.Tensor) else f"{t.dtype} tensor"
        raise CheckpointError(f"{file}: {name} is a {kind}, not a floating-point tensor")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{file}: {name} has shape {tuple(t.shape)}, expected {shape}")
    t = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{file}: {name} contains NaN or infinite entries")
    return t


def _dl_k(state: dict, tcfg: dict, file: pathlib.Path, cfg_path: pathlib.Path, d_sae: int) -> int:
    """TopK's / BatchTopK's ``k``: the state dict's buffer, checked against ``config.json``'s."""
    k_state = None
    if "k" in state:
        t = state["k"]
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.ndim > 1 or t.dtype == torch.bool:
            got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{file}: k must be one integer (the buffer k), got {got}")
        value = t.reshape(()).item()
        if not math.isfinite(value) or not float(value).is_integer():
            raise CheckpointError(f"{file}: k must be an integer, got {value!r}")
        k_state = int(value)
    k_cfg = _cfg_int(tcfg, "k", cfg_path)
    if k_state is not None and k_cfg is not None and k_state != k_cfg:
        raise CheckpointError(f"k: {file} holds k={k_state} but {cfg_path} says k={k_cfg}")
    k = k_state if k_state is not None else k_cfg
    if k is None:
        raise CheckpointError(f"k is missing: {file} has no buffer k and "
                              f"{cfg_path if tcfg else 'no config.json beside it'} records none")
    if not 1 <= k <= d_sae:
        raise CheckpointError(f"{file}: k={k} must lie in [1, d_sae={d_sae}]")
    return k


def _load_dl_sparse(file: pathlib.Path, state: dict, cfg: dict, cfg_path: pathlib.Path, arch: str,
                    trainer: Any, device, dtype):
    """A dictionary_learning AutoEncoderTopK / BatchTopKSAE / JumpReluAutoEncoder as a SparseCheckpoint (Chapter 9)."""
    from .beyond_l1 import SparseCheckpoint, SparseSAE   # imported here: beyond_l1 imports this module

    tcfg = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else cfg
    if arch == "jumprelu":
        required, optional = _DL_JUMPRELU_KEYS, ()
        first, layout = "W_enc", "(d_in, d_sae)"
    else:
        required = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec") + (
            ("threshold",) if arch == "batchtopk" else ())
        optional = ("k", "threshold")
        first, layout = "encoder.weight", "(d_sae, d_in)"
    _require(state, required, file)
    extra = sorted(set(state) - set(required) - set(optional))
    if extra:
        raise CheckpointError(f"{file} holds tensors {extra} beside the {arch} SAE's "
                              f"{sorted(set(required) | set(optional))}: another architecture")
    w = state[first]
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise CheckpointError(f"{file}: {first} must be a 2-dimensional tensor {layout}, got "
                              f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    d_in, d_sae = w.shape if arch == "jumprelu" else (w.shape[1], w.shape[0])
    for key, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        stated = _cfg_int(tcfg, key, cfg_path)
        if stated is not None and stated != value:
            raise CheckpointError(f"{cfg_path} says {key}={stated} but {file}'s {first} has shape "
                                  f"{tuple(w.shape)}")
    k = None
    if arch == "jumprelu":
        W_enc = _dl_float(state, "W_enc", (d_in, d_sae), file)
        b_dec = _dl_float(state, "b_dec", (d_in,), file)
        # the trainer's encoder is ReLU(h [h > θ]), h = x W_enc + b_enc (no b_dec subtracted):
        # h = (x - b_dec) W_enc + (b_enc + b_dec W_enc), the exact fold
        b_enc = _dl_float(state, "b_enc", (d_sae,), file) + b_dec @ W_enc
        W_dec = _dl_float(state, "W_dec", (d_sae, d_in), file)
        theta = _dl_float(state, "threshold", (d_sae,), file)
    else:
        W_enc = _dl_float(state, "encoder.weight", (d_sae, d_in), file).T
        b_enc = _dl_float(state, "encoder.bias", (d_sae,), file)
        W_dec = _dl_float(state, "decoder.weight", (d_in, d_sae), file).T
        b_dec = _dl_float(state, "b_dec", (d_in,), file)
        k = _dl_k(state, tcfg, file, cfg_path, d_sae)
        theta = torch.zeros(d_sae, dtype=torch.float64)
        if "threshold" in state:
            t = state["threshold"]
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else ()
            scalar = _dl_float(state, "threshold", shape if shape in ((), (1,)) else (), file).reshape(())
            if arch == "batchtopk":
                theta = theta + scalar
                if float(scalar) < 0:
                    warnings.warn(
                        f"{file}: BatchTopK threshold = {float(scalar):g} < 0, the value before the trainer "
                        "first sets it (after threshold_start_step): dictionary_learning's inference "
                        "encoder is then a plain ReLU with no sparsity, and it is read as such",
                        CheckpointWarning, stacklevel=5)
    sae = SparseSAE(d_in, d_sae, architecture=arch, k=k if arch == "topk" else None,
                    device=device, dtype=dtype or torch.float64)
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec),
                        ("threshold", theta)):
            getattr(sae, name).copy_(t.to(sae.W_dec.dtype))
    eps, source = _dl_eps(arch, trainer, tcfg, cfg_path, bool(cfg))
    return SparseCheckpoint(sae=sae, architecture=arch, k=None if k is None else float(k), eps=eps,
                            eps_source=source, path=file, cfg=cfg)


def _dl_eps(arch: str, trainer: Any, tcfg: dict, cfg_path: pathlib.Path,
            has_cfg: bool) -> tuple[float | None, str]:
    """JumpReLU's ε in ½‖x − x̂‖² + ε‖z‖₀ from dictionary_learning's config.json, or why there is none."""
    if arch == "topk":
        return None, "a TopK SAE has a budget k, no price eps"
    if arch == "batchtopk":
        return None, ("BatchTopK: a budget of k latents per sample on average; its price eps is not "
                      "recorded (the global threshold plays its part)")
    give = " (pass eps to certify_checkpoint or certify_sparse_sae)"
    if not has_cfg:
        return None, f"no {cfg_path.name} beside the checkpoint: the training loss is not recorded" + give
    c = tcfg.get("sparsity_penalty")
    if trainer == "JumpReluTrainer" or "target_l0" in tcfg:
        return None, (f"{cfg_path.name}: JumpReluTrainer's sparsity loss sparsity_penalty * "
                      f"(L0 / target_l0 - 1)^2 (sparsity_penalty={c!r}, target_l0={tcfg.get('target_l0')!r}) "
                      "pulls the batch's mean L0 towards target_l0 and sets no price per latent; "
                      "linearised at a mean L0 l its eps is sparsity_penalty * (l / target_l0 - 1) / "
                      "target_l0, and l is not recorded" + give)
    if trainer == "TrainerJumpRelu":
        if c is None:
            return None, (f"{cfg_path.name}: TrainerJumpRelu trained ||x - x_hat||^2 + sparsity_penalty * L0 "
                          "(eps = sparsity_penalty / 2) but records no sparsity_penalty" + give)
        eps = _positive_scale(c, f"{cfg_path.name} sparsity_penalty") / 2
        return eps, (f"{cfg_path.name} sparsity_penalty / 2 (TrainerJumpRelu: ||x - x_hat||^2 + "
                     "sparsity_penalty * L0, the squared error not halved)")
    return None, f"{cfg_path.name}: trainer_class {trainer!r} is not one whose loss is known here" + give


def load_sae(path: str | pathlib.Path, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, activation_scale: float | None = None) -> Checkpoint:
    """Load an SAE checkpoint in the SAELens or dictionary_learning layout (Chapter 7; Chapter 9 for TopK, BatchTopK, JumpReLU).

    Parameters
    ----------
    path : str or path
        A SAELens directory (``sae_weights.safetensors`` + ``cfg.json``, optionally
        ``runner_cfg.json``), a dictionary_learning ``ae.pt`` file, or a directory holding
        ``ae.pt`` (and ``config.json``).
    device : torch.device or str, optional
        Where to put the parameters. Default CPU.
    dtype : torch.dtype, optional
        Parameter dtype (float32 or float64). Default: the stored dtype when it is float32 or
        float64, else float32 (e.g. for bfloat16 checkpoints). Certify in float64.
    activation_scale : float, optional
        SAELens' ``expected_average_only_in`` scale factor :math:`s` (training activations
        were :math:`s\\,x`); then :math:`\\lambda` = ``l1_coefficient`` / (2s), and weights
        still stored for :math:`s\\,x` are folded to act on raw activations.

    Returns
    -------
    Checkpoint, or companion.beyond_l1.SparseCheckpoint
        A SAELens ``topk``, ``batchtopk`` or ``jumprelu`` checkpoint is read by
        :func:`companion.beyond_l1.load_sparse_sae` into a
        :class:`~companion.beyond_l1.SparseCheckpoint` (Chapter 9): no λ, but its ``k`` or
        JumpReLU's ε. So is a dictionary_learning ``AutoEncoderTopK``, ``BatchTopKSAE`` or
        ``JumpReluAutoEncoder`` ``ae.pt`` (with the ``config.json`` its trainer wrote beside it;
        see the module docstring for how each parameter maps, and why a dictionary_learning
        JumpReLU records no ε). Its ``dtype`` defaults to float64.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the files are incomplete, corrupt, have inconsistent shapes, NaN or infinite entries,
        hold another architecture or loss (or a dictionary_learning ``dict_class`` not read
        here, or a TopK ``k`` that is missing, not an integer in ``[1, d_sae]`` or not the one
        ``config.json`` records), or need an activation scale that is not known; the message
        names the parameter.
    """
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"dtype must be torch.float32 or torch.float64, got {dtype}: the parameters are kept in "
            "float64 for certificates at 1e-6 (or float32); activations of any float dtype, float16 "
            "and bfloat16 included, are cast to it chunk by chunk by certify_sae")
    device = _usable_device(device)
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    ck = _load_path(p, device, dtype, activation_scale)
    if isinstance(ck, Checkpoint) and ck.lam is not None:
        # remembered on the module, so that certify_sae(checkpoint.sae, X, lam) can warn when
        # lam is the checkpoint's times 2 (SAELens' l1_coefficient) or 1/2
        ck.sae._checkpoint_lam = (ck.lam, ck.lam_source)
    return ck


def _usable_device(device: Any) -> torch.device | None:
    """``device`` as a torch.device, checked usable here (a ValueError, not an AssertionError)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device (try 'cpu' or 'cuda')") from None
    if dev.type == "cpu":
        return dev
    try:
        torch.zeros(1, device=dev)
    except (RuntimeError, AssertionError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (" (this torch has no CUDA, or no GPU is visible: use device='cpu')"
                if dev.type == "cuda" and not torch.cuda.is_available() else "")
        raise ValueError(f"device={device!r} is not usable here{hint}: {first}") from None
    return dev


def _load_path(p: pathlib.Path, device, dtype, activation_scale) -> Checkpoint:
    if p.is_dir():
        if (p / SAELENS_WEIGHTS).is_file() or (p / SAELENS_CFG).is_file():
            return _load_saelens(p, device, dtype, activation_scale)
        if (p / DICTIONARY_LEARNING_WEIGHTS).is_file():
            return _load_dictionary_learning(p / DICTIONARY_LEARNING_WEIGHTS, device, dtype,
                                             activation_scale)
        raise CheckpointError(
            f"{p} holds neither {SAELENS_WEIGHTS} + {SAELENS_CFG} (SAELens) nor "
            f"{DICTIONARY_LEARNING_WEIGHTS} (dictionary_learning)"
        )
    if p.name == SAELENS_WEIGHTS:
        return _load_saelens(p.parent, device, dtype, activation_scale)
    if p.suffix in (".pt", ".pth") and p.is_file():
        return _load_dictionary_learning(p, device, dtype, activation_scale)
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
    ``scale_sparsity_penalty_by_decoder_norm=true``, also under SAELens v6's
    ``metadata.training_architecture_details``), and ``companion_lam`` :math:`=\lambda`
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
        "metadata": {"training_architecture": "standard",
                     "training_architecture_details": {"l1_coefficient": 2 * lam, "lp_norm": 1.0}},
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
        The penalty :math:`\lambda` of the certificates (the book's: SAELens' ``l1_coefficient``
        is :math:`2\lambda`, and every ``loss`` here is SAELens' training loss divided by 2).
    sae_codes : CertificateReport
        :func:`companion.certify` of the SAE's joint view :math:`(x - b_{dec}, D, Z_{SAE})`
        (``codes="given"``): its ``t1_violation`` is how far the encoder's codes are from exact
        codes for the SAE's own dictionary, its ``loss`` is the SAE loss.
    exact_codes : CertificateReport or None
        The same dictionary with exact codes (``codes="exact"``): its ``loss`` is
        :math:`F(D)`, its ``t2_violation`` says whether the dictionary is stationary, its
        ``new_atom_gain`` what one more atom would buy. None when not computed.
    amortisation_gap : float or None
        ``sae_codes.loss - exact_codes.loss`` :math:`= L(D, Z_{SAE}) - F(D) \ge 0`.
    relative_amortisation_gap : float or None
        The gap divided by the SAE loss.
    tol : float
        Threshold of the verdicts: ``1e-6`` in float64, ``1e-3`` in float32.
    floor : float
        Magnitudes below it are rounding noise and print as ``< floor`` in :meth:`summary`:
        ``1e-9`` in float64, ``1e-5`` in float32.
    statistics : CertificateStatistics or None
        The sampling noise of the exact-code certificate and the graded verdict
        (:mod:`companion.verdict`): T2 per atom with its standard error, the noise floor at this
        number of rows, the held-out new-atom gain, dead-atom triage, and ``next_steps``. None
        without exact codes.
    world_size : int
        How many processes computed the certificate (``torch.distributed``), 1 for one.
    lam_source : str or None
        Where ``lam`` came from, when a checkpoint gave it.
    """

    lam: float
    sae_codes: CertificateReport
    exact_codes: CertificateReport | None
    amortisation_gap: float | None
    relative_amortisation_gap: float | None
    tol: float = 1e-6
    floor: float = 1e-9
    statistics: CertificateStatistics | None = None
    world_size: int = 1
    lam_source: str | None = None

    @property
    def verdict(self) -> str:
        """The graded verdict on the dictionary (statistical when exact codes were computed)."""
        if self.statistics is not None:
            return self.statistics.verdict
        return self.exact_codes.verdict if self.exact_codes is not None else self.sae_codes.verdict

    @property
    def next_steps(self) -> list[dict]:
        """What to do next (``statistics.next_steps``; from T1 alone without exact codes)."""
        if self.statistics is not None:
            return self.statistics.next_steps
        t1 = self.sae_codes.t1_violation_lam
        return [{"topic": "encoder", "act": self.sae_codes.t1_violation > self.tol,
                 "finding": f"T1 of the SAE's codes = {t1:.3g} lambda",
                 "action": "certify with exact codes (exact=True) to test the dictionary and to measure "
                           "what the encoder costs"}]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict: ``sae_codes`` and ``exact_codes`` are the two reports."""
        return {
            "lam": self.lam,
            "loss_convention": "loss = 0.5 ||x - x_hat||^2 + lam sum_k ||W_dec[k]|| z_k = SAELens training loss / 2",
            "fvu_formula": "sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2",
            "sae_codes": self.sae_codes.to_dict(),
            "exact_codes": None if self.exact_codes is None else self.exact_codes.to_dict(),
            "amortisation_gap": self.amortisation_gap,
            "relative_amortisation_gap": self.relative_amortisation_gap,
            "tol": self.tol,
            "world_size": self.world_size,
            "lam_source": self.lam_source,
            "verdict": self.verdict,
            "next_steps": self.next_steps,
            "statistics": None if self.statistics is None else self.statistics.to_dict(),
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
            ("loss (SAELens loss / 2)", "loss"),
            ("T1 violation (codes)", "t1_violation"),
            ("  the same, in units of lambda", "t1_violation_lam"),
            ("T2 violation (dictionary)", "t2_violation"),
            ("b_dec stationarity |mean r|", "bias_stationarity"),
            ("duality gap", "duality_gap"),
            ("gap to T4 Huber bound", "huber_gap"),
            ("L0 (active latents per row)", "l0"),
            ("FVU", "fvu"),
            ("new-atom gain (lower bound)", "new_atom_gain"),
            ("max_n u.r_n - lambda", "new_atom_excess"),
            ("max residual norm", "max_residual_norm"),
        ]
        w = 32
        lines = [f"{'':<{w}}{'SAE codes':>14}{'exact codes':>14}"]
        lines += [f"{label:<{w}}{f(getattr(s, name)):>14}{get(name):>14}" for label, name in rows]
        used = lambda r: f"{r.n_atoms - len(r.dead_atoms)} / {len(r.dead_atoms)}"  # noqa: E731
        lines.append(f"{'atoms used / dead':<{w}}{used(s):>14}{used(e) if e is not None else '-':>14}")
        lines += ["", "loss = 0.5 ||x - x_hat||^2 + lambda sum_k ||W_dec[k]|| z_k, SAELens' training "
                      "loss divided by 2;",
                  "FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean x||^2; T4 Huber bound = "
                  f"{f(s.huber_bound)} (no dictionary of any size does better at this b_dec)"]
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
        st = self.statistics
        if st is not None:
            g = lambda x: f"{x:.{min(digits, 2)}g}"  # noqa: E731  (noise is known to 1-2 digits)
            n_used = int((np.asarray(st.atom_rows) > 0).sum())
            gap_line = ("-" if st.amortisation_gap is None or s.loss <= 0 else
                        f"{g(100 * st.amortisation_gap / s.loss)} ± {g(100 * st.amortisation_gap_se / s.loss)}")
            lines += ["", f"sampling noise at n = {st.n_samples} rows (rows taken as independent draws)",
                      f"  {'T2, usage-weighted / largest':<40}{g(st.t2_weighted)} / {g(st.t2_max)}",
                      f"  {'noise floor (standard error, weighted)':<40}{g(st.noise_floor)}",
                      f"  {'largest T2 from noise alone (halves)':<40}{g(st.t2_max_split)}",
                      f"  {'atoms beyond ' + format(st.threshold, '.1f') + ' standard errors':<40}"
                      f"{st.n_beyond} of {n_used} used",
                      f"  {'b_dec |mean r|, in standard errors':<40}{g(st.bias_z)}",
                      f"  {'new-atom gain, % of F(D)':<40}{g(st.new_atom_gain_pct)} in sample, "
                      f"{g(st.heldout_gain_pct)} ± {g(st.heldout_gain_se_pct)} held out",
                      f"  {'amortisation gap, % of the SAE loss':<40}{gap_line}",
                      f"  {'dead atoms':<40}{len(st.dead_exact)} at exact codes, "
                      f"{len(st.dead_encoder_only)} only in the encoder",
                      f"  {'random unit atoms exact codes would use':<40}{st.n_random_used} of {st.n_random}"]
            if st.worst_atom is not None:
                lines.append(f"  {'most significant':<40}{st.worst_line()}")
        lines += ["", "verdict"]
        if st is not None:
            lines.append(f"  dictionary: {st.verdict}")
        lines += [f"  encoder codes exact for the dictionary (T1 <= {self.tol:g}): "
                  f"{s.t1_violation <= self.tol} (T1 = {f(s.t1_violation_lam)} lambda)"]
        if e is not None:
            lines += [
                f"  dictionary stationary to rounding at exact codes (T2 <= {self.tol:g}): "
                f"{e.t2_violation <= self.tol}",
                f"  dictionary and b_dec with exact codes: {e.verdict}",
                f"  adding the new atom u found here would lower the loss by at least {f(e.new_atom_gain)}"
                if e.new_atom_excess > 0 else
                "  the new-atom search found no direction u with max_n u.r_n > lambda",
                f"  dead atoms at exact codes: {len(e.dead_atoms)} of {e.n_atoms}",
            ]
        lines += ["", "what to do next"]
        for step in self.next_steps:
            mark = "->" if step["act"] else "ok"
            lines.append(f"  {mark} {step['topic']}: {step['finding']}")
            lines.append(f"     {step['action']}")
        if self.world_size > 1:
            lines += ["", f"computed by {self.world_size} processes"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _sae_input(X: Any) -> tuple[Any, bool]:
    """Check the activations' kind and shape without reading them (they may be a memory map)."""
    if isinstance(X, (str, os.PathLike)):
        raise TypeError(f"X must be an array, got the path {str(X)!r}: pass np.load(path, mmap_mode='r'), "
                        "or use certify_checkpoint, which opens a .npy path itself")
    if isinstance(X, torch.Tensor):
        if X.dtype.is_complex or X.dtype == torch.bool:
            raise TypeError(f"X must hold real numbers, got a {X.dtype} tensor")
        is_numpy = False
    elif isinstance(X, np.ndarray):
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise TypeError(f"X must hold real numbers, got dtype {X.dtype}")
        is_numpy = True
    else:
        raise TypeError(f"X must be a torch.Tensor or numpy.ndarray, got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-dimensional (n_samples, d_in), got shape {tuple(X.shape)}")
    return X, is_numpy


def _where(X: Any) -> str:
    name = getattr(X, "filename", None)
    return f" of {name}" if name else ""


def open_activations(path: str | os.PathLike, d_in: int | None = None) -> np.ndarray:
    """A ``.npy`` file of activations as a read-only memory map, checked without reading its rows.

    Raises ``FileNotFoundError`` or ``ValueError`` with one line that says what is wrong: a
    missing or non-regular file, a ``torch.save`` file (``.pt``) or an ``.npz`` archive in
    place of a ``.npy`` array, an array that is not 2-D or not numeric, a width that is not
    ``d_in``, no rows.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"activations file {str(p)!r} does not exist")
    if not stat.S_ISREG(p.stat().st_mode):
        raise ValueError(f"activations {str(p)!r} is not a regular file (a FIFO, device or "
                         "directory?); save the array with numpy.save")
    torch_file = _torch_save_file(p)
    if torch_file:
        raise ValueError(
            f"activations {str(p)!r} is a torch.save file{torch_file}, not a .npy array: convert it once "
            "with numpy.save('acts.npy', torch.load('acts.pt').float().cpu().numpy())")
    try:
        A = np.load(p, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not read {str(p)!r} as a .npy array: {first}") from None
    if not isinstance(A, np.ndarray):
        raise ValueError(f"{str(p)!r} is an .npz archive of several arrays, not a single .npy array: "
                         "save the activations with numpy.save")
    if A.ndim != 2:
        raise ValueError(f"activations must be 2-dimensional (n_samples, d_in), got shape {A.shape}")
    if not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.integer)):
        raise ValueError(f"activations must be numeric, got dtype {A.dtype}")
    if d_in is not None and A.shape[1] != d_in:
        raise ValueError(
            f"activations have {A.shape[1]} columns but the SAE has d_in={d_in}; "
            "rows must be activation vectors of the SAE's input width")
    if A.shape[0] == 0:
        raise ValueError("activations have no rows")
    return A


def _torch_save_file(p: pathlib.Path) -> str:
    """Non-empty (a description) when ``p`` looks like a torch.save file rather than a .npy."""
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        return ""
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(p) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return " (a zip archive holding data.pkl)"
        except zipfile.BadZipFile:
            return ""
        return ""
    if head[:1] == b"\x80" or p.suffix in (".pt", ".pth"):
        return " (a pickle)" if head[:1] == b"\x80" else f" ({p.suffix})"
    return ""


def _from_saelens(sae: Any, device: Any = None) -> Checkpoint:
    """An in-memory ``sae_lens.SAE`` as a Checkpoint: written with SAELens' own writer, read by
    :func:`load_sae` (so every architecture and λ rule applies), in float64 on its device."""
    import tempfile

    cfg = getattr(sae, "cfg", None)
    arch = cfg.architecture() if cfg is not None and callable(getattr(cfg, "architecture", None)) else None
    if arch is not None and arch != "standard":
        name = _SAELENS_OTHER.get(arch, arch)
        hint = (" For its own certificates (Chapter 9) save it with save_inference_model and call "
                "certify_checkpoint(directory, X)." if arch in _SPARSE_ARCHITECTURES else "")
        raise CheckpointError(f"sae is a SAELens {name} SAE (architecture {arch!r}): only a vanilla SAE "
                              "(architecture 'standard', ReLU, L1 penalty) is the L1 joint problem "
                              "certify_sae certifies." + hint)
    if device is None:
        device = next(iter(sae.parameters())).device
    import copy

    sae = copy.deepcopy(sae)             # SAELens' writers may fold scales into the weights in place
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(sae, "save_inference_model"):
                sae.save_inference_model(tmp)
            else:
                sae.save_model(tmp)
        ck = load_sae(tmp, device=device, dtype=torch.float64)
    ck.path = pathlib.Path(f"<in-memory {type(sae).__name__}>")
    return ck


def _is_saelens(sae: Any) -> bool:
    mod = type(sae).__module__ or ""
    return mod.startswith("sae_lens") or any((c.__module__ or "").startswith("sae_lens")
                                             for c in type(sae).__mro__)


def _resolve(sae: Any, lam: float | None, override: bool) -> tuple[VanillaSAE, float, str | None]:
    """The VanillaSAE and λ to certify, from a VanillaSAE, a Checkpoint or a sae_lens.SAE."""
    if _is_saelens(sae):
        sae = _from_saelens(sae)
    if _is_sparse_checkpoint(sae):
        raise TypeError(f"{sae.path} is a {sae.architecture} SAE: certify_sae certifies L1 SAEs; "
                        "certify_checkpoint(checkpoint, X) gives its own certificates (Chapter 9)")
    if isinstance(sae, Checkpoint):
        chosen = checkpoint_lam(sae, lam, override=override)
        if lam is not None and sae.lam is not None:
            _warn_factor_two(lam, sae.lam, sae.lam_source)
        source = sae.lam_source if lam is None else "given"
        return sae.sae, chosen, source
    if not isinstance(sae, VanillaSAE):
        raise TypeError(f"sae must be a VanillaSAE, a Checkpoint (load_sae) or a sae_lens SAE of the "
                        f"standard architecture, got {type(sae).__name__}")
    recorded = getattr(sae, "_checkpoint_lam", None)
    if lam is None:
        if recorded is not None:
            raise TypeError("lam is required with a VanillaSAE; this one came from a checkpoint whose λ is "
                            f"{recorded[0]:g} ({recorded[1]}): pass the Checkpoint itself, certify_sae("
                            "checkpoint, X), or certify_checkpoint(path, X), to take λ from it")
        raise TypeError("lam is required with a VanillaSAE (or pass a Checkpoint from load_sae, whose λ "
                        "is read from its files)")
    lam = check_positive(lam, "lam")
    if recorded is not None:
        _warn_factor_two(lam, recorded[0], recorded[1])
    return sae, lam, None


def _warn_factor_two(lam: float, ck_lam: float, source: str) -> None:
    ratio = lam / ck_lam
    for factor, word in ((2.0, "twice"), (0.5, "half")):
        if abs(ratio - factor) <= 0.01 * factor:
            warnings.warn(
                f"lam={lam:g} is {word} the λ={ck_lam:g} of this SAE's checkpoint ({source}). The book's "
                "λ multiplies the L1 of ½‖x - x̂‖² + λ Σ_k ‖W_dec[k]‖ z_k, so SAELens' l1_coefficient is "
                "2λ; certifying at lam as asked (pass the checkpoint's λ, or certify_checkpoint(path, X), "
                "which reads it)", CheckpointWarning, stacklevel=4)


def _first_nonfinite(X: Any, is_numpy: bool, rows: Any, chunks: list[tuple[int, int]]) -> int | None:
    """Position (in the certified sequence) of the first row with NaN or Inf among ``chunks``."""
    if is_numpy and not np.issubdtype(X.dtype, np.floating):
        return None
    if not is_numpy and not X.dtype.is_floating_point:
        return None
    for s, e in chunks:
        idx = slice(s, e) if rows is None else rows[s:e]
        if is_numpy:
            bad = ~np.isfinite(np.asarray(X[idx])).all(1)
            if bad.any():
                return s + int(np.argmax(bad))
        else:
            part = X[idx] if rows is None else X[torch.as_tensor(idx, device=X.device)]
            bad = ~torch.isfinite(part).all(1)
            if bool(bad.any()):
                return s + int(torch.nonzero(bad)[0])
    return None


def _group_info(process_group: Any) -> tuple[Any, int, int]:
    if process_group is None:
        return None, 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (torchrun does the environment)")
    group = dist.group.WORLD if process_group is True else process_group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _all_reduce_running(acc: _Running, group: Any) -> None:
    """Combine the :class:`_Running` sums of every process of ``group`` (sums, maxima, the pool)."""
    import torch.distributed as dist

    for t in (acc.V, acc.zsum, acc.zsq, acc.fire, acc.rsum, acc.xsum):
        dist.all_reduce(t, group=group)
    for t in (acc.atom_t1, acc.maxcorr):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    dev = acc.D.device
    sums = torch.tensor([acc.n, acc.nnz, acc.loss_sum, acc.dual_sum, acc.huber_sum, acc.xsq, acc.rsq],
                        dtype=torch.float64, device=dev)
    dist.all_reduce(sums, group=group)
    acc.n, acc.nnz = int(round(float(sums[0]))), int(round(float(sums[1])))
    acc.loss_sum, acc.dual_sum, acc.huber_sum, acc.xsq, acc.rsq = (float(v) for v in sums[2:])
    most = torch.tensor([acc.t1, acc.rmax, float(acc.negative)], dtype=torch.float64, device=dev)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    acc.t1, acc.rmax, acc.negative = float(most[0]), float(most[1]), bool(most[2] > 0)
    pool, norms = _gather_rows(acc.pool, acc.pool_norm, group)
    if pool.shape[0] > acc.n_candidates:
        top = norms.topk(acc.n_candidates).indices
        pool, norms = pool[top], norms[top]
    acc.pool, acc.pool_norm = pool, norms


def _all_reduce_codes(codes: _ExactCodes, group: Any) -> None:
    import torch.distributed as dist

    worst = torch.tensor([codes.worst, codes.worst_tol], dtype=torch.float64, device=codes.D.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    codes.worst, codes.worst_tol = float(worst[0]), float(worst[1])


def certify_sae(sae: Any, X: Any, lam: float | None = None, *, exact: bool = True,
                chunk_size: int | None = None, progress: bool = False, rows: Any = None,
                tol: float | None = None, encode_kwargs: dict | None = None, override: bool = False,
                statistics: bool = True, alpha: float = 0.05, check_finite: bool = True,
                process_group: Any = None) -> SAECertificate:
    r"""Certify an SAE on activations ``X``: as it is, and with exact codes (Chapter 7).

    With the joint view :math:`(X - b_{dec}, D, Z_{SAE})` of Chapter 1 (``D`` the
    unit-normalised decoder rows, ``Z_SAE`` the encoder's codes times the decoder norms), this
    computes the :func:`companion.certify` report of the SAE's codes and, if ``exact``, of
    exact codes for the same ``D``, with ``b_dec`` as the fitted bias. Their losses are the SAE
    loss :math:`L(D, Z_{SAE})` (SAELens' loss ÷ 2) and :math:`F(D)`; the difference is the
    amortisation gap, nonnegative because exact codes minimise every row's cost. With exact
    codes, ``statistics`` adds the sampling noise of every number and a graded verdict
    (:mod:`companion.verdict`): T2 per atom against its standard error, the noise floor at this
    number of rows, the held-out new-atom gain, dead-atom triage and what to do next.

    The rows are streamed: each chunk is read (from a memory map too), cast to the SAE's
    dtype and device, encoded twice and reduced into both reports, so peak memory is
    ``O(chunk_size · d_sae)`` however many rows there are. Before that pass, every row is
    scanned for NaN and Inf (a cheap read), so a bad row fails at once, naming its row and file.

    Parameters
    ----------
    sae : VanillaSAE, Checkpoint or sae_lens.SAE
        A vanilla SAE (e.g. :func:`companion.train_sae`), a :class:`Checkpoint` from
        :func:`load_sae` (then ``lam`` defaults to the checkpoint's, and a ``lam`` that
        disagrees is a :class:`LamMismatchError` unless ``override``), or an in-memory SAELens
        SAE of the standard architecture (written with SAELens' own writer and read back in
        float64, so its λ comes from its config as for a checkpoint). Use float64 for
        certificates at the ``1e-6`` level.
    X : array (n_samples, d_in)
        Activations, uncentred (the decoder bias is subtracted here): a tensor or numpy array
        of any real dtype (float16, bfloat16, float32, float64, integers) on any device, e.g.
        ``np.load(..., mmap_mode="r")``; each chunk is cast to the SAE's dtype and device.
    lam : float, optional
        The penalty, in the book's convention (see :func:`checkpoint_lam`). Required for a
        bare VanillaSAE; a VanillaSAE read by :func:`load_sae` remembers its checkpoint's λ and
        a ``lam`` twice or half of it raises a :class:`CheckpointWarning` (SAELens'
        ``l1_coefficient`` is :math:`2\lambda`).
    exact : bool
        Also certify the dictionary with exact codes (the expensive part: one nonnegative
        lasso per row).
    chunk_size : int, optional
        Rows per chunk (memory ``O(chunk_size · d_sae)``).
    progress : bool
        tqdm bars on stderr, named for their stage: the scan for NaN/Inf, the pass over the
        rows (SAE codes, exact codes), the new-atom searches. ``TQDM_DISABLE=1`` turns them off.
    rows : array of int, optional
        Certify only these rows of ``X`` (e.g. a random sample); read in the given order.
    tol : float, optional
        Threshold of the rounding-level verdicts; default ``1e-6`` in float64, ``1e-3`` in float32.
    encode_kwargs : dict, optional
        Options of the exact codes (``tol``, ``max_iter``, ``add_per_iter``, ``fallback_iter``).
    override : bool
        With a Checkpoint: certify at ``lam`` even when it disagrees with the checkpoint's.
    statistics : bool
        Compute the sampling noise and the graded verdict (needs ``exact``).
    alpha : float
        Family-wise level of the stationarity test (Bonferroni over the used atoms and the bias).
    check_finite : bool
        Scan all rows for NaN/Inf before the pass (on by default; chunks are checked anyway).
    process_group : torch.distributed process group, optional
        Certify the rows over the processes of this group (``True``: the default group): each
        process encodes every ``world_size``-th chunk, the sums are all-reduced, and every
        process returns the same certificate, with ``world_size`` recorded. Every process must
        call this with the same arguments and see the same ``X`` (e.g. the same ``.npy`` file,
        memory-mapped).

    Returns
    -------
    SAECertificate

    Raises
    ------
    TypeError
        A ``sae`` of another kind, a missing ``lam`` for a bare VanillaSAE, ``X`` not an array.
    ValueError
        Wrong shapes, NaN/Inf in ``X`` (naming the first row, and the file of a memory map),
        ``lam <= 0``; :class:`LamMismatchError` as above; :class:`CheckpointError` for an
        in-memory SAELens SAE of another architecture.
    """
    sae, lam, lam_source = _resolve(sae, lam, override)
    X, is_numpy = _sae_input(X)
    if X.shape[1] != sae.d_in:
        raise ValueError(f"X has {X.shape[1]} columns but the SAE has d_in={sae.d_in}")
    if rows is not None:
        rows = np.asarray(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise TypeError("rows must be a 1-D array of row indices")
        if rows.size and (rows.min() < 0 or rows.max() >= X.shape[0]):
            raise ValueError(f"rows must index the {X.shape[0]} rows of X")
    n = X.shape[0] if rows is None else rows.size
    check_nonempty(n, sae.d_sae)
    if chunk_size is None:
        chunk_size = default_chunk_size(sae.d_sae)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    alpha = check_positive(alpha, "alpha")
    if alpha >= 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    group, rank, world = _group_info(process_group)
    dtype, device = sae.W_dec.dtype, sae.W_dec.device
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    tol = default_certificate_tol(dtype) if tol is None else check_positive(tol, "tol")
    etol, emax, eadd, efb = _encode_options(encode_kwargs)
    kind = ArrayKind(is_numpy=is_numpy)
    chunks = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)][rank::world]
    mine = sum(e - s for s, e in chunks)

    if check_finite:
        with progress_bar(progress=progress, total=1, desc="certify_sae: scan rows for NaN/Inf", unit="pass"):
            bad = _first_nonfinite(X, is_numpy, rows, chunks)
        if group is not None:
            import torch.distributed as dist

            first = torch.tensor([n if bad is None else bad], dtype=torch.float64, device=device)
            dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
            bad = None if int(first) >= n else int(first)
        if bad is not None:
            where = bad if rows is None else int(rows[bad])
            raise ValueError(f"X contains NaN or infinite entries: first in row {where}{_where(X)} "
                             "(found by a scan before certifying)")

    stats_on = statistics and exact
    with torch.no_grad():
        D, norms = sae.dictionary()
        W_enc, b_enc, b_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
        on_sae = _Running(D, lam, 0.0, 8192)
        on_exact = _Running(D, lam, 0.0, 8192) if exact else None
        codes = _ExactCodes(D, lam, etol, emax, eadd, efb) if exact else None
        noise = _Noise(D, lam) if stats_on else None
        desc = "certify_sae: read rows, SAE codes" + (", exact codes" if exact else "")
        with progress_bar(progress=progress, total=mine, desc=desc, unit="row") as bar:
            for s, e in chunks:
                idx = slice(s, e) if rows is None else rows[s:e]
                if is_numpy:
                    # one writable copy per chunk, cast on the way (a memory map stays unread elsewhere)
                    chunk = torch.from_numpy(np.array(X[idx], dtype=np_dtype)).to(device)
                else:
                    part = X[idx] if rows is None else X[torch.as_tensor(idx, device=X.device)]
                    chunk = part.to(device=device, dtype=dtype)
                if not bool(torch.isfinite(chunk).all()):
                    bad = int(torch.nonzero(~torch.isfinite(chunk).all(1))[0])
                    where = s + bad if rows is None else int(idx[bad])
                    raise ValueError(f"X contains NaN or infinite entries (first in row {where}{_where(X)})")
                chunk = perturb_data(chunk)
                Xc = chunk - b_dec
                Z = sae_codes(chunk, W_enc, b_enc, b_dec) * norms
                on_sae.add(Xc, Z)
                if exact:
                    Ze = codes(Xc)
                    on_exact.add(Xc, Ze)
                    if stats_on:
                        pos = np.arange(s, e) if rows is None else np.asarray(idx)
                        eps = torch.from_numpy(split_signs(pos)).to(device=device, dtype=dtype)
                        Rs = Xc - Z @ D
                        sae_loss = 0.5 * (Rs * Rs).sum(1) + lam * Z.sum(1)
                        noise.add(Xc, Ze, eps, sae_loss)
                bar.update(e - s)
        if group is not None:
            _all_reduce_running(on_sae, group)
            if exact:
                _all_reduce_running(on_exact, group)
                _all_reduce_codes(codes, group)
            if stats_on:
                noise.all_reduce(group)
        if exact:
            codes.warn(stacklevel=2)
        searches = 1 + int(exact) + 2 * int(stats_on)
        with progress_bar(progress=progress, total=searches, desc="certify_sae: new-atom searches", unit="search") as stage:
            rep_sae = on_sae.report(kind, codes="given", tol=tol, with_bias=True)
            stage.update(1)
            if not exact:
                return SAECertificate(lam, rep_sae, None, None, None, tol, _floor(dtype),
                                      world_size=world, lam_source=lam_source)
            rep_exact = on_exact.report(kind, codes="exact", tol=tol, with_bias=True)
            stage.update(1)
            stats = assess(noise, rep_exact, rep_sae, alpha=alpha, stage=stage) if stats_on else None
    gap = rep_sae.loss - rep_exact.loss
    rel = gap / rep_sae.loss if rep_sae.loss > 0 else 0.0
    return SAECertificate(lam, rep_sae, rep_exact, gap, rel, tol, _floor(dtype), statistics=stats,
                          world_size=world, lam_source=lam_source)


def _is_sparse_checkpoint(ck: Any) -> bool:
    from .beyond_l1 import SparseCheckpoint

    return isinstance(ck, SparseCheckpoint)


def checkpoint_eps(checkpoint: Any, eps: float | None = None, *, override: bool = False) -> float | None:
    r"""The JumpReLU price :math:`\varepsilon` to certify a TopK/BatchTopK/JumpReLU checkpoint at (Chapter 9).

    ``eps=None`` gives the checkpoint's own (``None`` when it records none: a TopK SAE, a
    BatchTopK SAE, or a JumpReLU checkpoint whose loss implies no price). A given ``eps`` must
    be positive, is refused for a TopK SAE (certified under its budget ``k``), and must agree
    with a recorded one unless ``override``.
    """
    if eps is None:
        return checkpoint.eps
    eps = check_positive(eps, "eps")
    if checkpoint.architecture == "topk":
        raise ValueError(f"eps applies to JumpReLU and BatchTopK SAEs; {checkpoint.path} is a TopK SAE, "
                         f"certified under its budget k={checkpoint.k:g}")
    if (checkpoint.eps is not None and not override
            and abs(eps - checkpoint.eps) > _LAM_RTOL * max(eps, checkpoint.eps)):
        raise ValueError(f"eps={eps:g} disagrees with the checkpoint's eps={checkpoint.eps:g} "
                         f"({checkpoint.eps_source}); pass override=True to certify at another eps")
    return eps


def certify_checkpoint(checkpoint: Any, X: Any, *, lam: float | None = None, override: bool = False,
                       activation_scale: float | None = None, device: Any = None,
                       dtype: torch.dtype = torch.float64, progress: bool = True,
                       **options: Any) -> SAECertificate:
    r"""Certify a checkpoint on activations, with λ (and the activation scale) from its files, as the CLI does.

    ``certify_checkpoint(path, "acts.npy")`` is ``python -m companion certify path acts.npy``
    from Python: :func:`load_sae` reads the checkpoint in ``dtype`` on ``device``,
    :func:`checkpoint_lam` reconciles ``lam`` with the λ its files imply (the SAELens
    ``l1_coefficient`` is :math:`2\lambda`; a ``lam`` that disagrees is a
    :class:`LamMismatchError` unless ``override``), and :func:`certify_sae` certifies it, with
    progress bars on by default.

    Parameters
    ----------
    checkpoint : str, path or Checkpoint
        A SAELens directory or dictionary_learning ``ae.pt`` (see :func:`load_sae`), or a
        Checkpoint already loaded (then ``activation_scale`` must be None; ``device`` and
        ``dtype`` apply to a copy).
    X : array (n_samples, d_in), or a path to a ``.npy`` file
        The activations; a path is memory-mapped (:func:`open_activations`).
    lam : float, optional
        The λ to certify at; default the checkpoint's.
    override : bool
        Certify at ``lam`` even when it disagrees with the checkpoint's.
    activation_scale : float, optional
        SAELens' ``expected_average_only_in`` scale factor (see :func:`load_sae`).
    device : torch device, optional
        Default: ``COMPANION_DEVICE``, else CUDA when available, else the CPU.
    dtype : torch.dtype
        float64 (default; certificates at ``1e-6``) or float32.
    progress : bool
        Progress bars on stderr (default on; ``TQDM_DISABLE=1`` turns them off).
    **options
        Passed to :func:`certify_sae` (``exact``, ``chunk_size``, ``rows``, ``tol``,
        ``encode_kwargs``, ``statistics``, ``alpha``, ``check_finite``, ``process_group``).

    Returns
    -------
    SAECertificate
        With ``lam_source`` saying where λ came from. For a TopK, BatchTopK or JumpReLU
        checkpoint (a :class:`~companion.beyond_l1.SparseCheckpoint`), the
        :class:`~companion.beyond_l1.SparseSAECertificate` of
        :func:`companion.beyond_l1.certify_sparse_sae` (Chapter 9) at the checkpoint's ``k`` or
        :math:`\varepsilon`; of ``options`` it takes ``max_samples``, ``matched_l1``, ``tol``,
        and ``eps`` (JumpReLU, BatchTopK): the price to score the local moves under, needed for
        a JumpReLU checkpoint that records none (dictionary_learning's, see :func:`load_sae`);
        one that disagrees with the checkpoint's is a ``ValueError`` unless ``override``.
    """
    import copy

    device = _usable_device(device) if device is not None else pick_device()
    if isinstance(checkpoint, Checkpoint):
        if activation_scale is not None:
            raise ValueError("activation_scale applies when loading: this Checkpoint is loaded already "
                             "(pass its path, or load_sae(path, activation_scale=s))")
        ck = checkpoint
        if ck.sae.W_dec.device != device or ck.sae.W_dec.dtype != dtype:
            ck = copy.copy(ck)
            ck.sae = copy.deepcopy(checkpoint.sae).to(device=device, dtype=dtype)
    elif isinstance(checkpoint, (str, os.PathLike)):
        ck = load_sae(checkpoint, device=device, dtype=dtype, activation_scale=activation_scale)
    elif _is_sparse_checkpoint(checkpoint):
        ck = checkpoint
    else:
        raise TypeError(f"checkpoint must be a path or a Checkpoint (load_sae), got {type(checkpoint).__name__}; "
                        "for a VanillaSAE or a sae_lens SAE in memory use certify_sae")
    if isinstance(X, (str, os.PathLike)):
        X = open_activations(X, ck.sae.d_in)
    if _is_sparse_checkpoint(ck):
        from .beyond_l1 import certify_sparse_sae

        if lam is not None:
            raise ValueError(f"lam applies to L1 SAEs; {ck.path} is a {ck.architecture} SAE, certified "
                             "under its own k or JumpReLU's eps (Chapter 9)")
        eps = checkpoint_eps(ck, options.get("eps"), override=override)
        return certify_sparse_sae(ck.sae, X, eps=eps,
                                  **{k: v for k, v in options.items() if k in ("max_samples", "matched_l1", "tol")})
    lam_used = checkpoint_lam(ck, lam, override=override)
    if lam is None:
        source = f"from the checkpoint: {ck.lam_source}"
    elif ck.lam is None:
        source = "given (the checkpoint implies none)"
    elif abs(lam_used - ck.lam) > _LAM_RTOL * max(lam_used, ck.lam):
        source = f"given, overriding the checkpoint's {ck.lam:g}"
    else:
        source = "given, agrees with the checkpoint"
    cert = certify_sae(ck.sae, X, lam_used, progress=progress, **_certify_options(options))
    cert.lam_source = source
    return cert


def _certify_options(options: dict) -> dict:
    for key in ("lam", "override", "sae"):
        if key in options:
            raise TypeError(f"certify_checkpoint got {key!r} twice")
    return options


def _floor(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-5


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
