// How states and sizes read in the console: the enum names as poolctl prints them.
import { PowerState } from "./gen/host_pb";
import { AlertKind, AlertSeverity, HostState, Role, TaskState } from "./gen/pool_pb";

// protobuf-es drops the enums' prefixes: PowerState.RUNNING is POWER_STATE_RUNNING.
function label(names: Record<number, string>, value: number): string {
  const n = names[value];
  return n === undefined ? String(value) : n.toLowerCase().replaceAll("_", " ");
}

export const power = (s: PowerState) => label(PowerState, s);
export const hostState = (s: HostState) => label(HostState, s);
export const taskState = (s: TaskState) => label(TaskState, s);
export const role = (r: Role) => label(Role, r);
export const alertKind = (k: AlertKind) => label(AlertKind, k);
export const severity = (s: AlertSeverity) => label(AlertSeverity, s);

// A task's figures (`Task.results`) in words, as poolctl prints them.
const RESULT_WORDS: [key: string, words: (v: string) => string][] = [
  ["pause_ms", (v) => `paused ${v} ms`],
  ["downtime_ms", (v) => `downtime ${v} ms`],
];

/** What a task reported (a checkpoint's pause, a migration's downtime) in words; "" when
 * it reported none of the figures the console knows. */
export function taskResult(t: { results: Record<string, string> }): string {
  return RESULT_WORDS.filter(([k]) => t.results[k] !== undefined)
    .map(([k, words]) => words(t.results[k]!))
    .join(", ");
}

/** A task's line in the tasks list: its error if it failed, else its status and result. */
export function taskLine(t: { errorMessage: string; statusMessage: string; results: Record<string, string> }): string {
  return t.errorMessage || [t.statusMessage, taskResult(t)].filter((s) => s !== "").join("; ");
}

/** A protobuf timestamp as local date and time; "" when unset. */
export function when(t: { seconds: bigint; nanos: number } | undefined): string {
  if (t === undefined) return "";
  return new Date(Number(t.seconds) * 1000 + t.nanos / 1e6).toLocaleString();
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function bytes(n: bigint | number): string {
  let v = Number(n);
  let u = 0;
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u += 1;
  }
  return `${u === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${UNITS[u]}`;
}
