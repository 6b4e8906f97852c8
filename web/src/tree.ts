// Objects that name a parent (VM snapshots by `parentId`, volumes by `originId`) drawn as
// a tree: each node after its parent, one level deeper. A parent that is not among the
// items (deleted, or outside the set) makes its child a root, so nothing is lost; a cycle,
// which the pool never makes, is broken rather than looped on.

export interface TreeRow<T> {
  item: T;
  depth: number;
}

export function treeRows<T>(
  items: readonly T[],
  id: (x: T) => string,
  parent: (x: T) => string,
  order: (a: T, b: T) => number,
): TreeRow<T>[] {
  const byId = new Map(items.map((x) => [id(x), x]));
  const children = new Map<string, T[]>();
  const roots: T[] = [];
  for (const x of items) {
    const p = parent(x);
    if (p !== "" && p !== id(x) && byId.has(p)) {
      const list = children.get(p);
      if (list === undefined) children.set(p, [x]);
      else list.push(x);
    } else {
      roots.push(x);
    }
  }
  const out: TreeRow<T>[] = [];
  const seen = new Set<string>();
  const walk = (x: T, depth: number) => {
    if (seen.has(id(x))) return;
    seen.add(id(x));
    out.push({ item: x, depth });
    for (const c of (children.get(id(x)) ?? []).sort(order)) walk(c, depth + 1);
  };
  for (const r of roots.sort(order)) walk(r, 0);
  // Members of a cycle have no root above them: listed at the top.
  for (const x of [...items].sort(order)) walk(x, 0);
  return out;
}

/** `id` and everything derived from it, in tree order (a volume's snapshots and clones,
 * theirs, and so on), with depths counted from `id`. */
export function subtree<T>(rows: readonly TreeRow<T>[], id: (x: T) => string, root: string): TreeRow<T>[] {
  const at = rows.findIndex((r) => id(r.item) === root);
  if (at < 0) return [];
  const base = rows[at]!.depth;
  const out: TreeRow<T>[] = [{ item: rows[at]!.item, depth: 0 }];
  for (let i = at + 1; i < rows.length && rows[i]!.depth > base; i++) {
    out.push({ item: rows[i]!.item, depth: rows[i]!.depth - base });
  }
  return out;
}
