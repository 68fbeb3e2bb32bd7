"""Prefix sharing and packed passes give the reference's student states at the aligned positions, the same
gradients for the new rows and the same teacher targets, on tiny Llama/Qwen2/Gemma3 models in fp32 and bf16.

The rule (FlashAttention's): against a float64 run of the reference, the fast path's error is at most twice the
reference's own error in the same dtype, plus a small relative floor. On CPU packed passes attend through the
dense path; on a GPU the varlen kernel is compared with the per-sequence reference too.
"""

import copy
import dataclasses
import logging

import numpy as np
import pytest
import torch
from conftest import assert_close_as_reference, tiny_config
from tokdistill_fast.kernels.embedding_rows import embedding_rows
from transformers import AutoModelForCausalLM

from tokdistill_fast import DistillConfig, align, student, teacher
from tokdistill_fast.config import UserInputError
from tokdistill_fast.modeling import attention, fused
from tokdistill_fast.modeling.models import Decoder
from tokdistill_fast.student.feed import TargetFeed
from tokdistill_fast.student.loop import LossLog

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PHRASES = [[7, 8], [9, 10, 11]]
MODES = {"prefix": student.Passes(prefix=True), "fused": student.Passes(prefix=True, fused=True),
         "cached": student.Passes(prefix=True, cached=True)}


def snippets(seed: int, n: int = 7):
    """Random teacher sequences with a phrase planted at the start, mid-sequence, twice, or not at all."""
    rng = np.random.default_rng(seed)
    seqs, which = [], []
    for i in range(n):
        s = rng.integers(20, 300, int(rng.integers(6, 20))).tolist()
        p = PHRASES[i % 2]
        if i != 3:  # snippet 3 has no occurrence: no aligned pairs
            at = 0 if i == 0 else int(rng.integers(1, len(s) - 3))
            s[at:at + len(p)] = p
        if i == 5:
            s[-len(p):] = p  # a second occurrence at the very end
        seqs.append(s)
        which.append(i % 2)
    al = align.align(seqs, PHRASES, which, [300, 301], "python")
    teacher_ids, cu_teacher = align.pack(seqs)
    return al, np.asarray(which), teacher_ids, cu_teacher


def mode_cache(dec, al, teacher_seqs, layer, mode, layers=None):
    """The teacher cache a run in `mode` reads (at `layers`, default [layer]): none (fused), packed with the prefix
    keys/values (cached), else the padded reference cache."""
    layers = layers or [layer]
    if mode == "fused":
        return None
    if mode == "cached":
        return teacher.compute(dec, *teacher_seqs, al, layers, 4096, dec.embed_weight.dtype, packed=True,
                               capture=align.prefix_lengths(al))
    return teacher.compute(dec, *teacher_seqs, al, layers, 4096, dec.embed_weight.dtype)


