// A VM as an OVA download. poold prepares the package (a browser cannot read the disks
// over iSCSI); a download cannot send a header, so the token goes with a POST for a
// one-shot ticket first and the download's URL carries only that ticket.
import { Code, ConnectError } from "@connectrpc/connect";

/** The calls an export makes for its user (the server checks each): the button shows only to a role that may make them all. */
export const EXPORT_METHODS = ["SnapshotVm", "OpenVolumeAccess", "DeleteVmSnapshot"] as const;

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

/** Asks for a ticket to download VM `vmId`; the download's path, or the server's words as a ConnectError. */
export async function exportTicket(vmId: string, token: string | undefined, fetchFn: typeof fetch = fetch): Promise<string> {
  const headers: Record<string, string> = {};
  if (token !== undefined) headers.authorization = `Bearer ${token}`;
  const r = await fetchFn(`/export/ticket?vm=${encodeURIComponent(vmId)}`, { method: "POST", headers, cache: "no-store" });
  const text = (await r.text()).trim();
  if (!r.ok) throw new ConnectError(text || r.statusText, code(r.status));
  return text;
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
