"""Memory-bounded pipeline: streamed top-k, grouped/checkpointed Fisher passes, chunked LM loss.

Each streamed computation is compared with a plain in-memory reference on small models.
"""

from __future__ import annotations

import random

import pytest
import torch

from helpers import sentences, tiny_model, tiny_tokenizer
from sparsezo.errors import SparseZOError
from sparsezo.masks import compute_mask
from sparsezo.masks.sensitive import (_head_parts, calibration_batches, chunked_lm_loss, plan_passes,
                                      squared_gradient_passes)
from sparsezo.masks.topk import TopK, exact_count
from sparsezo.model.params import eligible_parameters
from sparsezo.testing import tiny_llama


def _reference_top(scores: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, list[int]]:
    """Sort everything: (score desc, tensor in model order, index asc) — the documented rule."""
    names = list(scores)
    if scope == "per-tensor":
        out = {}
        for n in names:
            flat = scores[n].reshape(-1).tolist()
            order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
            out[n] = sorted(order[: exact_count(density, len(flat))])
        return out
    entries = [(-v, p, i) for p, n in enumerate(names) for i, v in enumerate(scores[n].reshape(-1).tolist())]
    entries.sort()
    k = exact_count(density, len(entries))
    out = {n: [] for n in names}
    for _, p, i in entries[:k]:
        out[names[p]].append(i)
    return {n: sorted(v) for n, v in out.items()}


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
@pytest.mark.parametrize("seed", range(4))
def test_streamed_topk_equals_full_sort_with_ties_in_any_offer_order(scope, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (3, 11), (40,), (2, 2), (9, 9)]
    scores = {f"t{i}": torch.randint(0, 6, s, generator=g).float() for i, s in enumerate(shapes)}  # many ties
    density = [0.05, 0.2, 0.5, 1.0][seed]
    top = TopK({n: s.numel() for n, s in scores.items()}, density, scope)
    order = list(scores)
    random.Random(seed).shuffle(order)  # backward hands tensors over in reverse, or any order
    for n in order:
        top.offer(n, scores[n])
    got = {n: v.tolist() for n, v in top.indices().items()}
    assert got == _reference_top(scores, density, scope)
    assert sum(map(len, got.values())) == (exact_count(density, 40 + 35 + 33 + 4 + 81) if scope == "global"
                                           else sum(exact_count(density, s.numel()) for s in scores.values()))


def test_streamed_topk_pool_stays_bounded_and_mass_is_exact():
    g = torch.Generator().manual_seed(0)
    scores = {f"t{i}": torch.rand(1000, generator=g) for i in range(50)}
    top = TopK({n: 1000 for n in scores}, 0.01, "global", (0.001, 0.01, 0.05), pool_limit=600)
    for n, s in scores.items():
        top.offer(n, s)
        assert top._pending <= 2 * top.capacity + 1000  # never more than twice the pool plus one tensor
    assert top.capacity == 500 and set(top.mass()) == {"0.001", "0.01"}  # 0.05 (2500 entries) exceeds the pool
    flat = torch.cat(list(scores.values())).double()
    for d, m in top.mass().items():
        k = round(float(d) * flat.numel())
        assert m == pytest.approx(flat.topk(k).values.sum().item() / flat.sum().item(), rel=1e-12)


def _texts():
    return [" ".join(s for _, s in sentences(300, 3))]


def _reference_fisher(model, tok, seq_len, calib_tokens, mb):
    """Today's in-memory computation: the model's own loss, all gradients at once, summed squares."""
    rows = calibration_batches(tok, _texts(), calib_tokens, seq_len)
    params = eligible_parameters(model)
    ref = {n: torch.zeros(p.shape) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    with torch.enable_grad():
        for s in range(0, rows.shape[0], mb):
            b = rows[s : s + mb]
            grads = torch.autograd.grad(model(input_ids=b, labels=b).loss, list(params.values()))
            for r, gr in zip(ref.values(), grads):
                r.add_(gr.float().square())
    for p in params.values():
        p.requires_grad_(False)
    return rows, params, ref


@pytest.mark.parametrize("groups,ckpt", [("one", False), ("each", False), ("each", True), ("pairs", True)])
def test_grouped_checkpointed_fisher_equals_in_memory(groups, ckpt):
    model, tok = tiny_model(), tiny_tokenizer()
    rows, params, ref = _reference_fisher(model, tok, 16, 160, 2)  # 10 rows, 5 micro-batches
    names = list(params)
    split = {"one": [names], "each": [[n] for n in names], "pairs": [names[i : i + 2] for i in range(0, len(names), 2)]}
    plan = {"groups": split[groups], "checkpoint": ckpt, "micro_batches": 5}
    got = {}
    squared_gradient_passes(model, params, rows, 2, plan, got.__setitem__)
    assert list(sorted(got)) == sorted(names)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-10)
    assert all(not p.requires_grad and p.grad is None for p in params.values())  # the model is handed back frozen


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
@pytest.mark.parametrize("mb", [2, 16])  # 5 micro-batches (score buffers), or one (squares go straight to top-k)
def test_memory_bounded_mask_equals_in_memory_mask(scope, mb):
    model, tok = tiny_model(), tiny_tokenizer()
    _, params, ref = _reference_fisher(model, tok, 16, 160, mb)
    free = compute_mask(model, "sensitive", 0.02, scope=scope, tokenizer=tok, texts=_texts(), seq_len=16,
                        calib_tokens=160, micro_batch=mb)
    # score buffers for about two tensors at a time: several passes over the calibration data
    two = 8 * max(p.numel() for p in params.values())
    bounded = compute_mask(model, "sensitive", 0.02, scope=scope, tokenizer=tok, texts=_texts(), seq_len=16,
                           calib_tokens=160, micro_batch=mb, score_memory=two)
    assert free.stats["fisher_passes"] == 1
    assert bounded.stats["fisher_passes"] == (1 if mb == 16 else len(plan_passes(model, params, 10, 16, mb, 0,
                                                                                  score_memory=two)["groups"]))
    if mb == 2:
        assert bounded.stats["fisher_passes"] >= 3
    expected = _reference_top(ref, 0.02, scope)
    for m in (free, bounded):
        assert {n: v.tolist() for n, v in m.indices.items()} == expected
    assert free.stats["fisher_mass"] == bounded.stats["fisher_mass"]