def states_and_grad(dec, al, snippet_row, passes, teacher_seqs, rows0, weight, layer):
    """Student states at the aligned positions, d(sum(states * weight))/d rows, and (fused) teacher targets."""
    rows = rows0.clone().to(dec.embed_weight.device).requires_grad_()
    cache = mode_cache(dec, al, teacher_seqs, layer, "cached") if passes.cached else None
    b = student.make_batch(al, snippet_row, np.arange(al.n), passes, teacher_seqs,
                           prefix_cu=cache.prefix_cu if cache else None).to(dec.embed_weight.device)
    flat, targets = student.student_states(dec, b, dec.embed_weight, rows, [layer], passes,
                                           [layer] if passes.fused else None, prefix_kv=cache.prefix if cache else None)
    S = flat[layer].index_select(0, b.s_idx)
    (S.double() * weight.to(S.device)).sum().backward()
    T = targets[layer].index_select(0, b.t_idx).double().cpu() if targets else None
    return S.detach().double().cpu(), rows.grad.double().cpu(), T


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def family_case(request):
    """A tiny model of the family in float64 with its gold results, plus per-dtype copies and reference results."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param, 300), dtype=torch.float64)
    model.eval().requires_grad_(False)
    al, snippet_row, teacher_ids, cu_teacher = snippets(seed=1)
    rows0 = torch.randn(2, model.config.hidden_size, dtype=torch.float64) * 0.5
    weight = torch.randn(len(al.s_pos), model.config.hidden_size, dtype=torch.float64)  # upstream grad != 1
    case = dict(model=model, al=al, snippet_row=snippet_row, teacher=(teacher_ids, cu_teacher), rows0=rows0,
                weight=weight, layer=3)
    case["gold"] = reference_results(case, torch.float64)
    return case


def reference_results(case, dtype):
    """(decoder, (states, grads, None), teacher cache rows) of the reference path in `dtype` (memoized)."""
    if dtype not in case:
        dec = Decoder(copy.deepcopy(case["model"]).to(dtype))
        same = states_and_grad(dec, case["al"], case["snippet_row"], student.Passes(), None, case["rows0"],
                               case["weight"], case["layer"])
        cache = teacher.compute(dec, *case["teacher"], case["al"], [case["layer"]], 4096, dtype)
        case[dtype] = (dec, same, cache.states[case["layer"]].double())
    return case[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_student_states_and_grads_match_reference(family_case, mode, dtype):
    c = family_case
    _, gold, gold_t = c["gold"]
    dec, same, cache = reference_results(c, dtype)
    ours = states_and_grad(dec, c["al"], c["snippet_row"], MODES[mode], c["teacher"], c["rows0"], c["weight"],
                           c["layer"])
    assert_close_as_reference(ours[0], same[0], gold[0])
    assert_close_as_reference(ours[1], same[1], gold[1])
    if dtype == torch.float32:
        torch.testing.assert_close(ours[0], same[0], rtol=1e-5, atol=1e-5)
    if MODES[mode].fused:  # the teacher pass inside the step gives the cache's targets
        assert_close_as_reference(ours[2], cache, gold_t)


def test_teacher_packed_matches_padded():
    torch.manual_seed(0)
    dec = Decoder(AutoModelForCausalLM.from_config(tiny_config("gemma3", 300), dtype=torch.float32).eval())
    al, _, teacher_ids, cu_teacher = snippets(seed=2)
    padded = teacher.compute(dec, teacher_ids, cu_teacher, al, [2, 4], max_tokens=40, cache_dtype=torch.float32)
    packed = teacher.compute(dec, teacher_ids, cu_teacher, al, [2, 4], max_tokens=40, cache_dtype=torch.float32,
                             packed=True)
    for layer in (2, 4):
        torch.testing.assert_close(packed.states[layer], padded.states[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_training_matches_reference(mode):
    """Whole runs (shuffled batches, one without aligned pairs, AdamW, warm-up) end at the same rows."""
    torch.manual_seed(0)
    dec = Decoder(AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.float32).eval())
    al, snippet_row, teacher_ids, cu_teacher = snippets(seed=3)
    cache = teacher.compute(dec, teacher_ids, cu_teacher, al, [2], 4096, torch.float32)
    init = torch.randn(2, dec.hidden_size) * 0.5
    schedule = student.Schedule(lr=1e-2, epochs=1, batch_size=1, seed=0)  # one step sees snippet 3 alone
    objective = student.Objective(distill="mse", layer=2)
    ref = student.train(dec, al, cache, snippet_row, init, None, objective, schedule, tied=True)
    ours = student.train(dec, al, mode_cache(dec, al, (teacher_ids, cu_teacher), 2, mode), snippet_row, init, None,
                         objective, schedule, tied=True, passes=student.Passes(prefix=True, fused=mode == "fused"),
                         teacher=(teacher_ids, cu_teacher))
    np.testing.assert_allclose(ours.step_loss, ref.step_loss, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.rows, ref.rows, rtol=1e-4, atol=1e-5)
    assert ours.extra["positions"]["with_grad"] < sum(np.diff(al.cu_student))
    assert ours.extra["passes"] == mode  # a cache with prefix keys/values is read: no step runs a prefix
    if mode != "fused":
        assert (ours.extra["positions"]["prefix"] == 0) == (mode == "cached")


def many_tokens(seed: int, n_tokens: int = 12, per_token: int = 3):
    """Snippets for n_tokens two-subtoken phrases (ids 20 + 2i, 21 + 2i), per_token each, one snippet without."""
    rng = np.random.default_rng(seed)
    phrases = [[20 + 2 * i, 21 + 2 * i] for i in range(n_tokens)]
    seqs, which = [], []
    for t in range(n_tokens):
        for k in range(per_token):
            s = rng.integers(60, 300, int(rng.integers(6, 16))).tolist()
            if (t, k) != (0, 0):  # one snippet without its phrase: no aligned pairs
                at = int(rng.integers(0, len(s) - 2))
                s[at:at + 2] = phrases[t]
            seqs.append(s)
            which.append(t)
    al = align.align(seqs, phrases, which, [300 + t for t in range(n_tokens)], "python")
    return al, np.asarray(which), *align.pack(seqs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("distill,epochs,mode", [("mse", 1, "fused"), ("mse", 2, "prefix"), ("kl", 1, "fused"),
                                                 ("mse", 2, "cached"), ("kl", 2, "cached"), ("mse+mass", 2, "prefix"),
                                                 ("mse+mass", 2, "cached")])
def test_step_groups_match_reference(distill, epochs, mode, device):
    """Consecutive steps over disjoint tokens run as one pass (student.Rewind) and still end where the reference
    (step by step, padded) ends: rows, per-step losses and per-token losses (fp32; on CUDA with fused AdamW and
    the Triton kernels). +mass: alpha-mass's output term moves only each step's own rows in a pass too."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.float32)
    dec = Decoder(model.to(device).eval())
    al, snippet_row, teacher_ids, cu_teacher = many_tokens(seed=6)
    distill, mass = distill.removesuffix("+mass"), distill.endswith("+mass")
    layer = 2 if distill == "mse" else dec.num_layers
    objective = student.Objective(distill=distill, layer=layer, mass=mass)
    layers = objective.cache_layers(dec.num_layers)
    cache = teacher.compute(dec, teacher_ids, cu_teacher, al, layers, 4096, torch.float32)
    init = torch.randn(12, dec.hidden_size) * 0.5
    schedule = student.Schedule(lr=1e-2, epochs=epochs, batch_size=3, seed=0)
    ref = student.train(dec, al, cache, snippet_row, init, None, objective, schedule, tied=True)
    passes = student.Passes(prefix=True, fused=mode == "fused")
    ours_cache = mode_cache(dec, al, (teacher_ids, cu_teacher), layer, mode, layers)
    runs = {g: student.train(dec, al, ours_cache, snippet_row, init, None, objective,
                             dataclasses.replace(schedule, group=g), tied=True, passes=passes,
                             teacher=(teacher_ids, cu_teacher)) for g in (1, 16)}
    assert runs[1].extra["groups"] == ref.steps > runs[16].extra["groups"] > 1
    assert not torch.allclose(ref.rows.cpu(), init, atol=1e-3)  # the rows do train
    for ours in runs.values():
        assert ours.extra["passes"] == mode
        np.testing.assert_allclose(ours.step_loss, ref.step_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.token_loss, ref.token_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.word_loss, ref.word_loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.rows.cpu(), ref.rows.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["reference", "cached"])
