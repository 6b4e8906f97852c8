import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { TaskSchema } from "../src/gen/pool_pb";
import { taskLine, taskResult } from "../src/format";

describe("a task's result", () => {
  const task = (results: Record<string, string>, statusMessage = "", errorMessage = "") =>
    create(TaskSchema, { id: "t1", results, statusMessage, errorMessage });

  it("reads as poolctl prints it, known figures only", () => {
    expect(taskResult(task({ pause_ms: "84", save_pause_ms: "80", state_volume_id: "v9" }))).toBe("paused 84 ms");
    expect(taskResult(task({ downtime_ms: "31", total_time_ms: "900" }))).toBe("downtime 31 ms");
    expect(taskResult(task({ snapshot_id: "s1" }))).toBe("");
  });

  it("follows the status in the tasks list, and gives way to an error", () => {
    expect(taskLine(task({ pause_ms: "84" }, "done"))).toBe("done; paused 84 ms");
    expect(taskLine(task({ pause_ms: "84" }))).toBe("paused 84 ms");
    expect(taskLine(task({}, "round 3"))).toBe("round 3");
    expect(taskLine(task({ pause_ms: "84" }, "done", "storaged is unreachable"))).toBe("storaged is unreachable");
  });
});
