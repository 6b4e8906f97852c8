import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { PowerState } from "../src/gen/host_pb";
import { NetworkKind, NetworkSchema, VifSchema, VmSchema } from "../src/gen/pool_pb";
import {
  addressRoom,
  checkRanges,
  emptyNetworkForm,
  inSubnet,
  kindLabel,
  networkHints,
  networkRequest,
  noAddressMeans,
  parseAddresses,
  parseIpv4,
  parseSubnet,
  rangeParts,
  rangesChangeHints,
  rangesLabel,
  rangesUpdate,
  rateLabel,
  splitRanges,
  summary,
  vifAddressHints,
  vifsChangeable,
  vifsOn,
  vifsOutside,
  vlanLabel,
  type NetworkForm,
} from "../src/network";

const hostName = (id: string) => (id === "h1" ? "host-a" : id);

describe("a network in words", () => {
  it("names its kind, VLAN and where it lives, as poolctl does", () => {
    expect([NetworkKind.EXTERNAL, NetworkKind.PRIVATE, NetworkKind.INTERNAL].map(kindLabel)).toEqual(["external", "private", "internal"]);
    expect(kindLabel(NetworkKind.UNSPECIFIED)).toBe("kind 0");
    expect(vlanLabel(0)).toBe("untagged");
    expect(vlanLabel(42)).toBe("42");
  });

  it("sums a network up in one line: the kind's own fields, the VLAN only when tagged", () => {
    const net = (more: object) => create(NetworkSchema, { name: "n", mtu: 1500, ...more });
    expect(summary(net({ kind: NetworkKind.PRIVATE, vni: 3, subnet: "10.77.0.0/24", gateway: "10.77.0.1" }), hostName)).toBe(
      "private, every host, VNI 3, MTU 1500, 10.77.0.0/24 via 10.77.0.1",
    );
    expect(summary(net({ kind: NetworkKind.EXTERNAL, nic: "eth1", vlan: 10, mtu: 9000 }), hostName)).toBe("external, NIC eth1, VLAN 10, MTU 9000");
    // An internal network's host by name; an unknown one by id.
    expect(summary(net({ kind: NetworkKind.INTERNAL, hostId: "h1", subnet: "10.1.0.0/16", lockAddresses: true }), hostName)).toBe(
      "internal, host host-a, MTU 1500, 10.1.0.0/16, addresses locked",
    );
    expect(summary(net({ kind: NetworkKind.INTERNAL, hostId: "h9" }), hostName)).toBe("internal, host h9, MTU 1500");
    // Its ranges, where it has some: all the pool hands out.
    expect(summary(net({ kind: NetworkKind.PRIVATE, vni: 3, subnet: "10.77.0.0/24", ranges: ["10.77.0.50", "10.77.0.100-10.77.0.199"] }), hostName)).toBe(
      "private, every host, VNI 3, MTU 1500, 10.77.0.0/24 (VIFs from 10.77.0.50, 10.77.0.100-10.77.0.199)",
    );
  });

  it("reads a VIF's rate limits, either or both, or none", () => {
    const vif = (more: MessageInitShape<typeof VifSchema>) => create(VifSchema, more);
    expect(rateLabel(vif({}))).toBe("unlimited");
    expect(rateLabel(vif({ rateBytesPerSec: 1n << 20n }))).toBe("1.0 MiB/s");
    expect(rateLabel(vif({ rateBytesPerSec: 512n, ratePacketsPerSec: 1000n }))).toBe("512 B/s, 1000 packets/s");
  });

  it("says what a VIF with no address gets on a network", () => {
    expect(noAddressMeans({ subnet: "10.77.0.0/24", ranges: [], lockAddresses: true })).toBe("the pool's pick from 10.77.0.0/24");
    expect(noAddressMeans({ subnet: "10.77.0.0/24", ranges: ["10.77.0.50", "10.77.0.100-10.77.0.199"], lockAddresses: false })).toBe(
      "the pool's pick from 10.77.0.50, 10.77.0.100-10.77.0.199",
    );
    expect(noAddressMeans({ subnet: "", ranges: [], lockAddresses: false })).toBe("no address");
    expect(noAddressMeans({ subnet: "", ranges: [], lockAddresses: true })).toContain("refused");
    expect(noAddressMeans(undefined)).toBe("");
  });
});

