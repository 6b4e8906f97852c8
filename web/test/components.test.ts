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
  ListVolumeExportsResponseSchema,
  Role,
  RoleDescriptionSchema,
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

  it("asks for a ticket with the session's token and downloads what it names", async () => {
    const { inv, vm } = pool();
    saveSession({ token: "tok-1", user: "admin", roles: [] });
    const fetchFn = vi.fn(async () => new Response("/export/download?ticket=ab12\n", { status: 200 }));
    vi.stubGlobal("fetch", fetchFn);
    const clicked: string[] = [];
    vi.spyOn(HTMLAnchorElement.prototype, "click").mockImplementation(function (this: HTMLAnchorElement) {
      clicked.push(this.getAttribute("href") ?? "");
    });
    const w = mount(VmPanel, { props: { vm, inv, tick: 0, client: client().c }, ...withCan(everything) });
    await exportButton(w).trigger("click");
    await flushPromises();
    expect(fetchFn).toHaveBeenCalledTimes(1);
    const [url, init] = fetchFn.mock.calls[0] as unknown as [string, RequestInit];
    expect(url).toBe("/export/ticket?vm=vm1");
    expect(init.method).toBe("POST");
    expect((init.headers as Record<string, string>).authorization).toBe("Bearer tok-1");
    expect(clicked).toEqual(["/export/download?ticket=ab12"]);
    expect(w.find("[role=alert]").exists()).toBe(false);
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
