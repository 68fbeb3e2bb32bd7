"""WhitenedAdam (student/whitened.py) against its references: plain AdamW when S = I, and plain Adam on the
whitened parameters z (rows = mean + z S) for a real covariance."""

import pytest
import torch

from tokdistill_fast import DistillConfig
from tokdistill_fast.student.loop import warmup_schedule
from tokdistill_fast.student.steps import Group, Rewind
from tokdistill_fast.student.whitened import SPIKE_LIMIT, WhitenedAdam, spike_rows, sqrt_cov


def table(n: int = 500, d: int = 8) -> torch.Tensor:
    """Rows with very different spreads per direction, as an embedding table has."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g) * torch.logspace(-2, 0, d)[:, None]
    return torch.randn(n, d, generator=g) @ mix + 0.3


def test_sqrt_cov_squares_to_the_covariance_and_is_computed_once():
    t = table()
    s = sqrt_cov(t, chunk=64)  # several chunks
    cov = torch.cov(t.T.double()).float() * (t.shape[0] - 1) / t.shape[0]
    torch.testing.assert_close(s @ s, cov, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s, s.T)
    assert sqrt_cov(t) is s


def loss_fn(x: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient changes with the parameters (so moments matter), the same for every optimizer."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(x.shape, generator=g), torch.randn(x.shape[1], x.shape[1], generator=g)
    return ((x @ b - a) ** 2).sum() + x.pow(4).sum()


def steps(opt: torch.optim.Optimizer, param: torch.Tensor, rows, n: int = 12) -> list[torch.Tensor]:
    out = []
    for _ in range(n):
        opt.zero_grad()
        loss_fn(rows()).backward()
        opt.step()
        out.append(rows().detach().clone())
    return out


def test_identity_whitening_is_adamw_without_weight_decay():
    x0 = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    p, q = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    ours = steps(WhitenedAdam([p], [torch.eye(8)], lr=1e-2), p, lambda: p)
    ref = steps(torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0), q, lambda: q)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_equal_adam_on_the_whitened_parameters(dtype):
    """rows = mean + z S with Adam on z (the reference) moves rows exactly as WhitenedAdam moves them directly;
    S from a bf16 table (as the models load) is the same up to the table's rounding."""
    t = table().to(dtype)
    s = sqrt_cov(t)
    x0 = t[:5].float() + 0.1
    p = torch.nn.Parameter(x0.clone())
    ours = steps(WhitenedAdam([p], [s], lr=1e-2), p, lambda: p)
    z = torch.nn.Parameter(torch.linalg.solve(s, x0.T).T.clone())  # x0 = z0 S (the mean folds into z here)
    ref = steps(torch.optim.Adam([z], lr=1e-2), z, lambda: z @ s)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (ours[-1] - x0).abs().max() > 1e-3  # it moved


def test_one_sqrt_cov_per_parameter():
    with pytest.raises(ValueError, match="one sqrt_cov per parameter"):
        WhitenedAdam([torch.nn.Parameter(torch.zeros(2, 8))], [], lr=1e-2)


def test_auto_whitens_the_hidden_state_distillation_only():
    """Whitened where it was measured (token-distill methods, MSE loss); the paper's AdamW elsewhere, or as asked."""
    assert DistillConfig().run_optimizer() == "whitened"
    assert DistillConfig(method="token-distill+alpha-ntp").run_optimizer() == "whitened"
    assert DistillConfig(loss="kl").run_optimizer() == "adamw"
    assert DistillConfig(method="ntp").run_optimizer() == "adamw"
    assert DistillConfig(method="ntp", optimizer="whitened").run_optimizer() == "whitened"
    assert DistillConfig(optimizer="adamw").run_optimizer() == "adamw"
    assert DistillConfig().run_optimizer(target_tokenizer=True) == "adamw"  # --tokenizer: measured with AdamW
    assert DistillConfig(optimizer="whitened").run_optimizer(target_tokenizer=True) == "whitened"