describe("addresses and subnets", () => {
  it("takes four decimal octets, nothing else", () => {
    expect(parseIpv4("10.0.0.5")).toBe(0x0a000005);
    expect(parseIpv4("255.255.255.255")).toBe(0xffffffff);
    for (const bad of ["10.0.0", "10.0.0.256", "10.0.0.05", "10.0.0.-1", "a.b.c.d", "10.0.0.5/24", "", " 10.0.0.5"]) {
      expect(parseIpv4(bad), bad).toBeUndefined();
    }
  });

  it("takes a subnet the pool takes, and says what is wrong with another in the pool's words", () => {
    expect(parseSubnet("10.77.0.0/24")).toEqual({ ok: true, subnet: { base: 0x0a4d0000, prefix: 24 } });
    expect(parseSubnet(" 192.168.4.0/30 ").ok).toBe(true);
    expect(parseSubnet("10.77.0.5/24")).toEqual({ ok: false, error: "10.77.0.5/24 has host bits set: the network is 10.77.0.0/24" });
    expect(parseSubnet("10.0.0.0/31")).toEqual({ ok: false, error: "a prefix of /8-/30 leaves room for VIFs, not /31" });
    expect(parseSubnet("10.0.0.0/7").ok).toBe(false);
    expect(parseSubnet("10.0.0.0")).toEqual({ ok: false, error: "10.0.0.0 is not an IPv4 network like 10.0.0.0/24" });
    expect(parseSubnet("10.0.0.300/24").ok).toBe(false);
    // Ranges no interface holds, as the pool refuses them.
    expect(parseSubnet("239.1.0.0/16")).toEqual({ ok: false, error: "239.1.0.0/16 is not for interfaces (0/8, loopback, multicast or reserved)" });
    for (const s of ["0.0.0.0/8", "127.0.0.0/8", "240.0.0.0/8"]) expect(parseSubnet(s).ok).toBe(false);
    expect(parseSubnet("223.255.255.252/30").ok).toBe(true);
  });

  it("knows a subnet's host addresses: not its first or last", () => {
    expect(inSubnet("10.77.0.1", "10.77.0.0/24")).toBe(true);
    expect(inSubnet("10.77.0.254", "10.77.0.0/24")).toBe(true);
    expect(inSubnet("10.77.0.0", "10.77.0.0/24")).toBe(false);
    expect(inSubnet("10.77.0.255", "10.77.0.0/24")).toBe(false);
    expect(inSubnet("10.77.1.1", "10.77.0.0/24")).toBe(false);
    expect(inSubnet("10.77.0.1", "")).toBe(false);
    // Room for VIFs: the host addresses less the gateway's.
    expect(addressRoom({ subnet: "10.77.0.0/24", gateway: "10.77.0.1", ranges: [] })).toBe(253);
    expect(addressRoom({ subnet: "10.77.0.0/30", gateway: "", ranges: [] })).toBe(2);
    expect(addressRoom({ subnet: "", gateway: "", ranges: [] })).toBeUndefined();
    // With ranges, theirs only (a range never holds the gateway).
    expect(addressRoom({ subnet: "10.77.0.0/24", gateway: "10.77.0.1", ranges: ["10.77.0.50", "10.77.0.100-10.77.0.199"] })).toBe(101);
  });

  it("says where the pool hands addresses out from: the ranges, else all the subnet's but the gateway", () => {
    expect(rangesLabel({ subnet: "10.77.0.0/24", gateway: "10.77.0.1", ranges: ["10.77.0.50", "10.77.0.100-10.77.0.199"] })).toBe(
      "10.77.0.50, 10.77.0.100-10.77.0.199",
    );
    expect(rangesLabel({ subnet: "10.77.0.0/24", gateway: "10.77.0.1", ranges: [] })).toBe("all host addresses but the gateway");
    expect(rangesLabel({ subnet: "10.77.0.0/24", gateway: "", ranges: [] })).toBe("all host addresses");
    expect(rangesLabel({ subnet: "", gateway: "", ranges: [] })).toBe("");
  });

  it("parses addresses as a user types them: commas, spaces or lines, written the usual way", () => {
    expect(parseAddresses("")).toEqual({ ok: true, addresses: [] });
    expect(parseAddresses("  ")).toEqual({ ok: true, addresses: [] });
    expect(parseAddresses("10.77.0.20, 10.77.0.21\n10.77.0.22 ;10.77.0.23")).toEqual({
      ok: true,
      addresses: ["10.77.0.20", "10.77.0.21", "10.77.0.22", "10.77.0.23"],
    });
    expect(parseAddresses("10.77.0.20, 10.77.0.x")).toEqual({ ok: false, error: "10.77.0.x is not an IPv4 address like 10.0.0.5" });
    expect(parseAddresses("10.77.0.20 10.77.0.20")).toEqual({ ok: false, error: "10.77.0.20 is given twice" });
    // Whether an address suits the network (its subnet, free) is the pool's to say.
    expect(parseAddresses("192.168.9.9").ok).toBe(true);
  });

  it("says what the pool refuses of a VIF's addresses: off the subnet, the gateway, outside the ranges", () => {
    const lan = { name: "lan", subnet: "192.168.1.0/24", gateway: "192.168.1.1", ranges: ["192.168.1.100", "192.168.1.200-192.168.1.201"] };
    expect(vifAddressHints(["192.168.1.100", "192.168.1.201"], lan)).toEqual([]);
    expect(vifAddressHints(["192.168.1.255", "192.168.1.1", "192.168.1.10", "192.168.1.150", "192.168.1.200"], lan)).toEqual([
      'address 192.168.1.255 is not a host address of network "lan"\'s subnet 192.168.1.0/24',
      'address 192.168.1.1 is network "lan"\'s gateway',
      'address 192.168.1.10 is outside network "lan"\'s ranges (192.168.1.100, 192.168.1.200-192.168.1.201): the pool does not own it',
      'address 192.168.1.150 is outside network "lan"\'s ranges (192.168.1.100, 192.168.1.200-192.168.1.201): the pool does not own it',
    ]);
    // Without ranges, every host address but the gateway; without a subnet, anything.
    expect(vifAddressHints(["192.168.1.10", "192.168.1.1"], { ...lan, ranges: [] })).toEqual(['address 192.168.1.1 is network "lan"\'s gateway']);
    expect(vifAddressHints(["8.8.8.8"], { ...lan, subnet: "", gateway: "", ranges: [] })).toEqual([]);
    expect(vifAddressHints(["8.8.8.8"], undefined)).toEqual([]);
  });
});

