// @vitest-environment happy-dom
// The panels as a user sees them: what each shows of the pool, and which actions a role
// is offered. The client is a stand-in recording calls (this tests the view layer only).
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { flushPromises, mount } from "@vue/test-utils";
import { afterEach, describe, expect, it, vi } from "vitest";
import { ref } from "vue";
import { saveSession, type PoolClient } from "../src/api";
import { PowerState } from "../src/gen/host_pb";
import {
  AlertKind,
  AlertSchema,
  AlertSeverity,
  HostSchema,
  HostState,
  ListVolumeExportsResponseSchema,
  NetworkSchema,
  Role,
  RoleDescriptionSchema,
  TaskSchema,
  TaskState,
  UndoOverlaySchema,
  UserSchema,
  VmSchema,
  VmSnapshotSchema,
} from "../src/gen/pool_pb";
import { VolumeKind, VolumeSchema } from "../src/gen/storage_pb";
import { Inventory } from "../src/inventory";
import { CAN, type Can } from "../src/permissions";
import UsersPage from "../src/components/UsersPage.vue";
import AlertsPage from "../src/components/AlertsPage.vue";
import VmPanel from "../src/components/VmPanel.vue";
import VolumePanel from "../src/components/VolumePanel.vue";
import InventoryTree from "../src/components/InventoryTree.vue";

const everything: Can = () => true;
const nothing: Can = () => false;
const withCan = (can: Can) => ({ global: { provide: { [CAN as symbol]: ref(can) } } });

/** A client whose every method records its call and answers `answers[method]` or {}. */
function client(answers: Record<string, unknown> = {}) {
  const calls: { method: string; req: unknown }[] = [];
  const c = new Proxy(
    {},
    {
      get: (_t, method: string) => async (req: unknown) => {
        calls.push({ method, req });
        return answers[method] ?? {};
      },
    },
  ) as PoolClient;
  return { c, calls };
}

function pool() {
  const inv = new Inventory();
  const vm = create(VmSchema, {
    id: "vm1",
    hostId: "",
    powerState: PowerState.STOPPED,
    currentSnapshotId: "s3",
    spec: { name: "web", disks: [{ diskId: "disk0", volumeId: "v1" }] },
  });
  inv.objects.vm.set(vm.id, vm);
  const snap = (id: string, parentId: string, seconds: bigint) =>
    inv.objects.vmSnapshot.set(id, create(VmSnapshotSchema, { id, vmId: "vm1", name: `snap-${id}`, parentId, createdAt: { seconds } }));
  snap("s1", "", 1n);
  snap("s2", "s1", 2n);
  snap("s3", "s1", 3n);
  snap("s4", "s2", 4n);
  const vol = (id: string, name: string, originId: string, kind: VolumeKind) =>
    inv.objects.volume.set(id, create(VolumeSchema, { id, name, originId, kind, poolId: "sr1", virtualSizeBytes: 1n << 30n }));
  vol("v1", "web-disk", "", VolumeKind.VOLUME);
  vol("v2", "web-disk-snap", "v1", VolumeKind.SNAPSHOT);
  vol("v3", "web-disk-clone", "v2", VolumeKind.CLONE);
  vol("v9", "other", "", VolumeKind.VOLUME);
  return { inv, vm };
}

