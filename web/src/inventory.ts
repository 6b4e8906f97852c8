// The pool as the console knows it: every object the change feed has sent, kept by kind
// and id, and the feed position to resume from. Free of Vue and of the network, so the
// rules (a reset drops everything, a deletion removes, positions only grow) are tested
// on their own; the view layer bumps a counter when `apply` reports a change.
import type {
  Alert,
  AuditEvent,
  Host,
  Network,
  Pool,
  StorageRepository,
  Task,
  Template,
  User,
  Vm,
  VmSnapshot,
  WatchEventsResponse,
} from "./gen/pool_pb";
import type { Volume } from "./gen/storage_pb";
import type { PowerState } from "./gen/host_pb";
import { TaskState, type HostState } from "./gen/pool_pb";

export interface Objects {
  host: Map<string, Host>;
  sr: Map<string, StorageRepository>;
  volume: Map<string, Volume>;
  template: Map<string, Template>;
  vm: Map<string, Vm>;
  vmSnapshot: Map<string, VmSnapshot>;
  network: Map<string, Network>;
  user: Map<string, User>;
  task: Map<string, Task>;
  alert: Map<string, Alert>;
}

export type Kind = keyof Objects;

/** Audit records come as changes only; the console keeps the latest few. */
export const AUDIT_KEPT = 200;
/** Finished tasks kept in the page (the pool keeps 10,000; the console shows the latest
 * and those under way): past this, the oldest finished ones are dropped, 100 at a time. */
export const TASKS_KEPT = 500;

/** The feed's kind names as the server spells them, to the keys of `Objects`. */
const KINDS: Record<string, Kind> = {
  host: "host",
  sr: "sr",
  volume: "volume",
  template: "template",
  vm: "vm",
  vm_snapshot: "vmSnapshot",
  network: "network",
  user: "user",
  task: "task",
  alert: "alert",
};

function empty(): Objects {
  return {
    host: new Map(),
    sr: new Map(),
    volume: new Map(),
    template: new Map(),
    vm: new Map(),
    vmSnapshot: new Map(),
    network: new Map(),
    user: new Map(),
    task: new Map(),
    alert: new Map(),
  };
}

export class Inventory {
  objects: Objects = empty();
  pool: Pool | undefined;
  audit: AuditEvent[] = [];
  /** The `after` to resume the feed with. */
  position = 0n;
  /** The listing is complete: what the views show is the pool's present. */
  synced = false;
  /** Events taken in of each kind ("pool" too), for a view that reads something the feed
   * does not carry (ListSchedules) and asks again when what it depends on changed. */
  changes: Partial<Record<Kind | "pool", number>> = {};

  /** Takes in one message of the feed. */
  apply(msg: WatchEventsResponse): void {
    if (msg.reset) {
      this.objects = empty();
      this.pool = undefined;
      this.synced = false;
    }
    for (const e of msg.events) {
      const counted = e.kind === "pool" ? "pool" : KINDS[e.kind];
      if (counted !== undefined) this.changes[counted] = (this.changes[counted] ?? 0) + 1;
      if (e.kind === "pool") {
        if (e.object.case === "pool") this.pool = e.object.value;
        continue;
      }
      if (e.kind === "audit") {
        if (e.object.case === "audit") {
          this.audit.unshift(e.object.value);
          this.audit.length = Math.min(this.audit.length, AUDIT_KEPT);
        }
        continue;
      }
      const kind = KINDS[e.kind];
      // A kind this console does not know yet (a newer server): skipped, not fatal.
      if (kind === undefined) continue;
      const map = this.objects[kind] as Map<string, unknown>;
      if (e.deleted) {
        map.delete(e.id);
      } else if (e.object.value !== undefined) {
        map.set(e.id, e.object.value);
      }
    }
    if (this.objects.task.size > TASKS_KEPT + 100) this.dropOldTasks();
    if (msg.synced) this.synced = true;
    if (msg.position > this.position || msg.reset) this.position = msg.position;
  }