def test_plan_checkpoints_layers_and_splits_scores_only_when_the_limit_asks():
    model = tiny_model()
    params = eligible_parameters(model)
    roomy = plan_passes(model, params, 10, 16, 2, 0, memory_limit=2**40)
    assert len(roomy["groups"]) == 1 and not roomy["checkpoint"]
    need_all = roomy["estimate_bytes"]
    tight = plan_passes(model, params, 10, 16, 2, 0, memory_limit=need_all - 1)
    assert tight["checkpoint"] and len(tight["groups"]) >= 1 and tight["estimate_bytes"] <= need_all - 1
    one_batch = plan_passes(model, params, 2, 16, 2, 0, memory_limit=need_all - 1)
    assert len(one_batch["groups"]) == 1  # one micro-batch: no score buffers, one pass whatever the limit


def test_fisher_too_small_machine_fails_before_any_pass():
    model, tok = tiny_model(), tiny_tokenizer()
    with pytest.raises(SparseZOError, match=r"needs at least .* GiB .*lower --seq-len, or --calib-tokens"):
        compute_mask(model, "sensitive", 0.02, tokenizer=tok, texts=_texts(), seq_len=16, calib_tokens=160,
                     micro_batch=2, memory_limit=2**20)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_lm_loss_and_gradient_match_the_models(softcap):
    model = tiny_llama(vocab_size=96, hidden=32, layers=2)
    model.config.final_logit_softcapping = softcap  # Gemma-2-style capping, honoured by the chunked head
    if softcap:  # a Llama has no capping of its own: compare against the capped formula directly
        head = model.lm_head
        ref_fn = lambda b: torch.nn.functional.cross_entropy(  # noqa: E731
            (torch.tanh(head(model.model(b).last_hidden_state[:, :-1]).float() / softcap) * softcap).reshape(-1, 96),
            b[:, 1:].reshape(-1))
    else:
        ref_fn = lambda b: model(input_ids=b, labels=b).loss  # noqa: E731
    batch = torch.randint(3, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    w = model.model.layers[1].mlp.up_proj.weight
    w.requires_grad_(True)
    with torch.enable_grad():
        ref = ref_fn(batch)
        g_ref = torch.autograd.grad(ref, w)[0]
        got = chunked_lm_loss(_head_parts(model), batch, chunk_tokens=4)  # 30 positions in 8 chunks
        g_got = torch.autograd.grad(got, w)[0]
    w.requires_grad_(False)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-8)


def _folder_tensors(folder):
    from sparsezo.model.shards import iter_tensors

    return {k: v.clone() for k, v in iter_tensors(folder)}


