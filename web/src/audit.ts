// The audit log as the console shows it: records read with ListAuditEvents (oldest first,
// a page at a time) merged with those the change feed brings after, newest first, each
// once (ids are fixed-width hex sequence numbers, so they order as the records do).
import type { AuditEvent } from "./gen/pool_pb";

export class AuditLog {
  private byId = new Map<string, AuditEvent>();
  private sorted: AuditEvent[] | undefined;

  add(events: Iterable<AuditEvent>): void {
    for (const e of events) {
      if (!this.byId.has(e.id)) {
        this.byId.set(e.id, e);
        this.sorted = undefined;
      }
    }
  }

  get size(): number {
    return this.byId.size;
  }

  /** Newest first, those matching `query` (in the user, method, target, result, detail or
   * peer, any case), at most `limit`. */
  newest(query: string, limit: number): AuditEvent[] {
    this.sorted ??= [...this.byId.values()].sort((a, b) => (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
    const q = query.trim().toLowerCase();
    const out: AuditEvent[] = [];
    for (const e of this.sorted) {
      if (out.length >= limit) break;
      if (q === "" || matches(e, q)) out.push(e);
    }
    return out;
  }
}

function matches(e: AuditEvent, q: string): boolean {
  return [e.userName, e.method, e.targetId, e.result, e.detail, e.peerAddress, e.taskId].some((f) =>
    f.toLowerCase().includes(q),
  );
}
