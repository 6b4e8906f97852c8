// @vitest-environment happy-dom
// Guest networks as a user sees them: the networks page and its form, a network's panel,
// and the VIFs in a VM's panel. The client is a stand-in recording calls (this tests the
// view layer only).
import { clone, create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { flushPromises, mount, type VueWrapper } from "@vue/test-utils";
import { describe, expect, it } from "vitest";
import { ref } from "vue";
import { PowerState } from "../src/gen/host_pb";
import { HostSchema, NetworkKind, NetworkSchema, VifSchema, VmSchema } from "../src/gen/pool_pb";
import { Inventory } from "../src/inventory";
import { CAN, type Can } from "../src/permissions";
import { recordingClient } from "./client";
import NetworkPanel from "../src/components/NetworkPanel.vue";
import NetworksPage from "../src/components/NetworksPage.vue";
import VmPanel from "../src/components/VmPanel.vue";

const everything: Can = () => true;
const nothing: Can = () => false;
const withCan = (can: Can) => ({ global: { provide: { [CAN as symbol]: ref(can) } } });

const client = (fail: Record<string, ConnectError> = {}) => recordingClient(fail);

/** Two hosts, a private network with a subnet, an internal one on host-a, and two VMs:
 * web (stopped, one VIF on each network) and db (running, one on the private one). */
function pool() {
  const inv = new Inventory();
  inv.objects.host.set("h1", create(HostSchema, { id: "h1", name: "host-a", nics: ["eth0", "eth1"] }));
  inv.objects.host.set("h2", create(HostSchema, { id: "h2", name: "host-b", nics: ["eth0"] }));
  const lab = create(NetworkSchema, {
    id: "n1",
    name: "lab",
    kind: NetworkKind.PRIVATE,
    vni: 7,
    mtu: 1500,
    subnet: "10.77.0.0/24",
    gateway: "10.77.0.1",
    lockAddresses: true,
    createdAt: { seconds: 1n },
  });
  const back = create(NetworkSchema, { id: "n2", name: "back", kind: NetworkKind.INTERNAL, hostId: "h1", vlan: 42, mtu: 9000 });
  inv.objects.network.set(lab.id, lab);
  inv.objects.network.set(back.id, back);
  const web = create(VmSchema, {
    id: "vm1",
    spec: { name: "web" },
    powerState: PowerState.STOPPED,
    desiredPowerState: PowerState.STOPPED,
    vifs: [
      { id: "vm1-vif0", vmId: "vm1", networkId: "n1", networkName: "lab", mac: "02:aa:00:00:00:01", ipv4: ["10.77.0.2"], rateBytesPerSec: 1n << 20n },
      { id: "vm1-vif1", vmId: "vm1", networkId: "n2", networkName: "back", mac: "02:aa:00:00:00:02" },
    ],
  });
  const db = create(VmSchema, {
    id: "vm2",
    spec: { name: "db" },
    hostId: "h2",
    powerState: PowerState.RUNNING,
    desiredPowerState: PowerState.RUNNING,
    vifs: [{ id: "vm2-vif0", vmId: "vm2", networkId: "n1", networkName: "lab", mac: "02:aa:00:00:00:03", ipv4: ["10.77.0.3", "10.77.0.4"] }],
  });
  inv.objects.vm.set(web.id, web);
  inv.objects.vm.set(db.id, db);
  return { inv, lab, back, web, db };
}

const rows = (w: VueWrapper, list: string) =>
  w.findAll(`[data-list=${list}] tbody tr[data-vif]`).map((r) => r.findAll("td").map((td) => td.text()));

describe("NetworkPanel", () => {
  it("shows a private network's VNI, subnet and gateway, and the VIFs on it from the VMs", () => {
    const { inv, lab } = pool();
    const w = mount(NetworkPanel, { props: { n: lab, inv, tick: 0, client: client().c }, ...withCan(nothing) });
    expect(w.find("[data-field=kind]").text()).toBe("private");
    expect(w.find("[data-field=vni]").text()).toContain("7");
    expect(w.find("[data-field=vlan]").text()).toBe("untagged");
    expect(w.find("[data-field=subnet]").text()).toBe("10.77.0.0/24");
    expect(w.find("[data-field=gateway]").text()).toBe("10.77.0.1");
    expect(w.find("[data-field=ranges]").text()).toBe("all host addresses but the gateway");
    expect(w.find("[data-field=room]").text()).toBe("3 held of 253");
    expect(w.find("[data-field=locked]").text()).toContain("yes");
    expect(w.find("[data-field=nic]").exists()).toBe(false);
    expect(rows(w, "vifs")).toEqual([
      ["db", "running", "02:aa:00:00:00:03", "10.77.0.3, 10.77.0.4", "unlimited"],
      ["web", "stopped", "02:aa:00:00:00:01", "10.77.0.2", "1.0 MiB/s"],
    ]);
  });

  it("shows a network's ranges, and counts the room for VIFs in them", () => {
    const { inv, lab } = pool();
    lab.ranges = ["10.77.0.2-10.77.0.9", "10.77.0.50"];
    const w = mount(NetworkPanel, { props: { n: lab, inv, tick: 0, client: client().c }, ...withCan(nothing) });
    expect(w.find("[data-field=ranges]").text()).toBe("10.77.0.2-10.77.0.9, 10.77.0.50 (VIFs hold addresses from these only)");
    expect(w.find("[data-field=room]").text()).toBe("3 held of 9");
  });

  it("names an internal network's host and its VLAN tag, and opens the host and a VM", async () => {
    const { inv, back } = pool();
    const w = mount(NetworkPanel, { props: { n: back, inv, tick: 0, client: client().c }, ...withCan(nothing) });
    expect(w.find("[data-field=host]").text()).toBe("host-a");
    expect(w.find("[data-field=vlan]").text()).toBe("42");
    expect(w.find("[data-field=subnet]").text()).toContain("none");
    expect(w.find("[data-field=vni]").exists()).toBe(false);
    // No subnet: no ranges, no room to count.
    expect(w.find("[data-field=ranges]").exists()).toBe(false);
    await w.find("[data-field=host] a").trigger("click");
    await w.find("[data-list=vifs] tr[data-vm=web] a").trigger("click");
    expect(w.emitted("select")).toEqual([
      ["host", "h1"],
      ["vm", "vm1"],
    ]);
  });

  it("follows the feed: a VIF added to a VM appears on the next tick", async () => {
    const { inv, back, db } = pool();
    const w = mount(NetworkPanel, { props: { n: back, inv, tick: 0, client: client().c }, ...withCan(nothing) });
    expect(rows(w, "vifs")).toHaveLength(1);
    // The feed's next copy of the VM, with a second VIF.
    const moved = clone(VmSchema, db);
    moved.vifs.push(create(VifSchema, { id: "vm2-vif1", vmId: "vm2", networkId: "n2", networkName: "back", mac: "02:aa:00:00:00:09" }));
    inv.objects.vm.set(db.id, moved);
    await w.setProps({ tick: 1 });
    expect(rows(w, "vifs").map((r) => r[0])).toEqual(["db", "web"]);
  });

  it("destroys once the user says yes, and shows the pool's refusal as it words it", async () => {
    const { inv, lab } = pool();
    const refusal = new ConnectError('network "lab" is in use by VIF vm1-vif0 of VM vm1 (web): destroy the VIF first', Code.FailedPrecondition);
    const { c, calls } = client({ destroyNetwork: refusal });
    const w = mount(NetworkPanel, { props: { n: lab, inv, tick: 0, client: c }, ...withCan(everything) });
    const answer = [false, true];
    window.confirm = () => answer.shift() ?? false;
    await w.find("button[data-action=destroy-network]").trigger("click");
    expect(calls).toEqual([]);
    await w.find("button[data-action=destroy-network]").trigger("click");
    await flushPromises();
    expect(calls).toEqual([{ method: "destroyNetwork", req: { networkId: "n1" } }]);
    expect(w.find("[role=alert]").text()).toBe(
      'destroy network lab: FailedPrecondition: network "lab" is in use by VIF vm1-vif0 of VM vm1 (web): destroy the VIF first',
    );
  });

  it("offers each action only to a role allowed its call, a change of ranges only with a subnet", () => {
    const { inv, lab, back } = pool();
    const offered = (can: Can, n = lab) =>
      mount(NetworkPanel, { props: { n, inv, tick: 0, client: client().c }, ...withCan(can) })
        .findAll("button")
        .map((b) => b.attributes("data-action"));
    expect(offered(everything)).toEqual(["change-ranges", "destroy-network"]);
    expect(offered((m) => m !== "DestroyNetwork")).toEqual(["change-ranges"]);
    expect(offered((m) => m !== "UpdateNetwork")).toEqual(["destroy-network"]);
    expect(offered(nothing)).toEqual([]);
    expect(offered(everything, back)).toEqual(["destroy-network"]);
  });

  it("changes the ranges to those typed, from the present ones, and clears them with none", async () => {
    const { inv, lab } = pool();
    lab.ranges = ["10.77.0.2-10.77.0.9", "10.77.0.50"];
    const { c, calls } = client();
    const w = mount(NetworkPanel, { props: { n: lab, inv, tick: 0, client: c }, ...withCan(everything) });
    const form = w.find("form[data-form=ranges]");
    const input = () => form.find("input[name=network-ranges]").element as HTMLInputElement;
    expect(input().value).toBe("10.77.0.2-10.77.0.9, 10.77.0.50");
    expect(input().placeholder).toBe("empty: all host addresses but the gateway");
    expect(form.find("[data-field=ranges-help]").text()).toBe("comma-separated; empty clears them (VIFs then take from all host addresses but the gateway)");
    await form.find("input[name=network-ranges]").setValue("10.77.0.2 - 10.77.0.99, 10.77.0.150");
    expect(form.find("[data-field=ranges-hints]").exists()).toBe(false);
    await form.trigger("submit");
    await flushPromises();
    // Taken: the input keeps it until the feed brings the change, then follows the feed.
    expect(input().value).toBe("10.77.0.2 - 10.77.0.99, 10.77.0.150");
    await w.setProps({ n: { ...lab, ranges: ["10.77.0.2-10.77.0.99", "10.77.0.150"] } });
    expect(input().value).toBe("10.77.0.2-10.77.0.99, 10.77.0.150");
    await form.find("input[name=network-ranges]").setValue("");
    await form.trigger("submit");
    await flushPromises();
    expect(calls).toEqual([
      { method: "updateNetwork", req: { networkId: "n1", ranges: { ranges: ["10.77.0.2-10.77.0.99", "10.77.0.150"] } } },
      { method: "updateNetwork", req: { networkId: "n1", ranges: { ranges: [] } } },
    ]);
    expect(w.find("[data-field=ranges-error]").exists()).toBe(false);
  });

  it("says beside the form what the pool will refuse of the ranges, a VIF left outside them too, and shows its refusal as is", async () => {
    const { inv, lab } = pool();
    const refusal = new ConnectError(
      "VIF vm1-vif0 (VM vm1) holds 10.77.0.2, outside the new ranges: give it an address in them first (vif-update)",
      Code.FailedPrecondition,
    );
    const { c, calls } = client({ updateNetwork: refusal });
    const w = mount(NetworkPanel, { props: { n: lab, inv, tick: 0, client: c }, ...withCan(everything) });
    const form = w.find("form[data-form=ranges]");
    expect((form.find("input[name=network-ranges]").element as HTMLInputElement).value).toBe("");
    const hints = () => form.findAll("[data-field=ranges-hints] li").map((li) => li.text());
    await form.find("input[name=network-ranges]").setValue("10.77.0.1-10.77.0.9");
    expect(hints()).toEqual(["range 10.77.0.1-10.77.0.9 holds the gateway 10.77.0.1"]);
    await form.find("input[name=network-ranges]").setValue("10.77.0.100-10.77.0.199");
    expect(hints()).toEqual([
      "VIF vm2-vif0 (VM vm2) holds 10.77.0.3, outside the new ranges: give it an address in them first (vif-update)",
      "VIF vm1-vif0 (VM vm1) holds 10.77.0.2, outside the new ranges: give it an address in them first (vif-update)",
    ]);
    await form.find("input[name=network-ranges]").setValue("10.77.0.3-10.77.0.9");
    expect(hints()).toEqual([refusal.rawMessage]);
    // Sent regardless: the pool has the last word.
    await form.trigger("submit");
    await flushPromises();
    expect(calls).toEqual([{ method: "updateNetwork", req: { networkId: "n1", ranges: { ranges: ["10.77.0.3-10.77.0.9"] } } }]);
    expect(w.find("[data-field=ranges-error]").text()).toBe(`change the ranges of lab: FailedPrecondition: ${refusal.rawMessage}`);
    // What was typed stays, to be corrected.
    expect((form.find("input[name=network-ranges]").element as HTMLInputElement).value).toBe("10.77.0.3-10.77.0.9");
  });
});

describe("NetworksPage", () => {
  it("lists the networks with where each lives and how many VIFs it has", () => {
    const { inv } = pool();
    const lan = create(NetworkSchema, {
      id: "n3",
      name: "lan",
      kind: NetworkKind.EXTERNAL,
      nic: "eth1",
      subnet: "192.168.1.0/24",
      ranges: ["192.168.1.100-192.168.1.199", "192.168.1.250"],
    });
    inv.objects.network.set(lan.id, lan);
    const w = mount(NetworksPage, { props: { inv, tick: 0, client: client().c }, ...withCan(nothing) });
    const row = (name: string) => ["kind", "where", "vlan", "subnet", "ranges", "vifs"].map((f) => w.find(`tr[data-network=${name}] [data-field=${f}]`).text());
    expect(w.findAll("tr[data-network]").map((r) => r.attributes("data-network"))).toEqual(["back", "lab", "lan"]);
    expect(row("lab")).toEqual(["private", "every host, VNI 7", "untagged", "10.77.0.0/24", "all host addresses but the gateway", "2"]);
    expect(row("back")).toEqual(["internal", "host host-a", "42", "", "", "1"]);
    expect(row("lan")).toEqual(["external", "NIC eth1", "untagged", "192.168.1.0/24", "192.168.1.100-192.168.1.199, 192.168.1.250", "0"]);
    // A read-only user: the list, no form.
    expect(w.find("form").exists()).toBe(false);
    expect(w.findAll("button")).toHaveLength(0);
  });

  it("asks for a NIC only for an external network, a host only for an internal one", async () => {
    const { inv } = pool();
    const w = mount(NetworksPage, { props: { inv, tick: 0, client: client().c }, ...withCan(everything) });
    const fields = () => ["network-nic", "network-host"].filter((n) => w.find(`[name=${n}]`).exists());
    expect(fields()).toEqual([]);
    await w.find("select[name=network-kind]").setValue(String(NetworkKind.EXTERNAL));
    expect(fields()).toEqual(["network-nic"]);
    // The NICs the hosts report are offered.
    expect(w.findAll("datalist#network-nics option").map((o) => o.attributes("value"))).toEqual(["eth0", "eth1"]);
    await w.find("select[name=network-kind]").setValue(String(NetworkKind.INTERNAL));
    expect(fields()).toEqual(["network-host"]);
    expect(w.findAll("select[name=network-host] option").map((o) => o.text())).toEqual(["choose a host", "host-a", "host-b"]);
  });

  it("creates a private network with a subnet, and empties the form", async () => {
    const { inv } = pool();
    const { c, calls } = client();
    const w = mount(NetworksPage, { props: { inv, tick: 0, client: c }, ...withCan(everything) });
    await w.find("input[name=network-name]").setValue("lab2");
    await w.find("input[name=network-vlan]").setValue("12");
    await w.find("input[name=network-subnet]").setValue("10.78.0.0/24");
    await w.find("input[name=network-gateway]").setValue("10.78.0.1");
    await w.find("input[name=network-ranges]").setValue("10.78.0.100 - 10.78.0.199, 10.78.0.50");
    await w.find("input[name=network-lock]").setValue(true);
    expect(w.find("[data-field=hints]").exists()).toBe(false);
    await w.find("form[data-form=new-network]").trigger("submit");
    await flushPromises();
    expect(calls).toEqual([
      {
        method: "createNetwork",
        req: {
          name: "lab2",
          kind: NetworkKind.PRIVATE,
          nic: "",
          hostId: "",
          vlan: 12,
          mtu: 0,
          subnet: "10.78.0.0/24",
          gateway: "10.78.0.1",
          ranges: ["10.78.0.100-10.78.0.199", "10.78.0.50"],
          lockAddresses: true,
        },
      },
    ]);
    expect((w.find("input[name=network-name]").element as HTMLInputElement).value).toBe("");
    expect((w.find("input[name=network-ranges]").element as HTMLInputElement).value).toBe("");
  });

  it("says beside the form what the pool will refuse, sends it anyway, and shows the pool's own words", async () => {
    const { inv } = pool();
    const refusal = new ConnectError('subnet "10.78.0.5/24" has host bits set: the network is 10.78.0.0/24', Code.InvalidArgument);
    const { c, calls } = client({ createNetwork: refusal });
    const w = mount(NetworksPage, { props: { inv, tick: 0, client: c }, ...withCan(everything) });
    await w.find("input[name=network-name]").setValue("bad");
    await w.find("input[name=network-subnet]").setValue("10.78.0.5/24");
    expect(w.find("[data-field=hints]").text()).toBe("10.78.0.5/24 has host bits set: the network is 10.78.0.0/24");
    await w.find("form[data-form=new-network]").trigger("submit");
    await flushPromises();
    expect(calls.map((x) => x.method)).toEqual(["createNetwork"]);
    expect(w.find("[role=alert]").text()).toBe('create network bad: InvalidArgument: subnet "10.78.0.5/24" has host bits set: the network is 10.78.0.0/24');
    // What was typed stays, to be corrected.
    expect((w.find("input[name=network-subnet]").element as HTMLInputElement).value).toBe("10.78.0.5/24");
  });

  it("says beside the form which ranges the pool will refuse, in its words, and sends them regardless", async () => {
    const { inv } = pool();
    const refusal = new ConnectError("range 10.78.0.1-10.78.0.9 holds the gateway 10.78.0.1", Code.InvalidArgument);
    const { c, calls } = client({ createNetwork: refusal });
    const w = mount(NetworksPage, { props: { inv, tick: 0, client: c }, ...withCan(everything) });
    await w.find("input[name=network-name]").setValue("lab2");
    await w.find("input[name=network-ranges]").setValue("10.78.0.1-10.78.0.9");
    expect(w.find("[data-field=hints]").text()).toBe("address ranges (10.78.0.1-10.78.0.9) need the network's subnet");
    await w.find("input[name=network-subnet]").setValue("10.78.0.0/24");
    expect(w.find("[data-field=hints]").exists()).toBe(false);
    await w.find("input[name=network-gateway]").setValue("10.78.0.1");
    expect(w.find("[data-field=hints]").text()).toBe("range 10.78.0.1-10.78.0.9 holds the gateway 10.78.0.1");
    await w.find("form[data-form=new-network]").trigger("submit");
    await flushPromises();
    expect(calls.map((x) => x.method)).toEqual(["createNetwork"]);
    expect(w.find("[role=alert]").text()).toBe("create network lab2: InvalidArgument: range 10.78.0.1-10.78.0.9 holds the gateway 10.78.0.1");
  });
});

describe("VmPanel's network interfaces", () => {
  it("lists the VM's VIFs with their network, MAC, addresses and rate limits", () => {
    const { inv, web } = pool();
    const w = mount(VmPanel, { props: { vm: web, inv, tick: 0, client: client().c }, ...withCan(nothing) });
    expect(rows(w, "vifs")).toEqual([
      ["lab", "02:aa:00:00:00:01", "10.77.0.2", "1.0 MiB/s"],
      ["back", "02:aa:00:00:00:02", "none", "unlimited"],
    ]);
    expect(w.find("[data-list=vifs] a").attributes("title")).toBe("private, every host, VNI 7, MTU 1500, 10.77.0.0/24 via 10.77.0.1, addresses locked");
  });

  it("adds a VIF with the addresses and MAC given, or none for the pool to choose", async () => {
    const { inv, web } = pool();
    const { c, calls } = client();
    const w = mount(VmPanel, { props: { vm: web, inv, tick: 0, client: c }, ...withCan(everything) });
    const form = w.find("form[data-form=new-vif]");
    await form.find("select[name=network]").setValue("n1");
    expect(form.find("input[name=vif-new-addresses]").attributes("placeholder")).toBe("addresses (empty: the pool's pick from 10.77.0.0/24)");
    await form.trigger("submit");
    await flushPromises();
    await form.find("select[name=network]").setValue("n2");
    await form.find("input[name=vif-new-addresses]").setValue("10.9.0.5,10.9.0.6");
    await form.find("input[name=vif-mac]").setValue(" 02:00:00:00:00:aa ");
    await form.trigger("submit");
    await flushPromises();
    expect(calls).toEqual([
      { method: "createVif", req: { vmId: "vm1", network: "n1", ipv4: [], mac: "" } },
      { method: "createVif", req: { vmId: "vm1", network: "n2", ipv4: ["10.9.0.5", "10.9.0.6"], mac: "02:00:00:00:00:aa" } },
    ]);
    expect((form.find("input[name=vif-new-addresses]").element as HTMLInputElement).value).toBe("");
  });

  it("picks from a network's ranges, and says beside the forms which addresses the pool will refuse", async () => {
    const { inv, lab, web } = pool();
    lab.ranges = ["10.77.0.2-10.77.0.9", "10.77.0.50"];
    const { c, calls } = client();
    const w = mount(VmPanel, { props: { vm: web, inv, tick: 0, client: c }, ...withCan(everything) });
    expect(w.find("[data-list=vifs] a").attributes("title")).toContain("10.77.0.0/24 via 10.77.0.1 (VIFs from 10.77.0.2-10.77.0.9, 10.77.0.50)");
    const form = w.find("form[data-form=new-vif]");
    await form.find("select[name=network]").setValue("n1");
    expect(form.find("input[name=vif-new-addresses]").attributes("placeholder")).toBe("addresses (empty: the pool's pick from 10.77.0.2-10.77.0.9, 10.77.0.50)");
    await form.find("input[name=vif-new-addresses]").setValue("10.77.0.50, 10.77.0.20 10.77.0.1");
    expect(w.findAll("[data-field=new-vif-hints] li").map((li) => li.text())).toEqual([
      'address 10.77.0.20 is outside network "lab"\'s ranges (10.77.0.2-10.77.0.9, 10.77.0.50): the pool does not own it',
      'address 10.77.0.1 is network "lab"\'s gateway',
    ]);
    // Sent regardless: the pool has the last word.
    await form.trigger("submit");
    await flushPromises();
    expect(calls).toEqual([{ method: "createVif", req: { vmId: "vm1", network: "n1", ipv4: ["10.77.0.50", "10.77.0.20", "10.77.0.1"], mac: "" } }]);
    expect(w.find("[data-field=new-vif-hints]").exists()).toBe(false);
    // A VIF's row says so of what is typed there, not of the addresses it holds.
    const row = w.find("[data-list=vifs] tr[data-network=lab]");
    expect(row.find("[data-field=vif-hints]").exists()).toBe(false);
    await row.find("input[name=vif-addresses]").setValue("10.78.0.5");
    expect(row.find("[data-field=vif-hints]").text()).toBe('address 10.78.0.5 is not a host address of network "lab"\'s subnet 10.77.0.0/24');
    await row.find("input[name=vif-addresses]").setValue("10.77.0.3");
    expect(row.find("[data-field=vif-hints]").exists()).toBe(false);
  });

  it("refuses addresses that are not addresses before asking the pool, and shows the pool's refusal of others", async () => {
    const { inv, web } = pool();
    const taken = new ConnectError('address 10.77.0.3 is VIF vm2-vif0\'s (VM vm2) on network "lab"', Code.AlreadyExists);
    const { c, calls } = client({ createVif: taken });
    const w = mount(VmPanel, { props: { vm: web, inv, tick: 0, client: c }, ...withCan(everything) });
    const form = w.find("form[data-form=new-vif]");
    await form.find("select[name=network]").setValue("n1");
    await form.find("input[name=vif-new-addresses]").setValue("10.77.0.3, ten");
    await form.trigger("submit");
    await flushPromises();
    expect(calls).toEqual([]);
    expect(w.find("[data-field=vif-error]").text()).toBe("add a network interface: ten is not an IPv4 address like 10.0.0.5");
    await form.find("input[name=vif-new-addresses]").setValue("10.77.0.3");
    await form.trigger("submit");
    await flushPromises();
    expect(calls).toHaveLength(1);
    expect(w.find("[data-field=vif-error]").text()).toBe(`add a network interface: AlreadyExists: ${taken.rawMessage}`);
  });

  it("sets a VIF's addresses (empty: the pool's pick), and removes one once the user says yes", async () => {
    const { inv, web } = pool();
    const { c, calls } = client();
    const w = mount(VmPanel, { props: { vm: web, inv, tick: 0, client: c }, ...withCan(everything) });
    const row = w.find("[data-list=vifs] tr[data-network=lab]");
    const input = row.find("input[name=vif-addresses]");
    expect((input.element as HTMLInputElement).value).toBe("10.77.0.2");
    await input.setValue("10.77.0.20 10.77.0.21");
    await row.find("form[data-form=vif-addresses]").trigger("submit");
    await flushPromises();
    await row.find("input[name=vif-addresses]").setValue("");
    await row.find("form[data-form=vif-addresses]").trigger("submit");
    await flushPromises();
    const answer = [false, true];
    window.confirm = () => answer.shift() ?? false;
    await row.find("button[data-action=remove-vif]").trigger("click");
    await row.find("button[data-action=remove-vif]").trigger("click");
    await flushPromises();
    expect(calls).toEqual([
      { method: "updateVif", req: { vifId: "vm1-vif0", ipv4: { ipv4: ["10.77.0.20", "10.77.0.21"] } } },
      { method: "updateVif", req: { vifId: "vm1-vif0", ipv4: { ipv4: [] } } },
      { method: "destroyVif", req: { vifId: "vm1-vif0" } },
    ]);
  });

  it("offers no change while the VM is not stopped, and says why", () => {
    const { inv, db } = pool();
    const w = mount(VmPanel, { props: { vm: db, inv, tick: 0, client: client().c }, ...withCan(everything) });
    expect(rows(w, "vifs")).toHaveLength(1);
    expect(w.find("form[data-form=new-vif]").exists()).toBe(false);
    expect(w.find("form[data-form=vif-addresses]").exists()).toBe(false);
    expect(w.find("button[data-action=remove-vif]").exists()).toBe(false);
    expect(w.find("[data-field=vifs-locked]").text()).toContain("while the VM is stopped");
  });

  it("offers each change only to a role allowed its call", () => {
    const { inv, web } = pool();
    const m = (can: Can) => mount(VmPanel, { props: { vm: web, inv, tick: 0, client: client().c }, ...withCan(can) });
    const offered = (w: VueWrapper) =>
      [
        w.find("form[data-form=new-vif]").exists() && "add",
        w.find("form[data-form=vif-addresses]").exists() && "readdress",
        w.find("button[data-action=remove-vif]").exists() && "remove",
      ].filter((x) => x !== false);
    expect(offered(m(everything))).toEqual(["add", "readdress", "remove"]);
    expect(offered(m((x) => x === "CreateVif"))).toEqual(["add"]);
    expect(offered(m((x) => x === "UpdateVif"))).toEqual(["readdress"]);
    expect(offered(m((x) => x === "DestroyVif"))).toEqual(["remove"]);
    const none = m(nothing);
    expect(offered(none)).toEqual([]);
    expect(none.find("[data-field=vifs-locked]").exists()).toBe(false);
  });
});