describe("VmPanel", () => {
  it("draws the snapshots as a tree and marks the VM's current one", () => {
    const { inv, vm } = pool();
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    const items = w.findAll("[data-list=snapshots] li[data-snapshot]");
    expect(items.map((li) => `${li.attributes("data-depth")}:${li.attributes("data-snapshot")}`)).toEqual([
      "0:snap-s1",
      "1:snap-s2",
      "2:snap-s4",
      "1:snap-s3",
    ]);
    expect(w.findAll("[data-current=true]").map((li) => li.attributes("data-snapshot"))).toEqual(["snap-s3"]);
  });

  it("deletes a snapshot only once the user says yes", async () => {
    const { inv, vm } = pool();
    const { c, calls } = client();
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: c }, ...withCan(everything) });
    const answer = [false, true];
    window.confirm = () => answer.shift() ?? false;
    const del = () => w.find("[data-snapshot=snap-s2]").findAll("button").find((b) => b.text() === "Delete")!;
    await del().trigger("click");
    expect(calls).toEqual([]);
    await del().trigger("click");
    await flushPromises();
    expect(calls).toEqual([{ method: "deleteVmSnapshot", req: { snapshotId: "s2" } }]);
  });

  it("attaches a free disk as the next device, and detaches one, keeping the rest of the spec", async () => {
    const { inv, vm } = pool();
    const { c, calls } = client();
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: c }, ...withCan(everything) });
    // Free: not a disk of a VM, not a snapshot (v1 is web's disk, v2 a snapshot).
    expect(w.findAll("select[name=attach-disk] option").map((o) => o.text())).toEqual(["other (1.0 GiB)", "web-disk-clone (1.0 GiB)"]);
    await w.find("select[name=attach-disk]").setValue("v9");
    await w.find("form[data-form=attach]").trigger("submit");
    await flushPromises();
    const attached = calls[0]!.req as { vmId: string; spec: { name: string; disks: { diskId: string; volumeId: string }[] } };
    expect(calls[0]!.method).toBe("updateVm");
    expect(attached.vmId).toBe("vm1");
    expect(attached.spec.name).toBe("web");
    expect(attached.spec.disks.map((d) => `${d.diskId}=${d.volumeId}`)).toEqual(["disk0=v1", "vda=v9"]);
    window.confirm = () => true;
    await w.find("[data-disk=disk0]").findAll("button").find((b) => b.text() === "Detach")!.trigger("click");
    await flushPromises();
    expect((calls[1]!.req as { spec: { disks: unknown[] } }).spec.disks).toEqual([]);
    // The VM's own spec object is left as it was (the change is a copy).
    expect(vm.spec?.disks).toHaveLength(1);
  });

  it("puts a disk in undo mode, and commits or discards (once the user says yes) what a run changed", async () => {
    const { inv, vm } = pool();
    const { c, calls } = client();
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: c }, ...withCan(everything) });
    expect(w.find("[data-disk=disk0] [data-field=undo]").exists()).toBe(false);
    await w.find("[data-disk=disk0] button[data-action=undo-on]").trigger("click");
    await flushPromises();
    const spec = (calls[0]!.req as { spec: { disks: { diskId: string; undo: boolean }[] } }).spec;
    expect(calls[0]!.method).toBe("updateVm");
    expect(spec.disks.map((d) => `${d.diskId}:${d.undo}`)).toEqual(["disk0:true"]);

    // Started and stopped since: the run's changes wait; the mode cannot change meanwhile.
    vm.spec!.disks[0]!.undo = true;
    vm.undoOverlays = [create(UndoOverlaySchema, { diskId: "disk0", volumeId: "v-overlay", snapshotId: "v-base" })];
    await w.setProps({ tick: 1 });
    expect(w.find("[data-disk=disk0] [data-field=undo]").text()).toBe("undo");
    expect(w.find("[data-disk=disk0] [data-field=undo-pending]").exists()).toBe(true);
    expect(w.find("[data-disk=disk0] button[data-action=undo-off]").exists()).toBe(false);
    expect(w.find("[data-field=undo-changes]").text()).toContain("Changes to disk0");
    await w.find("button[data-action=undo-commit]").trigger("click");
    await flushPromises();
    const answer = [false, true];
    window.confirm = () => answer.shift() ?? false;
    await w.find("button[data-action=undo-discard]").trigger("click");
    await w.find("button[data-action=undo-discard]").trigger("click");
    await flushPromises();
    expect(calls.slice(1)).toEqual([
      { method: "undoVmChanges", req: { vmId: "vm1", commit: true } },
      { method: "undoVmChanges", req: { vmId: "vm1", commit: false } },
    ]);
    // Running (the feed's next copy of the VM): the changes are shown, nothing offered.
    const running = create(VmSchema, { ...vm, powerState: PowerState.RUNNING });
    await w.setProps({ vm: running, tick: 2 });
    expect(w.find("[data-field=undo-changes]").text()).toContain("while it runs");
    expect(w.find("button[data-action=undo-commit]").exists()).toBe(false);
    // A role that may not end them is not offered it.
    const cannot: Can = (m) => m !== "UndoVmChanges";
    const other = mount(VmPanel, { props: { vm, inv, tick: 3, client: client().c }, ...withCan(cannot) });
    expect(other.find("[data-field=undo-changes]").exists()).toBe(true);
    expect(other.find("button[data-action=undo-commit]").exists()).toBe(false);
  });

  it("offers a role that may do nothing no action, only the views", () => {
    const { inv, vm } = pool();
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(nothing) });
    expect(w.findAll("button:not([role=tab])").map((b) => b.text())).toEqual([]);
    expect(w.findAll("form")).toHaveLength(0);
    expect(w.text()).toContain("snap-s4");
  });
});

