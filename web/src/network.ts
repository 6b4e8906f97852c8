// Guest networks as the console shows them: a network's kind and where it lives in
// poolctl's words (network-list), its subnet's room for VIFs, the VIFs on it found in the
// VMs the feed keeps, and addresses as a user types them parsed into a list. Free of Vue.
// The pool checks everything again when a change commits (poold/src/state/networks.rs):
// what is checked here is only said next to the form, never kept from the pool.
import { PowerState } from "./gen/host_pb";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { NetworkKind, type CreateNetworkRequestSchema, type Network, type Vif, type Vm } from "./gen/pool_pb";
import { bytes } from "./format";
import { collate, vmName } from "./inventory";

/** The kinds a network is created as, in the form's order, with what each means. */
export const NETWORK_KINDS = [
  { kind: NetworkKind.PRIVATE, label: "private", help: "one segment across every host (VXLAN between them)" },
  { kind: NetworkKind.EXTERNAL, label: "external", help: "bridged onto a host NIC, on every host that has it" },
  { kind: NetworkKind.INTERNAL, label: "internal", help: "one host's bridge with no uplink; its VMs run there only" },
] as const;

export function kindLabel(kind: NetworkKind): string {
  return NETWORK_KINDS.find((k) => k.kind === kind)?.label ?? `kind ${kind}`;
}

/** 802.1Q tags a network may carry; 0 is untagged. */
export const VLAN_RANGE = [1, 4094] as const;
export const MTU_RANGE = [68, 9000] as const;
/** Subnet prefixes the pool takes: /8 to /30 (a /31 or /32 leaves no room for VIFs). */
export const PREFIX_RANGE = [8, 30] as const;

export function vlanLabel(vlan: number): string {
  return vlan === 0 ? "untagged" : String(vlan);
}

/** Where a network's frames go: its NIC, its host (by name), or every host. */
export function placeLabel(n: Network, hostName: (id: string) => string): string {
  switch (n.kind) {
    case NetworkKind.EXTERNAL:
      return `NIC ${n.nic}`;
    case NetworkKind.INTERNAL:
      return `host ${hostName(n.hostId)}`;
    case NetworkKind.PRIVATE:
      return `every host, VNI ${n.vni}`;
    default:
      return "";
  }
}

/** A network in one line: "private, every host, VNI 3, VLAN 10, MTU 1500, 10.77.0.0/24
 * via 10.77.0.1, addresses locked" (the VLAN only when tagged). */
export function summary(n: Network, hostName: (id: string) => string): string {
  const parts = [kindLabel(n.kind), placeLabel(n, hostName)];
  if (n.vlan !== 0) parts.push(`VLAN ${n.vlan}`);
  parts.push(`MTU ${n.mtu}`);
  if (n.subnet !== "") parts.push(n.gateway === "" ? n.subnet : `${n.subnet} via ${n.gateway}`);
  if (n.lockAddresses) parts.push("addresses locked");
  return parts.filter((p) => p !== "").join(", ");
}

/** A VIF's addresses, or "none". */
export function addressesLabel(v: Vif): string {
  return v.ipv4.length === 0 ? "none" : v.ipv4.join(", ");
}

/** A VIF's rate limits (the same each direction), or "unlimited". */
export function rateLabel(v: Vif): string {
  const limits: string[] = [];
  if (v.rateBytesPerSec !== undefined) limits.push(`${bytes(v.rateBytesPerSec)}/s`);
  if (v.ratePacketsPerSec !== undefined) limits.push(`${v.ratePacketsPerSec} packets/s`);
  return limits.length === 0 ? "unlimited" : limits.join(", ");
}

/** The VIFs on a network, each with its VM, by VM name then device order. Taken from the
 * VMs (each carries its VIFs), so a view of them follows the feed. */
export function vifsOn(vms: Iterable<Vm>, networkId: string): { vm: Vm; vif: Vif; index: number }[] {
  const out: { vm: Vm; vif: Vif; index: number }[] = [];
  for (const vm of vms) {
    vm.vifs.forEach((vif, index) => {
      if (vif.networkId === networkId) out.push({ vm, vif, index });
    });
  }
  return out.sort((a, b) => collate(vmName(a.vm), vmName(b.vm)) || collate(a.vm.id, b.vm.id) || a.index - b.index);
}