describe("address ranges", () => {
  it("splits ranges as a user types them: commas, spaces or lines, spaces around a dash allowed", () => {
    expect(splitRanges("")).toEqual([]);
    expect(splitRanges(" 10.0.0.100-10.0.0.199, 10.0.0.50\n10.0.0.60 - 10.0.0.69;10.0.0.70 ")).toEqual([
      "10.0.0.100-10.0.0.199",
      "10.0.0.50",
      "10.0.0.60-10.0.0.69",
      "10.0.0.70",
    ]);
  });

  it("reads a range as one address or two", () => {
    expect(rangeParts("10.0.0.100-10.0.0.199")).toEqual({ first: 0x0a000064, last: 0x0a0000c7 });
    expect(rangeParts("10.0.0.50")).toEqual({ first: 0x0a000032, last: 0x0a000032 });
    expect(rangeParts(" 10.0.0.9 - 10.0.0.1 ")).toEqual({ first: 0x0a000009, last: 0x0a000001 });
    for (const bad of ["", "x", "10.0.0.9-", "-10.0.0.9", "10.0.0.1-10.0.0.2-10.0.0.3", "10.0.0.0/24", "10.0.0.09"]) {
      expect(rangeParts(bad), bad).toBeUndefined();
    }
  });

  it("checks ranges as the pool does, in its words: written the one way, in order", () => {
    const s = { base: 0xc0a80100, prefix: 24 }; // 192.168.1.0/24
    expect(checkRanges(["192.168.1.200 - 192.168.1.201", "192.168.1.100-192.168.1.100"], s, "192.168.1.1")).toEqual({
      ok: true,
      ranges: ["192.168.1.100", "192.168.1.200-192.168.1.201"],
    });
    expect(checkRanges([], s, "")).toEqual({ ok: true, ranges: [] });
    const error = (ranges: string[], gateway = "") => {
      const r = checkRanges(ranges, s, gateway);
      return r.ok ? "" : r.error;
    };
    expect(error(["192.168.1.x"])).toBe('range "192.168.1.x" is not an address or two like 10.0.0.100-10.0.0.199');
    expect(error(["192.168.1.20-192.168.1.10"])).toBe("range 192.168.1.20-192.168.1.10: its first address comes after its last");
    expect(error(["192.168.1.0-192.168.1.9"])).toBe("range 192.168.1.0-192.168.1.9 is not within the host addresses of subnet 192.168.1.0/24");
    expect(error(["192.168.1.250-192.168.1.255"])).toBe("range 192.168.1.250-192.168.1.255 is not within the host addresses of subnet 192.168.1.0/24");
    expect(error(["192.168.2.5"])).toBe("range 192.168.2.5 is not within the host addresses of subnet 192.168.1.0/24");
    expect(error(["192.168.1.1-192.168.1.9"], "192.168.1.1")).toBe("range 192.168.1.1-192.168.1.9 holds the gateway 192.168.1.1");
    expect(error(["192.168.1.50-192.168.1.60", "192.168.1.10-192.168.1.50"])).toBe(
      "ranges 192.168.1.10-192.168.1.50 and 192.168.1.50-192.168.1.60 overlap",
    );
    const many = Array.from({ length: 17 }, (_, i) => `192.168.1.${i + 2}`);
    expect(error(many)).toBe("a network has at most 16 address ranges, not 17");
    expect(error(many.slice(0, 16))).toBe("");
  });
});

