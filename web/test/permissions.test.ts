import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ListRolesResponseSchema, Role } from "../src/gen/pool_pb";
import { allowedMethods } from "../src/permissions";

const described = create(ListRolesResponseSchema, {
  roles: [
    { role: Role.READ_ONLY, allowedMethods: ["pool.v1.PoolService/ListVms", "pool.v1.PoolService/WatchEvents"] },
    { role: Role.VM_OPERATOR, allowedMethods: ["pool.v1.PoolService/ListVms", "pool.v1.PoolService/StartVm"] },
    { role: Role.POOL_ADMIN, allowedMethods: ["pool.v1.PoolService/CreateUser"] },
  ],
});

describe("allowedMethods", () => {
  it("joins what each of the user's roles may call, by the method's short name", () => {
    expect([...allowedMethods([Role.READ_ONLY], described)].sort()).toEqual(["ListVms", "WatchEvents"]);
    expect([...allowedMethods([Role.READ_ONLY, Role.VM_OPERATOR], described)].sort()).toEqual(["ListVms", "StartVm", "WatchEvents"]);
  });

  it("allows nothing for no role, or a role the pool does not describe", () => {
    expect(allowedMethods([], described).size).toBe(0);
    expect(allowedMethods([Role.VM_ADMIN], described).size).toBe(0);
  });
});
