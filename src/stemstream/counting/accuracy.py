"""Counting accuracy against the truth: counted events matched to the electrons that really landed.

Used by benchmarks/bench_accuracy.py and tests/test_accuracy.py with the detector simulator's
``FrameBatch.true_events`` (distinct landing pixels per frame). An event matches a true electron at
the same pixel; optionally, events still unmatched then match a still unmatched true electron among
the 8 neighbours (one-to-one, so a split electron counted twice counts once). recall = matched /
true electrons, precision = matched / events.

:func:`compare_with_electrons` matches against every electron instead (sources.simulator.
landed_electrons: a pixel where two landed is listed twice and can match two events), the truth
for a method that counts coincident electrons (counting.clusters); one-to-one in the same way
(greedy), or by a maximum matching: the most disjoint pairs within 1 px there are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy.sparse import csr_matrix

from stemstream.core.detector import FRAME_SHAPE


@njit(nogil=True, cache=True)
def _match(events, event_offsets, truth, truth_offsets, rows, cols):
    # Stamps instead of clearing: pixel p holds a true electron of frame i when
    # stamp[p] == i + 1; used[p] is i + 1 when an event at p matched it, -(i + 1) when an event
    # next to it did.
    stamp = np.zeros(rows * cols, np.int64)
    used = np.zeros(rows * cols, np.int64)
    exact = 0
    near = 0
    isolated = 0
    isolated_found = 0
    n = event_offsets.shape[0] - 1
    for i in range(n):
        tag = i + 1
        for t in range(truth_offsets[i], truth_offsets[i + 1]):
            stamp[truth[t]] = tag
        pending = np.empty(event_offsets[i + 1] - event_offsets[i], np.int64)
        n_pending = 0
        for e in range(event_offsets[i], event_offsets[i + 1]):
            p = events[e]
            if stamp[p] == tag and used[p] != tag:
                used[p] = tag
                exact += 1
            else:
                pending[n_pending] = p
                n_pending += 1
        for k in range(n_pending):
            p = pending[k]
            r, c = p // cols, p % cols
            done = False
            for dr in range(-1, 2):
                for dc in range(-1, 2):
                    rr, cc = r + dr, c + dc
                    if done or rr < 0 or rr >= rows or cc < 0 or cc >= cols:
                        continue
                    q = rr * cols + cc
                    if stamp[q] == tag and used[q] != tag and used[q] != -tag:
                        used[q] = -tag  # matched by a neighbouring event
                        near += 1
                        done = True
        # Isolated electrons: no other true electron within 2 pixels (their charge clouds and the
        # 3 x 3 maximum test cannot interfere), and how many of them were found at their pixel.
        for t in range(truth_offsets[i], truth_offsets[i + 1]):
            p = truth[t]
            r, c = p // cols, p % cols
            alone = True
            for rr in range(max(r - 2, 0), min(r + 3, rows)):
                for cc in range(max(c - 2, 0), min(c + 3, cols)):
                    if (rr != r or cc != c) and stamp[rr * cols + cc] == tag:
                        alone = False
            if alone:
                isolated += 1
                if used[p] == tag:
                    isolated_found += 1
    return exact, near, isolated, isolated_found


@dataclass(frozen=True)
class Accuracy:
    events: int  # counted events
    true: int  # true electrons (distinct landing pixels)
    matched: int  # events at a true electron's pixel
    matched_within_1: int  # ... or, one-to-one, at one of its 8 neighbours
    isolated: int = 0  # true electrons with no other within 2 pixels
    isolated_found: int = 0  # ... of which matched at their pixel (a within-1 match counts only if exact)

    @property
    def recall(self) -> float:
        return self.matched / self.true if self.true else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.events if self.events else 1.0

    @property
    def isolated_recall(self) -> float:
        """Recall of isolated electrons: what is lost beyond it is coincidence loss (electrons
        too close to be told apart by a 3 x 3 maximum), not missed single electrons."""
        return self.isolated_found / self.isolated if self.isolated else 1.0

    @property
    def recall_within_1(self) -> float:
        return self.matched_within_1 / self.true if self.true else 1.0

    @property
    def precision_within_1(self) -> float:
        return self.matched_within_1 / self.events if self.events else 1.0

    def __add__(self, other: Accuracy) -> Accuracy:
        return Accuracy(*(a + b for a, b in zip(
            (self.events, self.true, self.matched, self.matched_within_1, self.isolated, self.isolated_found),
            (other.events, other.true, other.matched, other.matched_within_1, other.isolated, other.isolated_found),
        )))


def compare_with_truth(events: np.ndarray, offsets: np.ndarray, true_events: list[np.ndarray],
                       frame_shape: tuple[int, int] = FRAME_SHAPE) -> Accuracy:
    """Match counted events (frame ``i`` = ``events[offsets[i]:offsets[i+1]]``, flat pixel indices)
    with the true landing pixels of the same frames."""
    if len(true_events) != len(offsets) - 1:
        raise ValueError(f"{len(offsets) - 1} counted frames but {len(true_events)} frames of truth")
    truth_offsets = np.zeros(len(true_events) + 1, np.int64)
    np.cumsum([len(t) for t in true_events], out=truth_offsets[1:])
    truth = np.concatenate(true_events).astype(np.int64) if true_events else np.zeros(0, np.int64)
    exact, near, isolated, isolated_found = _match(
        np.asarray(events, np.int64), np.asarray(offsets, np.int64), truth, truth_offsets, *frame_shape
    )
    return Accuracy(events=int(offsets[-1] - offsets[0]), true=int(truth_offsets[-1]), matched=int(exact),
                    matched_within_1=int(exact + near), isolated=int(isolated), isolated_found=int(isolated_found))


@njit(nogil=True, cache=True)
def _match_electrons(events, event_offsets, truth, truth_offsets, rows, cols):
    # left[p]: electrons of the current frame at pixel p not yet matched (reset after the frame).
    left = np.zeros(rows * cols, np.int64)
    exact = 0
    near = 0
    for i in range(event_offsets.shape[0] - 1):
        for t in range(truth_offsets[i], truth_offsets[i + 1]):
            left[truth[t]] += 1
        pending = np.empty(event_offsets[i + 1] - event_offsets[i], np.int64)
        n_pending = 0
        for e in range(event_offsets[i], event_offsets[i + 1]):
            p = events[e]
            if left[p] > 0:
                left[p] -= 1
                exact += 1
            else:
                pending[n_pending] = p
                n_pending += 1
        for k in range(n_pending):
            r, c = pending[k] // cols, pending[k] % cols
            done = False
            for rr in range(max(r - 1, 0), min(r + 2, rows)):
                for cc in range(max(c - 1, 0), min(c + 2, cols)):
                    if not done and left[rr * cols + cc] > 0:
                        left[rr * cols + cc] -= 1
                        near += 1
                        done = True
        for t in range(truth_offsets[i], truth_offsets[i + 1]):
            left[truth[t]] = 0
    return exact, near


@njit(nogil=True, cache=True)
def _maximum_matching(indptr, indices, n_right):
    """The size of a maximum matching of a bipartite graph (left vertex u's neighbours:
    ``indices[indptr[u]:indptr[u + 1]]``, right vertices 0 .. n_right - 1): a greedy matching,
    then an augmenting path (breadth first) from each left vertex it left free. Marks of a failed
    search stay until a search succeeds (the matching did not change, so what it reached cannot
    lead to a free vertex either): between two augmentations each edge is read at most once.
    scipy's Hopcroft-Karp, starting from no matching, took up to 10 s on one frame of 16,000 events
    at 0.05 e/px/frame, where the bright-field disc makes one component of nearly all of them."""
    n_left = indptr.shape[0] - 1
    match_left = np.full(n_left, -1, np.int64)
    match_right = np.full(n_right, -1, np.int64)
    matched = 0
    for u in range(n_left):
        for k in range(indptr[u], indptr[u + 1]):
            v = indices[k]
            if match_right[v] < 0:
                match_right[v], match_left[u] = u, v
                matched += 1
                break
    seen = np.zeros(n_right, np.int64)  # == tag: reached by the current run of searches
    came_from = np.empty(n_right, np.int64)
    queue = np.empty(n_left, np.int64)
    tag = 1
    for u in range(n_left):
        if match_left[u] >= 0:
            continue
        queue[0], head, tail, free = u, 0, 1, -1
        while head < tail and free < 0:
            x = queue[head]
            head += 1
            for k in range(indptr[x], indptr[x + 1]):
                v = indices[k]
                if seen[v] == tag:
                    continue
                seen[v], came_from[v] = tag, x
                if match_right[v] < 0:
                    free = v
                    break
                queue[tail] = match_right[v]
                tail += 1
        if free < 0:
            continue
        v = free  # flip the path's edges back to u
        while v >= 0:
            x = came_from[v]
            previous = match_left[x]
            match_left[x], match_right[v] = v, x
            v = previous
        matched += 1
        tag += 1
    return matched


def _most_pairs_within_1(events: np.ndarray, electrons: np.ndarray, frame_shape: tuple[int, int]) -> int:
    """The largest number of disjoint (event, electron) pairs at most 1 px apart in rows and in
    cols, of one frame (flat pixel indices; an electron pixel listed k times is k electrons): a
    maximum matching of the bipartite graph (_maximum_matching). frame_shape: (rows, cols)."""
    rows, cols = frame_shape
    if not len(events) or not len(electrons):
        return 0
    events = np.asarray(events, np.int64)
    electrons = np.sort(np.asarray(electrons, np.int64))
    r, c = events // cols, events % cols
    event_of, electron_of = [], []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            rr, cc = r + dr, c + dc
            pixel = rr * cols + cc
            first = np.searchsorted(electrons, pixel, "left")
            many = np.searchsorted(electrons, pixel, "right") - first
            many[(rr < 0) | (rr >= rows) | (cc < 0) | (cc >= cols)] = 0
            # every electron of that pixel: the run first .. first + many - 1, one edge each
            starts = np.repeat(first - (np.cumsum(many) - many), many)
            event_of.append(np.repeat(np.arange(len(events)), many))
            electron_of.append(starts + np.arange(int(many.sum())))
    edges = np.concatenate(event_of)
    graph = csr_matrix((np.ones(len(edges), np.int8), (edges, np.concatenate(electron_of))),
                       shape=(len(events), len(electrons)))
    return _maximum_matching(graph.indptr.astype(np.int64), graph.indices.astype(np.int64), len(electrons))


def compare_with_electrons(events: np.ndarray, offsets: np.ndarray, electrons: list[np.ndarray],
                           frame_shape: tuple[int, int] = FRAME_SHAPE, matching: str = "greedy") -> Accuracy:
    """Match counted events (as compare_with_truth) with every electron that landed, one entry
    per electron (``electrons[i]``: flat pixel indices of frame i, repeats for electrons on one
    pixel): ``true`` counts electrons, an event matches one electron, a pixel's electrons match as
    many events. frame_shape: (rows, cols).

    ``matching`` of the pairs within 1 px: "greedy" (exact pixels first, then each event's first
    free neighbour in event order: an event between two electrons may take the one another event
    needed, so it finds fewer pairs than there are) or "maximum" (the most disjoint pairs within
    1 px there are, :func:`_most_pairs_within_1`). ``matched`` (same pixel) is the same for both."""
    if len(electrons) != len(offsets) - 1:
        raise ValueError(f"{len(offsets) - 1} counted frames but {len(electrons)} frames of truth")
    if matching not in ("greedy", "maximum"):
        raise ValueError(f"matching is 'greedy' or 'maximum', not {matching!r}")
    truth_offsets = np.zeros(len(electrons) + 1, np.int64)
    np.cumsum([len(t) for t in electrons], out=truth_offsets[1:])
    truth = np.concatenate(electrons).astype(np.int64) if electrons else np.zeros(0, np.int64)
    exact, near = _match_electrons(np.asarray(events, np.int64), np.asarray(offsets, np.int64), truth,
                                   truth_offsets, *frame_shape)
    within_1 = exact + near
    if matching == "maximum":
        within_1 = sum(_most_pairs_within_1(events[offsets[i]:offsets[i + 1]], electrons[i], frame_shape)
                       for i in range(len(electrons)))
    return Accuracy(events=int(offsets[-1] - offsets[0]), true=int(truth_offsets[-1]), matched=int(exact),
                    matched_within_1=int(within_1))