describe("VmPanel's Export", () => {
  afterEach(() => {
    vi.unstubAllGlobals();
    vi.restoreAllMocks();
    saveSession(undefined);
  });
  const exportButton = (w: ReturnType<typeof mount>) => w.find("button[data-action=export]");
  const only =
    (...methods: string[]): Can =>
    (m) =>
      methods.includes(m);

  it("shows only to a role that may take a snapshot, read its disks and delete the snapshot", () => {
    const { inv, vm } = pool();
    const mountWith = (can: Can) => mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(can) });
    // vm-admin and up: the three calls an export makes.
    expect(exportButton(mountWith(only("SnapshotVm", "OpenVolumeAccess", "DeleteVmSnapshot"))).exists()).toBe(true);
    // A role missing any one of them: no button.
    expect(exportButton(mountWith(only("SnapshotVm", "DeleteVmSnapshot"))).exists()).toBe(false);
    expect(exportButton(mountWith(only("OpenVolumeAccess", "DeleteVmSnapshot"))).exists()).toBe(false);
    // read-only and vm-operator.
    expect(exportButton(mountWith(only("GetVm", "ListVms", "StartVm", "ShutdownVm"))).exists()).toBe(false);
    expect(exportButton(mountWith(nothing)).exists()).toBe(false);
  });

  it("prepares with the session's token, shows how far it got, then downloads the file", async () => {
    const { inv, vm } = pool();
    saveSession({ token: "tok-1", user: "admin", roles: [] });
    const status = (phase: string, read: number) =>
      JSON.stringify({ phase, disk: 1, disks: 1, read, total: 4 << 20, note: "", error: "", file: phase === "ready" ? "web.ova" : "", size: 3 << 20 });
    const answers = [
      new Response('{"id":"e1"}', { status: 200 }),
      new Response(status("reading", 1 << 20), { status: 200 }),
      new Response(status("ready", 4 << 20), { status: 200 }),
      new Response("/export/download?ticket=ab12\n", { status: 200 }),
    ];
    const fetchFn = vi.fn(async () => answers.shift()!);
    vi.stubGlobal("fetch", fetchFn);
    vi.useFakeTimers();
    const clicked: string[] = [];
    vi.spyOn(HTMLAnchorElement.prototype, "click").mockImplementation(function (this: HTMLAnchorElement) {
      clicked.push(this.getAttribute("href") ?? "");
    });
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    await exportButton(w).trigger("click");
    await flushPromises();
    expect(w.find("[data-field=export-progress]").text()).toContain("Export: reading disk: 1.0 MiB of 4.0 MiB (25%)");
    expect(exportButton(w).attributes("disabled")).toBeDefined();
    await vi.advanceTimersByTimeAsync(600);
    await flushPromises();
    vi.useRealTimers();
    const urls = fetchFn.mock.calls.map((c) => {
      const [url, init] = c as unknown as [string, RequestInit];
      expect((init.headers as Record<string, string>).authorization).toBe("Bearer tok-1");
      return `${init.method} ${url}`;
    });
    expect(urls).toEqual(["POST /export/prepare?vm=vm1", "GET /export/status?id=e1", "GET /export/status?id=e1", "POST /export/ticket?id=e1"]);
    expect(clicked).toEqual(["/export/download?ticket=ab12"]);
    expect(w.find("[data-field=export-progress]").text()).toContain("downloading");
    expect(w.find("[role=alert]").exists()).toBe(false);
  });

  it("shows a failure after the start in the page's error style, and downloads nothing", async () => {
    const { inv, vm } = pool();
    const words = "taking the export's snapshot failed: storaged at 127.0.0.1:1 is unreachable";
    const answers = [
      new Response('{"id":"e2"}', { status: 200 }),
      new Response(JSON.stringify({ phase: "failed", disk: 0, disks: 1, read: 0, total: 0, note: "", error: words, file: "", size: 0 }), { status: 200 }),
    ];
    vi.stubGlobal(
      "fetch",
      vi.fn(async () => answers.shift()!),
    );
    const click = vi.spyOn(HTMLAnchorElement.prototype, "click").mockImplementation(() => {});
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    await exportButton(w).trigger("click");
    await flushPromises();
    expect(w.find("[role=alert]").text()).toBe(`export: Aborted: ${words}`);
    expect(w.find("[data-field=export-progress]").exists()).toBe(false);
    expect(click).not.toHaveBeenCalled();
  });

  it("shows a refusal as the server words it, and downloads nothing", async () => {
    const { inv, vm } = pool();
    const words = 'user "ro" may not call SnapshotVm: it needs role vm-admin or higher';
    vi.stubGlobal(
      "fetch",
      vi.fn(async () => new Response(`${words}\n`, { status: 403 })),
    );
    const click = vi.spyOn(HTMLAnchorElement.prototype, "click").mockImplementation(() => {});
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    await exportButton(w).trigger("click");
    await flushPromises();
    expect(w.find("[role=alert]").text()).toBe(`export: PermissionDenied: ${words}`);
    expect(click).not.toHaveBeenCalled();
  });

  it("cancels on the member when the user says so", async () => {
    const { inv, vm } = pool();
    const reading = JSON.stringify({ phase: "snapshot", disk: 0, disks: 1, read: 0, total: 0, note: "", error: "", file: "", size: 0 });
    const fetchFn = vi.fn(async (url: string) => new Response(url.startsWith("/export/prepare") ? '{"id":"e3"}' : url.includes("status") ? reading : "", { status: 200 }));
    vi.stubGlobal("fetch", fetchFn);
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    await exportButton(w).trigger("click");
    await flushPromises();
    expect(w.find("[data-field=export-progress]").text()).toContain("taking a snapshot");
    await w.find("button[data-action=cancel-export]").trigger("click");
    await flushPromises();
    const calls = fetchFn.mock.calls.map((c) => `${(c as unknown as [string, RequestInit])[1].method} ${c[0]}`);
    expect(calls).toContain("DELETE /export/status?id=e3");
    expect(w.find("[data-field=export-progress]").exists()).toBe(false);
  });
});

