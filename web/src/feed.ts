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

export async function follow(
  client: PoolClient,
  inv: Inventory,
  hooks: FeedHooks,
  signal: AbortSignal,
  sleep: (ms: number, signal: AbortSignal) => Promise<void> = pause,
): Promise<void> {
  let retry = FIRST_RETRY_MS;
  while (!signal.aborted) {
    try {
      for await (const msg of client.watchEvents({ after: inv.position }, { signal })) {
        inv.apply(msg);
        if (inv.synced) hooks.status("live");
        retry = FIRST_RETRY_MS;
        hooks.changed();
      }
      hooks.status("the feed ended; reconnecting");
    } catch (e) {
      if (signal.aborted) return;
      if (isUnauthenticated(e)) {
        hooks.unauthenticated(explain(e));
        return;
      }
      hooks.status(`reconnecting (${explain(e)})`);
    }
    await sleep(retry, signal);
    retry = Math.min(retry * 2, LAST_RETRY_MS);
  }
}

function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });
}
