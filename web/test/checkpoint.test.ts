import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { PowerState } from "../src/gen/host_pb";
import { VmSnapshotSchema } from "../src/gen/pool_pb";
import { isCheckpoint, whyNoCheckpoint, whyNoRevert } from "../src/checkpoint";

describe("checkpoints", () => {
  it("are the snapshots with a state volume", () => {
    expect(isCheckpoint(create(VmSnapshotSchema, { id: "s1", stateVolumeId: "v-state" }))).toBe(true);
    expect(isCheckpoint(create(VmSnapshotSchema, { id: "s2" }))).toBe(false);
  });

  it("are taken of a running or paused VM only, as the pool allows", () => {
    const allowed = (s: PowerState) => whyNoCheckpoint(s) === "";
    expect(allowed(PowerState.RUNNING)).toBe(true);
    expect(allowed(PowerState.PAUSED)).toBe(true);
    for (const s of [PowerState.STOPPED, PowerState.CRASHED, PowerState.MIGRATING, PowerState.UNSPECIFIED]) expect(allowed(s)).toBe(false);
    expect(whyNoCheckpoint(PowerState.STOPPED)).toBe("the VM is stopped: a checkpoint saves a running VM's memory (take a snapshot of its disks instead)");
    expect(whyNoCheckpoint(PowerState.SUSPENDED)).toContain("suspended");
  });

  it("are reverted to, as any snapshot, from a stopped VM only", () => {
    expect(whyNoRevert(PowerState.STOPPED)).toBe("");
    expect(whyNoRevert(PowerState.CRASHED)).toBe("");
    expect(whyNoRevert(PowerState.RUNNING)).toBe("the VM is running: shut it down before reverting it");
    expect(whyNoRevert(PowerState.PAUSED)).toBe("the VM is paused: shut it down before reverting it");
    expect(whyNoRevert(PowerState.SUSPENDED)).toContain("resume it and shut it down");
  });
});
