"""Certify a public vanilla L1 SAE on its language model's activations (where the network is there).

The SAEs practitioners study are public vanilla (ReLU, L1) SAEs on decoder language models,
such as SAELens' GPT-2-small residual-stream release ``gpt2-small-res-jb``. This script

1. downloads one with ``sae_lens.SAE.from_pretrained_with_cfg_and_sparsity`` and writes it in
   the SAELens layout, with the training fields of its published config (``l1_coefficient``,
   ``lp_norm``, …) so that :func:`companion.load_sae` reads the λ it was trained at;
2. loads the model SAELens names for it with ``transformer_lens.HookedTransformer.from_pretrained``
   (with the release's ``model_from_pretrained_kwargs``) and collects activations at the SAE's
   hook on held-out text: Python's own documentation (``pydoc_data.topics``, shipped with
   Python), not the web text the SAE was trained on; windows of the SAE's context size, the
   BOS position left out (its residual norm is an outlier the SAE is not meant to code);
3. certifies the SAE in float64 with :func:`companion.interop.certify_checkpoint` (λ from the
   checkpoint, progress bars, the statistical verdict and next steps) and prints the ladder

       SAE loss L(D, Z_SAE)  >=  F_b(D) (exact codes, b = b_dec)  >=  Huber bound (T4)

   and the full report.

Offline (``HF_HUB_OFFLINE=1``, or no connection to huggingface.co within 3 s) it says so and
exits 0 without downloading anything. A GPU makes the exact codes fast (Colab: a GPU runtime);
the CPU works with fewer tokens.

    python tools/certify_public_sae.py                      # gpt2-small-res-jb, blocks.8.hook_resid_pre
    python tools/certify_public_sae.py --sae-id blocks.4.hook_resid_pre --n-tokens 8192 --json out.json

Everything after the download (a checkpoint directory and activations in, the certificate
out) is :func:`certify_checkpoint`, tested offline in ``tests/test_certify_public_sae.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import companion  # noqa: E402

HUB = ("huggingface.co", 443)
CONNECT_TIMEOUT_S = 3.0
# The fields of a published SAELens config that say which loss it was trained on; they are
# copied to the top level of the written cfg.json, where companion.load_sae reads them.
LAM_CAUTION = ("note: λ is read from the published config by companion.load_sae's rules (SAELens' "
               "l1_coefficient = 2λ for its summed, unhalved squared error). Early SAELens versions "
               "trained some releases on losses their configs do not record (e.g. a squared error "
               "divided by the input's norm); for those this certifies the book's loss at that λ, "
               "not the loss the SAE was trained on. Pass --lam to choose λ.")
TRAINING_FIELDS = ("l1_coefficient", "lp_norm", "mse_loss_normalization",
                   "scale_sparsity_penalty_by_decoder_norm")


def network_available(host: tuple[str, int] = HUB, timeout: float = CONNECT_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the Hugging Face hub can be reached, and if not why, without ever hanging.

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value means offline; otherwise
    one TCP connection is attempted with a ``timeout``-second limit.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return False, f"{var}={os.environ[var]}"
    try:
        socket.create_connection(host, timeout=timeout).close()
    except OSError as e:
        return False, f"no connection to {host[0]}:{host[1]} within {timeout:g} s ({e})"
    return True, ""


def _field(cfg: dict, key: str) -> Any:
    """``key`` from a SAELens config, wherever its version put it (flat, v6 metadata, training details)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    details = meta.get("training_architecture_details") if isinstance(meta.get("training_architecture_details"), dict) else {}
    for source in (cfg, meta, details):
        if key in source and source[key] is not None:
            return source[key]
    return None


def save_public_sae(sae: Any, cfg: dict, directory: pathlib.Path) -> dict:
    """Write a SAELens ``sae`` in the SAELens layout, with its published training fields.

    ``cfg`` is the config dict SAELens returned with the SAE. Returns what the activations
    need: ``model_name``, ``hook_name``, ``context_size``, ``prepend_bos`` and
    ``model_from_pretrained_kwargs``.
    """
    sae.save_model(directory)
    cfg_path = directory / "cfg.json"
    written = json.loads(cfg_path.read_text())
    for key in TRAINING_FIELDS:
        if _field(cfg, key) is not None:
            written[key] = _field(cfg, key)
    cfg_path.write_text(json.dumps(written, indent=2) + "\n")
    info = {key: _field(cfg, key) for key in ("model_name", "hook_name", "context_size", "prepend_bos")}
    info["model_from_pretrained_kwargs"] = _field(cfg, "model_from_pretrained_kwargs") or {}
    for key in ("model_name", "hook_name"):
        if not info[key]:
            raise ValueError(f"the SAE's config names no {key}: cannot collect its activations")
    if _field(cfg, "hook_head_index") is not None or (_field(cfg, "reshape_activations") or "none") != "none":
        raise ValueError("only SAEs on a whole hook's activations (no head index, no reshaping) are supported")
    return info


def download_sae(release: str, sae_id: str, directory: pathlib.Path, device: str) -> dict:
    """Fetch ``release``/``sae_id`` with SAELens and write it to ``directory`` (see :func:`save_public_sae`)."""
    from sae_lens import SAE

    sae, cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, device="cpu")
    return save_public_sae(sae, cfg, directory)