describe("VmPanel's suspend and resume", () => {
  const withState = (powerState: PowerState) => {
    const { inv, vm } = pool();
    vm.powerState = powerState;
    return { inv, vm };
  };
  const buttons = (w: ReturnType<typeof mount>) => w.findAll(".actions button").map((b) => b.text());

  it("offers Suspend on a running or paused VM, and Resume with a host on a suspended one", () => {
    for (const st of [PowerState.RUNNING, PowerState.PAUSED]) {
      const { inv, vm } = withState(st);
      const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
      expect(w.find("button[data-action=suspend]").exists()).toBe(true);
      expect(w.find("form[data-form=resume]").exists()).toBe(false);
    }
    const { inv, vm } = withState(PowerState.SUSPENDED);
    inv.objects.host.set("h2", create(HostSchema, { id: "h2", name: "host-b", state: HostState.ENABLED }));
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    // Neither running nor stopped: no start, shut down or suspend.
    expect(w.find("[data-field=power]").text()).toBe("suspended");
    expect(buttons(w)).not.toContain("Start");
    expect(buttons(w)).not.toContain("Shut down");
    expect(w.find("button[data-action=suspend]").exists()).toBe(false);
    expect(w.findAll("select[name=resume-host] option").map((o) => o.text())).toEqual(["the host the pool chooses", "host-b"]);
  });

  it("suspends, and resumes on the host chosen", async () => {
    const running = withState(PowerState.RUNNING);
    const a = client();
    const w = mount(VmPanel, { props: { vm: running.vm, inv: running.inv, tick: 0, client: a.c }, ...withCan(everything) });
    await w.find("button[data-action=suspend]").trigger("click");
    await flushPromises();
    expect(a.calls).toEqual([{ method: "suspendVm", req: { vmId: "vm1" } }]);

    const { inv, vm } = withState(PowerState.SUSPENDED);
    inv.objects.host.set("h2", create(HostSchema, { id: "h2", name: "host-b", state: HostState.ENABLED }));
    const b = client();
    const v = mount(VmPanel, { props: { vm, inv, tick: 0, client: b.c }, ...withCan(everything) });
    await v.find("select[name=resume-host]").setValue("h2");
    await v.find("form[data-form=resume]").trigger("submit");
    await flushPromises();
    expect(b.calls).toEqual([{ method: "resumeVm", req: { vmId: "vm1", hostId: "h2" } }]);
  });

  it("offers neither to a role that may not make those calls", () => {
    const { inv, vm } = withState(PowerState.RUNNING);
    const operator: Can = (m) => m !== "SuspendVm" && m !== "ResumeVm";
    expect(mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(operator) }).find("button[data-action=suspend]").exists()).toBe(false);
    const s = withState(PowerState.SUSPENDED);
    expect(mount(VmPanel, { props: { vm: s.vm, inv: s.inv, tick: 0, client: client().c }, ...withCan(operator) }).find("form[data-form=resume]").exists()).toBe(false);
  });

  it("asks for a quick migration when ticked", async () => {
    const { inv, vm } = withState(PowerState.RUNNING);
    const a = client();
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: a.c }, ...withCan(everything) });
    await w.find("input[name=quick]").setValue(true);
    await w.findAll("button").find((b) => b.text() === "Migrate")!.trigger("click");
    await flushPromises();
    expect(a.calls).toEqual([{ method: "migrateVm", req: { vmId: "vm1", destinationHostId: "", quick: true } }]);
  });
});

