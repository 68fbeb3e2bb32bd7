"""`--method token-distill+alpha-mass`: alpha-NTP's output side read at the teacher's cached final states. Its loss
is next-token prediction with the new rows as extra output rows (value and gradient against losses.next_token),
its per-state statistics are the original model's own (against a plain forward), a step adds exactly its alpha-scaled
gradient, per step of a group, and through distill() it trains tied models only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from tokdistill_fast import DistillConfig, align, distill, student, teacher
from tokdistill_fast.config import UserInputError
from tokdistill_fast.modeling import losses
from tokdistill_fast.modeling.models import Decoder
from tokdistill_fast.student.objective import Trainable

FAST = dict(snippets_per_token=6, snippet_length=24, batch_size=4, epochs=2, dtype="float32",
            device="cpu", add_variants=False, target_layer=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_teacher_ntp_is_next_token_prediction_on_the_new_output_rows(dtype, tol):
    torch.manual_seed(0)
    V, D, n, K = 50, 16, 6, 20
    W = torch.randn(V, D)
    T = torch.randn(K + 3, D).to(dtype)
    t_idx = torch.randperm(K + 3)[:K]
    target = torch.randint(0, V, (K,))
    rows = torch.randn(n, D, requires_grad=True)
    ref_rows = rows.detach().clone().requires_grad_()
    ref_loss, ref_row = losses.next_token(lambda h: h.float() @ W.t(), ref_rows, T.float(), t_idx, target, V)
    ref_loss.backward()
    logits = T.float() @ W.t()
    lse = logits.logsumexp(-1)
    ce = torch.zeros(K + 3)
    ce[t_idx] = lse[t_idx] - logits[t_idx].gather(1, target[:, None])[:, 0]
    own = torch.ones(K, n, dtype=torch.bool)
    row = losses.teacher_ntp(T, t_idx, rows, own, lse[t_idx], ce[t_idx])
    row.mean().backward()
    torch.testing.assert_close(row.detach(), ref_row, rtol=tol, atol=tol)
    torch.testing.assert_close(rows.grad, ref_rows.grad, rtol=tol, atol=tol * 1e-1)
    # rows a pair does not own enter its softmax but take none of its gradient
    rows.grad = None
    own[:, 0] = False
    losses.teacher_ntp(T, t_idx, rows, own, lse[t_idx], ce[t_idx]).mean().backward()
    assert rows.grad[0].abs().max() == 0 and rows.grad[1:].abs().max() > 0


def test_the_student_stops_at_the_target_layer():
    """alpha-mass reads the teacher's last layer, never the student's: a step runs only up to the target layer."""
    objective = student.Objective(distill="mse", layer=2, mass=True)
    assert objective.cache_layers(6) == [2, 6] and objective.student_layers(6, False) == [2]


@pytest.fixture(scope="module")
def case():
    """A tiny tied model and 12 snippets of a two-subtoken word (one ends with it): (model, decoder, alignment,
    teacher sequences, the cache of the target layer 1 and the last layer)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3", 300), dtype=torch.float32).eval()
    dec = Decoder(model)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(20, 300, int(rng.integers(6, 14))).tolist() for _ in range(12)]
    for i, s in enumerate(seqs):
        at = len(s) - 2 if i == 2 else int(rng.integers(0, len(s) - 4))  # snippet 2 ends with the word
        s[at:at + 2] = [7, 8]
    al = align.align(seqs, [[7, 8]], [0] * len(seqs), [300], "python")
    ids, cu = align.pack(seqs)
    cache = teacher.compute(dec, ids, cu, al, [1, dec.num_layers], 4096, torch.float32)
    return model, dec, al, seqs, cache


def test_head_stats_are_the_original_models_next_token_loss(case):
    """head_stats' logsumexp and cross-entropy at each cached pair are those of a plain forward of the teacher
    sequence at the pair's teacher position (0 where the snippet ends)."""
    model, dec, al, seqs, cache = case
    lse, ce = student.Objective.head_stats(dec, cache, al, chunk=3)
    snippet = al.pair_snippet()
    for k in range(len(al.t_pos)):
        seq, t = seqs[snippet[k]], int(al.t_pos[k])
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, t].float()
        assert lse[k].item() == pytest.approx(logits.logsumexp(-1).item(), rel=1e-4)
        want = F.cross_entropy(logits[None], torch.tensor([seq[t + 1]])).item() if t + 1 < len(seq) else 0.0
        assert ce[k].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert (ce == 0).sum() >= 1  # the pair at snippet 2's end has no next token


def test_a_caches_subset_keeps_its_head_stats(case):
    """TeacherCache.take carries the head stats a run stored: a subset's are those head_stats computes on the subset
    (the rows that train again read them instead of recomputing)."""
    _, dec, al, _, cache = case
    cache = dataclasses.replace(cache, head=student.Objective.head_stats(dec, cache, al))
    idx = np.array([2, 0])
    sub = cache.take(idx)
    want = student.Objective.head_stats(dec, sub, al.take(idx))
    for got, ref in zip(sub.head, want):
        torch.testing.assert_close(got, ref)
    assert len(sub.head[0]) < len(cache.head[0])


