import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ScheduleKind, ScheduleSchema } from "../src/gen/pool_pb";
import { checkForm, clock, emptyForm, formatAt, isWeekly, parseClock, period, retention, splitPeriod, toForm, utc, type ScheduleForm } from "../src/schedule";

const form = (f: Partial<ScheduleForm>): ScheduleForm => ({ ...emptyForm(), name: "nightly", vmId: "vm1", ...f });
const error = (f: Partial<ScheduleForm>) => {
  const c = checkForm(form(f));
  return c.ok ? "" : c.error;
};

describe("periods", () => {
  it("read as poolctl prints them: the largest whole unit", () => {
    expect(period(86_400)).toBe("1d");
    expect(period(5400)).toBe("90m");
    expect(period(1_209_600)).toBe("2w");
    expect(period(90)).toBe("90s");
    expect(period(0)).toBe("0s");
  });

  it("split into the form's number and unit", () => {
    expect(splitPeriod(86_400)).toEqual({ count: 1, unit: "d" });
    expect(splitPeriod(21_600)).toEqual({ count: 6, unit: "h" });
    expect(splitPeriod(604_800 * 2)).toEqual({ count: 2, unit: "w" });
    expect(splitPeriod(5400)).toEqual({ count: 90, unit: "m" });
    expect(isWeekly(604_800)).toBe(true);
    expect(isWeekly(86_400)).toBe(false);
  });
});

describe("at", () => {
  it("parses HH:MM and refuses what is not a time of day", () => {
    expect(parseClock("02:30")).toEqual({ seconds: 9000 });
    expect(parseClock(" 7:05 ")).toEqual({ seconds: 7 * 3600 + 300 });
    expect(parseClock("24:00")).toHaveProperty("error", '"24:00": HH:MM, 00:00 to 23:59');
    expect(parseClock("12:60")).toHaveProperty("error");
    expect(parseClock("noon")).toHaveProperty("error", '"noon" is not a time: HH:MM, 00:00 to 23:59');
  });

  it("reads as a weekday for weekly periods, a time for daily ones, an offset otherwise", () => {
    expect(clock(9000)).toBe("02:30");
    expect(clock(9005)).toBe("02:30:05");
    expect(formatAt(6 * 86_400 + 3 * 3600, 604_800)).toBe("Sun 03:00");
    expect(formatAt(0, 604_800)).toBe("Mon 00:00");
    expect(formatAt(7200, 86_400)).toBe("02:00");
    expect(formatAt(7200, 2 * 86_400)).toBe("02:00");
    expect(formatAt(2700, 3600)).toBe("+45m");
    expect(formatAt(0, 3600)).toBe("0s");
  });
});