def test_word_loss_is_the_loss_at_each_snippets_first_pair(mode):
    """TrainResult.word_loss (what outliers are flagged on) is, per token, the mean squared error at the word's
    own position only (each snippet's first aligned pair), computed here from plain forward passes; token_loss
    averages every aligned pair. lr 0 keeps the rows where the check computes them."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.float32)
    dec = Decoder(model.eval())
    al, snippet_row, teacher_ids, cu_teacher = snippets(seed=3)
    layer, init = 2, torch.randn(2, dec.hidden_size) * 0.5
    schedule = student.Schedule(lr=0.0, epochs=1, batch_size=al.n, seed=0)  # one step: every pair counts
    passes = student.Passes(prefix=True) if mode == "cached" else student.Passes()
    cache = mode_cache(dec, al, (teacher_ids, cu_teacher), layer, mode)
    got = student.train(dec, al, cache, snippet_row, init, None, student.Objective(distill="mse", layer=layer),
                        schedule, tied=True, passes=passes)
    word, every = [[] for _ in init], [[] for _ in init]
    for i in range(al.n):
        pairs = np.arange(al.cu_aligned[i], al.cu_aligned[i + 1])
        if not len(pairs):
            continue
        with torch.no_grad():
            t = dec.hidden_states(dec.embed(torch.from_numpy(teacher_ids[cu_teacher[i]:cu_teacher[i + 1]])[None]),
                                  [layer])[layer][0]
            s_ids = torch.from_numpy(al.student_ids[al.cu_student[i]:al.cu_student[i + 1]])
            s = dec.hidden_states(embedding_rows(s_ids[None], dec.embed_weight, init, dec.embed_scale),
                                  [layer])[layer][0]
        err = (s[al.s_pos[pairs]] - t[al.t_pos[pairs]]).pow(2).mean(-1)
        word[snippet_row[i]].append(err[0].item())
        every[snippet_row[i]].extend(err.tolist())
    np.testing.assert_allclose(got.word_loss, [np.mean(w) for w in word], rtol=1e-4)
    np.testing.assert_allclose(got.token_loss, [np.mean(e) for e in every], rtol=1e-4)
    assert not np.allclose(got.word_loss, got.token_loss)


def test_group_steps_cuts_at_shared_tokens_and_breaks():
    snippet_row = np.array([0, 1, 2, 3, 0, 4])
    plan = [np.array([0]), np.array([1, 2]), np.array([3]), np.array([4]), np.array([5])]
    assert student.group_steps(plan, snippet_row, 16) == [range(0, 3), range(3, 5)]  # step 3 reuses token 0
    assert student.group_steps(plan, snippet_row, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert student.group_steps(plan, snippet_row, 16, breaks={2}) == [range(0, 2), range(2, 5)]


def test_batch_plan_pairs_batches_over_other_rows():
    """Every epoch takes each snippet once; most batches come in pairs over disjoint rows, which group_steps runs
    as one pass: a 40-word job runs about two steps a pass, a job of two words step by step."""
    counts = np.random.default_rng(1).integers(3, 26, 40)
    snippet_row = np.repeat(np.arange(40), counts)
    plan = student.batch_plan(snippet_row, 16, 3, seed=0)
    covered = np.sort(np.concatenate(plan))
    np.testing.assert_array_equal(covered, np.repeat(np.arange(len(snippet_row)), 3))
    assert sum(len(b) < 16 for b in plan) <= 3
    groups = student.group_steps(plan, snippet_row, 16)
    assert len(groups) <= 0.6 * len(plan)
    assert [b.tolist() for b in student.batch_plan(snippet_row, 16, 3, seed=0)] == [b.tolist() for b in plan]
    two = np.repeat([0, 1], 20)
    assert len(student.group_steps(student.batch_plan(two, 16, 1, seed=0), two, 16)) == 3


def test_epoch_means_average_each_epochs_steps():
    """report.json's training curve: the mean step loss of each epoch of a plan, epochs told apart by the snippets
    their steps read (an epoch reads every snippet once, in batches of uneven sizes)."""
    snippet_row = np.repeat(np.arange(7), [3, 5, 2, 8, 1, 4, 6])
    plan = student.batch_plan(snippet_row, 4, 3, seed=1)
    seen, epoch = np.zeros(len(snippet_row), dtype=int), []
    for b in plan:
        epoch.append(seen[b[0]])
        seen[b] += 1
    loss = np.random.default_rng(0).random(len(plan))
    expected = [loss[np.array(epoch) == e].mean() for e in range(3)]
    np.testing.assert_allclose(student.loop.epoch_means(loss, plan, len(snippet_row)), expected)


def test_batch_plan_runs_sixteen_steps_a_pass_in_large_jobs():
    """With many rows a run grows past the pair, up to the loop's group size: 1,000 words run ~16 steps a pass
    (random batches: ~4), every snippet once an epoch; the run stops at a quarter of the rows, so a job of 60
    words keeps its pairs."""
    snippet_row = np.repeat(np.arange(1000), 25)
    plan = student.batch_plan(snippet_row, 16, 2, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(plan)), np.repeat(np.arange(len(snippet_row)), 2))
    groups = student.group_steps(plan, snippet_row, student.Schedule.group)
    assert max(len(g) for g in groups) == 16 and len(groups) <= 0.07 * len(plan)
    sixty = np.repeat(np.arange(60), 25)
    assert max(len(g) for g in student.group_steps(student.batch_plan(sixty, 16, 2, seed=0), sixty, 16)) == 2


def test_ntp_objective_with_prefix_sharing():
    """Next-token prediction (logits on the last layer) and untied output rows through the suffix pass."""
    torch.manual_seed(0)
    dec = Decoder(AutoModelForCausalLM.from_config(tiny_config("qwen2", 300, tied=False), dtype=torch.float32).eval())
    al, snippet_row, teacher_ids, cu_teacher = snippets(seed=4)
    init = torch.randn(2, dec.hidden_size) * 0.5
    schedule = student.Schedule(lr=1e-2, epochs=1, batch_size=4, seed=0)
    objective = student.Objective(distill=None, ntp="plain", layer=4, train_output=True)
    runs = [student.train(dec, al, None, snippet_row, init, init, objective, schedule, tied=False, passes=p)
            for p in (student.Passes(), student.Passes(prefix=True, fused=True))]
    torch.testing.assert_close(runs[1].rows, runs[0].rows, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[1].out_rows, runs[0].out_rows, rtol=1e-4, atol=1e-5)


def test_host_cache_feed_gives_cache_rows():
    states = {2: torch.randn(50, 8), 4: torch.randn(50, 8)}
    cache = teacher.TeacherCache(states, np.array([0, 50]))
    rng = np.random.default_rng(0)
    batches = [student.Batch(None, torch.zeros(0), torch.zeros(0), rng.permutation(50)[:k], torch.zeros(0),
                             torch.zeros(0), torch.zeros(0), torch.zeros(0)) for k in (7, 20, 3)]
    feed = TargetFeed(cache, batches, torch.device("cpu"), staged=True)
    for step, b in enumerate(batches):
        got, idx = feed(step, b)
        for layer, t in states.items():
            torch.testing.assert_close(got[layer].index_select(0, idx), t[torch.from_numpy(b.t_rows)])


def test_loss_log_reports_windows(caplog):
    log = LossLog(torch.arange(10, dtype=torch.float32), every=4, desc="t")
    with caplog.at_level(logging.INFO, logger="tokdistill_fast.student"):
        for step in range(10):
            log.step(step)
        log.close()
    assert [r.getMessage() for r in caplog.records] == ["t: steps 1-4, mean loss 1.5", "t: steps 5-8, mean loss 5.5"]


def test_resolve_passes():
    assert student.resolve_passes("auto", "auto", 1) == student.Passes(prefix=True, fused=True)
    assert student.resolve_passes("auto", "auto", 1, sink_guard=True) == student.Passes(prefix=True)
    # one epoch of the MSE caches its teacher pass, as compare does, so the sink guard reads every pair's norm
    one = dict(epochs=1, more_epochs=0)
    assert not student.Passes.for_config(DistillConfig(**one)).fused
    assert student.Passes.for_config(DistillConfig(**one, loss="kl")).fused
    assert student.resolve_passes("auto", "triton", 3) == student.Passes(prefix=True)
    assert student.resolve_passes("auto", "torch", 1) == student.Passes()
    assert student.resolve_passes("on", "torch", 1) == student.Passes(prefix=True)
    with pytest.raises(UserInputError, match="epochs 1"):
        student.resolve_passes("fused", "auto", 2)
    # a config's passes count its more epochs, which NTP objectives and a decaying rate do not train
    assert student.Passes.for_config(DistillConfig(epochs=1, more_epochs=4)) == student.Passes(prefix=True)
    for cfg in (DistillConfig(epochs=1, more_epochs=0, loss="kl"),
                DistillConfig(epochs=1, more_epochs=4, lr_schedule="decay", loss="kl"),
                DistillConfig(epochs=1, more_epochs=4, method="token-distill+alpha-ntp", loss="kl")):
        assert student.Passes.for_config(cfg) == student.Passes(prefix=True, fused=True)
    # auto: more epochs, the hardest quarter's and the variants' where the model runs in bf16, none in fp32 on a CPU
    for dtype, extra in (("bfloat16", 4), ("float32", 0)):
        cfg = DistillConfig(device="cpu", dtype=dtype)
        assert (cfg.run_more_epochs(), cfg.run_hardest_epochs(), cfg.run_variant_epochs()) == (extra, extra, extra)
    assert DistillConfig(dtype="float32", hardest_epochs=2).run_hardest_epochs() == 2
    assert DistillConfig(dtype="bfloat16", add_variants=False).run_variant_epochs() == 0


VARLEN_CASE = ([5, 1, 17, 30], [12, 1, 17, 49])  # suffix over a prefix, length 1, no prefix, long prefix


def random_varlen_case(q_len, k_len, heads, kv_heads, hd, dtype, device):
    q_len, k_len = np.asarray(q_len), np.asarray(k_len)
    spec = attention.packed_spec(q_len, k_len - q_len).to(torch.device(device))
    q = torch.randn(int(q_len.sum()), heads, hd, dtype=dtype, device=device)
    k, v = (torch.randn(int(k_len.sum()), kv_heads, hd, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, spec


def test_varlen_reference_is_bottom_right_causal():
    """A query block of m rows over n keys equals the last m rows of a full causal pass over the n keys."""
    q, k, v, spec = random_varlen_case([3], [7], 4, 2, 8, torch.float64, "cpu")
    full_q = torch.cat([torch.randn(4, 4, 8, dtype=torch.float64), q])
    full = attention.varlen_causal_ref(full_q, k, v, spec.cu_k, spec.cu_k, 0.3)
    torch.testing.assert_close(attention.varlen_causal_ref(q, k, v, spec.cu_q, spec.cu_k, 0.3), full[4:])


def check_against_reference(ours, qkv, reference):
    """Values of ours = f(*qkv) and gradients to qkv against reference(*tensors) run in qkv's dtype and in float64.
    Keys' and values' gradients sum over their group's query heads, rounded where each path sums: by mean error."""
    same = reference(*qkv)
    qkv64 = [x.detach().double().requires_grad_() for x in qkv]
    gold = reference(*qkv64)
    assert_close_as_reference(ours.double(), same.double(), gold)
    g = torch.randn_like(ours)
    d_ours, d_same = torch.autograd.grad(ours, qkv, g), torch.autograd.grad(same, qkv, g)
    d_gold = torch.autograd.grad(gold, qkv64, g.double())
    assert_close_as_reference(d_ours[0].double(), d_same[0].double(), d_gold[0])
    for a, b, c in zip(d_ours[1:], d_same[1:], d_gold[1:], strict=True):
        assert (a.double() - c).abs().mean() <= 1.5 * (b.double() - c).abs().mean() + 1e-7 * c.abs().max()