def test_steps_told_their_rows_compute_rows_when_read():
    """Steps that name the rows with a gradient (the others' is zero) leave the other rows to sync(): rows read
    after sync(rows), and all rows after sync(), equal the every-row steps; an unsynced row keeps its old value."""
    t = table()
    s = sqrt_cov(t)
    x0 = t[:20].float() + 0.1
    dense, lazy = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    opt_d, opt_l = WhitenedAdam([dense], [s], lr=1e-2), WhitenedAdam([lazy], [s], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        rows = torch.randperm(20, generator=g)[:4].sort().values
        opt_l.sync(rows)  # the rows this step reads
        torch.testing.assert_close(lazy[rows], dense[rows], rtol=1e-5, atol=1e-6)
        grad = torch.zeros(20, 8)
        grad[rows] = torch.randn(4, 8, generator=g)
        for p, opt, kw in ((dense, opt_d, {}), (lazy, opt_l, {"rows": rows})):
            p.grad = grad.clone()
            opt.step(**kw)
    stale = lazy.detach().clone()
    opt_l.sync()
    torch.testing.assert_close(lazy, dense, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stale, lazy)  # the steps had left rows for sync()


def test_training_with_row_steps_equals_every_row_steps(model_dirs, words_file, corpus_file, monkeypatch):
    """The training loop (step groups on) gives the same rows when whitened steps name their rows as when every
    step reads every row."""
    from tokdistill_fast import distill
    from tokdistill_fast.student import steps as student_steps

    cfg = DistillConfig(snippets_per_token=6, snippet_length=24, batch_size=1, epochs=2, target_layer=2,
                        optimizer="whitened", prefix_sharing="on", dtype="float32")
    model = model_dirs[("llama", "bytelevel", True)]
    rowwise = distill(model, words_file, [corpus_file], None, cfg)
    monkeypatch.setattr(student_steps.Rewind, "__init__",
                        lambda self, opt, sched, rows, lazy=False: self.__dict__.update(
                            opt=opt, sched=sched, rows=rows, lazy=False))
    monkeypatch.setattr(WhitenedAdam, "sync", lambda self, rows=None: None)  # every step already synced all
    every = distill(model, words_file, [corpus_file], None, cfg)
    assert rowwise.report["training"]["steps"] == every.report["training"]["steps"]
    assert rowwise.report["training"]["passes"] < rowwise.report["training"]["steps"]  # steps ran in groups
    torch.testing.assert_close(rowwise.rows, every.rows, rtol=1e-4, atol=1e-5)


def test_spike_rows_are_rows_far_above_their_own_history():
    """A row is a spike when its gradient norm exceeds `limit` x the RMS its second moment holds; rows without
    history never are, whatever their gradient."""
    v = torch.full((3, 4), 0.25 * 1e-3)  # each row: one earlier step of per-channel gradient 0.5 (norm 1)
    seen = torch.tensor([1e-3, 1e-3, 0.0])
    g = torch.stack([torch.full((4,), 0.5 * 99), torch.full((4,), 0.5 * 101), torch.full((4,), 1e6)])
    assert spike_rows(g.norm(dim=1), v, seen, 100.0).tolist() == [False, True, False]


@pytest.mark.parametrize("lazy", [False, True])
def test_a_spike_step_is_a_step_without_gradient(lazy):
    """With `spike`, a row whose gradient jumps 10^4 x its history takes that step as if its gradient were zero
    (its moments only decay), so every later step equals a run that never saw the spike; the others step as
    usual, and the optimizer counts the step it left out."""
    t = table()
    s = sqrt_cov(t)
    x0 = t[:6].float() + 0.1
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, 8, generator=g) for _ in range(8)]
    spiked = [x.clone() for x in grads]
    spiked[5][2] *= 1e4
    clean = [x.clone() for x in grads]
    clean[5][2] = 0.0
    runs = []
    for seq in (spiked, clean):
        p = torch.nn.Parameter(x0.clone())
        opt = WhitenedAdam([p], [s], lr=1e-2, spike=100.0)
        for grad in seq:
            p.grad = grad.clone()
            opt.step(**({"rows": torch.arange(6)} if lazy else {}))
        opt.sync()
        runs.append((p.detach().clone(), int(opt.state[p]["dropped"])))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert (runs[0][1], runs[1][1]) == (1, 0)
    plain = torch.nn.Parameter(x0.clone())
    opt = WhitenedAdam([plain], [s], lr=1e-2)
    for grad in spiked:
        plain.grad = grad.clone()
        opt.step()
    assert not torch.allclose(plain[2], runs[0][0][2])  # without the limit the spike moves the row
    torch.testing.assert_close(plain[[0, 1, 3, 4, 5]], runs[0][0][[0, 1, 3, 4, 5]], rtol=1e-6, atol=1e-7)


