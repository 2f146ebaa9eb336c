r"""Load SAEs trained elsewhere, save ours, and know which :math:`\lambda` a checkpoint was trained at (Chapter 7).

Two checkpoint layouts are read, both into a :class:`companion.sae.VanillaSAE`
(:math:`z = \mathrm{ReLU}((x - b_{dec})W_{enc} + b_{enc})`, :math:`\hat x = zW_{dec} + b_{dec}`):

* **SAELens** (v5 and v6) — a directory holding ``sae_weights.safetensors`` (``W_enc``
  (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,)) and
  ``cfg.json``, and, when SAELens' training runner wrote it, ``runner_cfg.json``. Only the
  ``"standard"`` architecture with a ReLU is a vanilla SAE; TopK, BatchTopK, JumpReLU, gated
  and the rest are refused by name. With ``apply_b_dec_to_input: false`` the encoder does
  not subtract ``b_dec``, which is folded exactly into the encoder bias
  (``b_enc ← b_enc + b_dec W_enc``).
* **dictionary_learning** (saprmarks) — a file ``ae.pt`` (or a directory holding one, with
  its ``config.json``): the ``AutoEncoder`` state dict (``encoder.weight`` (d_sae, d_in),
  ``encoder.bias``, ``decoder.weight`` (d_in, d_sae), ``bias``; encoder
  ``ReLU(encoder(x - bias))``) or the ``AutoEncoderNew`` one (``decoder.bias`` instead of
  ``bias``, encoder ``ReLU(encoder(x))``, folded like ``apply_b_dec_to_input: false``).

A tensor beyond these (``threshold``, ``k``, ``b_gate``, ``r_mag``, ...) belongs to another
architecture, and the checkpoint is refused naming it, never silently dropped.

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
  :math:`p` annealed below 1) are refused, as are TopK, BatchTopK, gated and JumpReLU
  trainers; with no config or an unknown trainer no :math:`\lambda` is implied.
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
import pathlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ._validation import ArrayKind, check_positive, check_positive_int
from .certificates import CertificateReport, _encode_options, _ExactCodes, _Running, check_nonempty, \
    default_certificate_tol
from .coding import default_chunk_size
from .losses import sae_codes
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
#: dictionary_learning trainers (and dictionary classes) of other architectures.
_DL_OTHER = {
    "TopKTrainer": "TopK", "AutoEncoderTopK": "TopK", "BatchTopKTrainer": "BatchTopK",
    "BatchTopKSAE": "BatchTopK", "MatryoshkaBatchTopKTrainer": "Matryoshka BatchTopK",
    "MatryoshkaBatchTopKSAE": "Matryoshka BatchTopK", "GatedSAETrainer": "gated",
    "GatedAutoEncoder": "gated", "GatedAnnealTrainer": "gated (annealed)",
    "JumpReluTrainer": "JumpReLU", "JumpReluAutoEncoder": "JumpReLU",
}


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
                    CheckpointWarning, stacklevel=3)
    return Checkpoint(sae=sae, layout="saelens", path=directory, lam=lam, lam_source=source,
                      l1_weighted_by_decoder_norm=weighted,
                      normalize_activations="expected_average_only_in" if normalised else "none",
                      activation_scale=scale, cfg=cfg)


def _dl_trainer(cfg: dict) -> tuple[str | None, str | None, Any]:
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else cfg
    return trainer.get("trainer_class"), trainer.get("dict_class"), trainer.get("l1_penalty")


def _load_dictionary_learning(file: pathlib.Path, device, dtype, activation_scale) -> Checkpoint:
    if activation_scale is not None:
        raise CheckpointError("activation_scale applies to SAELens checkpoints only; "
                              "dictionary_learning trains on the activations as given")
    cfg_path = file.parent / "config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    trainer, dict_class, l1 = _dl_trainer(cfg)
    for name in (trainer, dict_class):
        if name in _DL_OTHER:
            raise CheckpointError(
                f"{cfg_path}: {name} trains a {_DL_OTHER[name]} SAE, not supported: only a vanilla "
                "SAE (ReLU, L1 penalty) is the joint problem of this book")
    if trainer == "StandardTrainer":
        raise CheckpointError(
            f"{cfg_path}: trainer_class 'StandardTrainer' (the original dictionary_learning trainer) "
            "minimises the unsquared error ||x - x_hat|| + l1_penalty ||f||_1; its code condition is "
            "not T1 of the squared-error loss, so the L1 theory of this book does not apply "
            "(StandardTrainerAprilUpdate's loss is supported)")
    if trainer is not None and ("Anneal" in trainer or trainer.startswith("Lp")):
        raise CheckpointError(
            f"{cfg_path}: trainer_class {trainer!r} trains with an Lp sparsity penalty (p annealed "
            "below 1), not the L1 penalty that the joint problem and T1 are about: not supported")
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"could not read {file} as a torch state dict: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} must hold a state dict, got {type(state).__name__}")
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


def load_sae(path: str | pathlib.Path, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, activation_scale: float | None = None) -> Checkpoint:
    """Load a vanilla SAE checkpoint in the SAELens or dictionary_learning layout (Chapter 7).

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
    Checkpoint

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the files are incomplete, corrupt, have inconsistent shapes, hold another
        architecture or loss, or need an activation scale that is not known.
    """
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
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
    """

    lam: float
    sae_codes: CertificateReport
    exact_codes: CertificateReport | None
    amortisation_gap: float | None
    relative_amortisation_gap: float | None
    tol: float = 1e-6
    floor: float = 1e-9

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
        lines += ["", "verdict",
                  f"  encoder codes exact for the dictionary (T1 <= {self.tol:g}): "
                  f"{s.t1_violation <= self.tol} (T1 = {f(s.t1_violation_lam)} lambda)"]
        if e is not None:
            lines += [
                f"  dictionary stationary at exact codes (T2 <= {self.tol:g}): {e.t2_violation <= self.tol}",
                f"  dictionary and b_dec with exact codes: {e.verdict}",
                f"  adding the new atom u found here would lower the loss by at least {f(e.new_atom_gain)}"
                if e.new_atom_excess > 0 else
                "  the new-atom search found no direction u with max_n u.r_n > lambda",
                f"  dead atoms at exact codes: {len(e.dead_atoms)} of {e.n_atoms}",
            ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _sae_input(X: Any, sae: VanillaSAE) -> tuple[Any, bool]:
    """Check the activations' shape and kind without reading them (they may be a memory map)."""
    if isinstance(X, torch.Tensor):
        want = sae.W_dec
        if X.dtype != want.dtype:
            raise TypeError(
                f"X is a {X.dtype} tensor but the SAE's parameters are {want.dtype}: pass "
                f"X.to({want.dtype}), or load the SAE with dtype={X.dtype}")
        if X.device != want.device:
            raise ValueError(f"X is on {X.device} but the SAE is on {want.device}: move one of them")
        is_numpy = False
    elif isinstance(X, np.ndarray):
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise TypeError(f"X must hold numbers, got dtype {X.dtype}")
        is_numpy = True
    else:
        raise TypeError(f"X must be a torch.Tensor or numpy.ndarray, got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-dimensional (n_samples, d_in), got shape {tuple(X.shape)}")
    if X.shape[1] != sae.d_in:
        raise ValueError(f"X has {X.shape[1]} columns but the SAE has d_in={sae.d_in}")
    return X, is_numpy


def certify_sae(sae: VanillaSAE, X: Any, lam: float, *, exact: bool = True,
                chunk_size: int | None = None, progress: bool = False, rows: Any = None,
                tol: float | None = None, encode_kwargs: dict | None = None) -> SAECertificate:
    r"""Certify an SAE on activations ``X``: as it is, and with exact codes (Chapter 7).

    With the joint view :math:`(X - b_{dec}, D, Z_{SAE})` of Chapter 1 (``D`` the
    unit-normalised decoder rows, ``Z_SAE`` the encoder's codes times the decoder norms), this
    computes the :func:`companion.certify` report of the SAE's codes and, if ``exact``, of
    exact codes for the same ``D``, with ``b_dec`` as the fitted bias. Their losses are the SAE
    loss :math:`L(D, Z_{SAE})` (SAELens' loss ÷ 2) and :math:`F(D)`; the difference is the
    amortisation gap, nonnegative because exact codes minimise every row's cost.

    The rows are streamed: each chunk is read (from a memory map too), cast to the SAE's
    dtype, encoded twice and reduced into both reports, so peak memory is
    ``O(chunk_size · d_sae)`` however many rows there are.

    Parameters
    ----------
    sae : VanillaSAE
        Any vanilla SAE (e.g. from :func:`load_sae` or :func:`companion.train_sae`). Use float64
        for certificates at the ``1e-6`` level.
    X : array (n_samples, d_in)
        Activations, uncentred (the decoder bias is subtracted here): a tensor of the SAE's
        dtype and device, or a numpy array of any numeric dtype (e.g. ``np.load(...,
        mmap_mode="r")``), cast chunk by chunk.
    lam : float
        The penalty, in the book's convention (see :func:`checkpoint_lam`).
    exact : bool
        Also certify the dictionary with exact codes (the expensive part: one nonnegative
        lasso per row).
    chunk_size : int, optional
        Rows per chunk (memory ``O(chunk_size · d_sae)``).
    progress : bool
        One tqdm bar on stderr over the rows, named for what it does (reading the rows, the
        SAE's codes, the exact codes).
    rows : array of int, optional
        Certify only these rows of ``X`` (e.g. a random sample); read in the given order.
    tol : float, optional
        Threshold of the verdicts; default ``1e-6`` in float64, ``1e-3`` in float32.
    encode_kwargs : dict, optional
        Options of the exact codes (``tol``, ``max_iter``, ``add_per_iter``, ``fallback_iter``).

    Returns
    -------
    SAECertificate
    """
    if not isinstance(sae, VanillaSAE):
        raise TypeError(f"sae must be a VanillaSAE, got {type(sae).__name__}")
    lam = check_positive(lam, "lam")
    X, is_numpy = _sae_input(X, sae)
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
    dtype, device = sae.W_dec.dtype, sae.W_dec.device
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    tol = default_certificate_tol(dtype) if tol is None else check_positive(tol, "tol")
    etol, emax, eadd, efb = _encode_options(encode_kwargs)
    kind = ArrayKind(is_numpy=is_numpy)
    with torch.no_grad():
        D, norms = sae.dictionary()
        W_enc, b_enc, b_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
        on_sae = _Running(D, lam, 0.0, 8192)
        on_exact = _Running(D, lam, 0.0, 8192) if exact else None
        codes = _ExactCodes(D, lam, etol, emax, eadd, efb) if exact else None
        desc = "certify_sae: read rows, SAE codes" + (", exact codes" if exact else "")
        with tqdm(total=n, desc=desc, unit="row", disable=not progress, leave=False) as bar:
            for s in range(0, n, chunk_size):
                e = min(n, s + chunk_size)
                idx = slice(s, e) if rows is None else rows[s:e]
                if is_numpy:
                    # one writable copy per chunk, cast on the way (a memory map stays unread elsewhere)
                    chunk = torch.from_numpy(np.array(X[idx], dtype=np_dtype)).to(device)
                else:
                    chunk = X[idx] if rows is None else X[torch.as_tensor(idx, device=X.device)]
                if not bool(torch.isfinite(chunk).all()):
                    bad = int(torch.nonzero(~torch.isfinite(chunk).all(1))[0])
                    where = s + bad if rows is None else int(idx[bad])
                    raise ValueError(f"X contains NaN or infinite entries (first in row {where})")
                Xc = chunk - b_dec
                Z = sae_codes(chunk, W_enc, b_enc, b_dec) * norms
                on_sae.add(Xc, Z)
                if exact:
                    on_exact.add(Xc, codes(Xc))
                bar.update(e - s)
        if exact:
            codes.warn(stacklevel=2)
        rep_sae = on_sae.report(kind, codes="given", tol=tol, with_bias=True)
        if not exact:
            return SAECertificate(lam, rep_sae, None, None, None, tol, _floor(dtype))
        rep_exact = on_exact.report(kind, codes="exact", tol=tol, with_bias=True)
    gap = rep_sae.loss - rep_exact.loss
    rel = gap / rep_sae.loss if rep_sae.loss > 0 else 0.0
    return SAECertificate(lam, rep_sae, rep_exact, gap, rel, tol, _floor(dtype))


def _floor(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-5


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
