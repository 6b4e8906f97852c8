// Keeps an Inventory in step with the pool: WatchEvents from the inventory's position,
// again from where it stopped when the stream breaks (the server sends a reset listing
// when that position is gone). Ends when the signal aborts or the token is refused.
import { explain, isUnauthenticated, type PoolClient } from "./api";
import type { Inventory } from "./inventory";

export interface FeedHooks {
  /** After each applied message. */
  changed(): void;
  /** The stream's state, for the status bar: "live", or why it is not. */
  status(text: string): void;
  /** The token was refused (expired, revoked, user deleted). */
  unauthenticated(reason: string): void;
}

const FIRST_RETRY_MS = 500;
const LAST_RETRY_MS = 10_000;
/**
 * Messages taken from one call before it is ended and the feed resumed from its position
 * (which loses nothing: the server sends every change after it). Connect's client races
 * each read of a stream against the call's end with `Promise.race`, and every race stays
 * attached to that end until it comes: a call held for hours keeps ~120 bytes per message
 * (measured with heap snapshots in Chromium: one Promise, its reaction and a closure each).
 */
export const MESSAGES_PER_CALL = 2000;

export async function follow(
  client: PoolClient,
  inv: Inventory,
  hooks: FeedHooks,
  signal: AbortSignal,
  sleep: (ms: number, signal: AbortSignal) => Promise<void> = pause,
  perCall = MESSAGES_PER_CALL,
): Promise<void> {
  let retry = FIRST_RETRY_MS;
  while (!signal.aborted) {
    const call = new AbortController();
    const relay = () => call.abort();
    signal.addEventListener("abort", relay, { once: true });
    let taken = 0;
    let rotated = false;
    try {
      for await (const msg of client.watchEvents({ after: inv.position }, { signal: call.signal })) {
        inv.apply(msg);
        if (inv.synced) hooks.status("live");
        retry = FIRST_RETRY_MS;
        hooks.changed();
        // Only between whole listings: a resumed call gets changes, not the listing again.
        if (++taken >= perCall && inv.synced) {
          rotated = true;
          break;
        }
      }
      if (!rotated) hooks.status("the feed ended; reconnecting");
    } catch (e) {
      if (signal.aborted) return;
      if (isUnauthenticated(e)) {
        hooks.unauthenticated(explain(e));
        return;
      }
      hooks.status(`reconnecting (${explain(e)})`);
    } finally {
      signal.removeEventListener("abort", relay);
      // Ends the call (and frees what its reads left attached to it).
      call.abort();
    }
    if (rotated) continue;
    await sleep(retry, signal);
    retry = Math.min(retry * 2, LAST_RETRY_MS);
  }
}

function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}
