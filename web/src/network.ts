// Guest networks as the console shows them: a network's kind and where it lives in
// poolctl's words (network-list), the room for VIFs in its subnet or address ranges, the
// VIFs on it found in the VMs the feed keeps, and addresses and ranges as a user types
// them parsed into a list. Free of Vue.
// The pool checks everything again when a change commits (poold/src/state/networks.rs):
// what is checked here is only said next to the form, never kept from the pool.
import { PowerState } from "./gen/host_pb";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { NetworkKind, type CreateNetworkRequestSchema, type Network, type UpdateNetworkRequestSchema, type Vif, type Vm } from "./gen/pool_pb";
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
 * via 10.77.0.1 (VIFs from 10.77.0.100-10.77.0.199), addresses locked" (the VLAN only
 * when tagged, the ranges only when it has some). */
export function summary(n: Network, hostName: (id: string) => string): string {
  const parts = [kindLabel(n.kind), placeLabel(n, hostName)];
  if (n.vlan !== 0) parts.push(`VLAN ${n.vlan}`);
  parts.push(`MTU ${n.mtu}`);
  if (n.subnet !== "") {
    const via = n.gateway === "" ? n.subnet : `${n.subnet} via ${n.gateway}`;
    parts.push(n.ranges.length === 0 ? via : `${via} (VIFs from ${n.ranges.join(", ")})`);
  }
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

/** How many addresses of the network's subnet VIFs may hold: those of its ranges (which
 * never hold the gateway), else all its host addresses but the gateway; undefined without
 * a subnet. */
export function addressRoom(n: Pick<Network, "subnet" | "gateway" | "ranges">): number | undefined {
  const s = parseSubnet(n.subnet);
  if (n.subnet === "" || !s.ok) return undefined;
  if (n.ranges.length > 0) {
    return n.ranges.reduce((k, r) => {
      const p = rangeParts(r);
      return p === undefined ? k : k + p.last - p.first + 1;
    }, 0);
  }
  const { first, last } = hostRange(s.subnet);
  return last - first + 1 - (n.gateway !== "" && inSubnet(n.gateway, n.subnet) ? 1 : 0);
}

/** The most address ranges a network may have. */
export const MAX_RANGES = 16;

/** "10.0.0.100-10.0.0.199", or one address, as its first and last address (either may
 * come first: that is for `checkRanges` to say); undefined unless one or two addresses. */
export function rangeParts(s: string): { first: number; last: number } | undefined {
  const dash = s.indexOf("-");
  const first = parseIpv4((dash < 0 ? s : s.slice(0, dash)).trim());
  const last = parseIpv4((dash < 0 ? s : s.slice(dash + 1)).trim());
  return first === undefined || last === undefined ? undefined : { first, last };
}

/** A range written the pool's one way: "a-b", or "a" for a single address. */
export function rangeText(r: { first: number; last: number }): string {
  return r.first === r.last ? formatIpv4(r.first) : `${formatIpv4(r.first)}-${formatIpv4(r.last)}`;
}

/** Ranges as a user types them, "10.0.0.100-10.0.0.199, 10.0.0.50" (commas, spaces or
 * lines between them, spaces around a dash allowed), as a list of words as typed. */
export function splitRanges(text: string): string[] {
  return text
    .replace(/\s*-\s*/g, "-")
    .split(/[\s,;]+/)
    .filter((w) => w !== "");
}

/**
 * A network's ranges, new or changed, checked as the pool checks them (state/networks.rs
 * `parse_ranges`), against its subnet and gateway (the gateway may be empty): written
 * the one way and in order, or the first thing the pool refuses, in its words.
 */
export function checkRanges(asked: string[], subnet: Subnet, gateway: string): { ok: true; ranges: string[] } | { ok: false; error: string } {
  if (asked.length > MAX_RANGES) return { ok: false, error: `a network has at most ${MAX_RANGES} address ranges, not ${asked.length}` };
  const { first: low, last: high } = hostRange(subnet);
  const gw = parseIpv4(gateway);
  const ranges: { first: number; last: number }[] = [];
  for (const a of asked) {
    const r = rangeParts(a);
    if (r === undefined) return { ok: false, error: `range ${JSON.stringify(a)} is not an address or two like 10.0.0.100-10.0.0.199` };
    if (r.first > r.last) return { ok: false, error: `range ${a}: its first address comes after its last` };
    if (r.first < low || r.last > high) {
      return { ok: false, error: `range ${a} is not within the host addresses of subnet ${formatIpv4(subnet.base)}/${subnet.prefix}` };
    }
    if (gw !== undefined && gw >= r.first && gw <= r.last) return { ok: false, error: `range ${a} holds the gateway ${formatIpv4(gw)}` };
    ranges.push(r);
  }
  ranges.sort((x, y) => x.first - y.first);
  for (let i = 1; i < ranges.length; i++) {
    if (ranges[i]!.first <= ranges[i - 1]!.last) {
      return { ok: false, error: `ranges ${rangeText(ranges[i - 1]!)} and ${rangeText(ranges[i]!)} overlap` };
    }
  }
  return { ok: true, ranges: ranges.map(rangeText) };
}

/** Where the pool hands VIF addresses out from on a network: its ranges, else all its
 * subnet's host addresses (but the gateway); "" without a subnet. */
export function rangesLabel(n: Pick<Network, "subnet" | "gateway" | "ranges">): string {
  if (n.ranges.length > 0) return n.ranges.join(", ");
  if (n.subnet === "") return "";
  return n.gateway === "" ? "all host addresses" : "all host addresses but the gateway";
}

/** What changing a network's ranges to those typed asks the pool for (UpdateNetwork):
 * the words as typed, for the pool to check and write its one way. None typed is an
 * empty list, which clears them: VIFs may then hold every host address but the gateway. */
export function rangesUpdate(networkId: string, text: string): MessageInitShape<typeof UpdateNetworkRequestSchema> {
  return { networkId, ranges: { ranges: splitRanges(text) } };
}

/** Whether address `ip` (as `parseIpv4` reads it) lies in one of `ranges`. */
function inRanges(ip: number, ranges: { first: number; last: number }[]): boolean {
  return ranges.some((r) => ip >= r.first && ip <= r.last);
}

/** A network's ranges as numbers; what does not parse is left out (the pool wrote them). */
function ownedRanges(ranges: string[]): { first: number; last: number }[] {
  return ranges.map(rangeParts).filter((r) => r !== undefined);
}

/**
 * The VIFs holding an address outside a network's new ranges (as `checkRanges` gives
 * them; none: every host address of the subnet), each with the first such address, as
 * the pool looks for them before it changes the ranges (state/networks.rs
 * `update_network`, which refuses while any is).
 */
export function vifsOutside<T extends { vm: Vm; vif: Vif }>(on: Iterable<T>, subnet: Subnet, ranges: string[]): (T & { address: string })[] {
  const owned = ranges.length > 0 ? ownedRanges(ranges) : [hostRange(subnet)];
  const out: (T & { address: string })[] = [];
  for (const a of on) {
    const address = a.vif.ipv4.find((ip) => {
      const n = parseIpv4(ip);
      return n !== undefined && !inRanges(n, owned);
    });
    if (address !== undefined) out.push({ ...a, address });
  }
  return out;
}

/**
 * What the pool will refuse of a network's ranges changed to those typed, in its words:
 * a network without a subnet, the ranges themselves (`checkRanges`), else each VIF on it
 * (`on`, as `vifsOn` finds them) left holding an address outside them (the pool names
 * the first it finds; here all are, to be readdressed first).
 */
export function rangesChangeHints(n: Pick<Network, "name" | "subnet" | "gateway">, text: string, on: Iterable<{ vm: Vm; vif: Vif }>): string[] {
  if (n.subnet === "") return [`network ${JSON.stringify(n.name)} has no subnet for address ranges to lie in`];
  const s = parseSubnet(n.subnet);
  if (!s.ok) return [];
  const r = checkRanges(splitRanges(text), s.subnet, n.gateway);
  if (!r.ok) return [r.error];
  return vifsOutside(on, s.subnet, r.ranges).map(
    ({ vm, vif, address }) => `VIF ${vif.id} (VM ${vm.id}) holds ${address}, outside the new ranges: give it an address in them first (vif-update)`,
  );
}

/**
 * What the pool will refuse of these addresses for a VIF on the network, in its words
 * (state/networks.rs `vif_ipv4s`): one not a host address of its subnet, its gateway, or
 * one outside its ranges. Said beside the form; whether an address is free, and the
 * rest, is the pool's to say.
 */
export function vifAddressHints(addresses: string[], n: Pick<Network, "name" | "subnet" | "gateway" | "ranges"> | undefined): string[] {
  if (n === undefined || n.subnet === "") return [];
  const s = parseSubnet(n.subnet);
  if (!s.ok) return [];
  const name = JSON.stringify(n.name);
  const { first, last } = hostRange(s.subnet);
  const gateway = parseIpv4(n.gateway);
  const ranges = ownedRanges(n.ranges);
  const hints: string[] = [];
  for (const a of addresses) {
    const ip = parseIpv4(a);
    if (ip === undefined) continue;
    if (ip < first || ip > last) hints.push(`address ${a} is not a host address of network ${name}'s subnet ${n.subnet}`);
    else if (ip === gateway) hints.push(`address ${a} is network ${name}'s gateway`);
    else if (ranges.length > 0 && !inRanges(ip, ranges)) {
      hints.push(`address ${a} is outside network ${name}'s ranges (${n.ranges.join(", ")}): the pool does not own it`);
    }
  }
  return hints;
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

/** What a VIF gets when no address is given on this network: the pool picks from its
 * ranges where it has some, else from its subnet. */
export function noAddressMeans(n: Pick<Network, "subnet" | "ranges" | "lockAddresses"> | undefined): string {
  if (n === undefined) return "";
  if (n.subnet !== "") return `the pool's pick from ${n.ranges.length > 0 ? n.ranges.join(", ") : n.subnet}`;
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
  /** Address ranges as typed, "10.0.0.100-10.0.0.199, 10.0.0.50"; empty: none. */
  ranges: string;
  lockAddresses: boolean;
}

export function emptyNetworkForm(): NetworkForm {
  return { name: "", kind: NetworkKind.PRIVATE, nic: "", hostId: "", vlan: "", mtu: "", subnet: "", gateway: "", ranges: "", lockAddresses: false };
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
    ranges: splitRanges(f.ranges),
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
  const ranges = splitRanges(f.ranges);
  if (subnet !== "") {
    const s = parseSubnet(subnet);
    if (!s.ok) hints.push(s.error);
    else {
      if (gateway !== "" && !inSubnet(gateway, subnet)) hints.push(`the gateway ${gateway} is not a host address of ${subnet}`);
      const r = checkRanges(ranges, s.subnet, gateway);
      if (!r.ok) hints.push(r.error);
    }
  } else {
    if (gateway !== "") hints.push("a gateway needs the network's subnet");
    if (ranges.length > 0) hints.push(`address ranges (${ranges.join(", ")}) need the network's subnet`);
    if (f.lockAddresses) hints.push("a network that locks addresses needs a subnet to hand them out from");
  }
  return hints;
}
