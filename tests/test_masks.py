"""Mask rules: exact densities, references for sensitive/magnitude, file round trip and errors."""

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer, sentences
from sparsezo.errors import SparseZOError
import sparsezo.masks.sensitive as sensitive
from sparsezo.masks import Mask, compute_mask, select_top
from sparsezo.model.params import eligible_parameters


def _flat_sets(mask):
    return {n: set(i.tolist()) for n, i in mask.indices.items()}


def test_eligible_default_is_decoder_linear_weights():
    names = list(eligible_parameters(tiny_model()))
    assert len(names) == 2 * 7
    assert all(".layers." in n and n.endswith(".weight") and ("self_attn" in n or "mlp" in n) for n in names)
    with_embed = eligible_parameters(tiny_model(), include=r"embed_tokens|layers\.0\.mlp\.up_proj")
    assert list(with_embed) == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    no_mlp = eligible_parameters(tiny_model(), exclude=r"\.mlp\.")
    assert len(no_mlp) == 2 * 4


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
@pytest.mark.parametrize("rule", ["random", "magnitude-small", "magnitude-large"])
def test_density_is_exact(rule, scope):
    model = tiny_model()
    params = eligible_parameters(model)
    d = 0.013
    mask = compute_mask(model, rule, d, scope=scope, seed=4)
    if scope == "global":
        assert mask.num_trainable == round(d * sum(p.numel() for p in params.values()))
    else:
        for n, p in params.items():
            assert mask.indices[n].numel() == max(1, round(d * p.numel()))
    for idx in mask.indices.values():
        assert torch.equal(idx, idx.unique())  # sorted, no duplicates


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_magnitude_masks_match_topk_reference(scope):
    model = tiny_model()
    params = eligible_parameters(model)
    d = 0.02
    for rule, sign in (("magnitude-small", -1), ("magnitude-large", 1)):
        mask = compute_mask(model, rule, d, scope=scope)
        if scope == "per-tensor":
            for n, p in params.items():
                ref = torch.topk(sign * p.abs().reshape(-1), max(1, round(d * p.numel()))).indices.sort().values
                assert torch.equal(mask.indices[n], ref), (rule, n)
        else:
            flat = torch.cat([sign * p.abs().reshape(-1) for p in params.values()])
            top = set(torch.topk(flat, round(d * flat.numel())).indices.tolist())
            got, off = set(), 0
            for n, p in params.items():
                got |= {off + i for i in mask.indices[n].tolist()}
                off += p.numel()
            assert got == top, rule


def _texts():
    return [" ".join(s for _, s in sentences(200, 3))]


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_sensitive_mask_matches_bruteforce_fisher(scope):
    model, tok = tiny_model(), tiny_tokenizer()
    d, seq_len, mb = 0.01, 16, 2
    mask = compute_mask(model, "sensitive", d, scope=scope, tokenizer=tok, texts=_texts(), seq_len=seq_len,
                        calib_tokens=96, micro_batch=mb)
    # reference: per-parameter squared gradients summed over the same micro-batches
    ids = tok(_texts()[0], add_special_tokens=False)["input_ids"][:96]
    rows = torch.tensor(ids).view(-1, seq_len)
    params = eligible_parameters(model)
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for s in range(0, rows.shape[0], mb):
        model.zero_grad()
        b = rows[s : s + mb]
        model(input_ids=b, labels=b).loss.backward()
        for n, p in params.items():
            ref[n] += p.grad ** 2
    for p in params.values():
        p.requires_grad_(False)
    if scope == "per-tensor":
        for n, s in ref.items():
            top = torch.topk(s.reshape(-1), max(1, round(d * s.numel()))).indices.sort().values
            assert torch.equal(mask.indices[n], top), n
    else:
        flat = torch.cat([s.reshape(-1) for s in ref.values()])
        top = set(torch.topk(flat, round(d * flat.numel())).indices.tolist())
        got, off = set(), 0
        for n, s in ref.items():
            got |= {off + i for i in mask.indices[n].tolist()}
            off += s.numel()
        assert got == top
    assert mask.meta["calib_tokens_used"] == 96


def test_select_top_breaks_ties_deterministically_and_exactly():
    scores = {"a": torch.tensor([1.0, 2.0, 2.0, 0.0]), "b": torch.tensor([2.0, 3.0])}
    out = select_top(scores, 3 / 6, "global")  # k=3: 3.0 plus two of the three 2.0s, in model order
    assert out["a"].tolist() == [1] and out["b"].tolist() == [0, 1] or out["a"].tolist() == [1, 2] and out["b"].tolist() == [1]
    assert sum(v.numel() for v in out.values()) == 3
    assert {k: v.tolist() for k, v in select_top(scores, 0.5, "global").items()} == {k: v.tolist() for k, v in out.items()}