describe("VmPanel's checkpoints", () => {
  /** The pool's VM in `powerState`; s3 (its current snapshot) a checkpoint; hosts h1, h2
   * enabled and h3 in maintenance. */
  const withCheckpoint = (powerState: PowerState) => {
    const { inv, vm } = pool();
    vm.powerState = powerState;
    inv.objects.vmSnapshot.get("s3")!.stateVolumeId = "v-state";
    inv.objects.host.set("h1", create(HostSchema, { id: "h1", name: "host-a", state: HostState.ENABLED }));
    inv.objects.host.set("h2", create(HostSchema, { id: "h2", name: "host-b", state: HostState.ENABLED }));
    inv.objects.host.set("h3", create(HostSchema, { id: "h3", name: "host-c", state: HostState.MAINTENANCE }));
    return { inv, vm };
  };
  const checkpointButton = (w: ReturnType<typeof mount>) => w.find("button[data-action=checkpoint]");
  const revertForm = (w: ReturnType<typeof mount>) => w.find("[data-snapshot=snap-s3] form[data-form=revert-checkpoint]");

  it("marks checkpoints in the tree with a memory badge", () => {
    const { inv, vm } = withCheckpoint(PowerState.STOPPED);
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    expect(w.findAll("[data-list=snapshots] li[data-memory=true]").map((li) => li.attributes("data-snapshot"))).toEqual(["snap-s3"]);
    expect(w.find("[data-snapshot=snap-s3] [data-field=memory]").text()).toBe("memory");
    expect(w.find("[data-snapshot=snap-s1]").attributes("data-memory")).toBe("false");
    expect(w.find("[data-snapshot=snap-s1] [data-field=memory]").exists()).toBe(false);
  });

  it("offers a checkpoint of a running or paused VM, and says why not of a stopped or suspended one", () => {
    for (const st of [PowerState.RUNNING, PowerState.PAUSED]) {
      const { inv, vm } = withCheckpoint(st);
      const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
      expect(checkpointButton(w).attributes("disabled")).toBeUndefined();
    }
    for (const [st, why] of [
      [PowerState.STOPPED, "a checkpoint saves a running VM's memory"],
      [PowerState.SUSPENDED, "resume it to take a checkpoint"],
    ] as const) {
      const { inv, vm } = withCheckpoint(st);
      const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
      expect(checkpointButton(w).attributes("disabled")).toBeDefined();
      expect(checkpointButton(w).element.parentElement!.getAttribute("title")).toContain(why);
    }
    const { inv, vm } = withCheckpoint(PowerState.RUNNING);
    const cannot: Can = (m) => m !== "SnapshotVm";
    expect(checkpointButton(mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(cannot) })).exists()).toBe(false);
  });

  it("takes a checkpoint with memory, a snapshot without, and shows the pause the checkpoint's task reports", async () => {
    const { inv, vm } = withCheckpoint(PowerState.RUNNING);
    const { c, calls } = client({ snapshotVm: { task: { id: "t7" } } });
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: c }, ...withCan(everything) });
    await w.find("input[name=snapshot-name]").setValue("disks-only");
    await w.find("button[data-action=snapshot]").trigger("click");
    await w.find("form[data-form=snapshot]").trigger("submit");
    await flushPromises();
    await w.find("input[name=snapshot-name]").setValue("cp1");
    await w.find("button[data-action=checkpoint]").trigger("click");
    await w.find("form[data-form=snapshot]").trigger("submit");
    await flushPromises();
    expect(calls).toEqual([
      { method: "snapshotVm", req: { vmId: "vm1", name: "disks-only" } },
      { method: "snapshotVm", req: { vmId: "vm1", name: "cp1", memory: true } },
    ]);
    // Nothing to show while the task runs; its pause once the feed says it succeeded.
    inv.objects.task.set("t7", create(TaskSchema, { id: "t7", kind: "vm.snapshot", state: TaskState.RUNNING, targetId: "vm1" }));
    await w.setProps({ tick: 1 });
    expect(w.find("[data-field=checkpoint-result]").exists()).toBe(false);
    inv.objects.task.set("t7", create(TaskSchema, { id: "t7", kind: "vm.snapshot", state: TaskState.SUCCEEDED, results: { pause_ms: "84" } }));
    await w.setProps({ tick: 2 });
    expect(w.find("[data-field=checkpoint-result]").text()).toBe("Checkpoint cp1 taken: paused 84 ms");
    expect(w.find("[data-field=checkpoint-result]").attributes("role")).toBe("status");
    inv.objects.task.set("t7", create(TaskSchema, { id: "t7", state: TaskState.FAILED, errorMessage: "no room for the state volume" }));
    await w.setProps({ tick: 3 });
    expect(w.find("[role=alert][data-field=checkpoint-result]").text()).toBe("checkpoint cp1: no room for the state volume");
  });

  it("reverts a stopped VM to a checkpoint on the host chosen, or the pool's choice; to a disk snapshot with no host", async () => {
    const { inv, vm } = withCheckpoint(PowerState.STOPPED);
    const { c, calls } = client();
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: c }, ...withCan(everything) });
    // Live hosts only: not the one in maintenance.
    expect(revertForm(w).findAll("select[name=revert-host] option").map((o) => o.text())).toEqual([
      "on the host the pool chooses",
      "on host-a",
      "on host-b",
    ]);
    await revertForm(w).find("select[name=revert-host]").setValue("h2");
    await revertForm(w).trigger("submit");
    await flushPromises();
    await revertForm(w).find("select[name=revert-host]").setValue("");
    await revertForm(w).trigger("submit");
    await flushPromises();
    // A disk snapshot's row: no host to choose.
    const disk = w.find("[data-snapshot=snap-s1]");
    expect(disk.find("select").exists()).toBe(false);
    await disk.findAll("button").find((b) => b.text() === "Revert")!.trigger("click");
    await flushPromises();
    expect(calls).toEqual([
      { method: "revertVm", req: { vmId: "vm1", snapshotId: "s3", hostId: "h2" } },
      { method: "revertVm", req: { vmId: "vm1", snapshotId: "s3", hostId: "" } },
      { method: "revertVm", req: { vmId: "vm1", snapshotId: "s1" } },
    ]);
  });

  it("says why a running VM cannot be reverted to a checkpoint, and offers no revert to a role that may not", () => {
    const { inv, vm } = withCheckpoint(PowerState.RUNNING);
    vm.hostId = "h1";
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    expect(revertForm(w).attributes("title")).toBe("the VM is running: shut it down before reverting it");
    expect(revertForm(w).find("button").attributes("disabled")).toBeDefined();
    expect(revertForm(w).find("select").attributes("disabled")).toBeDefined();
    // The host it runs on stays a choice, for after it is stopped.
    expect(revertForm(w).findAll("option").map((o) => o.text())).toEqual(["on the host the pool chooses", "on host-a", "on host-b"]);
    // A disk snapshot's revert stays out of sight until the VM is stopped, as before.
    expect(w.find("[data-snapshot=snap-s1]").findAll("button").map((b) => b.text())).toEqual(["Delete"]);
    const cannot: Can = (m) => m !== "RevertVm";
    const s = withCheckpoint(PowerState.STOPPED);
    expect(revertForm(mount(VmPanel, { props: { vm: s.vm, inv: s.inv, tick: 0, client: client().c }, ...withCan(cannot) })).exists()).toBe(false);
  });
});