@pytest.mark.parametrize("groups", [1, 2])
def test_objective_adds_alpha_times_teacher_ntp_gradient_only(case, groups):
    """One pass over every snippet (as one step, or as two steps of a group over disjoint rows): the loss is the
    distillation loss, and the gradient is the distillation's plus, per step, alpha = its distillation loss over
    its teacher-state NTP loss times the gradient of the latter's mean over the whole pass's pairs (take_steps
    rescales each step's rows to its own mean), each pair moving its own step's rows only."""
    _, dec, al, _, cache = case
    L, n = dec.num_layers, 2
    snippet_row = np.arange(al.n) % n  # two rows: snippets alternate between them
    lse, ce = student.Objective.head_stats(dec, cache, al)
    b = student.make_batch(al, snippet_row, np.arange(al.n), student.Passes(),
                           step_of=snippet_row if groups == 2 else None)
    part = torch.from_numpy(snippet_row if groups == 2 else np.zeros(al.n, dtype=np.int64))[al.pair_snippet()]
    b.part = part if groups == 2 else None
    row_step = torch.arange(n) if groups == 2 else torch.zeros(n, dtype=torch.long)
    torch.manual_seed(3)
    init = torch.randn(n, dec.hidden_size)
    grads, values = [], []
    for mass in (False, True):
        rows = init.clone().requires_grad_()
        flat, _ = student.student_states(dec, b, dec.embed_weight, rows, [1], student.Passes(), None)
        loss, row_loss = student.Objective(distill="mse", layer=1, mass=mass).loss(
            dec, flat, (cache.states, b.t_idx), b, Trainable(rows, None, True), mass=(lse, ce, row_step))
        loss.backward()
        grads.append(rows.grad)
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    rows = init.clone().requires_grad_()
    out = losses.teacher_ntp(cache.states[L], b.t_idx, rows, part[:, None] == row_step[None, :], lse[b.t_idx],
                             ce[b.t_idx])
    want = torch.zeros_like(init)
    for s in part.unique():
        sel = part == s
        alpha = row_loss[sel].mean() / out[sel].mean()
        g, = torch.autograd.grad(alpha.detach() * out[sel].sum() / len(out), rows, retain_graph=True)
        want += g
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(grads[1] - grads[0], want, rtol=1e-4, atol=1e-6)


def test_alpha_mass_through_distill(model_dirs, words_file, corpus_file):
    """A tied model: the run trains alpha-mass (no guard watches it) and reports the distillation loss alone; untied
    models and teacher-in-step passes are refused."""
    tied = model_dirs[("llama", "bytelevel", True)]
    plain = distill(tied, words_file, [corpus_file], None, DistillConfig(**FAST, lr=0.3, ntp_guard=False)).report
    mass = distill(tied, words_file, [corpus_file], None,
                   DistillConfig(**FAST, lr=0.3, method="token-distill+alpha-mass")).report
    assert mass["settings"]["resolved_method"] == "token-distill+alpha-mass"
    assert {t["method"] for t in mass["tokens"]} == {"token-distill+alpha-mass"}
    assert mass["ntp_guard_after_run"] is None
    first = [r["training"]["first_loss"] for r in (plain, mass)]
    assert first[0] == pytest.approx(first[1], rel=1e-5)  # the same first step, reported without the mass term
    assert all(t["mass_after"] >= 0 for t in mass["tokens"])  # the run measured its rows as every run does
    with pytest.raises(UserInputError, match="tied"):
        distill(model_dirs[("qwen2", "bytelevel", False)], words_file, [corpus_file], None,
                DistillConfig(**FAST, method="token-distill+alpha-mass"))
    with pytest.raises(UserInputError, match="cached pass"):
        student.resolve_passes("fused", "auto", 1, cached_teacher=True)
    assert student.resolve_passes("auto", "auto", 1, cached_teacher=True) == student.Passes(prefix=True)


def test_alpha_mass_in_chunks(model_dirs, words_file, corpus_file):
    """Large vocabularies train in chunks of tokens (--chunk-tokens), each with its own teacher cache: alpha-mass's
    head stats come from each chunk's cache, one chunk is the unchunked run, and smaller chunks stay close to it."""
    cfg = DistillConfig(target_layer=2, lr=5e-3, batch_size=4, snippets_per_token=12, dtype="float32", device="cpu",
                        method="token-distill+alpha-mass")
    whole, one, two = (distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file],
                               config=cfg.replace(chunk_tokens=n)).rows for n in (None, 1000, 2))
    assert torch.equal(whole, one)
    assert not torch.equal(whole, two) and torch.allclose(whole, two, atol=0.1)
