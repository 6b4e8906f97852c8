// Downloads the member prepares (a browser cannot read the disks over iSCSI): a VM as an
// OVA, a disk as qcow2 or raw. Preparing takes minutes and can fail midway, so the page
// starts it, follows its progress, and then downloads the file. A download cannot send
// a header, so the token goes with a POST for a one-shot ticket and the download's URL
// carries only that ticket. An export lives on the member that served the page.
import { Code, ConnectError } from "@connectrpc/connect";
import { onBeforeUnmount, ref } from "vue";
import { explain, loadSession } from "./api";
import { bytes } from "./format";

/** The calls a VM export makes for its user (the server checks each): the button shows only to a role that may make them all. */
export const EXPORT_METHODS = ["SnapshotVm", "OpenVolumeAccess", "DeleteVmSnapshot"] as const;
/** The calls a disk download makes (as `poolctl vdi-export`). */
export const DISK_EXPORT_METHODS = ["OpenVolumeAccess", "CloseVolumeAccess"] as const;

export type DiskFormat = "qcow2" | "raw";
export type ExportTarget = { vm: string } | { volume: string; format: DiskFormat };

/** `GET /export/status` as poold words it (`pool_image::progress::Progress`). */
export interface ExportProgress {
  phase: "snapshot" | "reading" | "converting" | "cleanup" | "ready" | "failed";
  disk: number;
  disks: number;
  read: number;
  total: number;
  /** What the step waits on ("waiting: storaged … unreachable"), or "". */
  note: string;
  error: string;
  file: string;
  size: number;
}

/** The API's code for an HTTP refusal, so it is shown as any other call's. */
function code(status: number): Code {
  switch (status) {
    case 400:
      return Code.InvalidArgument;
    case 401:
      return Code.Unauthenticated;
    case 403:
      return Code.PermissionDenied;
    case 404:
      return Code.NotFound;
    case 409:
      return Code.FailedPrecondition;
    case 429:
      return Code.ResourceExhausted;
    default:
      return Code.Unavailable;
  }
}

/** One call on an export route with the session's token: the answer's text, or the server's words as a ConnectError. */
async function call(method: string, path: string, token: string | undefined, fetchFn: typeof fetch): Promise<string> {
  const headers: Record<string, string> = {};
  if (token !== undefined) headers.authorization = `Bearer ${token}`;
  const r = await fetchFn(path, { method, headers, cache: "no-store" });
  const text = (await r.text()).trim();
  if (!r.ok) throw new ConnectError(text || r.statusText, code(r.status));
  return text;
}

function query(target: ExportTarget): string {
  if ("vm" in target) return `vm=${encodeURIComponent(target.vm)}`;
  return `volume=${encodeURIComponent(target.volume)}&format=${target.format}`;
}

/** Starts preparing `target`: the export's id. */
export async function startExport(target: ExportTarget, token: string | undefined, fetchFn: typeof fetch = fetch): Promise<string> {
  const answer = JSON.parse(await call("POST", `/export/prepare?${query(target)}`, token, fetchFn)) as { id: string };
  return answer.id;
}

export async function exportStatus(id: string, token: string | undefined, fetchFn: typeof fetch = fetch): Promise<ExportProgress> {
  return JSON.parse(await call("GET", `/export/status?id=${encodeURIComponent(id)}`, token, fetchFn)) as ExportProgress;
}

/** Cancels export `id`: its work stops and its files go. */
export async function cancelExport(id: string, token: string | undefined, fetchFn: typeof fetch = fetch): Promise<void> {
  await call("DELETE", `/export/status?id=${encodeURIComponent(id)}`, token, fetchFn);
}

/** A ready export's download path, with its one-shot ticket. */
export async function exportTicket(id: string, token: string | undefined, fetchFn: typeof fetch = fetch): Promise<string> {
  return call("POST", `/export/ticket?id=${encodeURIComponent(id)}`, token, fetchFn);
}

