"""Write the fixtures beside this file with the real dictionary_learning (tests/test_dictionary_learning_sparse.py).

Each of topk/, batchtopk/, jumprelu/ holds the ``ae.pt`` state dict and ``config.json`` (the
trainer's own ``config`` property, under "trainer", as ``trainSAE`` writes it) of an
AutoEncoderTopK, BatchTopKSAE or JumpReluAutoEncoder built by the library's TopKTrainer,
BatchTopKTrainer or JumpReluTrainer, with random weights of the class's own layout (non-unit
decoder rows, nonzero biases, a set threshold), saved in float32 as training saves them; and
``reference.npz``: inputs ``x`` and the library's own ``encode(x)`` and ``decode(encode(x))``,
evaluated by the same modules in float64.

Run once, by hand, with dictionary_learning 0.1.0 (PyPI) unpacked, not installed (its package
``__init__`` imports nnsight; the modules used here need only torch and einops)::

    pip download dictionary-learning==0.1.0 --no-deps -d /tmp/dl
    python -m zipfile -e /tmp/dl/dictionary_learning-0.1.0-py3-none-any.whl /tmp/dl/src
    python make_fixtures.py /tmp/dl/src tests/data/dictionary_learning_sparse
"""
import importlib, json, sys, types, pathlib
import numpy as np
import torch

SRC = pathlib.Path(sys.argv[1])      # unpacked wheel: SRC/dictionary_learning/...
OUT = pathlib.Path(sys.argv[2])
for name, path in (("dictionary_learning", SRC / "dictionary_learning"),
                   ("dictionary_learning.trainers", SRC / "dictionary_learning" / "trainers")):
    m = types.ModuleType(name); m.__path__ = [str(path)]; sys.modules[name] = m
dl = importlib.import_module("dictionary_learning.dictionary")
topk = importlib.import_module("dictionary_learning.trainers.top_k")
btk = importlib.import_module("dictionary_learning.trainers.batch_top_k")
jr = importlib.import_module("dictionary_learning.trainers.jumprelu")

d_in, d_sae, k = 6, 10, 3
g = torch.Generator().manual_seed(0)
X = torch.randn(40, d_in, generator=g, dtype=torch.float64) * 1.5 + 0.3

def perturb(ae):
    """Random weights of the class's own layout (non-unit decoder rows, nonzero biases)."""
    with torch.no_grad():
        for name, p in ae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "bias" in name or name.startswith("b_") else 1.0))

def write(name, ae, trainer_cfg, encode):
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    state = {kk: v.detach().cpu().clone() for kk, v in ae.state_dict().items()}
    torch.save(state, d / "ae.pt")
    (d / "config.json").write_text(json.dumps({"trainer": trainer_cfg}, indent=4) + "\n")
    ae64 = ae.double()
    with torch.no_grad():
        f = encode(ae64, X)
        xh = ae64.decode(f)
    np.savez(d / "reference.npz", x=X.numpy(), codes=f.numpy(), reconstruction=xh.numpy())
    print(name, sorted(state), {kk: tuple(v.shape) for kk, v in state.items()}, "L0", (f > 0).sum(1).float().mean().item())

# TopK: the trainer's own config; encode default (use_threshold=False): top k of ReLU(encoder(x - b_dec))
tr = topk.TopKTrainer(steps=3000, activation_dim=d_in, dict_size=d_sae, k=k, layer=0, lm_name="fixture", device="cpu", seed=0)
perturb(tr.ae)
tr.ae.threshold = torch.tensor(0.25)          # as update_threshold leaves it (unused by the default encode)
write("topk", tr.ae, tr.config, lambda ae, x: ae.encode(x))

# BatchTopK: inference encode (use_threshold=True): ReLU(encoder(x - b_dec)) kept where > threshold
tr = btk.BatchTopKTrainer(steps=3000, activation_dim=d_in, dict_size=d_sae, k=k, layer=0, lm_name="fixture", device="cpu", seed=0)
perturb(tr.ae)
tr.ae.threshold = torch.tensor(0.8)
write("batchtopk", tr.ae, tr.config, lambda ae, x: ae.encode(x))

# JumpReLU: pre_jump = x W_enc + b_enc (apply_b_dec_to_input False), f = ReLU(pre_jump [pre_jump > threshold])
tr = jr.JumpReluTrainer(steps=3000, activation_dim=d_in, dict_size=d_sae, layer=0, lm_name="fixture", device="cpu", seed=0)
perturb(tr.ae)
with torch.no_grad():
    tr.ae.threshold.copy_(torch.rand(d_sae, generator=g) * 1.0)
write("jumprelu", tr.ae, tr.config, lambda ae, x: ae.encode(x))