def test_random_mask_is_seeded(tmp_path):
    model = tiny_model()
    a, b, c = (compute_mask(model, "random", 0.05, seed=s) for s in (1, 1, 2))
    assert _flat_sets(a) == _flat_sets(b) != _flat_sets(c)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_mask_roundtrip_and_model_checks(tmp_path):
    model = tiny_model()
    mask = compute_mask(model, "random", 0.05, seed=1)
    path = tmp_path / "m.safetensors"
    mask.save(path)
    loaded = Mask.load(path)
    assert _flat_sets(loaded) == _flat_sets(mask)
    assert loaded.meta["rule"] == "random" and loaded.meta["density"] == 0.05
    loaded.check_model(model)
    with pytest.raises(SparseZOError, match="different model"):
        loaded.check_model(tiny_model(seed=5))  # same shapes, other weights
    from sparsezo.testing import tiny_llama

    with pytest.raises(SparseZOError, match="shape|does not have"):
        loaded.check_model(tiny_llama(hidden=64, vocab_size=len(tiny_tokenizer())))
    full = compute_mask(model, "full")
    full.save(tmp_path / "full.safetensors")
    assert Mask.load(tmp_path / "full.safetensors").is_full
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SparseZOError, match="not a readable"):
        Mask.load(tmp_path / "bad.safetensors")


def test_bad_mask_arguments():
    model = tiny_model()
    for d in (0.0, -0.1, 1.5):
        with pytest.raises(SparseZOError, match="outside"):
            compute_mask(model, "random", d)
    with pytest.raises(SparseZOError, match="unknown mask rule"):
        compute_mask(model, "bogus", 0.1)
    with pytest.raises(SparseZOError, match="calibration"):
        compute_mask(model, "sensitive", 0.1, tokenizer=tiny_tokenizer(), texts=None)
    with pytest.raises(SparseZOError, match="fewer than one sequence"):
        compute_mask(model, "sensitive", 0.1, tokenizer=tiny_tokenizer(), texts=["good movie"], seq_len=64)


def test_compare_is_jaccard_of_index_sets():
    from sparsezo.masks.analysis import compare

    model = tiny_model()
    a, b = compute_mask(model, "random", 0.1, seed=1), compute_mask(model, "magnitude-large", 0.1)
    res = compare(a, b)
    sa = {(n, i) for n, idx in a.indices.items() for i in idx.tolist()}
    sb = {(n, i) for n, idx in b.indices.items() for i in idx.tolist()}
    assert res["jaccard"] == pytest.approx(len(sa & sb) / len(sa | sb))
    assert res["intersection"] == len(sa & sb)
    assert compare(a, a)["jaccard"] == 1.0
    assert set(res["layers"]) == {"0", "1"} and "q_proj" in res["modules"]
    full = compute_mask(model, "full")
    assert compare(a, full)["jaccard"] == pytest.approx(a.num_trainable / full.num_trainable)


def test_fisher_mass_matches_reference():
    from sparsezo.masks.analysis import fisher_mass

    g = torch.Generator().manual_seed(0)
    scores = {"x": torch.rand(1000, generator=g) ** 8, "y": torch.rand(3000, generator=g) ** 8}
    mass = fisher_mass(scores, (1e-3, 1e-2, 0.5, 1.0))
    flat = torch.cat([scores["x"], scores["y"]]).sort(descending=True).values
    for d, m in mass.items():
        k = max(1, round(float(d) * 4000))
        assert m == pytest.approx((flat[:k].sum() / flat.sum()).item(), rel=1e-6)
    assert list(mass.values()) == sorted(mass.values()) and mass["1"] == pytest.approx(1.0)


def test_density_table_and_plot(tmp_path):
    from sparsezo.masks.analysis import density_table, plot_layer_density

    mask = compute_mask(tiny_model(), "random", 0.1, seed=2)
    table = density_table(mask)
    assert sum(r["trainable"] for r in table["layers"].values()) == mask.num_trainable
    assert sum(r["numel"] for r in table["modules"].values()) == mask.num_eligible
    plot_layer_density(mask, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Bar:
    """Records what the Fisher loop tells its progress bar."""

    made: list["_Bar"] = []

    def __init__(self, total, desc, unit, leave):
        self.total, self.unit, self.n, self.ticks = total, unit, 0, []
        _Bar.made.append(self)

    def update(self, k):
        self.n += k
        self.ticks.append(k)

    def close(self):
        pass


@pytest.mark.parametrize("micro_batch", [2, 64])
def test_the_fisher_bar_ticks_per_gradient_and_ends_full(micro_batch, monkeypatch):
    """One tick per tensor gradient (a single micro-batch must not sit at 0/1 with no ETA), full at the end."""
    monkeypatch.setattr(sensitive, "tqdm", _Bar)
    _Bar.made.clear()
    model, tok = tiny_model(), tiny_tokenizer()
    n_tensors = len(eligible_parameters(model))
    compute_mask(model, "sensitive", 0.01, tokenizer=tok, texts=_texts(), seq_len=16, calib_tokens=96,
                 micro_batch=micro_batch)
    (bar,) = _Bar.made
    n_mb = -(-6 // micro_batch)  # 96 tokens = 6 rows of 16
    assert bar.unit == "grad" and bar.total == n_mb * n_tensors and bar.n == bar.total
    assert bar.ticks.count(1) >= n_mb * n_tensors - n_mb  # ticks as backward delivers each gradient
