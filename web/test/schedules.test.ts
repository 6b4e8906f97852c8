// @vitest-environment happy-dom
// The schedules page and the schedule badge in a VM's snapshot tree, as a user sees them.
// The client is a stand-in recording calls (this tests the view layer only).
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { flushPromises, mount } from "@vue/test-utils";
import { describe, expect, it } from "vitest";
import { ref } from "vue";
import { PowerState } from "../src/gen/host_pb";
import {
  ListSchedulesResponseSchema,
  PoolEventSchema,
  PoolSchema,
  ScheduleKind,
  TaskSchema,
  TaskState,
  VmSchema,
  VmSnapshotSchema,
  WatchEventsResponseSchema,
  type Schedule,
} from "../src/gen/pool_pb";
import { Inventory } from "../src/inventory";
import { CAN, type Can } from "../src/permissions";
import { recordingClient } from "./client";
import SchedulesPage from "../src/components/SchedulesPage.vue";
import VmPanel from "../src/components/VmPanel.vue";

const withCan = (can: Can) => ({ global: { provide: { [CAN as symbol]: ref(can) } } });
const at = (s: number) => ({ seconds: BigInt(s), nanos: 0 });
// 2026-12-07 02:00 UTC, a Monday.
const MONDAY_2AM = Date.UTC(2026, 11, 7, 2, 0) / 1000;

function listing() {
  return create(ListSchedulesResponseSchema, {
    schedules: [
      {
        schedule: { name: "nightly", vmId: "vm1", kind: ScheduleKind.SNAPSHOT, everySeconds: 86_400, atSeconds: 7200, retention: { keepLast: 1 } },
        nextDue: at(MONDAY_2AM),
        lastDue: at(MONDAY_2AM - 86_400),
        lastTaskId: "t1",
        snapshots: 1,
      },
      {
        schedule: { name: "weekly", vmId: "gone", kind: ScheduleKind.CHECKPOINT, everySeconds: 604_800, atSeconds: 6 * 86_400 + 3 * 3600, disabled: true },
        snapshots: 0,
      },
    ],
  });
}

/** listSchedules answers `list()`. */
const client = (list = listing, fail: Record<string, ConnectError> = {}) =>
  recordingClient(fail, (method) => (method === "listSchedules" ? list() : {}));

function inventory() {
  const inv = new Inventory();
  inv.objects.vm.set("vm1", create(VmSchema, { id: "vm1", powerState: PowerState.RUNNING, spec: { name: "web" } }));
  inv.objects.vm.set("vm2", create(VmSchema, { id: "vm2", powerState: PowerState.STOPPED, spec: { name: "db" } }));
  inv.objects.task.set("t1", create(TaskSchema, { id: "t1", kind: "vm.snapshot", state: TaskState.SUCCEEDED }));
  return inv;
}

const cell = (w: ReturnType<typeof mount>, schedule: string, field: string) => w.find(`[data-schedule=${schedule}] [data-field=${field}]`).text();

