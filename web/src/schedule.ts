// Schedules as people write and read them: periods ("6h", "1d"), when in a period ("02:00",
// "Sun 03:00"), retention ("last 7, daily 0, weekly 4" or "all"), in poolctl's words
// (cli/src/cmd/schedule.rs). The pool's rules (state/schedules.rs `validate_schedule`) are
// checked here first so the form says what is wrong before the server refuses it; the
// server checks the same regardless. Times are UTC; periods count from Monday 00:00 UTC.
import { create } from "@bufbuild/protobuf";
import { ScheduleKind, ScheduleSchema, type Schedule } from "./gen/pool_pb";

export const MINUTE = 60;
export const HOUR = 3600;
export const DAY = 86_400;
export const WEEK = 7 * DAY;
/** The shortest period the pool takes. */
export const MIN_EVERY_SECONDS = MINUTE;
/** The longest: a year (a longer period is a typo, not a schedule). */
export const MAX_EVERY_SECONDS = 366 * DAY;

/** The form's period units, largest first (poolctl's letters). */
export const UNITS = [
  { letter: "w", seconds: WEEK, label: "weeks" },
  { letter: "d", seconds: DAY, label: "days" },
  { letter: "h", seconds: HOUR, label: "hours" },
  { letter: "m", seconds: MINUTE, label: "minutes" },
] as const;
export type Unit = (typeof UNITS)[number]["letter"];

export const WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"] as const;

const ALL_UNITS: readonly [string, number][] = [...UNITS.map((u): [string, number] => [u.letter, u.seconds]), ["s", 1]];

/** Seconds as the largest whole unit: 86400 → "1d", 5400 → "90m", 0 → "0s". */
export function period(secs: number): string {
  const u = ALL_UNITS.find(([, m]) => secs > 0 && secs % m === 0);
  return u === undefined ? "0s" : `${secs / u[1]}${u[0]}`;
}

/** A period as the form's number and unit (the largest unit that divides it whole). */
export function splitPeriod(secs: number): { count: number; unit: Unit } {
  const u = UNITS.find((x) => secs > 0 && secs % x.seconds === 0) ?? UNITS[3];
  return { count: Math.max(1, Math.round(secs / u.seconds)), unit: u.letter };
}

/** Whether the period is whole weeks: its `at` may name a weekday. */
export function isWeekly(everySeconds: number): boolean {
  return everySeconds > 0 && everySeconds % WEEK === 0;
}

const pad = (n: number) => String(n).padStart(2, "0");

/** A time of day from seconds past midnight: 9000 → "02:30" (":SS" only when not whole). */
export function clock(secs: number): string {
  const s = secs % DAY;
  const t = `${pad(Math.floor(s / HOUR))}:${pad(Math.floor((s % HOUR) / MINUTE))}`;
  return s % MINUTE === 0 ? t : `${t}:${pad(s % MINUTE)}`;
}

/**
 * When in its period a schedule runs, for the table: "Sun 03:00" for a weekly period,
 * "02:00" for whole days, else the offset into the period ("45m", poolctl's AT column).
 */
export function formatAt(atSeconds: number, everySeconds: number): string {
  if (isWeekly(everySeconds) && atSeconds < WEEK) return `${WEEKDAYS[Math.floor(atSeconds / DAY)]} ${clock(atSeconds)}`;
  if (everySeconds % DAY === 0 && atSeconds < DAY) return clock(atSeconds);
  return atSeconds === 0 ? "0s" : `+${period(atSeconds)}`;
}

/** "HH:MM" (or "H:MM") as seconds past midnight; an error in words when it is not one. */
export function parseClock(text: string): { seconds: number } | { error: string } {
  const t = text.trim();
  const m = /^(\d{1,2}):(\d{2})$/.exec(t);
  if (m === null) return { error: `${JSON.stringify(t)} is not a time: HH:MM, 00:00 to 23:59` };
  const h = Number(m[1]);
  const min = Number(m[2]);
  if (h > 23 || min > 59) return { error: `${JSON.stringify(t)}: HH:MM, 00:00 to 23:59` };
  return { seconds: h * HOUR + min * MINUTE };
}

/** What the schedule form holds. */
export interface ScheduleForm {
  name: string;
  vmId: string;
  checkpoint: boolean;
  count: number;
  unit: Unit;
  /** Weekday index from Monday (0..6); read only for weekly periods. */
  day: number;
  /** HH:MM UTC, from the period's midnight; "" is the period's start. */
  at: string;
  keepLast: number;
  keepDaily: number;
  keepWeekly: number;
  disabled: boolean;
  /** A backup schedule's directory (on the coordinator members); "" for snapshots. */
  backupDir: string;
}

/** A new schedule: daily, at midnight UTC, keeping everything (poolctl's defaults). */
export function emptyForm(): ScheduleForm {
  return { name: "", vmId: "", checkpoint: false, count: 1, unit: "d", day: 0, at: "", keepLast: 0, keepDaily: 0, keepWeekly: 0, disabled: false, backupDir: "" };
}