describe("VolumePanel", () => {
  const exportsAnswer = create(ListVolumeExportsResponseSchema, {
    exports: [
      {
        id: "e1",
        targetIqn: "iqn.2026-12.pool:v1",
        lun: 0,
        portals: ["10.0.0.1:3260"],
        grants: [
          { initiatorIqn: "iqn.host-a", hostName: "host-a" },
          { initiatorIqn: "iqn.backup", hostName: "" },
        ],
        sessionInitiators: ["iqn.host-a"],
      },
    ],
  });

  it("shows what was made from the volume, and its ACL; a pool host's grant cannot be revoked here", async () => {
    const { inv } = pool();
    const { c, calls } = client({ listVolumeExports: exportsAnswer });
    const w = mount(VolumePanel, { props: { v: inv.objects.volume.get("v1")!, inv, tick: 0, client: c }, ...withCan(everything) });
    await flushPromises();
    expect(calls).toEqual([{ method: "listVolumeExports", req: { volumeId: "v1" } }]);
    expect(w.findAll("[data-list=derived] li[data-volume]").map((li) => li.attributes("data-volume"))).toEqual([
      "web-disk-snap",
      "web-disk-clone",
    ]);
    expect(w.text()).toContain("Disk of");
    expect(w.find("[data-initiator='iqn.host-a']").text()).toContain("host-a");
    expect(w.find("[data-initiator='iqn.host-a']").find("button").exists()).toBe(false);
    expect(w.find("[data-initiator='iqn.backup']").find("button").text()).toBe("Revoke");
  });

  it("asks nothing of the pool for a role that may not list exports", async () => {
    const { inv } = pool();
    const { c, calls } = client({ listVolumeExports: exportsAnswer });
    const w = mount(VolumePanel, {
      props: { v: inv.objects.volume.get("v1")!, inv, tick: 0, client: c },
      ...withCan((m) => m !== "ListVolumeExports"),
    });
    await flushPromises();
    expect(calls).toEqual([]);
    expect(w.text()).not.toContain("iSCSI exports");
  });

  it("shows a failed call's own words next to what failed", async () => {
    const { inv } = pool();
    const c = new Proxy(
      {},
      {
        get: (_t, method: string) => async () => {
          if (method === "deleteVolume") {
            throw new ConnectError("volume v1 is a disk of VM web which is not stopped", Code.FailedPrecondition);
          }
          return { exports: [] };
        },
      },
    ) as PoolClient;
    window.confirm = () => true;
    const w = mount(VolumePanel, { props: { v: inv.objects.volume.get("v1")!, inv, tick: 0, client: c }, ...withCan(everything) });
    await w.findAll("button").find((b) => b.text() === "Delete")!.trigger("click");
    await flushPromises();
    expect(w.find("[role=alert]").text()).toBe("delete: FailedPrecondition: volume v1 is a disk of VM web which is not stopped");
  });

  it("downloads the disk in the format chosen through the same prepare and ticket", async () => {
    const { inv } = pool();
    saveSession({ token: "tok-2", user: "admin", roles: [] });
    const ready = JSON.stringify({ phase: "ready", disk: 1, disks: 1, read: 1, total: 1, note: "", error: "", file: "web-disk.raw", size: 1 << 30 });
    const answers = [new Response('{"id":"d1"}'), new Response(ready), new Response("/export/download?ticket=cd34")];
    const fetchFn = vi.fn(async () => answers.shift()!);
    vi.stubGlobal("fetch", fetchFn);
    const clicked: string[] = [];
    vi.spyOn(HTMLAnchorElement.prototype, "click").mockImplementation(function (this: HTMLAnchorElement) {
      clicked.push(this.getAttribute("href") ?? "");
    });
    const w = mount(VolumePanel, { props: { v: inv.objects.volume.get("v2")!, inv, tick: 0, client: client().c }, ...withCan(everything) });
    await w.find("select[name=download-format]").setValue("raw");
    await w.find("form[data-form=download]").trigger("submit");
    await flushPromises();
    expect(fetchFn.mock.calls.map((c) => (c as unknown as [string])[0])).toEqual(["/export/prepare?volume=v2&format=raw", "/export/status?id=d1", "/export/ticket?id=d1"]);
    expect(clicked).toEqual(["/export/download?ticket=cd34"]);
    saveSession(undefined);
    vi.unstubAllGlobals();
    vi.restoreAllMocks();
  });

  it("offers the download only to a role that may open and close a disk's access", () => {
    const { inv } = pool();
    const m = (can: Can) => mount(VolumePanel, { props: { v: inv.objects.volume.get("v1")!, inv, tick: 0, client: client().c }, ...withCan(can) });
    expect(m((x) => x === "OpenVolumeAccess" || x === "CloseVolumeAccess").find("form[data-form=download]").exists()).toBe(true);
    expect(m((x) => x === "OpenVolumeAccess").find("form[data-form=download]").exists()).toBe(false);
    expect(m(nothing).find("form[data-form=download]").exists()).toBe(false);
  });
});