def documentation_texts() -> list[str]:
    """Paragraphs of Python's documentation topics (shipped with Python), in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        paragraphs += [" ".join(p.split()) for p in topics[key].split("\n\n") if len(p.split()) >= 8]
    return paragraphs


def collect_activations(info: dict, n_tokens: int, device: str, model: Any = None) -> torch.Tensor:
    """Activations (n_tokens, d_in) at ``info['hook_name']`` of ``info['model_name']`` on the documentation.

    ``model`` (a ``HookedTransformer``) is loaded by name when not given. Each paragraph is one
    window of at most ``context_size`` tokens; only the blocks up to the hook are computed.
    """
    if model is None:
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained(info["model_name"], device=device,
                                                  **info["model_from_pretrained_kwargs"])
    model.eval()
    hook = info["hook_name"]
    layer = re.match(r"blocks\.(\d+)\.", hook)
    stop = int(layer.group(1)) + 1 if layer else None
    context = int(info["context_size"] or model.cfg.n_ctx)
    bos = info["prepend_bos"] is not False
    rows, total = [], 0
    with torch.no_grad():
        for text in documentation_texts():
            tokens = model.to_tokens(text, prepend_bos=bos)[:, :context]
            _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=stop)
            acts = cache[hook][0, 1:] if bos else cache[hook][0]
            rows.append(acts.float().cpu())
            total += acts.shape[0]
            if total >= n_tokens:
                break
    return torch.cat(rows)[:n_tokens]


@dataclass
class PublicCertificate:
    """The certificate of one checkpoint on one batch of activations, and its ladder."""

    certificate: companion.SAECertificate
    lam_source: str
    n_tokens: int

    @property
    def ladder(self) -> tuple[float, float, float]:
        """SAE loss, F_b(D) at exact codes, and the Huber bound at the SAE's centring."""
        e = self.certificate.exact_codes
        return self.certificate.sae_codes.loss, e.loss, e.huber_bound

    def ladder_holds(self) -> bool:
        sae_loss, exact, bound = self.ladder
        return sae_loss >= exact >= bound

    def summary(self) -> str:
        sae_loss, exact, bound = self.ladder
        c = self.certificate
        return "\n".join([
            f"the ladder on {self.n_tokens} held-out tokens, λ = {c.lam:.6g} ({self.lam_source})",
            f"  SAE loss L(D, Z_SAE)                    {sae_loss:12.6g}",
            f"  >= F_b(D), exact codes, b = b_dec       {exact:12.6g}   amortisation gap "
            f"{c.amortisation_gap:.4g} ({100 * c.relative_amortisation_gap:.3g}% of the SAE loss)",
            f"  >= Huber bound (T4), same centring      {bound:12.6g}   F_b(D) - bound = {exact - bound:.4g} "
            "(no unit-norm dictionary of any size gets below the bound)",
            f"  ladder holds: {self.ladder_holds()}",
            "",
            c.summary(),
        ])


def certify_checkpoint(directory: str | pathlib.Path, X: Any, *, lam: float | None = None,
                       override: bool = False, device: str | torch.device | None = None,
                       progress: bool = True) -> PublicCertificate:
    """Certify the SAELens-layout checkpoint in ``directory`` in float64 on ``X``, with statistics.

    :func:`companion.interop.certify_checkpoint`: ``lam`` defaults to the λ the checkpoint's
    training loss implies (:func:`companion.checkpoint_lam`); progress bars on stderr.
    """
    from companion.interop import certify_checkpoint as certify

    X = torch.as_tensor(X)
    cert = certify(directory, X, lam=lam, override=override, device=device, progress=progress)
    source = cert.lam_source.removeprefix("from the checkpoint: ") if lam is None else "given"
    return PublicCertificate(cert, source, X.shape[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", default="gpt2-small-res-jb", help="SAELens release (default %(default)s)")
    ap.add_argument("--sae-id", default="blocks.8.hook_resid_pre", help="SAE within the release (default %(default)s)")
    ap.add_argument("--n-tokens", type=int, default=4096, help="held-out tokens to certify on (default %(default)s)")
    ap.add_argument("--lam", type=float, help="λ in the book's convention (default: the checkpoint's)")
    ap.add_argument("--override-lam", action="store_true", help="certify at --lam even if the checkpoint implies another")
    ap.add_argument("--device", default=None, help="torch device (default: CUDA if available)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the certificate as JSON here")
    args = ap.parse_args(argv)
    if args.n_tokens <= 0:
        ap.error(f"--n-tokens must be positive, got {args.n_tokens}")

    online, why = network_available()
    if not online:
        print(f"certify_public_sae: offline ({why}); nothing downloaded, nothing certified. "
              "Run it where the Hugging Face hub is reachable (e.g. Colab with a GPU).")
        return 0
    device = args.device or str(companion.pick_device())
    with tempfile.TemporaryDirectory(prefix="public-sae-") as tmp:
        directory = pathlib.Path(tmp) / "sae"
        print(f"downloading {args.release} / {args.sae_id} with SAELens", flush=True)
        info = download_sae(args.release, args.sae_id, directory, device)
        print(f"collecting {args.n_tokens} activations at {info['hook_name']} of {info['model_name']} "
              "on Python's documentation", flush=True)
        X = collect_activations(info, args.n_tokens, device)
        result = certify_checkpoint(directory, X, lam=args.lam, override=args.override_lam, device=device)
    print(f"{args.release} / {args.sae_id}: {result.certificate.sae_codes.n_atoms} latents, "
          f"d_in = {X.shape[1]}")
    if args.lam is None:
        print(LAM_CAUTION)
    print(result.summary())
    if args.json:
        out = {"release": args.release, "sae_id": args.sae_id, **info, "lam_source": result.lam_source,
               "n_tokens": result.n_tokens, "ladder": dict(zip(("sae_loss", "exact_codes_loss", "huber_bound"),
                                                               result.ladder)),
               "certificate": result.certificate.to_dict()}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
