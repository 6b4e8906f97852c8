import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { PowerState } from "../src/gen/host_pb";
import {
  AlertSchema,
  AuditEventSchema,
  HostSchema,
  PoolEventSchema,
  PoolSchema,
  StorageRepositorySchema,
  TaskSchema,
  TaskState,
  VmSchema,
  WatchEventsResponseSchema,
  type PoolEvent,
} from "../src/gen/pool_pb";
import { VolumeSchema } from "../src/gen/storage_pb";
import { AUDIT_KEPT, Inventory, TASKS_KEPT } from "../src/inventory";

const vm = (id: string, name: string, hostId: string, powerState = PowerState.RUNNING) =>
  create(VmSchema, { id, hostId, powerState, spec: { name } });

function ev(position: bigint, e: MessageInitShape<typeof PoolEventSchema>): PoolEvent {
  return create(PoolEventSchema, { position, ...e });
}

function msg(position: bigint, events: PoolEvent[], flags: { reset?: boolean; synced?: boolean } = {}) {
  return create(WatchEventsResponseSchema, { position, events, ...flags });
}

function listing(position: bigint) {
  return msg(
    position,
    [
      ev(position, { kind: "pool", id: "p", object: { case: "pool", value: create(PoolSchema, { id: "p", vmCount: 2 }) } }),
      ev(position, { kind: "host", id: "h1", object: { case: "host", value: create(HostSchema, { id: "h1", name: "h1" }) } }),
      ev(position, { kind: "host", id: "h2", object: { case: "host", value: create(HostSchema, { id: "h2", name: "h2" }) } }),
      ev(position, { kind: "vm", id: "a", object: { case: "vm", value: vm("a", "web", "h1") } }),
      ev(position, { kind: "vm", id: "b", object: { case: "vm", value: vm("b", "db", "", PowerState.STOPPED) } }),
      ev(position, {
        kind: "sr",
        id: "sr1",
        object: { case: "sr", value: create(StorageRepositorySchema, { id: "sr1", name: "local", thinPoolId: "tp" }) },
      }),
      ev(position, {
        kind: "volume",
        id: "v1",
        object: { case: "volume", value: create(VolumeSchema, { id: "v1", name: "web-disk", poolId: "sr1" }) },
      }),
    ],
    { reset: true, synced: true },
  );
}

