import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { MetricSampleSchema } from "../src/gen/pool_pb";
import { points, polyline } from "../src/metrics";

describe("points", () => {
  it("turns buckets into points in time order, keeping each maximum, dropping one without a time", () => {
    const b = (seconds: bigint, value: number, max: number) => create(MetricSampleSchema, { at: { seconds, nanos: 0 }, value, max });
    const got = points([b(10n, 2, 5), b(5n, 1, 1), create(MetricSampleSchema, { value: 9 }), b(15n, 3, 0)]);
    expect(got).toEqual([
      { at: 5000, value: 1, max: 1 },
      { at: 10000, value: 2, max: 5 },
      // A latest sample answered without a max: the value is its own maximum.
      { at: 15000, value: 3, max: 3 },
    ]);
  });
});

describe("polyline", () => {
  const p = (at: number, value: number, max = value) => ({ at, value, max });
  it("draws each bucket level over its width in the time window, the top at max", () => {
    expect(polyline([p(0, 0), p(10, 5)], 100, 50, 10, 0, 20, 10)).toBe("0.0,50.0 50.0,50.0 50.0,25.0 100.0,25.0");
    // One bucket is a line too; a bucket past the window's end is cut at it.
    expect(polyline([p(15, 20)], 100, 50, 10, 0, 20, 10)).toBe("75.0,0.0 100.0,0.0");
    expect(polyline([], 100, 50, 1, 0, 1, 1)).toBe("");
  });

  it("draws the maxima when asked", () => {
    expect(polyline([p(0, 1, 10)], 100, 50, 10, 0, 10, 10, (x) => x.max)).toBe("0.0,0.0 100.0,0.0");
  });
});