def test_streamed_quantization_equals_in_memory_byte_for_byte(tmp_path):
    from helpers import save_tiny_model
    from sparsezo.model.load import load_model
    from sparsezo.quant.convert import load_quantized, load_quantized_folder, quantize_folder, save_quantized
    from sparsezo.model.shards import INDEX

    src = save_tiny_model(tmp_path / "fp32")  # an fp32 checkpoint quantized around bf16 exact entries
    model, tok = load_model(src, "bfloat16")
    mask = compute_mask(model, "random", 0.05, seed=3)
    save_quantized(load_quantized(src, mask, torch.bfloat16), tok, tmp_path / "mem", mask)
    quantize_folder(src, mask, tmp_path / "stream", torch.bfloat16, shard_bytes=4096)  # many shards
    assert (tmp_path / "stream" / INDEX).is_file() and not (tmp_path / "mem" / INDEX).is_file()
    a, b = _folder_tensors(tmp_path / "mem"), _folder_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8)), k
    ids = torch.randint(3, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = load_quantized_folder(tmp_path / "mem")(ids).logits
        lb = load_quantized_folder(tmp_path / "stream")(ids).logits
    assert torch.equal(la, lb)
    with pytest.raises(SparseZOError, match="expects .* of shape"):
        bad = compute_mask(tiny_llama(hidden=64, vocab_size=len(tok)), "random", 0.05)
        quantize_folder(src, bad, tmp_path / "bad", torch.bfloat16)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_checkpoint_fingerprint_equals_the_loaded_models(tmp_path, tied, dtype):
    from sparsezo.model.load import load_model
    from sparsezo.model.params import checkpoint_fingerprint, model_fingerprint

    model = tiny_llama(vocab_size=len(tiny_tokenizer()), hidden=32, layers=2)
    model.config.tie_word_embeddings = tied
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape), requires_grad=False)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", dtype)
    assert checkpoint_fingerprint(tmp_path / "m", dtype) == model_fingerprint(loaded)
    other = tiny_llama(seed=1, vocab_size=len(tiny_tokenizer()), hidden=32, layers=2)
    with pytest.raises(SparseZOError, match="different model"):
        checkpoint_fingerprint(tmp_path / "m", dtype, check=model_fingerprint(other))


def test_streamed_merge_leaves_the_base_untouched_and_shards_load(tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import save_tiny_model
    from sparsezo.training.checkpoint import Delta
    from sparsezo.export.hf import save_merged
    from sparsezo.model.load import load_model
    from sparsezo.zo import TrainableParams

    model, tok = load_model(save_tiny_model(tmp_path / "base"), "float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = compute_mask(model, "random", 0.1, seed=2)
    params = TrainableParams(model, mask)
    trained = params.theta + 0.5
    delta = Delta(mask, {n: trained[params.offsets[k]:params.offsets[k + 1]].clone() for k, n in enumerate(params.names)}, {})
    save_merged(model, tok, tmp_path / "merged", delta=delta, shard_bytes=2048)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing written into the base
    ids = torch.arange(3, 12)[None]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    applied = delta.apply(model)
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, model(input_ids=ids).logits)
    applied.remove()
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 2


def test_too_small_machine_fails_before_loading_with_the_figure(tmp_path, monkeypatch):
    import sparsezo.resources as res
    from helpers import save_tiny_model
    from sparsezo.model.load import load_model
    from sparsezo.model.memory import resident_bytes

    folder = save_tiny_model(tmp_path / "m")  # fp32 on disk: a bf16 load casts (anonymous copies)
    need_bf16, need_fp32 = resident_bytes(folder, "bfloat16"), resident_bytes(folder, "float32")
    assert need_bf16 > need_fp32  # fp32 weights stay mmap views of the file, bf16 ones are new tensors
    monkeypatch.setattr(res, "available_memory_bytes", lambda: need_bf16 - 1)
    with pytest.raises(SparseZOError, match=r"loading .* needs about .* GiB of memory, but only .* is available; "
                                            r"use --quant nf4"):
        load_model(folder, "bfloat16")
    model, _ = load_model(folder, "float32")  # fits: nothing is copied
    assert model is not None


def test_memory_report_names_its_figure_and_parse_bytes():
    from sparsezo.resources import memory_report, parse_bytes, start_memory_tracking

    start_memory_tracking()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB of anonymous memory
    rep = memory_report("cpu")
    del big
    assert rep["peak_memory_kind"] == "anon" and rep["peak_memory_bytes"] == rep["peak_anon_bytes"] >= 64 * 2**20
    assert rep["peak_rss_bytes"] >= rep["peak_anon_bytes"] * 0.9
    assert parse_bytes("4.5G") == int(4.5 * 2**30) and parse_bytes("512M") == 512 * 2**20 and parse_bytes("1e9") == 10**9
    with pytest.raises(SparseZOError, match="not a size"):
        parse_bytes("lots")


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_random_mask_beyond_a_billion_entries(scope):
    from sparsezo.masks import random as random_rule
    from sparsezo.masks.base import MaskContext

    params = {f"t{i}": torch.nn.Parameter(torch.empty(30000, 20000, device="meta")) for i in range(3)}  # 1.8e9
    ctx = MaskContext(None, params, scope=scope, seed=5)
    out = random_rule.compute(ctx, 1e-6)
    counts = [v.numel() for v in out.values()]
    assert sum(counts) == (exact_count(1e-6, 1.8e9) if scope == "global" else 3 * exact_count(1e-6, 6e8))
    for v in out.values():
        assert v.dtype == torch.int64 and (v[1:] > v[:-1]).all() and v.min() >= 0 and v.max() < 6e8
    again = random_rule.compute(MaskContext(None, params, scope=scope, seed=5), 1e-6)
    assert all(torch.equal(out[n], again[n]) for n in out)
