// PoolService as the console calls it: gRPC-Web to the member that served the page, with
// the session's token in the authorization header (never in a URL or a cookie).
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { PoolService } from "./gen/pool_pb";

export type PoolClient = Client<typeof PoolService>;

export interface Session {
  token: string;
  user: string;
  /** The user's roles (Role values), as Login returned them. */
  roles: number[];
}

const KEY = "pool-console-session";

/** The session of this tab (sessionStorage: gone with the tab, not shared between tabs). */
export function loadSession(storage: Storage = sessionStorage): Session | undefined {
  try {
    const s = JSON.parse(storage.getItem(KEY) ?? "null") as Partial<Session> | null;
    if (typeof s?.token !== "string" || typeof s.user !== "string") return undefined;
    const roles = Array.isArray(s.roles) ? s.roles.filter((r): r is number => typeof r === "number") : [];
    return { token: s.token, user: s.user, roles };
  } catch {
    return undefined;
  }
}

export function saveSession(s: Session | undefined, storage: Storage = sessionStorage): void {
  if (s === undefined) storage.removeItem(KEY);
  else storage.setItem(KEY, JSON.stringify(s));
}

export function poolClient(baseUrl: string, token: () => string | undefined): PoolClient {
  const auth: Interceptor = (next) => async (req) => {
    const t = token();
    if (t !== undefined) req.header.set("authorization", `Bearer ${t}`);
    return next(req);
  };
  return createClient(PoolService, createGrpcWebTransport({ baseUrl, interceptors: [auth] }));
}

/** What a failed call says to a person: the server's message, with its code. */
export function explain(e: unknown): string {
  const err = ConnectError.from(e);
  return `${Code[err.code] ?? err.code}: ${err.rawMessage}`;
}

export function isUnauthenticated(e: unknown): boolean {
  return ConnectError.from(e).code === Code.Unauthenticated;
}