/** A schedule the pool has, as the form shows it to be changed. */
export function toForm(s: Schedule): ScheduleForm {
  const { count, unit } = splitPeriod(s.everySeconds);
  const weekly = isWeekly(s.everySeconds);
  return {
    name: s.name,
    vmId: s.vmId,
    checkpoint: s.kind === ScheduleKind.CHECKPOINT,
    count,
    unit,
    day: weekly ? Math.floor(s.atSeconds / DAY) % 7 : 0,
    at: clock(weekly ? s.atSeconds % DAY : s.atSeconds),
    keepLast: s.retention?.keepLast ?? 0,
    keepDaily: s.retention?.keepDaily ?? 0,
    keepWeekly: s.retention?.keepWeekly ?? 0,
    disabled: s.disabled,
    backupDir: s.kind === ScheduleKind.BACKUP ? s.directory : "",
  };
}

const NAME = /^[A-Za-z0-9._-]{1,64}$/;
const U32 = 0xffff_ffff;

/** The schedule's fields as SetSchedule takes them, or the first thing the pool would refuse. */
export type Checked = { ok: true; schedule: Schedule } | { ok: false; error: string };

/** Checks the form by the pool's rules and builds the schedule from it. */
export function checkForm(f: ScheduleForm): Checked {
  const fail = (error: string): Checked => ({ ok: false, error });
  const name = f.name.trim();
  if (!NAME.test(name)) {
    return fail(`schedule name ${JSON.stringify(name)}: 1-64 letters, digits, '-', '_' or '.' (it names the snapshots it takes)`);
  }
  if (f.vmId === "") return fail("choose the VM to snapshot");
  const unit = UNITS.find((u) => u.letter === f.unit);
  if (unit === undefined || !Number.isInteger(f.count) || f.count < 1) return fail("the period is a whole number (1 or more) of minutes, hours, days or weeks");
  const every = f.count * unit.seconds;
  if (every < MIN_EVERY_SECONDS || every > MAX_EVERY_SECONDS) return fail(`every ${period(every)}: the period is 1m to 366d`);
  let at = 0;
  if (f.at.trim() !== "") {
    const c = parseClock(f.at);
    if ("error" in c) return fail(c.error);
    at = c.seconds;
  }
  if (isWeekly(every)) {
    if (!Number.isInteger(f.day) || f.day < 0 || f.day > 6) return fail("choose a weekday");
    at += f.day * DAY;
  }
  if (at >= every) {
    const when = isWeekly(every) ? `${WEEKDAYS[f.day]} ${f.at.trim()}` : f.at.trim();
    return fail(`${when} is not within the period of ${period(every)}: runs are at that time past each period's start (midnight UTC, or Monday's for weekly periods)`);
  }
  const dir = f.backupDir.trim();
  if (dir !== "" && (!dir.startsWith("/") || dir.split("/").includes(".."))) {
    return fail(`backup directory ${JSON.stringify(dir)}: an absolute path without . or .. is needed`);
  }
  if (dir !== "" && f.checkpoint) return fail("a backup schedule backs up the disks: choose snapshots or a backup directory, not both");
  const keeps: [string, number][] = [
    ["keep last", f.keepLast],
    ["keep daily", f.keepDaily],
    ["keep weekly", f.keepWeekly],
  ];
  for (const [what, n] of keeps) {
    if (!Number.isInteger(n) || n < 0 || n > U32) return fail(`${what} is a whole number, 0 or more (0: that rule keeps none)`);
  }
  return {
    ok: true,
    schedule: create(ScheduleSchema, {
      name,
      vmId: f.vmId,
      kind: dir !== "" ? ScheduleKind.BACKUP : f.checkpoint ? ScheduleKind.CHECKPOINT : ScheduleKind.SNAPSHOT,
      directory: dir,
      everySeconds: every,
      atSeconds: at,
      retention: { keepLast: f.keepLast, keepDaily: f.keepDaily, keepWeekly: f.keepWeekly },
      disabled: f.disabled,
    }),
  };
}

/** Retention in poolctl's words: "all" when no rule is set. */
export function retention(r: { keepLast: number; keepDaily: number; keepWeekly: number } | undefined): string {
  if (r === undefined || (r.keepLast === 0 && r.keepDaily === 0 && r.keepWeekly === 0)) return "all";
  return `last ${r.keepLast}, daily ${r.keepDaily}, weekly ${r.keepWeekly}`;
}

export function kind(k: ScheduleKind): string {
  if (k === ScheduleKind.BACKUP) return "backup";
  return k === ScheduleKind.CHECKPOINT ? "checkpoint" : "snapshot";
}

/** A timestamp in UTC, as schedules are written: "2026-12-07 02:00 UTC"; "" when unset. */
export function utc(t: { seconds: bigint; nanos: number } | undefined): string {
  if (t === undefined) return "";
  const d = new Date(Number(t.seconds) * 1000);
  const date = `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  const secs = d.getUTCSeconds();
  return `${date} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}${secs === 0 ? "" : `:${pad(secs)}`} UTC`;
}
