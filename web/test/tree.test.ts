import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { AuditEventSchema } from "../src/gen/pool_pb";
import { AuditLog } from "../src/audit";
import { subtree, treeRows } from "../src/tree";
import { nextDiskId } from "../src/inventory";

interface N {
  id: string;
  parent: string;
}
const n = (id: string, parent = ""): N => ({ id, parent });
const rows = (items: N[]) =>
  treeRows(
    items,
    (x) => x.id,
    (x) => x.parent,
    (a, b) => a.id.localeCompare(b.id),
  );
const show = (r: { item: N; depth: number }[]) => r.map((x) => `${"-".repeat(x.depth)}${x.item.id}`);

describe("treeRows", () => {
  it("puts each child after its parent, one level deeper, siblings in order", () => {
    const r = rows([n("c", "a"), n("b", "a"), n("a"), n("d", "b"), n("e")]);
    expect(show(r)).toEqual(["a", "-b", "--d", "-c", "e"]);
  });

  it("makes a child whose parent is gone a root, and loses nothing", () => {
    expect(show(rows([n("b", "gone"), n("c", "b")]))).toEqual(["b", "-c"]);
  });

  it("breaks a cycle instead of looping", () => {
    const r = rows([n("a", "b"), n("b", "a"), n("c", "c")]);
    expect(show(r).sort()).toEqual(["-b", "a", "c"].sort());
    expect(r).toHaveLength(3);
  });

  it("cuts the subtree of one node with depths from it", () => {
    const r = rows([n("a"), n("b", "a"), n("d", "b"), n("c", "a"), n("e")]);
    expect(show(subtree(r, (x) => x.id, "b"))).toEqual(["b", "-d"]);
    expect(subtree(r, (x) => x.id, "zz")).toEqual([]);
  });
});

describe("AuditLog", () => {
  const rec = (id: string, userName: string, method: string) => create(AuditEventSchema, { id, userName, method, result: "OK" });

  it("lists newest first, each record once, however it came", () => {
    const log = new AuditLog();
    log.add([rec("0001", "admin", "StartVm"), rec("0002", "ops", "StopVm")]);
    log.add([rec("0003", "admin", "Login"), rec("0002", "ops", "StopVm")]);
    expect(log.size).toBe(3);
    expect(log.newest("", 10).map((e) => e.id)).toEqual(["0003", "0002", "0001"]);
    expect(log.newest("", 2).map((e) => e.id)).toEqual(["0003", "0002"]);
  });

  it("filters on any field, any case", () => {
    const log = new AuditLog();
    log.add([rec("0001", "admin", "StartVm"), rec("0002", "ops", "StopVm"), rec("0003", "Admin", "Login")]);
    expect(log.newest("ADMIN", 10).map((e) => e.id)).toEqual(["0003", "0001"]);
    expect(log.newest("stopvm", 10).map((e) => e.id)).toEqual(["0002"]);
  });
});

describe("nextDiskId", () => {
  it("takes the first free vdX, then vdaa on", () => {
    expect(nextDiskId([])).toBe("vda");
    expect(nextDiskId(["vda", "vdc"])).toBe("vdb");
    const all = Array.from({ length: 26 }, (_, i) => `vd${String.fromCharCode(97 + i)}`);
    expect(nextDiskId(all)).toBe("vdaa");
  });
});