describe("UsersPage", () => {
  const roles = [
    create(RoleDescriptionSchema, { role: Role.POOL_ADMIN, description: "everything" }),
    create(RoleDescriptionSchema, { role: Role.READ_ONLY, description: "looks" }),
  ];

  it("lists users with their roles, and offers only the roles they lack", () => {
    const inv = new Inventory();
    inv.objects.user.set("u1", create(UserSchema, { id: "u1", name: "admin", roles: [Role.POOL_ADMIN] }));
    inv.objects.user.set("u2", create(UserSchema, { id: "u2", name: "ann", roles: [Role.READ_ONLY] }));
    const w = mount(UsersPage, { props: { inv, tick: 0, client: client().c, roles, me: "admin" }, ...withCan(everything) });
    const ann = w.find("[data-user=ann]");
    expect(ann.find("[data-role='read only']").exists()).toBe(true);
    expect(ann.findAll("select[name=grant-role] option").map((o) => o.text())).toEqual(["pool admin"]);
    // One does not delete oneself from here.
    expect(w.find("[data-user=admin]").findAll("button").some((b) => b.text() === "Delete")).toBe(false);
    expect(ann.findAll("button").some((b) => b.text() === "Delete")).toBe(true);
  });

  it("offers a read-only user the list and nothing else", () => {
    const inv = new Inventory();
    inv.objects.user.set("u2", create(UserSchema, { id: "u2", name: "ann", roles: [Role.READ_ONLY] }));
    const w = mount(UsersPage, { props: { inv, tick: 0, client: client().c, roles, me: "ann" }, ...withCan(nothing) });
    expect(w.find("[data-user=ann]").exists()).toBe(true);
    expect(w.findAll("button")).toHaveLength(0);
    expect(w.findAll("form")).toHaveLength(0);
  });
});