describe("a network's ranges changed", () => {
  it("asks the pool for the ranges as typed; none typed is an empty list, which clears them", () => {
    expect(rangesUpdate("n1", " 10.77.0.100 - 10.77.0.199, 10.77.0.50 ")).toEqual({
      networkId: "n1",
      ranges: { ranges: ["10.77.0.100-10.77.0.199", "10.77.0.50"] },
    });
    // Present and empty, not absent (which the pool reads as "nothing to change").
    expect(rangesUpdate("n1", "  ")).toEqual({ networkId: "n1", ranges: { ranges: [] } });
  });

  const on = (vm: string, addresses: string[][]) => {
    const v = create(VmSchema, { id: vm, vifs: addresses.map((ipv4, i) => ({ id: `${vm}-vif${i}`, vmId: vm, networkId: "n1", ipv4 })) });
    return v.vifs.map((vif) => ({ vm: v, vif }));
  };
  const s = { base: 0x0a4d0000, prefix: 24 }; // 10.77.0.0/24

  it("finds the VIFs holding an address outside the new ranges, with the first such address", () => {
    const vifs = [...on("vm1", [["10.77.0.5"], ["10.77.0.60", "10.77.0.61"], []]), ...on("vm2", [["10.77.0.50", "10.77.0.7", "10.77.0.8"]])];
    const outside = (ranges: string[]) => vifsOutside(vifs, s, ranges).map((x) => `${x.vif.id} ${x.address}`);
    expect(outside(["10.77.0.2-10.77.0.9", "10.77.0.50"])).toEqual(["vm1-vif1 10.77.0.60"]);
    expect(outside(["10.77.0.50-10.77.0.99"])).toEqual(["vm1-vif0 10.77.0.5", "vm2-vif0 10.77.0.7"]);
    // No ranges: every host address of the subnet, so none is outside.
    expect(outside([])).toEqual([]);
    // A VIF without addresses is never outside.
    expect(outside(["10.77.0.200"])).toEqual(["vm1-vif0 10.77.0.5", "vm1-vif1 10.77.0.60", "vm2-vif0 10.77.0.50"]);
  });

  it("says what the pool refuses of the change, in its words: no subnet, the ranges, a VIF left outside", () => {
    const lab = { name: "lab", subnet: "10.77.0.0/24", gateway: "10.77.0.1" };
    const vifs = [...on("vm1", [["10.77.0.5"]]), ...on("vm2", [["10.77.0.150"]])];
    expect(rangesChangeHints({ name: "back", subnet: "", gateway: "" }, "10.0.0.5", [])).toEqual([
      'network "back" has no subnet for address ranges to lie in',
    ]);
    expect(rangesChangeHints(lab, "10.77.0.1-10.77.0.9", vifs)).toEqual(["range 10.77.0.1-10.77.0.9 holds the gateway 10.77.0.1"]);
    expect(rangesChangeHints(lab, "10.77.0.100 - 10.77.0.199", vifs)).toEqual([
      "VIF vm1-vif0 (VM vm1) holds 10.77.0.5, outside the new ranges: give it an address in them first (vif-update)",
    ]);
    expect(rangesChangeHints(lab, "10.77.0.200-10.77.0.254", vifs)).toHaveLength(2);
    expect(rangesChangeHints(lab, "10.77.0.2-10.77.0.9, 10.77.0.100-10.77.0.199", vifs)).toEqual([]);
    // Cleared: every host address but the gateway, which holds them all.
    expect(rangesChangeHints(lab, "", vifs)).toEqual([]);
  });
});