# CPU: the C++ kernel in fp32 and bf16, DenseAttention (PyTorch) in float64; CUDA: the varlen kernel
VARLEN_PATHS = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float64),
                pytest.param("cuda", torch.bfloat16, marks=gpu), pytest.param("cuda", torch.float16, marks=gpu)]


@pytest.mark.parametrize("device,dtype", VARLEN_PATHS)
def test_varlen_attention_matches_reference(device, dtype):
    """Values and gradients of queries, keys and values (grouped-query heads: 8 over 2)."""
    *qkv, spec = random_varlen_case(*VARLEN_CASE, 8, 2, 64, dtype, device)
    qkv = [x.requires_grad_() for x in qkv]
    check_against_reference(attention.varlen_causal(*qkv, spec, 0.125), qkv,
                            lambda q, k, v: attention.varlen_causal_ref(q, k, v, spec.cu_q, spec.cu_k, 0.125))


@pytest.mark.parametrize("device,dtype", VARLEN_PATHS)
def test_varlen_attention_over_captured_prefixes_matches_reference(device, dtype):
    """Own rows attending over captured prefix keys/values (context, no gradient) and their own: as the reference
    over the keys in cu_k order, gradients to the queries and own keys/values."""
    q_len, k_len = np.asarray(VARLEN_CASE[0]), np.asarray(VARLEN_CASE[1])
    spec = attention.packed_spec(q_len, k_len - q_len).to(torch.device(device))
    n_ctx, n_own = int((k_len - q_len).sum()), int(q_len.sum())
    context = tuple(torch.randn(n_ctx, 2, 64, dtype=dtype, device=device) for _ in range(2))
    qkv = [torch.randn(n_own, h, 64, dtype=dtype, device=device).requires_grad_() for h in (8, 2, 2)]

    def reference(q, k, v):
        k, v = (torch.cat([c.to(x.dtype), x]).index_select(0, spec.kv_order)
                for c, x in zip(context, (k, v), strict=True))
        return attention.varlen_causal_ref(q, k, v, spec.cu_q, spec.cu_k, 0.125)

    check_against_reference(attention.varlen_causal(*qkv, spec, 0.125, context=context), qkv, reference)