  private dropOldTasks(): void {
    const at = (t: Task) => t.createdAt?.seconds ?? 0n;
    const finished = [...this.objects.task.values()]
      .filter((t) => t.state !== TaskState.RUNNING && t.state !== TaskState.PENDING)
      .sort((a, b) => (at(a) < at(b) ? -1 : at(a) > at(b) ? 1 : 0));
    const excess = this.objects.task.size - TASKS_KEPT;
    for (const t of finished.slice(0, Math.max(0, excess))) this.objects.task.delete(t.id);
  }

  /** Forgets everything (a logout): the next feed starts with a listing. */
  clear(): void {
    this.objects = empty();
    this.pool = undefined;
    this.audit = [];
    this.position = 0n;
    this.synced = false;
  }

  /** Alerts still open (not cleared, not dismissed), the latest first. */
  openAlerts(): Alert[] {
    return [...this.objects.alert.values()].filter(isOpen).sort(latestFirst);
  }

  hostName(id: string): string {
    return this.objects.host.get(id)?.name ?? id;
  }

  /** The name of whatever object has this id (an audit record's target), or "". */
  nameOf(id: string): string {
    const o = this.objects;
    const vm = o.vm.get(id);
    if (vm !== undefined) return vmName(vm);
    for (const m of [o.host, o.volume, o.sr, o.network, o.template, o.user, o.vmSnapshot] as Map<string, { name: string }>[]) {
      const x = m.get(id);
      if (x !== undefined) return x.name;
    }
    return "";
  }

  /** The VMs of each host, by name, in one pass; stopped VMs (on no host) under "". */
  vmsByHost(): Map<string, Vm[]> {
    return groupBy(this.objects.vm.values(), (v) => v.hostId, vmName);
  }

  /** The volumes of each storage repository (the pool records its id as their `poolId`). */
  volumesBySr(): Map<string, Volume[]> {
    return groupBy(this.objects.volume.values(), (v) => v.poolId, (v) => v.name);
  }

  /** Every object whose name or id contains `query` (any case), by kind then name. */
  search(query: string, limit = 100): Found[] {
    const q = query.trim().toLowerCase();
    if (q === "") return [];
    const found: Found[] = [];
    const add = (kind: Kind, id: string, name: string, detail: string) => {
      if (found.length < limit && (name.toLowerCase().includes(q) || id.toLowerCase().includes(q))) {
        found.push({ kind, id, name, detail });
      }
    };
    for (const h of this.objects.host.values()) add("host", h.id, h.name, h.address);
    for (const v of this.objects.vm.values()) add("vm", v.id, vmName(v), this.hostName(v.hostId));
    for (const s of this.objects.sr.values()) add("sr", s.id, s.name, s.address);
    for (const v of this.objects.volume.values()) add("volume", v.id, v.name, v.poolId);
    for (const n of this.objects.network.values()) add("network", n.id, n.name, "");
    for (const t of this.objects.template.values()) add("template", t.id, t.name, "");
    return found;
  }

  /**
   * The inventory tree as rows, in display order: the pool; each host and its VMs; the VMs
   * on no host; storage repositories and their disks; networks. Nodes whose key is in
   * `collapsed` do not list their children. One pass over the objects, so the tree of
   * 10,000 VMs is cheap to redo after each change, and a view can draw only the rows in
   * sight.
   */
  rows(collapsed: ReadonlySet<string>): Row[] {
    const out: Row[] = [];
    const node = (row: Omit<Row, "key" | "open"> & { key?: string }, children: () => void) => {
      const key = row.key ?? `${row.kind}:${row.id}`;
      const open = !collapsed.has(key);
      out.push({ ...row, key, open });
      if (open) children();
    };
    const leaf = (row: Omit<Row, "key" | "open">) => out.push({ ...row, key: `${row.kind}:${row.id}` });
    const vms = this.vmsByHost();
    const vmRows = (list: Vm[] | undefined, depth: number) => {
      for (const v of list ?? []) leaf({ depth, kind: "vm", id: v.id, label: vmName(v), detail: "", power: v.powerState });
    };
    const sorted = <T extends { name: string; id: string }>(xs: Iterable<T>) =>
      [...xs].sort((a, b) => collate(a.name, b.name) || collate(a.id, b.id));
    node({ depth: 0, kind: "pool", id: "", label: `Pool ${this.pool?.id ?? ""}`, detail: "" }, () => {
      for (const h of sorted(this.objects.host.values())) {
        node({ depth: 1, kind: "host", id: h.id, label: h.name, detail: "", hostState: h.state }, () => vmRows(vms.get(h.id), 2));
      }
      const stopped = vms.get("");
      if (stopped !== undefined) {
        node({ depth: 1, kind: "group", id: "stopped", label: "Not running", detail: `${stopped.length}` }, () => vmRows(stopped, 2));
      }
      const volumes = this.volumesBySr();
      node({ depth: 1, kind: "group", id: "storage", label: "Storage", detail: "" }, () => {
        for (const sr of sorted(this.objects.sr.values())) {
          node({ depth: 2, kind: "sr", id: sr.id, label: sr.name, detail: sr.reachable ? "" : "unreachable" }, () => {
            for (const v of volumes.get(sr.id) ?? []) leaf({ depth: 3, kind: "volume", id: v.id, label: v.name, detail: "" });
          });
        }
      });
      node({ depth: 1, kind: "group", id: "networks", label: "Networks", detail: "" }, () => {
        for (const n of sorted(this.objects.network.values())) leaf({ depth: 2, kind: "network", id: n.id, label: n.name, detail: "" });
      });
    });
    return out;
  }