def test_spikes_are_dropped_only_where_rows_step_with_their_own_snippets():
    """Row-sparse objectives get the spike limit; with NTP every row also steps as an output row each step, a
    history against which its own snippets' gradients would all read as spikes (docs/defaults.md)."""
    from tokdistill_fast.student.loop import Schedule, optimizer
    from tokdistill_fast.student.whitened import SPIKE_LIMIT

    p, t = torch.nn.Parameter(torch.zeros(2, 8)), table()
    for sparse, limit in ((True, SPIKE_LIMIT), (False, None)):
        opt, _ = optimizer([p], [t], Schedule(lr=1e-2), 10, torch.device("cpu"), row_sparse=sparse)
        assert opt.param_groups[0]["spike"] == limit


def test_look_ahead_equals_stepping_with_zero_gradients():
    """Rewind.ahead with a lazy WhitenedAdam computes each group step's rows at once (look_ahead); stepping with
    zero gradients and rewinding (the path every other optimizer takes) gives the same rows, and neither leaves
    the optimizer or the schedule moved."""
    t = table()
    x0 = t[:20].float() + 0.1
    p = torch.nn.Parameter(x0.clone())
    opt = WhitenedAdam([p], [sqrt_cov(t)], lr=1e-2, spike=SPIKE_LIMIT)
    sched = warmup_schedule(opt, 12, 0.5, False, cooldown=0.2)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        rows = torch.randperm(20, generator=g)[:6].sort().values
        p.grad = torch.zeros(20, 8)
        p.grad[rows] = torch.randn(6, 8, generator=g)
        opt.step(rows=rows)
        sched.step()
    opt.sync()
    parts = list(torch.randperm(20, generator=g)[:12].split([3, 4, 5]))
    state = {k: v.clone() for k, v in opt.state[p].items()}
    group = Group(range(3), None, parts, torch.zeros(0))
    fast = Rewind(opt, sched, p, lazy=True).ahead(group)
    slow = Rewind(opt, sched, p, lazy=False).ahead(group)
    for part in parts[1:]:
        torch.testing.assert_close(fast[part], slow[part], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(fast[part], p[part])  # the rows do move over the steps before theirs
    torch.testing.assert_close(fast[parts[0]], p[parts[0]].detach())
    for k, v in state.items():
        torch.testing.assert_close(opt.state[p][k], v)
    assert sched.last_epoch == 4


def test_group_steps_equal_steps_one_by_one():
    """WhitenedAdam.group_steps (a group's steps over disjoint rows at once, Rewind.take_steps) ends where as many
    step(rows=...) calls end: rows, moments, spike history and count (one planted spike), step count."""
    t = table()
    s = sqrt_cov(t)
    g = torch.Generator().manual_seed(7)
    x0 = t[:20].float() + 0.1
    warm = [(torch.randperm(20, generator=g)[:8].sort().values, torch.randn(8, 8, generator=g)) for _ in range(3)]
    parts = list(torch.randperm(20, generator=g)[:12].split([5, 3, 4]))
    grads = torch.randn(12, 8, generator=g)
    grads[6] *= 1e4  # a spike in the second step
    lrs = [1e-2, 2e-2, 1.5e-2]
    runs = []
    for grouped in (False, True):
        p = torch.nn.Parameter(x0.clone())
        opt = WhitenedAdam([p], [s], lr=1e-2, spike=SPIKE_LIMIT)
        for rows, grad in warm:
            p.grad = torch.zeros(20, 8)
            p.grad[rows] = grad
            opt.step(rows=rows)
        if grouped:
            opt.group_steps(p, parts, Group(range(3), None, parts, torch.zeros(0)).trained_step, grads, lrs)
        else:
            for part, grad, lr in zip(parts, grads.split([5, 3, 4]), lrs):
                opt.param_groups[0]["lr"] = lr
                p.grad = torch.zeros(20, 8)
                p.grad[part] = grad
                opt.step(rows=part)
        opt.sync()
        runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (one, state_one), (group, state_group) = runs
    torch.testing.assert_close(group, one, rtol=1e-5, atol=1e-6)
    for k in state_one:
        torch.testing.assert_close(state_group[k], state_one[k], rtol=1e-5, atol=1e-7)
    assert int(state_group["dropped"]) == 1 and float(state_group["step"]) == 6
