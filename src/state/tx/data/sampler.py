"""Cell sets drawn as a few contiguous windows of a group's rows in the training layout.

cell-load's sampler shuffles each (cell type, perturbation) group, cuts it into sets of
``cell_sentence_len`` cells (a short last set is refilled to full length by drawing its own cells with
replacement), shuffles the sets, packs ``batch_size`` sets per batch, and maps every cell to a random
control of the same cell type (and batch, with ``basal_mapping_strategy=batch``).

Here a group is a list of layout rows (shuffled within the group when the layout was written). Each
epoch, a group's rows are rotated by a random offset and cut into blocks of ``S/k`` rows; every set
takes k blocks, one of each block size, chosen by a random permutation. So over an epoch every
training cell is drawn exactly as often as with cell-load (once, or by the same with-replacement
refill for a short set, see :func:`set_rows`), set composition changes every epoch, and a set is about k contiguous reads.
The control set of a set is k windows at random offsets of the matching control pool.

Everything is a function of (seed, epoch): every worker process and every DDP rank computes the
same plan, ranks take disjoint slices of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Groups:
    """Training groups and control pools, all as layout rows (sorted int64 arrays)."""

    rows: list[np.ndarray]  # per group: layout rows of its training cells
    file: np.ndarray  # per group: index of the file (layout) it lives in
    pool: np.ndarray  # per group: index into pools of its control pool
    pools: list[np.ndarray]  # control pools: layout rows (same file as the groups using them)


@dataclass
class EpochPlan:
    """The sets of one epoch on one rank, in batch order."""

    group: np.ndarray  # (n_sets,) group of each set
    starts: np.ndarray  # (n_sets, k) window starts in the group's rotated rows (mod group size)
    lengths: np.ndarray  # (n_sets, k) window lengths; they sum to S, or less for a short set
    ctrl_starts: np.ndarray  # (n_sets, k) window starts in the control pool (mod pool size)
    set_ids: np.ndarray  # (n_sets,) epoch-wide id of each set (seeds its refill draws)
    batch_size: int

    @property
    def n_batches(self) -> int:
        return -(-len(self.group) // self.batch_size)

    def batch_sets(self, index: int) -> np.ndarray:
        return np.arange(index * self.batch_size, min((index + 1) * self.batch_size, len(self.group)))


def part_sizes(set_len: int, windows: int) -> np.ndarray:
    """k window lengths that sum to ``set_len`` (they differ by at most one)."""
    windows = max(1, min(int(windows), set_len))
    base, extra = divmod(set_len, windows)
    return np.array([base + 1] * extra + [base] * (windows - extra), dtype=np.int64)


def _group_sets(n: int, sizes: np.ndarray, rng: np.random.Generator, drop_last: bool, shuffle: bool = True):
    """Window starts/lengths of every set of one group of n rows (``shuffle=False``: set j is the j-th
    stretch of set_len rows, for validation)."""
    set_len, k = int(sizes.sum()), len(sizes)
    offsets = np.r_[0, np.cumsum(sizes)[:-1]]
    n_full = n // set_len
    rotation = int(rng.integers(n)) if shuffle else 0
    # block (j, i) = the i-th part of the j-th set_len-long stretch; set j takes part i of stretch perm_i[j].
    if not shuffle:
        picks = np.repeat(np.arange(n_full)[:, None], k, axis=1)
    elif n_full:
        picks = np.stack([rng.permutation(n_full) for _ in range(k)], axis=1)
    else:
        picks = np.zeros((0, k), np.int64)
    starts = (rotation + picks * set_len + offsets) % n
    lengths = np.broadcast_to(sizes, (n_full, k))
    rest = n - n_full * set_len
    if rest and not drop_last:
        starts = np.vstack([starts, np.r_[(rotation + n_full * set_len) % n, np.zeros(k - 1, np.int64)]])
        lengths = np.vstack([lengths, np.r_[rest, np.zeros(k - 1, np.int64)]])
    return starts.astype(np.int64), np.asarray(lengths, dtype=np.int64)


def epoch_plan(groups: Groups, *, set_len: int, windows: int, batch_size: int, seed: int, epoch: int,
               drop_last: bool = False, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> EpochPlan:
    """All sets of one epoch for one rank (deterministic for (seed, epoch); ranks are disjoint).
    ``shuffle=False`` (validation): groups in order, each cut into consecutive sets, sets in order."""
    rng = np.random.default_rng([int(seed), int(epoch), 7919])
    sizes = part_sizes(set_len, windows)
    k = len(sizes)
    group_ids, starts, lengths = [], [], []
    for g, rows in enumerate(groups.rows):
        if len(rows) == 0:
            continue
        s, ln = _group_sets(len(rows), sizes, rng, drop_last, shuffle)
        group_ids.append(np.full(len(s), g, dtype=np.int64))
        starts.append(s)
        lengths.append(ln)
    if not group_ids:
        empty = np.zeros((0, k), np.int64)
        return EpochPlan(np.zeros(0, np.int64), empty, empty, empty, np.zeros(0, np.int64), batch_size)
    group = np.concatenate(group_ids)
    starts, lengths = np.vstack(starts), np.vstack(lengths)
    pool_sizes = np.array([len(p) for p in groups.pools], dtype=np.int64)[groups.pool[group]]
    ctrl_starts = (rng.random((len(group), k)) * np.maximum(pool_sizes, 1)[:, None]).astype(np.int64)
    order = rng.permutation(len(group)) if shuffle else np.arange(len(group))
    if world_size > 1:  # equal, disjoint shares: a few sets (different ones each epoch) sit out
        share = len(order) // world_size
        order = order[rank * share:(rank + 1) * share]
    n_keep = len(order) - (len(order) % batch_size if drop_last else 0)
    order = order[:n_keep]
    return EpochPlan(group[order], starts[order], lengths[order], ctrl_starts[order], order, batch_size)


def _windows(rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    n = len(rows)
    idx = np.concatenate([(s + np.arange(ln)) % n for s, ln in zip(starts.tolist(), lengths.tolist())])
    return rows[idx]


def set_rows(groups: Groups, plan: EpochPlan, i: int, set_len: int, seed: int, epoch: int) -> tuple:
    """(perturbed rows, control rows, redraws) of set i of the plan: set_len layout rows each.

    A short set of m cells holds its m cells once, then set_len - m redrawn from them with replacement
    (``redraws``: which of the first m each extra row repeats; None for a full set). Each cell's
    expected count is set_len / m, as with cell-load's set_len draws with replacement, and the m
    cells stay contiguous reads.
    """
    g = int(plan.group[i])
    rows = _windows(groups.rows[g], plan.starts[i], plan.lengths[i])
    redraws = None
    if len(rows) < set_len:
        rng = np.random.default_rng([int(seed), int(epoch), int(plan.set_ids[i]), 104729])
        redraws = rng.integers(len(rows), size=set_len - len(rows))
        rows = np.concatenate([rows, rows[redraws]])
    pool = groups.pools[int(groups.pool[g])]
    ctrl = _windows(pool, plan.ctrl_starts[i], part_sizes(set_len, plan.starts.shape[1]))
    return rows, ctrl, redraws