@gpu
def test_student_on_cuda_matches_reference(family_case):
    c = family_case
    _, gold, _ = c["gold"]
    dec = Decoder(copy.deepcopy(c["model"]).to("cuda", torch.bfloat16))
    args = (c["al"], c["snippet_row"])
    same = states_and_grad(dec, *args, student.Passes(), None, c["rows0"], c["weight"], c["layer"])
    for passes in MODES.values():
        ours = states_and_grad(dec, *args, passes, c["teacher"], c["rows0"], c["weight"], c["layer"])
        assert_close_as_reference(ours[0], same[0], gold[0])
        assert_close_as_reference(ours[1], same[1], gold[1])


@gpu
def test_teacher_host_spill_matches_device_cache():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.bfloat16).to("cuda").eval()
    dec = Decoder(model)
    al, _, teacher_ids, cu_teacher = snippets(seed=5, n=40)
    on_device = teacher.compute(dec, teacher_ids, cu_teacher, al, [2, 4], 64, torch.bfloat16)
    on_host = teacher.compute(dec, teacher_ids, cu_teacher, al, [2, 4], 64, torch.bfloat16, device_budget=0)
    for layer in (2, 4):
        assert on_host.states[layer].device.type == "cpu" and on_host.states[layer].is_pinned()
        assert torch.equal(on_host.states[layer], on_device.states[layer].cpu())


