// A stand-in for PoolService in view tests: it records every call, throws what `fail`
// names for a method, and answers the rest with `answer(method)` (by default {}).
import type { ConnectError } from "@connectrpc/connect";
import type { PoolClient } from "../src/api";

export function recordingClient(fail: Record<string, ConnectError> = {}, answer: (method: string) => unknown = () => ({})) {
  const calls: { method: string; req: unknown }[] = [];
  const c = new Proxy(
    {},
    {
      get: (_t, method: string) => async (req: unknown) => {
        calls.push({ method, req });
        const err = fail[method];
        if (err !== undefined) throw err;
        return answer(method);
      },
    },
  ) as PoolClient;
  return { c, calls };
}