describe("the VIFs on a network", () => {
  const vm = (id: string, name: string, vifs: [string, string][], more: object = {}) =>
    create(VmSchema, {
      id,
      spec: { name },
      vifs: vifs.map(([network, mac], i) => ({ id: `${id}-vif${i}`, vmId: id, networkId: network, mac })),
      ...more,
    });

  it("are found in the VMs, by VM name as people read it, then in device order", () => {
    const vms = [
      vm("a", "web-10", [["n1", "02:00:00:00:00:01"]]),
      vm("b", "web-9", [
        ["n1", "02:00:00:00:00:03"],
        ["n2", "02:00:00:00:00:04"],
        ["n1", "02:00:00:00:00:02"],
      ]),
      vm("c", "db", [["n2", "02:00:00:00:00:05"]]),
    ];
    expect(vifsOn(vms, "n1").map((x) => `${x.vm.spec!.name}:${x.index}:${x.vif.mac}`)).toEqual([
      "web-9:0:02:00:00:00:00:03",
      "web-9:2:02:00:00:00:00:02",
      "web-10:0:02:00:00:00:00:01",
    ]);
    expect(vifsOn(vms, "n3")).toEqual([]);
  });

  it("change only while the VM is stopped, meant to stay so, on no host", () => {
    const stopped = { powerState: PowerState.STOPPED, desiredPowerState: PowerState.STOPPED, hostId: "" };
    expect(vifsChangeable(vm("a", "a", [], stopped))).toBe(true);
    expect(vifsChangeable(vm("a", "a", [], { ...stopped, desiredPowerState: PowerState.RUNNING }))).toBe(false);
    expect(vifsChangeable(vm("a", "a", [], { ...stopped, powerState: PowerState.RUNNING, hostId: "h1" }))).toBe(false);
    expect(vifsChangeable(vm("a", "a", [], { ...stopped, powerState: PowerState.CRASHED }))).toBe(false);
    expect(vifsChangeable(vm("a", "a", [], { ...stopped, powerState: PowerState.SUSPENDED }))).toBe(false);
  });
});