describe("Inventory", () => {
  it("takes a listing, then changes and deletions at later positions", () => {
    const inv = new Inventory();
    inv.apply(listing(10n));
    expect(inv.synced).toBe(true);
    expect(inv.position).toBe(10n);
    expect(inv.pool?.vmCount).toBe(2);
    expect([...inv.vmsByHost().get("h1")!].map((v) => v.id)).toEqual(["a"]);
    expect([...inv.vmsByHost().get("")!].map((v) => v.id)).toEqual(["b"]);
    expect(inv.volumesBySr().get("sr1")!.map((v) => v.name)).toEqual(["web-disk"]);

    // a migrates to h2; b is destroyed.
    inv.apply(
      msg(12n, [
        ev(12n, { kind: "vm", id: "a", object: { case: "vm", value: vm("a", "web", "h2") } }),
        ev(12n, { kind: "vm", id: "b", deleted: true }),
      ]),
    );
    expect(inv.position).toBe(12n);
    expect(inv.vmsByHost().get("h1")).toBeUndefined();
    expect(inv.vmsByHost().get("h2")!.map((v) => v.id)).toEqual(["a"]);
    expect(inv.objects.vm.has("b")).toBe(false);
  });

  it("drops everything it held when a reset listing starts, and is not synced until it ends", () => {
    const inv = new Inventory();
    inv.apply(listing(10n));
    const part = msg(20n, [ev(20n, { kind: "host", id: "h9", object: { case: "host", value: create(HostSchema, { id: "h9", name: "h9" }) } })], {
      reset: true,
    });
    inv.apply(part);
    expect(inv.synced).toBe(false);
    expect([...inv.objects.host.keys()]).toEqual(["h9"]);
    expect(inv.objects.vm.size).toBe(0);
    expect(inv.pool).toBeUndefined();
    inv.apply(msg(20n, [], { synced: true }));
    expect(inv.synced).toBe(true);
    expect(inv.position).toBe(20n);
  });

  it("keeps the latest audit records first, a bounded number, and skips kinds it does not know", () => {
    const inv = new Inventory();
    inv.apply(listing(1n));
    for (let i = 0; i < AUDIT_KEPT + 5; i++) {
      const pos = BigInt(2 + i);
      inv.apply(
        msg(pos, [
          ev(pos, { kind: "audit", id: String(i), object: { case: "audit", value: create(AuditEventSchema, { id: String(i) }) } }),
          ev(pos, { kind: "gadget", id: "x" }),
        ]),
      );
    }
    expect(inv.audit.length).toBe(AUDIT_KEPT);
    expect(inv.audit[0]!.id).toBe(String(AUDIT_KEPT + 4));
    expect(inv.objects.host.size).toBe(2);
  });

  it("keeps alerts as the feed changes them, the open ones latest first", () => {
    const inv = new Inventory();
    inv.apply(listing(1n));
    const alert = (pos: bigint, id: string, closed = false) =>
      ev(pos, {
        kind: "alert",
        id,
        object: { case: "alert", value: create(AlertSchema, { id, clearedAt: closed ? { seconds: 9n } : undefined }) },
      });
    inv.apply(msg(2n, [alert(2n, "0000000000000001"), alert(2n, "0000000000000002")]));
    expect(inv.openAlerts().map((a) => a.id)).toEqual(["0000000000000002", "0000000000000001"]);
    inv.apply(msg(3n, [alert(3n, "0000000000000002", true)]));
    expect(inv.openAlerts().map((a) => a.id)).toEqual(["0000000000000001"]);
    expect(inv.objects.alert.size).toBe(2);
  });

  it("finds objects of every kind by name or id, case aside", () => {
    const inv = new Inventory();
    inv.apply(listing(1n));
    expect(inv.search("WEB").map((f) => `${f.kind}:${f.id}`)).toEqual(["vm:a", "volume:v1"]);
    expect(inv.search("h2").map((f) => f.kind)).toEqual(["host"]);
    expect(inv.search("  ")).toEqual([]);
    expect(inv.search("web", 1)).toHaveLength(1);
  });

  it("lays the tree out as rows: hosts with their VMs, VMs on no host, storage, networks", () => {
    const inv = new Inventory();
    inv.apply(listing(1n));
    const rows = (collapsed: string[] = []) => inv.rows(new Set(collapsed)).map((r) => `${"  ".repeat(r.depth)}${r.label}`);
    expect(rows()).toEqual([
      "Pool p",
      "  h1",
      "    web",
      "  h2",
      "  Not running",
      "    db",
      "  Storage",
      "    local",
      "      web-disk",
      "  Networks",
    ]);
    expect(rows(["host:h1", "group:storage"])).toEqual(["Pool p", "  h1", "  h2", "  Not running", "    db", "  Storage", "  Networks"]);
    const h1 = inv.rows(new Set(["host:h1"])).find((r) => r.id === "h1")!;
    expect(h1.open).toBe(false);
    expect(inv.rows(new Set()).find((r) => r.id === "a")!.open).toBeUndefined();
  });

  it("sorts names as people read them", () => {
    const inv = new Inventory();
    const vms = ["vm-10", "vm-9", "VM-1"].map((name, i) =>
      ev(1n, { kind: "vm", id: `v${i}`, object: { case: "vm", value: vm(`v${i}`, name, "") } }),
    );
    inv.apply(msg(1n, vms, { reset: true, synced: true }));
    expect(inv.vmsByHost().get("")!.map((v) => v.spec!.name)).toEqual(["VM-1", "vm-9", "vm-10"]);
  });

  it("lists the latest tasks first, without the pool's bookkeeping", () => {
    const inv = new Inventory();
    const task = (id: string, kind: string, seconds: bigint) =>
      ev(1n, { kind: "task", id, object: { case: "task", value: create(TaskSchema, { id, kind, createdAt: { seconds } }) } });
    inv.apply(
      msg(1n, [task("t1", "vm.start", 10n), task("t2", "host.report", 30n), task("t3", "vm.migrate", 20n), task("t4", "vm.shutdown", 5n)], {
        reset: true,
        synced: true,
      }),
    );
    expect(inv.recentTasks(2).map((t) => t.id)).toEqual(["t3", "t1"]);
  });

  it("keeps the latest finished tasks and every task under way, a bounded number", () => {
    const inv = new Inventory();
    inv.apply(listing(1n));
    const task = (i: number, state: TaskState) =>
      ev(BigInt(i + 2), {
        kind: "task",
        id: `t${i}`,
        object: { case: "task", value: create(TaskSchema, { id: `t${i}`, kind: "vm.update", state, createdAt: { seconds: BigInt(i) } }) },
      });
    inv.apply(msg(2n, [task(0, TaskState.RUNNING)]));
    for (let i = 1; i <= TASKS_KEPT + 150; i++) inv.apply(msg(BigInt(i + 2), [task(i, TaskState.SUCCEEDED)]));
    expect(inv.objects.task.size).toBeLessThanOrEqual(TASKS_KEPT + 100);
    expect(inv.objects.task.has("t0")).toBe(true);
    expect(inv.objects.task.has(`t${TASKS_KEPT + 150}`)).toBe(true);
    expect(inv.objects.task.has("t1")).toBe(false);
  });

  it("forgets everything at logout", () => {
    const inv = new Inventory();
    inv.apply(listing(7n));
    inv.clear();
    expect(inv.position).toBe(0n);
    expect(inv.synced).toBe(false);
    expect(inv.objects.vm.size + inv.objects.host.size).toBe(0);
  });

  it("names any object by its id, for the audit log's targets", () => {
    const inv = new Inventory();
    inv.apply(listing(3n));
    expect(inv.nameOf("a")).toBe("web");
    expect(inv.nameOf("h2")).toBe("h2");
    expect(inv.nameOf("v1")).toBe("web-disk");
    expect(inv.nameOf("sr1")).toBe("local");
    expect(inv.nameOf("nothing")).toBe("");
  });

  it("counts the events of each kind taken in, for views that ask the pool again on a change", () => {
    const inv = new Inventory();
    inv.apply(listing(10n));
    expect(inv.changes).toMatchObject({ pool: 1, host: 2, vm: 2, sr: 1, volume: 1 });
    expect(inv.changes.vmSnapshot).toBeUndefined();
    inv.apply(msg(11n, [ev(11n, { kind: "vm_snapshot", id: "s1", deleted: true }), ev(11n, { kind: "someday", id: "x" })]));
    expect(inv.changes.vmSnapshot).toBe(1);
    expect(inv.changes.pool).toBe(1);
  });
});
