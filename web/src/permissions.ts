// What the logged-in user may do, as the pool says (ListRoles gives each role's methods):
// the console shows only the actions a role may take. The server checks every call
// regardless; this only keeps buttons that would be refused off the page.
import { inject, type InjectionKey, type Ref } from "vue";
import type { ListRolesResponse } from "./gen/pool_pb";

export type Can = (method: string) => boolean;

export const CAN: InjectionKey<Ref<Can>> = Symbol("can");

/** The methods (short names, "StartVm") the given roles may call. */
export function allowedMethods(roles: readonly number[], described: ListRolesResponse): Set<string> {
  const out = new Set<string>();
  for (const r of described.roles) {
    if (!roles.includes(r.role)) continue;
    for (const m of r.allowedMethods) out.add(m.slice(m.lastIndexOf("/") + 1));
  }
  return out;
}

export function useCan(): Ref<Can> {
  const can = inject(CAN);
  if (can === undefined) throw new Error("no permissions provided");
  return can;
}
