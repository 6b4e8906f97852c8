// A metric's recent samples, as the console gathers them (the pool answers QueryMetrics
// with the latest sample of each metric; the page keeps what it has seen), and what a
// graph draws of them: the values of a gauge, the per-second rates of a counter.

export interface Point {
  /** Milliseconds since the epoch. */
  at: number;
  value: number;
}

export class Series {
  readonly points: Point[] = [];
  constructor(readonly kept: number) {}

  /** Adds a sample; one at or before the last one's time is the same sample again. */
  add(p: Point): boolean {
    const last = this.points[this.points.length - 1];
    if (last !== undefined && p.at <= last.at) return false;
    this.points.push(p);
    if (this.points.length > this.kept) this.points.splice(0, this.points.length - this.kept);
    return true;
  }

  /** A counter's change per second between samples; a counter that went back (its VM
   * restarted) gives no point for that interval. */
  rates(): Point[] {
    const out: Point[] = [];
    for (let i = 1; i < this.points.length; i++) {
      const a = this.points[i - 1]!;
      const b = this.points[i]!;
      if (b.value >= a.value) out.push({ at: b.at, value: ((b.value - a.value) * 1000) / (b.at - a.at) });
    }
    return out;
  }
}

/** An SVG polyline's points for `pts` in a `w` by `h` box, the top being `max`. */
export function polyline(pts: readonly Point[], w: number, h: number, max: number): string {
  if (pts.length === 0) return "";
  const t0 = pts[0]!.at;
  const span = Math.max(1, pts[pts.length - 1]!.at - t0);
  const top = max > 0 ? max : 1;
  return pts
    .map((p) => `${(((p.at - t0) / span) * w).toFixed(1)},${(h - (Math.min(p.value, top) / top) * h).toFixed(1)}`)
    .join(" ");
}
