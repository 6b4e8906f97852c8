import { describe, expect, it } from "vitest";
import { polyline, Series } from "../src/metrics";

describe("Series", () => {
  it("keeps the latest samples once each, in time order", () => {
    const s = new Series(3);
    expect(s.add({ at: 1000, value: 1 })).toBe(true);
    expect(s.add({ at: 1000, value: 1 })).toBe(false);
    expect(s.add({ at: 500, value: 9 })).toBe(false);
    for (const at of [2000, 3000, 4000]) s.add({ at, value: at / 1000 });
    expect(s.points.map((p) => p.at)).toEqual([2000, 3000, 4000]);
  });

  it("turns a counter into rates per second, skipping a reset", () => {
    const s = new Series(10);
    s.add({ at: 0, value: 0 });
    s.add({ at: 2000, value: 4000 });
    s.add({ at: 4000, value: 5000 });
    s.add({ at: 5000, value: 10 });
    s.add({ at: 6000, value: 110 });
    expect(s.rates()).toEqual([
      { at: 2000, value: 2000 },
      { at: 4000, value: 500 },
      { at: 6000, value: 100 },
    ]);
  });
});

describe("polyline", () => {
  it("spans the box: first point left, last right, the top at max", () => {
    expect(polyline([{ at: 0, value: 0 }, { at: 10, value: 5 }, { at: 20, value: 20 }], 100, 50, 10)).toBe("0.0,50.0 50.0,25.0 100.0,0.0");
    expect(polyline([], 100, 50, 1)).toBe("");
  });
});