  /** The tasks on `targetId` that have not ended (a power change, a migration...). */
  underWay(targetId: string): Task[] {
    return [...this.objects.task.values()].filter(
      (t) => t.targetId === targetId && (t.state === TaskState.RUNNING || t.state === TaskState.PENDING),
    );
  }

  /** The latest tasks first, without the pool's own bookkeeping (HOUSEKEEPING). */
  recentTasks(n: number): Task[] {
    const seconds = (t: Task) => t.createdAt?.seconds ?? 0n;
    return [...this.objects.task.values()]
      .filter((t) => !HOUSEKEEPING.has(t.kind))
      .sort((a, b) => (seconds(a) === seconds(b) ? collate(b.id, a.id) : seconds(a) < seconds(b) ? 1 : -1))
      .slice(0, n);
  }
}

/** Tasks of the pool's own upkeep (heartbeats taken in, job steps, figures refreshed):
 * many a minute, and nothing a person asked for. */
export const HOUSEKEEPING = new Set(["host.report", "job.step", "job.finish", "audit", "sr.refresh", "pool.certificate_issued"]);

/** One line of the inventory tree. */
export interface Row {
  key: string;
  depth: number;
  kind: Kind | "pool" | "group";
  id: string;
  label: string;
  detail: string;
  power?: PowerState;
  hostState?: HostState;
  /** Set on nodes that have children: whether they are listed. */
  open?: boolean;
}

// Names sort as people read them ("vm-9" before "vm-10"); one collator, made once.
export const collate = new Intl.Collator(undefined, { numeric: true }).compare;

export interface Found {
  kind: Kind;
  id: string;
  name: string;
  detail: string;
}

/** The first of vda, vdb, ... vdz, vdaa, ... that `taken` does not hold: a new disk's id. */
export function nextDiskId(taken: readonly string[]): string {
  const have = new Set(taken);
  for (let i = 0; ; i++) {
    const letters = i < 26 ? String.fromCharCode(97 + i) : String.fromCharCode(96 + Math.floor(i / 26)) + String.fromCharCode(97 + (i % 26));
    if (!have.has(`vd${letters}`)) return `vd${letters}`;
  }
}

export function vmName(v: Vm): string {
  return v.spec?.name ?? v.id;
}

function groupBy<T extends { id: string }>(
  items: Iterable<T>,
  key: (x: T) => string,
  name: (x: T) => string,
): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const x of items) {
    const k = key(x);
    const list = out.get(k);
    if (list === undefined) out.set(k, [x]);
    else list.push(x);
  }
  for (const list of out.values()) {
    list.sort((a, b) => collate(name(a), name(b)) || collate(a.id, b.id));
  }
  return out;
}

/** Whether an alert is on the open list. */
export function isOpen(a: Alert): boolean {
  return a.clearedAt === undefined && a.dismissedAt === undefined;
}

/** The pool's alert ids are fixed-width hex in the order raised. */
export function latestFirst(a: Alert, b: Alert): number {
  return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
}
