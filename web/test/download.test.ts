// @vitest-environment happy-dom
import { Code, ConnectError } from "@connectrpc/connect";
import { describe as group, expect, it, vi } from "vitest";
import { describe, followExport, type ExportProgress } from "../src/download";

const progress = (p: Partial<ExportProgress>): ExportProgress => ({
  phase: "reading",
  disk: 1,
  disks: 1,
  read: 0,
  total: 0,
  note: "",
  error: "",
  file: "",
  size: 0,
  ...p,
});

group("describe", () => {
  it("words each phase, with the disk counted only where there are several", () => {
    expect(describe(progress({ phase: "snapshot" }))).toBe("taking a snapshot");
    expect(describe(progress({ disk: 2, disks: 3, read: 512 << 20, total: 1 << 30 }))).toBe("reading disk 2 of 3: 512 MiB of 1.0 GiB (50%)");
    expect(describe(progress({ total: 0 }))).toBe("reading disk");
    expect(describe(progress({ phase: "converting", disk: 1, disks: 2 }))).toBe("converting disk 1 of 2");
    expect(describe(progress({ phase: "cleanup" }))).toBe("deleting the snapshot");
    // What a step waits on is said with it.
    expect(describe(progress({ phase: "snapshot", note: "waiting: storaged at 10.0.0.9 unreachable" }))).toBe(
      "taking a snapshot (waiting: storaged at 10.0.0.9 unreachable)",
    );
    expect(describe(progress({ phase: "ready", file: "a.ova", size: 2048 }))).toBe("ready: a.ova (2.0 KiB)");
    expect(describe(progress({ phase: "failed", error: "qemu-img: no space" }))).toBe("failed: qemu-img: no space");
  });
});

group("followExport", () => {
  /** A fetch answering each path from `routes` in turn. */
  function server(routes: Record<string, [number, string][]>) {
    const seen: string[] = [];
    const fetchFn = vi.fn(async (url: string, init?: RequestInit) => {
      seen.push(`${init?.method} ${url}`);
      const key = url.slice(0, url.indexOf("?"));
      const [status, body] = routes[key]!.shift()!;
      return new Response(body, { status });
    }) as unknown as typeof fetch;
    return { fetchFn, seen };
  }
  const noWait = async () => {};

  it("reads the status until ready, then asks for the ticket; each read told", async () => {
    const { fetchFn, seen } = server({
      "/export/prepare": [[200, '{"id":"x"}']],
      "/export/status": [
        [200, JSON.stringify(progress({ phase: "snapshot" }))],
        [200, JSON.stringify(progress({ read: 5, total: 10 }))],
        [200, JSON.stringify(progress({ phase: "ready", file: "d.qcow2" }))],
      ],
      "/export/ticket": [[200, "/export/download?ticket=t\n"]],
    });
    const phases: string[] = [];
    const clicked: string[] = [];
    vi.spyOn(HTMLAnchorElement.prototype, "click").mockImplementation(function (this: HTMLAnchorElement) {
      clicked.push(this.getAttribute("href") ?? "");
    });
    const ok = await followExport({ volume: "v 1", format: "qcow2" }, "tok", { fetchFn, sleep: noWait, onProgress: (p) => phases.push(p.phase) });
    expect(ok).toBe(true);
    expect(phases).toEqual(["snapshot", "reading", "ready"]);
    expect(seen[0]).toBe("POST /export/prepare?volume=v%201&format=qcow2");
    expect(seen.at(-1)).toBe("POST /export/ticket?id=x");
    expect(clicked).toEqual(["/export/download?ticket=t"]);
    vi.restoreAllMocks();
  });

  it("throws a failure with the server's words and asks for no ticket", async () => {
    const { fetchFn, seen } = server({
      "/export/prepare": [[200, '{"id":"y"}']],
      "/export/status": [[200, JSON.stringify(progress({ phase: "failed", error: "reading volume v: storaged down" }))]],
    });
    const err = await followExport({ vm: "vm1" }, undefined, { fetchFn, sleep: noWait }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.Aborted);
    expect((err as ConnectError).rawMessage).toBe("reading volume v: storaged down");
    expect(seen).toEqual(["POST /export/prepare?vm=vm1", "GET /export/status?id=y"]);
  });

  it("refuses as the server does: an unknown export is NotFound, too many at once ResourceExhausted", async () => {
    const busy = server({ "/export/prepare": [[429, "2 exports are held on this member\n"]] });
    const e = (await followExport({ vm: "vm1" }, "t", { fetchFn: busy.fetchFn }).catch((x: unknown) => x)) as ConnectError;
    expect([e.code, e.rawMessage]).toEqual([Code.ResourceExhausted, "2 exports are held on this member"]);
    const gone = server({ "/export/prepare": [[200, '{"id":"z"}']], "/export/status": [[404, "no export z on this member"]] });
    const f = (await followExport({ vm: "vm1" }, "t", { fetchFn: gone.fetchFn }).catch((x: unknown) => x)) as ConnectError;
    expect(f.code).toBe(Code.NotFound);
  });

  it("stops following when told, without a download", async () => {
    const { fetchFn, seen } = server({ "/export/prepare": [[200, '{"id":"w"}']] });
    let started = "";
    const ok = await followExport({ vm: "vm1" }, "t", { fetchFn, onStart: (id) => (started = id), stopped: () => true });
    expect(ok).toBe(false);
    expect(started).toBe("w");
    expect(seen).toEqual(["POST /export/prepare?vm=vm1"]);
  });
});
