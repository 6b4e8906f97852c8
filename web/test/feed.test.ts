import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { HostSchema, PoolEventSchema, PoolService, WatchEventsResponseSchema, type WatchEventsResponse } from "../src/gen/pool_pb";
import { follow } from "../src/feed";
import { Inventory } from "../src/inventory";

const host = (position: bigint, id: string) =>
  create(PoolEventSchema, { position, kind: "host", id, object: { case: "host", value: create(HostSchema, { id, name: id }) } });

/** A PoolService whose WatchEvents answers each call with the next script. */
function server(scripts: Array<(after: bigint) => AsyncGenerator<WatchEventsResponse>>) {
  const afters: bigint[] = [];
  const transport = createRouterTransport(({ service }) => {
    service(PoolService, {
      watchEvents(req) {
        afters.push(req.after);
        const next = scripts.shift();
        if (next === undefined) throw new ConnectError("no more", Code.Internal);
        return next(req.after);
      },
    });
  });
  return { client: createClient(PoolService, transport), afters };
}

describe("follow", () => {
  it("resumes from the last position after a broken stream, and stops when the token is refused", async () => {
    const { client, afters } = server([
      async function* () {
        yield create(WatchEventsResponseSchema, { position: 5n, events: [host(5n, "h1")], reset: true, synced: true });
        throw new ConnectError("member went away", Code.Unavailable);
      },
      async function* () {
        yield create(WatchEventsResponseSchema, { position: 5n, synced: true });
        yield create(WatchEventsResponseSchema, { position: 8n, events: [host(8n, "h2")] });
      },
      async function* () {
        throw new ConnectError("token revoked", Code.Unauthenticated);
      },
    ]);
    const inv = new Inventory();
    const statuses: string[] = [];
    let refused = "";
    let changes = 0;
    const slept: number[] = [];
    await follow(
      client,
      inv,
      {
        changed: () => (changes += 1),
        status: (s) => statuses.push(s),
        unauthenticated: (why) => (refused = why),
      },
      new AbortController().signal,
      async (ms) => {
        slept.push(ms);
      },
    );
    expect(afters).toEqual([0n, 5n, 8n]);
    expect([...inv.objects.host.keys()].sort()).toEqual(["h1", "h2"]);
    expect(inv.position).toBe(8n);
    expect(changes).toBe(3);
    expect(refused).toContain("token revoked");
    expect(statuses).toContain("live");
    expect(statuses.some((s) => s.includes("member went away"))).toBe(true);
    // A stream that delivered resets the back-off.
    expect(slept).toEqual([500, 500]);
  });

  it("ends when aborted", async () => {
    const stop = new AbortController();
    const { client } = server([
      async function* () {
        yield create(WatchEventsResponseSchema, { position: 1n, reset: true, synced: true });
        stop.abort();
        yield create(WatchEventsResponseSchema, { position: 2n, events: [host(2n, "h1")] });
      },
    ]);
    const inv = new Inventory();
    await follow(client, inv, { changed() {}, status() {}, unauthenticated() {} }, stop.signal, async () => {});
    expect(inv.position).toBe(1n);
  });

  it("ends a call after so many messages and resumes at once where it stopped", async () => {
    const { client, afters } = server([
      async function* () {
        yield create(WatchEventsResponseSchema, { position: 1n, events: [host(1n, "h1")], reset: true, synced: true });
        for (let p = 2n; p <= 9n; p++) yield create(WatchEventsResponseSchema, { position: p, events: [host(p, `h${p}`)] });
      },
      async function* (after) {
        for (let p = after + 1n; p <= after + 2n; p++) yield create(WatchEventsResponseSchema, { position: p, events: [host(p, `h${p}`)] });
        throw new ConnectError("token revoked", Code.Unauthenticated);
      },
    ]);
    const inv = new Inventory();
    const slept: number[] = [];
    await follow(
      client,
      inv,
      { changed() {}, status() {}, unauthenticated() {} },
      new AbortController().signal,
      async (ms) => {
        slept.push(ms);
      },
      3,
    );
    // The first call ended after 3 messages; the next, with no pause, went on from there.
    expect(afters).toEqual([0n, 3n]);
    expect(slept).toEqual([]);
    expect(inv.position).toBe(5n);
    expect(inv.objects.host.size).toBe(5);
  });
});