describe("the form", () => {
  it("builds what SetSchedule takes: daily at 02:00, keep last 1", () => {
    const c = checkForm(form({ at: "02:00", keepLast: 1 }));
    expect(c.ok).toBe(true);
    if (!c.ok) return;
    expect(c.schedule.name).toBe("nightly");
    expect(c.schedule.vmId).toBe("vm1");
    expect(c.schedule.kind).toBe(ScheduleKind.SNAPSHOT);
    expect(c.schedule.everySeconds).toBe(86_400);
    expect(c.schedule.atSeconds).toBe(7200);
    expect(c.schedule.retention).toMatchObject({ keepLast: 1, keepDaily: 0, keepWeekly: 0 });
    expect(c.schedule.disabled).toBe(false);
  });

  it("makes a backup schedule of a directory, and keeps it when the schedule is edited", () => {
    const c = checkForm(form({ backupDir: " /srv/backups/web ", keepLast: 7 }));
    expect(c.ok && c.schedule.kind).toBe(ScheduleKind.BACKUP);
    expect(c.ok && c.schedule.directory).toBe("/srv/backups/web");
    if (!c.ok) return;
    expect(toForm(c.schedule)).toMatchObject({ backupDir: "/srv/backups/web", checkpoint: false, keepLast: 7 });
    expect(checkForm(form({ backupDir: "backups" }))).toEqual({ ok: false, error: 'backup directory "backups": an absolute path without . or .. is needed' });
    expect(checkForm(form({ backupDir: "/srv/../etc" })).ok).toBe(false);
    expect(checkForm(form({ backupDir: "/srv/b", checkpoint: true })).ok).toBe(false);
    // Not a backup: no directory sent.
    const s = checkForm(form({}));
    expect(s.ok && s.schedule.directory).toBe("");
  });

  it("counts a weekly period's time from Monday's midnight", () => {
    const c = checkForm(form({ count: 1, unit: "w", day: 6, at: "03:00", checkpoint: true }));
    expect(c.ok && c.schedule.atSeconds).toBe(6 * 86_400 + 3 * 3600);
    expect(c.ok && c.schedule.kind).toBe(ScheduleKind.CHECKPOINT);
    // The weekday is not read for a period of days.
    const d = checkForm(form({ count: 2, unit: "d", day: 6, at: "03:00" }));
    expect(d.ok && d.schedule.atSeconds).toBe(3 * 3600);
    // No time: the period's start.
    const s = checkForm(form({ count: 6, unit: "h", at: "" }));
    expect(s.ok && s.schedule.atSeconds).toBe(0);
  });

  it("says what the pool would refuse", () => {
    expect(error({ name: "" })).toMatch(/^schedule name "": 1-64 letters, digits/);
    expect(error({ name: "my schedule" })).toMatch(/1-64 letters/);
    expect(error({ name: "x".repeat(65) })).toMatch(/1-64 letters/);
    expect(error({ vmId: "" })).toBe("choose the VM to snapshot");
    expect(error({ count: 0 })).toMatch(/whole number \(1 or more\)/);
    expect(error({ count: 1.5 })).toMatch(/whole number/);
    expect(error({ count: 367, unit: "d" })).toBe("every 367d: the period is 1m to 366d");
    expect(error({ count: 53, unit: "w" })).toMatch(/the period is 1m to 366d/);
    expect(error({ count: 6, unit: "h", at: "07:00" })).toMatch(/^07:00 is not within the period of 6h/);
    expect(error({ count: 1, unit: "h", at: "00:59" })).toBe("");
    expect(error({ count: 1, unit: "h", at: "01:00" })).toMatch(/not within the period of 1h/);
    expect(error({ at: "25:00" })).toMatch(/HH:MM, 00:00 to 23:59/);
    expect(error({ keepLast: -1 })).toMatch(/^keep last is a whole number/);
    expect(error({ keepWeekly: 0.5 })).toMatch(/^keep weekly/);
    expect(error({ count: 366, unit: "d", at: "23:59" })).toBe("");
    expect(error({ count: 1, unit: "m", at: "" })).toBe("");
  });

  it("shows a schedule the pool has as it was written", () => {
    const s = create(ScheduleSchema, {
      name: "weekly",
      vmId: "vm1",
      kind: ScheduleKind.CHECKPOINT,
      everySeconds: 604_800,
      atSeconds: 6 * 86_400 + 3 * 3600,
      retention: { keepLast: 2, keepWeekly: 4 },
      disabled: true,
    });
    const f = toForm(s);
    expect(f).toMatchObject({ name: "weekly", count: 1, unit: "w", day: 6, at: "03:00", checkpoint: true, keepLast: 2, keepDaily: 0, keepWeekly: 4, disabled: true });
    expect(f.backupDir).toBe("");
    const again = checkForm(f);
    expect(again.ok && again.schedule).toEqual(s);
  });
});

describe("retention and times", () => {
  it("in poolctl's words", () => {
    expect(retention({ keepLast: 0, keepDaily: 0, keepWeekly: 0 })).toBe("all");
    expect(retention(undefined)).toBe("all");
    expect(retention({ keepLast: 1, keepDaily: 0, keepWeekly: 0 })).toBe("last 1, daily 0, weekly 0");
    expect(retention({ keepLast: 7, keepDaily: 14, keepWeekly: 8 })).toBe("last 7, daily 14, weekly 8");
  });

  it("times are UTC", () => {
    // 2026-12-07 is a Monday.
    expect(utc({ seconds: BigInt(Date.UTC(2026, 11, 7, 2, 0) / 1000), nanos: 0 })).toBe("2026-12-07 02:00 UTC");
    expect(utc({ seconds: BigInt(Date.UTC(2026, 11, 7, 2, 0, 9) / 1000), nanos: 0 })).toBe("2026-12-07 02:00:09 UTC");
    expect(utc(undefined)).toBe("");
  });
});