describe("SchedulesPage", () => {
  it("lists the schedules as poolctl does, in UTC, with the VM by name", async () => {
    const { c } = client();
    const w = mount(SchedulesPage, { props: { inv: inventory(), tick: 0, client: c }, ...withCan(() => true) });
    await flushPromises();
    expect(w.findAll("[data-schedule]").map((r) => r.attributes("data-schedule"))).toEqual(["nightly", "weekly"]);
    expect(cell(w, "nightly", "vm")).toBe("web");
    expect(cell(w, "nightly", "kind")).toBe("snapshot");
    expect(cell(w, "nightly", "every")).toBe("1d");
    expect(cell(w, "nightly", "at")).toBe("02:00");
    expect(cell(w, "nightly", "retention")).toBe("last 1, daily 0, weekly 0");
    expect(cell(w, "nightly", "next")).toBe("2026-12-07 02:00 UTC");
    expect(cell(w, "nightly", "last")).toBe("2026-12-06 02:00 UTC");
    expect(cell(w, "nightly", "last-task")).toBe("succeeded");
    expect(cell(w, "nightly", "snapshots")).toBe("1");
    expect(cell(w, "weekly", "vm")).toBe("gone (gone)");
    expect(cell(w, "weekly", "kind")).toBe("checkpoint");
    expect(cell(w, "weekly", "at")).toBe("Sun 03:00");
    expect(cell(w, "weekly", "retention")).toBe("all");
    expect(cell(w, "weekly", "next")).toBe("disabled");
    expect(w.find("[data-schedule=weekly]").attributes("data-disabled")).toBe("true");
  });

  it("asks again when the feed reports the pool's settings or a VM snapshot changed, not for other changes", async () => {
    const { c, calls } = client();
    const inv = inventory();
    const w = mount(SchedulesPage, { props: { inv, tick: 0, client: c }, ...withCan(() => true) });
    await flushPromises();
    const lists = () => calls.filter((x) => x.method === "listSchedules").length;
    expect(lists()).toBe(1);
    const feed = (kind: string, object: { case: "pool" | "vmSnapshot" | "vm"; value: never }) =>
      inv.apply(create(WatchEventsResponseSchema, { position: 5n, events: [create(PoolEventSchema, { kind, id: "x", object })] }));
    feed("vm", { case: "vm", value: create(VmSchema, { id: "vm9" }) as never });
    await w.setProps({ tick: 1 });
    await flushPromises();
    expect(lists()).toBe(1);
    feed("vm_snapshot", { case: "vmSnapshot", value: create(VmSnapshotSchema, { id: "s1", vmId: "vm1" }) as never });
    await w.setProps({ tick: 2 });
    await flushPromises();
    expect(lists()).toBe(2);
    feed("pool", { case: "pool", value: create(PoolSchema, { id: "p" }) as never });
    await w.setProps({ tick: 3 });
    await flushPromises();
    expect(lists()).toBe(3);
  });

  it("sets a schedule from the form, checked first, and shows the server's refusal", async () => {
    const refusal = new ConnectError("no VM vm1", Code.NotFound);
    const { c, calls } = client(listing, { setSchedule: refusal });
    const w = mount(SchedulesPage, { props: { inv: inventory(), tick: 0, client: c }, ...withCan(() => true) });
    await flushPromises();
    const f = w.find("form[data-form=schedule]");
    await f.find("input[name=schedule-name]").setValue("hourly");
    await f.find("select[name=schedule-vm]").setValue("vm1");
    await f.find("input[name=schedule-every]").setValue("6");
    await f.find("select[name=schedule-unit]").setValue("h");
    await f.find("input[name=schedule-at]").setValue("07:00");
    await f.trigger("submit");
    await flushPromises();
    expect(w.find("[data-field=form-error]").text()).toMatch(/^07:00 is not within the period of 6h/);
    expect(calls.filter((x) => x.method === "setSchedule")).toEqual([]);

    await f.find("input[name=schedule-at]").setValue("01:30");
    await f.find("input[name=keep-last]").setValue("3");
    await f.trigger("submit");
    await flushPromises();
    expect(w.find("[data-field=form-error]").exists()).toBe(false);
    const set = calls.filter((x) => x.method === "setSchedule");
    expect(set).toHaveLength(1);
    const sent = (set[0]!.req as { schedule: Schedule }).schedule;
    expect(sent).toMatchObject({ name: "hourly", vmId: "vm1", kind: ScheduleKind.SNAPSHOT, everySeconds: 21_600, atSeconds: 5400, disabled: false });
    expect(sent.retention).toMatchObject({ keepLast: 3, keepDaily: 0, keepWeekly: 0 });
    expect(w.find("[data-field=error]").text()).toBe("set schedule hourly: NotFound: no VM vm1");
    // A refused form keeps what was typed.
    expect((f.find("input[name=schedule-name]").element as HTMLInputElement).value).toBe("hourly");
  });

  it("asks a weekday for weekly periods, and fills the form from a row to replace it", async () => {
    const { c } = client();
    const w = mount(SchedulesPage, { props: { inv: inventory(), tick: 0, client: c }, ...withCan(() => true) });
    await flushPromises();
    expect(w.find("select[name=schedule-day]").exists()).toBe(false);
    await w.find("[data-schedule=weekly] [data-action=edit-schedule]").trigger("click");
    expect(w.find("form[data-form=schedule] h3").text()).toBe("Replace schedule weekly");
    expect((w.find("select[name=schedule-day]").element as HTMLSelectElement).value).toBe("6");
    expect((w.find("input[name=schedule-at]").element as HTMLInputElement).value).toBe("03:00");
    expect((w.find("select[name=schedule-unit]").element as HTMLSelectElement).value).toBe("w");
    expect((w.find("input[name=schedule-disabled]").element as HTMLInputElement).checked).toBe(true);
  });

  it("runs now and deletes (after a confirm saying its snapshots stay), then lists again", async () => {
    const { c, calls } = client();
    const w = mount(SchedulesPage, { props: { inv: inventory(), tick: 0, client: c }, ...withCan(() => true) });
    await flushPromises();
    await w.find("[data-schedule=nightly] [data-action=run-schedule]").trigger("click");
    await flushPromises();
    const asked: string[] = [];
    const answers = [false, true];
    window.confirm = (q?: string) => {
      asked.push(q ?? "");
      return answers.shift() ?? false;
    };
    await w.find("[data-schedule=nightly] [data-action=delete-schedule]").trigger("click");
    await flushPromises();
    await w.find("[data-schedule=nightly] [data-action=delete-schedule]").trigger("click");
    await flushPromises();
    expect(asked[0]).toMatch(/^Delete schedule nightly\? The snapshots it took stay/);
    expect(calls.map((x) => x.method)).toEqual(["listSchedules", "runSchedule", "listSchedules", "deleteSchedule", "listSchedules"]);
    expect(calls[1]!.req).toEqual({ name: "nightly" });
    expect(calls[3]!.req).toEqual({ name: "nightly" });
  });

  it("offers no change to a role that may only list", async () => {
    const { c } = client();
    const w = mount(SchedulesPage, { props: { inv: inventory(), tick: 0, client: c }, ...withCan((m) => m === "ListSchedules") });
    await flushPromises();
    expect(w.findAll("[data-schedule]")).toHaveLength(2);
    expect(w.findAll("button")).toHaveLength(0);
    expect(w.find("form").exists()).toBe(false);
  });

  it("says when the list cannot be read", async () => {
    const { c } = client(() => {
      throw new ConnectError("not the leader", Code.Unavailable);
    });
    const w = mount(SchedulesPage, { props: { inv: inventory(), tick: 0, client: c }, ...withCan(() => true) });
    await flushPromises();
    expect(w.find("[data-field=load-error]").text()).toBe("schedules: Unavailable: not the leader");
  });
});

describe("VmPanel's snapshots taken by a schedule", () => {
  it("carry the schedule's name as a badge; a person's none", () => {
    const inv = inventory();
    const vm = inv.objects.vm.get("vm1")!;
    inv.objects.vmSnapshot.set("s1", create(VmSnapshotSchema, { id: "s1", vmId: "vm1", name: "mine", createdAt: at(1) }));
    inv.objects.vmSnapshot.set("s2", create(VmSnapshotSchema, { id: "s2", vmId: "vm1", name: "nightly-20261207-0200", parentId: "s1", createdAt: at(2), schedule: "nightly" }));
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(() => false) });
    const taken = w.find("[data-snapshot=nightly-20261207-0200]");
    expect(taken.attributes("data-by-schedule")).toBe("nightly");
    const badge = taken.find("[data-field=schedule]");
    expect(badge.text()).toBe("nightly");
    expect(badge.attributes("data-schedule-name")).toBe("nightly");
    const mine = w.find("[data-snapshot=mine]");
    expect(mine.attributes("data-by-schedule")).toBeUndefined();
    expect(mine.find("[data-field=schedule]").exists()).toBe(false);
  });
});