/** Where an export has got, in words, with what it waits on. */
export function describe(p: ExportProgress): string {
  const said = step(p);
  return p.note && p.phase !== "ready" && p.phase !== "failed" ? `${said} (${p.note})` : said;
}

function step(p: ExportProgress): string {
  const of = p.disks > 1 ? ` ${p.disk} of ${p.disks}` : "";
  switch (p.phase) {
    case "snapshot":
      return "taking a snapshot";
    case "reading": {
      if (p.total === 0) return `reading disk${of}`;
      const pct = Math.floor((p.read * 100) / p.total);
      return `reading disk${of}: ${bytes(p.read)} of ${bytes(p.total)} (${pct}%)`;
    }
    case "converting":
      return `converting disk${of}`;
    case "cleanup":
      return "deleting the snapshot";
    case "ready":
      return `ready: ${p.file} (${bytes(p.size)})`;
    case "failed":
      return `failed: ${p.error}`;
  }
}

/** Starts the browser's download of `path` (same origin: the file's name is the server's). */
export function startDownload(path: string, doc: Document = document): void {
  const a = doc.createElement("a");
  a.href = path;
  a.download = "";
  a.style.display = "none";
  doc.body.appendChild(a);
  a.click();
  a.remove();
}

export interface Follow {
  fetchFn?: typeof fetch;
  /** Waits between status reads. */
  sleep?: (ms: number) => Promise<void>;
  /** Told each status read. */
  onProgress?: (p: ExportProgress) => void;
  /** Told the export's id once it is started (to cancel it). */
  onStart?: (id: string) => void;
  /** Asked before each status read: true stops following. */
  stopped?: () => boolean;
}

/** How often the page reads an export's status. */
export const POLL_MS = 500;

const wait = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * Prepares `target`, following it until it is ready, then downloads it: true once the
 * download is started, false when stopped. A failure is thrown as a ConnectError with
 * the server's words.
 */
export async function followExport(target: ExportTarget, token: string | undefined, opts: Follow = {}): Promise<boolean> {
  const fetchFn = opts.fetchFn ?? fetch;
  const sleep = opts.sleep ?? wait;
  const id = await startExport(target, token, fetchFn);
  opts.onStart?.(id);
  for (;;) {
    if (opts.stopped?.()) return false;
    const p = await exportStatus(id, token, fetchFn);
    opts.onProgress?.(p);
    if (p.phase === "failed") throw new ConnectError(p.error, Code.Aborted);
    if (p.phase === "ready") break;
    await sleep(POLL_MS);
  }
  startDownload(await exportTicket(id, token, fetchFn));
  return true;
}

/**
 * A panel's export: busy while one runs, its progress in words, the server's words when
 * it fails (as `useAction` shows a call's), and a cancel. A panel closed meanwhile
 * cancels its export, so its files do not wait on the member.
 */
export function useExport() {
  const busy = ref(false);
  const error = ref("");
  const progress = ref("");
  let id: string | undefined;
  let stop = false;
  async function run(what: string, target: ExportTarget): Promise<boolean> {
    busy.value = true;
    error.value = "";
    progress.value = "starting";
    stop = false;
    try {
      const started = await followExport(target, loadSession()?.token, {
        onStart: (i) => (id = i),
        onProgress: (p) => (progress.value = describe(p)),
        stopped: () => stop,
      });
      progress.value = started ? "downloading" : "";
      return started;
    } catch (e) {
      progress.value = "";
      error.value = `${what}: ${explain(e)}`;
      return false;
    } finally {
      busy.value = false;
      id = undefined;
    }
  }
  async function cancel(): Promise<void> {
    stop = true;
    const i = id;
    progress.value = "";
    if (i !== undefined) await cancelExport(i, loadSession()?.token).catch(() => undefined);
  }
  onBeforeUnmount(() => {
    if (id !== undefined) void cancel();
  });
  return { busy, error, progress, run, cancel };
}
