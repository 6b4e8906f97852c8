// What a graph draws of a metric's history as the pool answers QueryMetrics with a step:
// one point per bucket (its start, its average, its maximum; counters already as rates
// per second), and the SVG polyline of them.
import type { MetricSample } from "./gen/pool_pb";

export interface Point {
  /** Milliseconds since the epoch. */
  at: number;
  value: number;
  /** The bucket's maximum (the value itself for a single sample). */
  max: number;
}

/** The buckets as points, in time order; a bucket without a time is dropped. */
export function points(samples: readonly MetricSample[]): Point[] {
  const out: Point[] = [];
  for (const s of samples) {
    if (s.at === undefined) continue;
    out.push({ at: Number(s.at.seconds) * 1000 + s.at.nanos / 1e6, value: s.value, max: Math.max(s.max, s.value) });
  }
  return out.sort((a, b) => a.at - b.at);
}

/** An SVG polyline's points for `pts` in a `w` by `h` box from `t0` to `t1` (ms), the
 * top being `top`: each bucket a level line over its `width` (ms), so one bucket shows
 * too; `pick` chooses the value drawn (average or maximum). */
export function polyline(
  pts: readonly Point[],
  w: number,
  h: number,
  top: number,
  t0: number,
  t1: number,
  width: number,
  pick: (p: Point) => number = (p) => p.value,
): string {
  const span = Math.max(1, t1 - t0);
  const max = top > 0 ? top : 1;
  const x = (at: number) => ((Math.min(Math.max(at, t0), t1) - t0) / span) * w;
  const y = (p: Point) => h - (Math.min(pick(p), max) / max) * h;
  return pts.flatMap((p) => [`${x(p.at).toFixed(1)},${y(p).toFixed(1)}`, `${x(p.at + width).toFixed(1)},${y(p).toFixed(1)}`]).join(" ");
}