describe("the new-network form", () => {
  const form = (more: Partial<NetworkForm>): NetworkForm => ({ ...emptyNetworkForm(), name: "lab", ...more });

  it("asks for the kind's own fields only, names trimmed, empty numbers as the pool's defaults", () => {
    expect(
      networkRequest(form({ name: " lab ", kind: NetworkKind.PRIVATE, nic: "eth1", hostId: "h1", subnet: " 10.77.0.0/24", gateway: "10.77.0.1 " })),
    ).toEqual({
      name: "lab",
      kind: NetworkKind.PRIVATE,
      nic: "",
      hostId: "",
      vlan: 0,
      mtu: 0,
      subnet: "10.77.0.0/24",
      gateway: "10.77.0.1",
      ranges: [],
      lockAddresses: false,
    });
    // Ranges as typed, one word each: the pool writes them its way.
    expect(networkRequest(form({ subnet: "10.77.0.0/24", ranges: " 10.77.0.100 - 10.77.0.199, 10.77.0.50 " })).ranges).toEqual([
      "10.77.0.100-10.77.0.199",
      "10.77.0.50",
    ]);
    expect(networkRequest(form({ kind: NetworkKind.EXTERNAL, nic: " eth1 ", hostId: "h1", vlan: 10, mtu: "9000" }))).toMatchObject({
      kind: NetworkKind.EXTERNAL,
      nic: "eth1",
      hostId: "",
      vlan: 10,
      mtu: 9000,
    });
    expect(networkRequest(form({ kind: NetworkKind.INTERNAL, nic: "eth1", hostId: "h1", lockAddresses: true }))).toMatchObject({
      nic: "",
      hostId: "h1",
      lockAddresses: true,
    });
  });

  it("says what the pool will refuse, and nothing of a form it takes", () => {
    expect(networkHints(form({ subnet: "10.77.0.0/24", gateway: "10.77.0.1", lockAddresses: true, vlan: 4094, mtu: 68 }))).toEqual([]);
    expect(networkHints(form({ kind: NetworkKind.EXTERNAL }))).toEqual(["an external network needs the host NIC it is bridged onto"]);
    expect(networkHints(form({ kind: NetworkKind.INTERNAL }))).toEqual(["an internal network needs the host it lives on"]);
    expect(networkHints(form({ vlan: 4095, mtu: 9001 }))).toEqual(["a VLAN tag is 1-4094 (empty: untagged)", "an MTU is 68-9000 (empty: 1500)"]);
    expect(networkHints(form({ subnet: "10.77.0.5/24" }))).toEqual(["10.77.0.5/24 has host bits set: the network is 10.77.0.0/24"]);
    expect(networkHints(form({ subnet: "10.77.0.0/24", gateway: "10.77.0.255" }))).toEqual(["the gateway 10.77.0.255 is not a host address of 10.77.0.0/24"]);
    expect(networkHints(form({ gateway: "10.77.0.1", lockAddresses: true }))).toEqual([
      "a gateway needs the network's subnet",
      "a network that locks addresses needs a subnet to hand them out from",
    ]);
    // Ranges: nothing of ones the pool takes, the pool's first refusal of others.
    const lan = { subnet: "10.77.0.0/24", gateway: "10.77.0.1" };
    expect(networkHints(form({ ...lan, ranges: "10.77.0.100-10.77.0.199 10.77.0.50" }))).toEqual([]);
    expect(networkHints(form({ ...lan, ranges: "10.77.0.1-10.77.0.9" }))).toEqual(["range 10.77.0.1-10.77.0.9 holds the gateway 10.77.0.1"]);
    expect(networkHints(form({ ...lan, ranges: "10.77.0.10-10.77.0.20, 10.77.0.15" }))).toEqual(["ranges 10.77.0.10-10.77.0.20 and 10.77.0.15 overlap"]);
    expect(networkHints(form({ ...lan, ranges: "10.77.0.20-10.77.0.10" }))).toEqual(["range 10.77.0.20-10.77.0.10: its first address comes after its last"]);
    expect(networkHints(form({ ...lan, ranges: "10.77.1.5" }))).toEqual(["range 10.77.1.5 is not within the host addresses of subnet 10.77.0.0/24"]);
    expect(networkHints(form({ ...lan, ranges: "ten" }))).toEqual(['range "ten" is not an address or two like 10.0.0.100-10.0.0.199']);
    expect(networkHints(form({ ranges: "10.77.0.100-10.77.0.199, 10.77.0.50" }))).toEqual([
      "address ranges (10.77.0.100-10.77.0.199, 10.77.0.50) need the network's subnet",
    ]);
    // A subnet the pool refuses: that is said, the ranges wait for a good one.
    expect(networkHints(form({ subnet: "10.77.0.5/24", ranges: "10.77.0.100" }))).toEqual(["10.77.0.5/24 has host bits set: the network is 10.77.0.0/24"]);
  });
});