describe("AlertsPage", () => {
  function alerts() {
    const inv = new Inventory();
    const at = (s: number) => ({ seconds: BigInt(s), nanos: 0 });
    const add = (id: string, kind: AlertKind, more: object) =>
      inv.objects.alert.set(id, create(AlertSchema, { id, kind, severity: AlertSeverity.WARNING, raisedAt: at(1), ...more }));
    add("0000000000000001", AlertKind.HOST_UNREACHABLE, { targetId: "h1", message: "host h1 stopped heartbeating", clearedAt: at(5) });
    add("0000000000000002", AlertKind.HA_RESTART, { targetId: "vm1", message: "HA restarts VM web" });
    add("0000000000000003", AlertKind.SR_FULL, { targetId: "sr1", message: "sr1 is 93% full" });
    return inv;
  }

  it("lists the open alerts, latest first, and the closed ones when asked", async () => {
    const w = mount(AlertsPage, { props: { inv: alerts(), tick: 0, client: client().c }, ...withCan(everything) });
    expect(w.findAll("[data-alert]").map((r) => r.attributes("data-alert"))).toEqual(["sr full", "ha restart"]);
    await w.find("input[name=closed-too]").setValue(true);
    const rows = w.findAll("[data-alert]");
    expect(rows.map((r) => r.attributes("data-alert"))).toEqual(["sr full", "ha restart", "host unreachable"]);
    const closed = w.find("[data-alert='host unreachable']");
    expect(closed.text()).toContain("cleared");
    // Only what is open can be dismissed.
    expect(closed.find("button").exists()).toBe(false);
  });

  it("dismisses through the API, and offers it only to a role that may", async () => {
    const { c, calls } = client();
    const w = mount(AlertsPage, { props: { inv: alerts(), tick: 0, client: c }, ...withCan(everything) });
    await w.find("[data-alert='ha restart'] button").trigger("click");
    await flushPromises();
    expect(calls).toEqual([{ method: "dismissAlert", req: { alertId: "0000000000000002" } }]);
    const ro = mount(AlertsPage, { props: { inv: alerts(), tick: 0, client: c }, ...withCan(nothing) });
    expect(ro.findAll("button")).toHaveLength(0);
  });
});

describe("InventoryTree", () => {
  afterEach(() => {
    vi.unstubAllGlobals();
    vi.restoreAllMocks();
  });

  it("draws the rows in sight again once a search is cleared", async () => {
    // A box 220 px high while in the page (happy-dom lays nothing out), and a resize
    // observer that reports when told to, as a browser does when a box leaves the page.
    vi.spyOn(HTMLElement.prototype, "clientHeight", "get").mockImplementation(function (this: HTMLElement) {
      return this.isConnected ? 220 : 0;
    });
    const observers: { report: () => void }[] = [];
    vi.stubGlobal(
      "ResizeObserver",
      class {
        observed = new Set<Element>();
        constructor(private readonly callback: () => void) {
          observers.push({ report: () => this.observed.size > 0 && this.callback() });
        }
        observe(el: Element) {
          this.observed.add(el);
        }
        unobserve(el: Element) {
          this.observed.delete(el);
        }
        disconnect() {
          this.observed.clear();
        }
      },
    );
    const inv = new Inventory();
    for (let i = 0; i < 60; i++) inv.objects.network.set(`n${i}`, create(NetworkSchema, { id: `n${i}`, name: `net-${i}` }));
    const w = mount(InventoryTree, { props: { inv, tick: 0 }, attachTo: document.body });
    // 10 rows in sight and 10 more each side (none above the first).
    const drawn = () => w.findAll(".row").length;
    await w.vm.$nextTick();
    expect(drawn()).toBe(30);
    await w.find("input.search").setValue("net-1");
    expect(w.findAll(".found a").length).toBeGreaterThan(0);
    await w.find("input.search").setValue("");
    for (const o of observers) o.report();
    await w.vm.$nextTick();
    expect(drawn()).toBe(30);
    w.unmount();
  });
});