/** Whether the pool takes changes to the VM's VIFs now: only while it is stopped, meant
 * to stay so, on no host (state/networks.rs `stopped_vm`). */
export function vifsChangeable(vm: Vm): boolean {
  return vm.powerState === PowerState.STOPPED && vm.desiredPowerState === PowerState.STOPPED && vm.hostId === "";
}

/** "10.0.0.5" as a number; undefined unless four decimal octets 0-255 without leading
 * zeros (which some tools read as octal). */
export function parseIpv4(s: string): number | undefined {
  const parts = s.split(".");
  if (parts.length !== 4) return undefined;
  let n = 0;
  for (const p of parts) {
    if (!/^(0|[1-9]\d{0,2})$/.test(p) || Number(p) > 255) return undefined;
    n = n * 256 + Number(p);
  }
  return n;
}

export function formatIpv4(n: number): string {
  return [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join(".");
}

export interface Subnet {
  base: number;
  prefix: number;
}

/** Its first and last addresses (the network's and the broadcast) are no VIF's. */
export function hostRange(s: Subnet): { first: number; last: number } {
  const size = 2 ** (32 - s.prefix);
  return { first: s.base + 1, last: s.base + size - 2 };
}

/** "10.0.0.0/24" as a subnet the pool takes, or what is wrong with it (as the pool says). */
export function parseSubnet(s: string): { ok: true; subnet: Subnet } | { ok: false; error: string } {
  const m = /^([^/]+)\/(\d{1,2})$/.exec(s.trim());
  const base = m === null ? undefined : parseIpv4(m[1]!);
  if (m === null || base === undefined) return { ok: false, error: `${s.trim()} is not an IPv4 network like 10.0.0.0/24` };
  const prefix = Number(m[2]);
  if (prefix < PREFIX_RANGE[0] || prefix > PREFIX_RANGE[1]) {
    return { ok: false, error: `a prefix of /${PREFIX_RANGE[0]}-/${PREFIX_RANGE[1]} leaves room for VIFs, not /${prefix}` };
  }
  const size = 2 ** (32 - prefix);
  if (base % size !== 0) {
    return { ok: false, error: `${s.trim()} has host bits set: the network is ${formatIpv4(base - (base % size))}/${prefix}` };
  }
  // A prefix of 8 or more lies in one first octet.
  const first = Math.floor(base / 2 ** 24);
  if (first === 0 || first === 127 || first >= 224) {
    return { ok: false, error: `${s.trim()} is not for interfaces (0/8, loopback, multicast or reserved)` };
  }
  return { ok: true, subnet: { base, prefix } };
}

/** Whether `ip` is a host address of `subnet` (not its first or last). */
export function inSubnet(ip: string, subnet: string): boolean {
  const a = parseIpv4(ip);
  const s = parseSubnet(subnet);
  if (a === undefined || !s.ok) return false;
  const { first, last } = hostRange(s.subnet);
  return a >= first && a <= last;
}

/** How many addresses of the network's subnet VIFs may hold (all its host addresses but
 * the gateway); undefined without a subnet. */
export function addressRoom(n: Pick<Network, "subnet" | "gateway">): number | undefined {
  const s = parseSubnet(n.subnet);
  if (n.subnet === "" || !s.ok) return undefined;
  const { first, last } = hostRange(s.subnet);
  return last - first + 1 - (n.gateway !== "" && inSubnet(n.gateway, n.subnet) ? 1 : 0);
}

/**
 * Addresses as a user types them ("10.0.0.5, 10.0.0.6" or one a line) as a list, each
 * written the usual way; an empty text is an empty list. Refuses what is not an IPv4
 * address, or one given twice; whether the pool takes them (on the network's subnet,
 * unicast, free) is the pool's to say.
 */
export function parseAddresses(text: string): { ok: true; addresses: string[] } | { ok: false; error: string } {
  const addresses: string[] = [];
  for (const word of text.split(/[\s,;]+/).filter((w) => w !== "")) {
    const n = parseIpv4(word);
    if (n === undefined) return { ok: false, error: `${word} is not an IPv4 address like 10.0.0.5` };
    const a = formatIpv4(n);
    if (addresses.includes(a)) return { ok: false, error: `${a} is given twice` };
    addresses.push(a);
  }
  return { ok: true, addresses };
}

/** What a VIF gets when no address is given on this network. */
export function noAddressMeans(n: Pick<Network, "subnet" | "lockAddresses"> | undefined): string {
  if (n === undefined) return "";
  if (n.subnet !== "") return `the pool's pick from ${n.subnet}`;
  return n.lockAddresses ? "refused: this network locks VIFs to their addresses" : "no address";
}

/** The new-network form as the user fills it in. */
export interface NetworkForm {
  name: string;
  kind: NetworkKind;
  nic: string;
  hostId: string;
  /** Empty (untagged) or a number, as a number input gives it. */
  vlan: number | string;
  /** Empty (the pool's 1500) or a number. */
  mtu: number | string;
  subnet: string;
  gateway: string;
  lockAddresses: boolean;
}

export function emptyNetworkForm(): NetworkForm {
  return { name: "", kind: NetworkKind.PRIVATE, nic: "", hostId: "", vlan: "", mtu: "", subnet: "", gateway: "", lockAddresses: false };
}

/** A number field's value as a whole number: empty is 0 ("untagged", "the default");
 * anything else that is no whole number is -1 (the input's min and step keep it out). */
const whole = (v: number | string) => {
  const n = typeof v === "number" ? v : v.trim() === "" ? 0 : Number(v);
  return Number.isInteger(n) && n >= 0 ? n : -1;
};

/** What the form asks the pool for: only the kind's own fields (a NIC for an external
 * network, a host for an internal one), names trimmed. */
export function networkRequest(f: NetworkForm): MessageInitShape<typeof CreateNetworkRequestSchema> {
  return {
    name: f.name.trim(),
    kind: f.kind,
    nic: f.kind === NetworkKind.EXTERNAL ? f.nic.trim() : "",
    hostId: f.kind === NetworkKind.INTERNAL ? f.hostId : "",
    vlan: Math.max(0, whole(f.vlan)),
    mtu: Math.max(0, whole(f.mtu)),
    subnet: f.subnet.trim(),
    gateway: f.gateway.trim(),
    lockAddresses: f.lockAddresses,
  };
}

/** What the pool will refuse in the form, in words, said beside it while the user types;
 * the form is sent regardless, and the pool's own answer shown. */
export function networkHints(f: NetworkForm): string[] {
  const hints: string[] = [];
  if (f.kind === NetworkKind.EXTERNAL && f.nic.trim() === "") hints.push("an external network needs the host NIC it is bridged onto");
  if (f.kind === NetworkKind.INTERNAL && f.hostId === "") hints.push("an internal network needs the host it lives on");
  const vlan = whole(f.vlan);
  if (vlan < 0 || (vlan !== 0 && (vlan < VLAN_RANGE[0] || vlan > VLAN_RANGE[1]))) {
    hints.push(`a VLAN tag is ${VLAN_RANGE[0]}-${VLAN_RANGE[1]} (empty: untagged)`);
  }
  const mtu = whole(f.mtu);
  if (mtu < 0 || (mtu !== 0 && (mtu < MTU_RANGE[0] || mtu > MTU_RANGE[1]))) hints.push(`an MTU is ${MTU_RANGE[0]}-${MTU_RANGE[1]} (empty: 1500)`);
  const subnet = f.subnet.trim();
  const gateway = f.gateway.trim();
  if (subnet !== "") {
    const s = parseSubnet(subnet);
    if (!s.ok) hints.push(s.error);
    else if (gateway !== "" && !inSubnet(gateway, subnet)) hints.push(`the gateway ${gateway} is not a host address of ${subnet}`);
  } else {
    if (gateway !== "") hints.push("a gateway needs the network's subnet");
    if (f.lockAddresses) hints.push("a network that locks addresses needs a subnet to hand them out from");
  }
  return hints;
}
