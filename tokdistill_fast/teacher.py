"""Stage 4: teacher hidden states, computed once without gradient and only up to the deepest layer needed.

Snippets run in large batches, packed without padding (attention.py) or, on the reference path, sorted by
length and right-padded; of each sequence only the aligned positions are kept, packed in the cu_seqlens layout of the
alignment: states[l][cu_aligned[i]:cu_aligned[i+1]] are snippet i's targets at layer l. The cache lives on the
compute device, or in pinned host memory when it would take more than `device_budget` bytes there (the
student then copies each step's rows to the device asynchronously, student/feed.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .align import Alignment, cu_seqlens, kept_offsets, prefix_lengths
from .config import progress
from .control import observed
from .modeling.attention import Attend, ranges, select_kv
from .modeling.layout import lay_out, token_batches
from .modeling.models import Decoder

log = logging.getLogger(__name__)

# An aligned pair whose teacher state's norm is over this many times the median of the pairs' is an attention sink
# (sink_pairs). The pairs' 99th percentile sat at 1.11-1.46x (SmolLM2 at layers 15, 22 and 30 on five corpora,
# Gemma-3 at 9 and 14 on two), the sinks at 2.1-8x, mostly a comma or " and" right after the word (docs/defaults.md,
# "Sinks inside the text").
SINK_FACTOR = 2.0


@dataclass
class TeacherCache:
    """Packed teacher targets: one [K, D] tensor per cached layer, rows in alignment order."""

    states: dict[int, torch.Tensor]
    cu_aligned: np.ndarray
    # compute(capture=...): every layer's keys/values of each snippet's first capture[i] positions, in cu order;
    # snippet i's rows are prefix_cu[i]:prefix_cu[i + 1]
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    prefix_cu: np.ndarray | None = None
    # compute(keep_states=...): the states after the deepest layer at those same positions of the snippets `kept`
    # (sorted), packed in that order: a deeper pass over them (the new-token mass check) starts from there
    prefix_states: torch.Tensor | None = None
    kept: np.ndarray | None = None
    # alpha-mass: the original head's (logsumexp, next-token loss) at each row of the last layer (Objective.head_stats),
    # set by the first run that reads them; take() keeps them, so subsets never recompute them
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    # sink_pairs: the median norm of the aligned pairs' states at each compared layer, set by the first run that
    # reads it; take() keeps it, so the rows that train again alone judge sinks by the run's pairs, not their own
    pair_median: dict[int, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def take(self, idx: np.ndarray) -> TeacherCache:
        """The cache of the snippets `idx`, in that order (Alignment.take's), prefix keys/values included: the rows
        that train again alone (retrain.train_alone) read the run's teacher pass instead of running their own."""
        def pick(t: torch.Tensor, cu: np.ndarray) -> torch.Tensor:
            return t.index_select(0, torch.from_numpy(ranges(cu[idx], np.diff(cu)[idx])).to(t.device))

        prefix = None if self.prefix is None else {l: (pick(k, self.prefix_cu), pick(v, self.prefix_cu))
                                                   for l, (k, v) in self.prefix.items()}
        head = None if self.head is None else tuple(pick(t, self.cu_aligned) for t in self.head)
        return TeacherCache({l: pick(t, self.cu_aligned) for l, t in self.states.items()},
                            cu_seqlens(np.diff(self.cu_aligned)[idx]), prefix,
                            None if self.prefix is None else cu_seqlens(np.diff(self.prefix_cu)[idx]), head=head,
                            pair_median=dict(self.pair_median))

    def keep_pairs(self, keep: np.ndarray) -> TeacherCache:
        """The cache of Alignment.keep_pairs(keep): the same snippets (prefix keys/values and kept states too),
        only the rows of the pairs where `keep` [K] is true."""
        idx = torch.from_numpy(np.flatnonzero(keep))

        def pick(t: torch.Tensor) -> torch.Tensor:
            out = t.index_select(0, idx.to(t.device))
            return out.pin_memory() if t.is_pinned() else out

        return replace(self, states={l: pick(t) for l, t in self.states.items()},
                       cu_aligned=kept_offsets(self.cu_aligned, keep),
                       head=None if self.head is None else tuple(pick(t) for t in self.head),
                       pair_median=dict(self.pair_median))


def sink_pairs(al: Alignment, states: torch.Tensor, median: float | None = None,
               median_of=None) -> tuple[np.ndarray, float]:
    """([K] bool, the median): aligned pairs whose teacher state (`states`, the cache rows of the compared layer)
    is an attention sink, a norm over SINK_FACTOR x `median` (default: the pairs' own median, or `median_of`(their
    norms) where several processes hold parts of the pairs), and every pair of a snippet whose first pair (the
    word's own) is one. Such a target is the subtokens' text's own, which the student's row did not reach in
    training (SmolLM2 / PostgreSQL manual, layer 22: " and" after "superusers" at 6.8x; its pair's error, about
    5,000 where the step's other pairs averaged about 4.5, was most of its word's loss), so those pairs are left
    out."""
    chunk = 1 << 16  # fp32 norms without an fp32 copy of a large cache
    norms = torch.cat([torch.linalg.vector_norm(states[i:i + chunk].float(), dim=-1)
                       for i in range(0, len(states), chunk)] + [states.new_zeros(0, dtype=torch.float32)])
    if median is None and median_of is not None:
        median = median_of(norms)
    if not len(states):
        return np.zeros(0, dtype=bool), float("nan") if median is None else median
    median = float(norms.median()) if median is None else median
    sink = (norms > SINK_FACTOR * median).cpu().numpy()
    if not sink.any():
        return sink, median
    snippet = al.pair_snippet()
    first = al.cu_aligned[:-1][np.diff(al.cu_aligned) > 0]
    return sink | np.isin(snippet, snippet[first[sink[first]]]), median


def batch_tokens(device: torch.device) -> int:
    """Tokens per no-grad batch (teacher passes, held-out scoring): 65,536 on CUDA, where one Llama-3.1-8B layer's
    activations are then 512 MiB per tensor beside 16 GB of weights; 2,048 on CPU, where a batch's activations
    then stay in the L3 cache (SmolLM2, an MLP tensor 12 MiB): the 40-word FOLDOC teacher pass took 18% less time
    than at 8,192 on a 2-core EPYC (docs/defaults.md, "No-grad batches that fit the cache")."""
    return 65536 if device.type == "cuda" else 2048


# Share of the device memory free when the cache is built that it may take: the rest is left to the student's
# activations and the optimizer, which come after it; a larger cache spills to pinned host memory.
DEVICE_CACHE_SHARE = 0.5
# Most memory captured prefix keys/values may take (CPU; on CUDA this share of the device's total memory): beyond
# it, passes that would read them run their own prefixes again.
PREFIX_KV_BYTES = 2 * 2**30
PREFIX_KV_DEVICE_SHARE = 0.25


def prefix_kv_bytes(decoder: Decoder, lengths: np.ndarray, dtype: torch.dtype, depth: int | None = None) -> int:
    """Bytes of the keys and values of layers 1..depth (default: all) at `lengths.sum()` positions."""
    cfg = decoder.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (int(lengths.sum()) * (depth or decoder.num_layers) * 2 * heads * head_dim
            * torch.empty((), dtype=dtype).element_size())


def prefix_kv_budget(device: torch.device) -> int:
    """Bytes captured prefix keys/values may take on `device`: a fixed share of its total memory (never of what
    is free at the moment, so that the same job decides alike on a busy device)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * PREFIX_KV_DEVICE_SHARE)
    return PREFIX_KV_BYTES


def prefix_kv_fits(decoder: Decoder, alignment: Alignment, depth: int) -> bool:
    """Whether a packed teacher pass to `depth` layers may keep the keys/values before each snippet's first new
    token (compute's capture=prefix_lengths), which the student's prefix steps then read in every epoch instead of
    rerunning those prefixes (student/steps.py): within prefix_kv_budget."""
    need = prefix_kv_bytes(decoder, prefix_lengths(alignment), decoder.embed_weight.dtype, depth)
    return need <= prefix_kv_budget(decoder.embed_weight.device)


def options(decoder: Decoder, dtype: torch.dtype, packed: bool) -> dict:
    """compute()'s batch size, cache dtype and placement for a run on the decoder's device."""
    device = decoder.embed_weight.device
    budget = int(torch.cuda.mem_get_info()[0] * DEVICE_CACHE_SHARE) if device.type == "cuda" else None
    return {"max_tokens": batch_tokens(device), "cache_dtype": dtype, "packed": packed, "device_budget": budget}


def length_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Group sequence indices, sorted by length, into batches whose padded size B * T_max stays within max_tokens."""
    order = np.argsort(lengths, kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, int(lengths[i]))
        if current and longest_if * (len(current) + 1) > max_tokens:
            batches.append(np.asarray(current))
            current, longest_if = [], int(lengths[i])
        current.append(i)
        longest = longest_if
    if current:
        batches.append(np.asarray(current))
    return batches


def pad_batch(flat: np.ndarray, cu: np.ndarray, seqs: np.ndarray, device: torch.device) -> torch.Tensor:
    """Right-padded [B, T_max] int64 tensor of the packed sequences `seqs` (indices)."""
    lens = cu[seqs + 1] - cu[seqs]
    return lay_out(flat, cu[seqs], lens, np.zeros(len(seqs)), packed=False).ids.to(device, non_blocking=True)


def aligned_rows(cu_aligned: np.ndarray, pos: np.ndarray, seqs: np.ndarray, width: int) -> np.ndarray:
    """Flat indices b * width + pos of the aligned positions of the sequences `seqs` (in batch order)."""
    return np.concatenate([b * width + pos[cu_aligned[i]:cu_aligned[i + 1]] for b, i in enumerate(seqs)]
                          ).astype(np.int64)


def shared_stems(ids: np.ndarray, cu: np.ndarray, al: Alignment, capture: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(source [n], stem [n]) int64: stem[i] = snippet i's positions up to its first aligned one (the word's last
    subtoken in training), source[i] the first snippet with the same tokens there, or -1 (none earlier, no pairs, or
    a `capture` longer than the stem). A repeat's stem states are its source's, so a pass runs only its tail: a word
    with few corpus snippets is continued from each of them many times, and generated contexts share one prompt."""
    n, cu_a, counts = len(cu) - 1, al.cu_aligned, np.diff(al.cu_aligned)
    source, stem = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    has = counts > 0
    stem[has] = al.t_pos[cu_a[:-1][has]] + 1
    pair_of = np.repeat(np.arange(n), counts)
    later = np.ones(len(pair_of), dtype=bool)
    later[cu_a[:-1][has]] = False
    before_stem = np.zeros(n, dtype=bool)  # a pair other than the first inside the stem: no tail alone holds the rest
    np.logical_or.at(before_stem, pair_of[later], al.t_pos[later] < stem[pair_of[later]])
    ok = has & ~before_stem & (True if capture is None else capture <= stem)
    seen: dict[bytes, int] = {}
    for i in np.flatnonzero(ok):
        first = seen.setdefault(ids[cu[i]:cu[i] + stem[i]].tobytes(), i)
        source[i] = -1 if first == i else first
    return source, stem


@torch.no_grad()
def compute(decoder: Decoder, teacher_ids: np.ndarray, cu_teacher: np.ndarray, alignment: Alignment,
            layers: list[int], max_tokens: int, cache_dtype: torch.dtype,
            device_budget: int | None = None, packed: bool = False, capture: np.ndarray | None = None,
            keep_states: np.ndarray | None = None) -> TeacherCache:
    """Teacher states at `layers` for the aligned positions of every snippet. `packed` runs packed rows instead of
    length-sorted right-padded batches (the reference); both give the same states. Packed, a snippet whose stem
    repeats an earlier one's (shared_stems) runs only its tail, over the keys/values of that one's stem. `capture`
    [n] (packed): also keep each layer's keys/values of snippet i's first capture[i] positions, for passes that
    share that prefix (attention.py); not with a cache spilled to host memory, whose steps run their own prefixes.
    `keep_states` [n] bool (with `capture`): of those snippets, also keep the states after the deepest layer at the
    same positions."""
    device = decoder.embed_weight.device
    n, K, D = len(cu_teacher) - 1, len(alignment.t_pos), decoder.hidden_size
    need = K * D * torch.empty((), dtype=cache_dtype).element_size() * len(layers)
    on_host = device.type == "cuda" and device_budget is not None and need > device_budget
    observed.note("teacher_cache", "host" if on_host else "device", fallback=None if not on_host else (
        f"teacher cache ({need / 2**30:.1f} GiB) exceeds the device budget ({device_budget / 2**30:.1f} GiB): kept in "
        "pinned host memory: every step copies its rows over PCIe (tens of GB/s, against ~3 TB/s of device memory)"))
    states = {l: torch.empty((K, D), dtype=cache_dtype, device="cpu" if on_host else device,
                             pin_memory=on_host) for l in layers}
    lengths = cu_teacher[1:] - cu_teacher[:-1]
    cu_a = alignment.cu_aligned
    if capture is not None and not packed:
        raise ValueError("capturing prefix keys/values needs packed passes")
    if capture is not None and on_host:  # steps copy their targets over PCIe: they rerun their prefixes too
        capture = None
    source, stem = (shared_stems(teacher_ids, cu_teacher, alignment, capture) if packed
                    else (np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)))
    repeats = np.flatnonzero(source >= 0)
    # keys/values each snippet of the full pass keeps: its stem where a repeat reads it, else what `capture` asks
    asked = np.zeros(n, dtype=np.int64) if capture is None else capture.astype(np.int64)
    kv_len = asked.copy()
    kv_len[source[repeats]] = stem[source[repeats]]
    # those and the prefix rows copied from them at the end stay within the budget `capture` alone is held to
    if len(repeats) and sum(prefix_kv_bytes(decoder, k, decoder.embed_weight.dtype, max(layers))
                            for k in (kv_len[source < 0], asked)) > prefix_kv_budget(device):
        source[:], repeats, kv_len = -1, repeats[:0], asked
    if len(repeats):
        log.info("teacher: %d of %d snippets repeat another's tokens up to the word: %d tokens run instead of %d",
                 len(repeats), n, int(lengths.sum() - stem[repeats].sum()), int(lengths.sum()))
    own = np.where(source >= 0, source, np.arange(n))  # the snippet whose pass computes each one's stem
    full = np.flatnonzero(source < 0)
    kv_at = np.zeros(n, dtype=np.int64)
    kv_at[full] = cu_seqlens(kv_len[full])[:-1]
    capturing = capture is not None or len(repeats) > 0
    # keep_states: the deepest layer's rows at the captured positions, of kept snippets and the stems they repeat
    kept_idx = np.flatnonzero(keep_states) if capture is not None and keep_states is not None else None
    deep_len = np.zeros(n, dtype=np.int64)
    if kept_idx is not None:
        np.maximum.at(deep_len, own[kept_idx], capture[kept_idx])
    deep_at = np.zeros(n, dtype=np.int64)
    deep_at[full] = cu_seqlens(deep_len[full])[:-1]
    spill = _HostSpill(states) if on_host else None

    def put(hidden: dict[int, torch.Tensor], rows: np.ndarray, pairs: np.ndarray) -> None:
        """Write the states at flat `rows` of a pass into the cache rows `pairs`."""
        flat_idx = torch.from_numpy(rows).to(device)
        picked = {l: h.reshape(-1, D).index_select(0, flat_idx).to(cache_dtype) for l, h in hidden.items()}
        if spill is None:
            dest = torch.from_numpy(pairs).to(device)
            for l, rows_l in picked.items():
                states[l].index_copy_(0, dest, rows_l)
        else:
            spill.put(picked, torch.from_numpy(pairs))

    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    deep: list[torch.Tensor] = []
    batches = token_batches(lengths[full], max_tokens) if packed else length_batches(lengths, max_tokens)
    for seqs in progress([full[b] for b in batches], desc="teacher", unit="batch", leave=False):
        lay = lay_out(teacher_ids, cu_teacher[seqs], lengths[seqs], np.zeros(len(seqs)), packed,
                      capture=kv_len[seqs] if capturing else None).to(device)
        kept: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if capturing else None
        hidden = decoder.hidden_states(decoder.embed(lay.ids), layers, lay.positions if packed else None,
                                       Attend(lay.spec, capture=kept) if packed else None)
        for layer, pair in (kept or {}).items():
            kv.setdefault(layer, []).append(pair)
        if kept_idx is not None:  # packed batches hold consecutive snippets, in order
            p = deep_len[seqs]
            rows = torch.from_numpy(lay.rows(np.repeat(np.arange(len(seqs)), p), ranges(np.zeros(len(p)), p)))
            deep.append(hidden[max(layers)].reshape(-1, D).index_select(0, rows.to(device)))
        counts = cu_a[seqs + 1] - cu_a[seqs]
        pairs = ranges(cu_a[seqs], counts)  # this batch's aligned pairs, which are also their cache rows
        put(hidden, lay.rows(np.repeat(np.arange(len(seqs)), counts), alignment.t_pos[pairs]), pairs)
    joined = {l: (torch.cat([k for k, _ in p]), torch.cat([v for _, v in p])) for l, p in kv.items()}
    tails = repeats[lengths[repeats] > stem[repeats]]
    for b in progress(token_batches(lengths[tails] - stem[tails], max_tokens), desc="teacher tails", unit="batch",
                  leave=False, disable=not len(tails)):
        seqs = tails[b]
        s = stem[seqs]
        lay = lay_out(teacher_ids, cu_teacher[seqs] + s, lengths[seqs] - s, s, True, prefix_len=s).to(device)
        at = torch.from_numpy(ranges(kv_at[source[seqs]], s)).to(device)
        hidden = decoder.hidden_states(decoder.embed(lay.ids), layers, lay.positions,
                                       Attend(lay.spec, context=select_kv(joined, at)))
        counts = cu_a[seqs + 1] - cu_a[seqs] - 1  # the first pair is the stem's last position
        pairs = ranges(cu_a[seqs] + 1, counts)
        put(hidden, lay.rows(np.repeat(np.arange(len(seqs)), counts), alignment.t_pos[pairs] - np.repeat(s, counts)),
            pairs)
    if spill is not None:
        spill.flush()
    if len(repeats):  # a repeat's first pair is its source's
        dest, src = (torch.from_numpy(cu_a[i]).to(states[layers[0]].device) for i in (repeats, source[repeats]))
        for t in states.values():
            t.index_copy_(0, dest, t.index_select(0, src))
    prefix = prefix_states = None
    if capture is not None:  # each snippet's first capture[i] rows, from the pass that ran its stem
        at = torch.from_numpy(ranges(kv_at[own], capture)).to(device)
        prefix = select_kv(joined, at) if len(repeats) else joined
    if kept_idx is not None and deep:
        prefix_states = torch.cat(deep)
        if len(repeats):
            prefix_states = prefix_states.index_select(0, torch.from_numpy(
                ranges(deep_at[own[kept_idx]], capture[kept_idx])).to(device))
    return TeacherCache(states, cu_a, prefix, None if capture is None else cu_seqlens(capture),
                        prefix_states, kept_idx if prefix_states is not None else None)


class _HostSpill:
    """Scatter device rows into a pinned host cache without stalling the device: each batch is copied
    asynchronously into its own pinned staging buffer, and the host-side scatter of batch k waits (on an
    event) for that copy only when batch k + 1 has been queued."""

    def __init__(self, states: dict[int, torch.Tensor]):
        self.states = states
        self.pending: tuple | None = None

    def put(self, picked: dict[int, torch.Tensor], dest: torch.Tensor) -> None:
        staged = {l: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                  for l, t in picked.items()}
        done = torch.cuda.Event()
        done.record()
        self.flush()
        self.pending = (done, staged, dest)

    def flush(self) -> None:
        if self.pending is not None:
            done, staged, dest = self.pending
            done.synchronize()
            for l, t in staged.items():
                self.states[l].index_copy_(0, dest, t)
            self.pending = None


def without_prefix(decoder: Decoder, dtype: torch.dtype, alignment: Alignment, teacher_ids: np.ndarray,
                   cu_teacher: np.ndarray, layers: list[int], packed: bool) -> TeacherCache:
    """Teacher states of some of the snippets (a chunk's; rows trained alone where the run kept no cache) at `layers`,
    without prefix keys/values: the student's prefix steps run their prefixes again."""
    return compute(decoder, teacher_ids, cu_teacher, alignment, layers, **options(decoder, dtype, packed))