def with_repeats(seed: int):
    """snippets(seed) plus repeats of their stems (tokens up to the phrase's first occurrence): continued with
    other tails, as top-up continuations are, one with no tail, and one an exact copy."""
    al, which, teacher_ids, cu = snippets(seed)
    seqs = [teacher_ids[cu[i]:cu[i + 1]].tolist() for i in range(al.n)]
    rng = np.random.default_rng(seed + 100)
    stems = {i: int(al.t_pos[al.cu_aligned[i]]) + 1 for i in (1, 2, 4)}
    extra = [(i, seqs[i][:stems[i]] + rng.integers(20, 300, k).tolist()) for i, k in ((1, 3), (1, 3), (2, 5), (4, 0))]
    extra.append((6, list(seqs[6])))
    seqs += [s for _, s in extra]
    which = np.concatenate([which, [which[i] for i, _ in extra]])
    return align.align(seqs, PHRASES, which.tolist(), [300, 301], "python"), *align.pack(seqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_teacher_runs_a_repeated_stem_once(monkeypatch, family, dtype):
    """A snippet whose tokens up to its first aligned position repeat an earlier one's runs only its tail: the
    cache (states, prefix keys/values, the deepest layer's prefix states) is the one of a pass over every snippet
    whole, bit for bit with the C++ kernels (their attention sums a tail's keys in the whole sequence's order; the
    PyTorch fallback within rounding), and the padded reference's within fp32 rounding."""
    torch.manual_seed(0)
    dec = Decoder(AutoModelForCausalLM.from_config(tiny_config(family, 300), dtype=dtype).eval())
    al, teacher_ids, cu_teacher = with_repeats(seed=3)
    source, _ = teacher.shared_stems(teacher_ids, cu_teacher, al, align.prefix_lengths(al))
    assert (source >= 0).sum() == 5
    keep = np.arange(al.n) % 2 == 1

    def run():
        return teacher.compute(dec, teacher_ids, cu_teacher, al, [2, 4], 64, dtype, packed=True,
                               capture=align.prefix_lengths(al), keep_states=keep)

    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        if fused.extension() is not None:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **({} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}))

    ours = run()
    with monkeypatch.context() as m:  # stems over the keys/values budget: every snippet runs whole
        m.setattr(teacher, "prefix_kv_budget", lambda device: 0)
        over_budget = run()
    monkeypatch.setattr(teacher, "shared_stems", lambda ids, cu, a, c: (np.full(a.n, -1), np.zeros(a.n, dtype=int)))
    whole = run()
    assert all(torch.equal(over_budget.states[l], whole.states[l]) for l in (2, 4))
    for layer in (2, 4):
        same(ours.states[layer], whole.states[layer])
    for layer in whole.prefix:
        for a, b in zip(ours.prefix[layer], whole.prefix[layer]):
            same(a, b)
    same(ours.prefix_states, whole.prefix_states)
    assert np.array_equal(ours.kept, whole.kept)
    if dtype == torch.float32:
        padded = teacher.compute(dec, teacher_ids, cu_teacher, al, [2, 4], 4096, dtype)
        torch.testing.assert_close(ours.states[4], padded.states[4], rtol=1e-5, atol=1e-5)
