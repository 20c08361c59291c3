"""The embedding explorer's hierarchy: DendroMap's treemap over hierarchical clusters.

DendroMap (Bertucci et al., IEEE VIS 2022) draws the dendrogram of an agglomerative clustering
of image embeddings as a zoomable treemap: a cell is a cluster, its children the clusters it
splits into, each shown by representative images. As there, the binary dendrogram (Ward linkage
on the L2-normalised embeddings, ``scipy.cluster.hierarchy``) is turned into a tree of at most
``branching`` children per cell by splitting, below each cell, the highest merge first; a cluster
of at most ``leaf_size`` samples is a leaf. A cell's representatives are the samples closest to
its mean direction, chosen among its children's representatives (a leaf's among its members),
so the whole tree shows no more distinct images than its leaves do.

The input is a bounded sample (``report.explorer_sample``), never the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Cell:
    """A node of the treemap: its members (indices into the sample), children and representatives."""

    id: str
    parent: str
    members: np.ndarray
    children: list["Cell"] = field(default_factory=list)
    reps: list[int] = field(default_factory=list)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def cluster_tree(embeddings: np.ndarray, branching: int = 6, leaf_size: int = 24, reps: int = 3,
                 has_picture: np.ndarray | None = None) -> Cell:
    """The treemap hierarchy of ``embeddings`` (n x d). ``has_picture``: which samples can be shown
    (representatives are chosen among them when a cell has any)."""
    from scipy.cluster.hierarchy import linkage

    x = normalise(embeddings)
    n = x.shape[0]
    if has_picture is None:
        has_picture = np.ones(n, dtype=bool)
    if n == 0:
        return Cell("root", "", np.zeros(0, dtype=np.int64))
    if n == 1:
        root = Cell("root", "", np.zeros(1, dtype=np.int64))
        root.reps = [0]
        return root
    z = linkage(x, method="ward")
    # Node ids as scipy numbers them: < n a sample, n + i the i-th merge; height = merge distance.
    left, right = z[:, 0].astype(np.int64), z[:, 1].astype(np.int64)
    height = z[:, 2]
    size = np.concatenate([np.ones(n, dtype=np.int64), z[:, 3].astype(np.int64)])

    def members(node: int) -> np.ndarray:
        out, stack = [], [node]
        while stack:
            v = stack.pop()
            if v < n:
                out.append(v)
            else:
                stack += [int(left[v - n]), int(right[v - n])]
        return np.array(sorted(out), dtype=np.int64)

    def split(node: int) -> list[int]:
        """Up to ``branching`` dendrogram nodes under ``node``: the highest merges opened first."""
        parts = [node]
        while len(parts) < branching:
            openable = [p for p in parts if p >= n]
            if not openable:
                break
            top = max(openable, key=lambda p: height[p - n])
            parts.remove(top)
            parts += [int(left[top - n]), int(right[top - n])]
        return sorted(parts, key=lambda p: -size[p])

    # Top-down, with a stack (a chain-like dendrogram, e.g. of many equal embeddings, is deep), then the
    # representatives bottom-up: a parent's come from its children's.
    top = 2 * n - 2
    root = Cell("root", "", members(top))
    stack, order, count = [(top, root)], [], 0
    while stack:
        node, cell = stack.pop()
        order.append(cell)
        if size[node] > leaf_size and node >= n:
            for child in split(node):
                count += 1
                sub = Cell(f"c{count}", cell.id, members(child))
                cell.children.append(sub)
                stack.append((child, sub))
    for cell in reversed(order):  # every child comes after its parent in ``order``
        pool = np.concatenate([np.array(c.reps, dtype=np.int64) for c in cell.children]) if cell.children \
            else cell.members
        cell.reps = representatives(x, cell.members, pool, reps, has_picture)
    return root


def representatives(x: np.ndarray, members: np.ndarray, pool: np.ndarray, k: int,
                    has_picture: np.ndarray) -> list[int]:
    """The ``k`` samples of ``pool`` closest to the mean direction of ``members`` (those with a
    picture first)."""
    if members.size == 0 or pool.size == 0:
        return []
    centre = x[members].mean(axis=0)
    sims = x[pool] @ centre
    order = np.lexsort((-sims, ~has_picture[pool]))  # pictures first, then most similar
    return [int(v) for v in pool[order][:k]]


def walk(cell: Cell):
    """Every cell under ``cell`` (itself first), parents before their children."""
    stack = [cell]
    while stack:
        c = stack.pop()
        yield c
        stack.extend(reversed(c.children))
