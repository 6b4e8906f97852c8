//! The CMOS real-time clock (MC146818) on ports 0x70 (index) and 0x71 (data): the time
//! of day from the host's UTC clock plus an offset the guest sets, and 128 bytes of NVRAM.
//!
//! Without it the ports read 0xff, so "update in progress" looks set forever: older Linux
//! spins on it, newer gives up and has no wall clock unless kvmclock provides one. Here
//! an update is never in progress, and no alarm or periodic interrupt is offered (the
//! DSDT gives the RTC no IRQ).

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::BusDevice;
use crate::vmm::layout::CMOS_CENTURY;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

/// Register A: update in progress (never, here).
const A_UIP: u8 = 0x80;
/// Register A after reset: 32.768 kHz time base, 1024 Hz rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates stopped while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B: binary rather than BCD.
const B_DM: u8 = 0x04;
/// Register B: 24-hour rather than 12-hour.
const B_24H: u8 = 0x02;
/// Register D: valid RAM and time (the battery is fine).
const D_VRT: u8 = 0x80;
/// 12-hour mode: the hour's PM flag.
const HOUR_PM: u8 = 0x80;

const NVRAM_LEN: usize = 128;
const OFFSET_INDEX: u64 = 0;
const OFFSET_DATA: u64 = 1;

/// The RTC's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcState {
    /// The index register (without the NMI mask bit).
    pub index: u8,
    /// Guest time minus host UTC, in seconds.
    pub offset_s: i64,
    /// Every register, time registers included (they hold what the guest wrote while
    /// SET is on).
    pub nvram: [u8; NVRAM_LEN],
}

impl Default for RtcState {
    fn default() -> Self {
        let mut nvram = [0u8; NVRAM_LEN];
        nvram[REG_A as usize] = A_DEFAULT;
        nvram[REG_B as usize] = B_24H;
        Self {
            index: 0,
            offset_s: 0,
            nvram,
        }
    }
}

/// A calendar date and time of day (UTC, proleptic Gregorian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    pub fn from_unix(secs: i64) -> Self {
        let (year, month, day) = proto::civil_from_days(secs.div_euclid(86_400));
        let s = secs.rem_euclid(86_400);
        Self {
            year,
            month,
            day,
            hour: (s / 3600) as u8,
            minute: (s / 60 % 60) as u8,
            second: (s % 60) as u8,
        }
    }

    pub fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// 1 = Sunday, as the RTC counts.
    fn weekday(self) -> u8 {
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u8 + 1
    }
}

pub fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

pub fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

fn host_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub struct Rtc {
    s: RtcState,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    pub fn new() -> Self {
        Self::from_state(RtcState::default())
    }

    pub fn from_state(s: RtcState) -> Self {
        Self { s }
    }

    pub fn state(&self) -> RtcState {
        self.s.clone()
    }

    fn reg(&self, r: u8) -> u8 {
        self.s.nvram[r as usize]
    }

    /// A value in the guest's chosen format (BCD or binary).
    fn encode(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_DM != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_DM != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & !HOUR_PM) % 12;
        if v & HOUR_PM != 0 { h + 12 } else { h }
    }

    /// Writes the time `now` (host seconds) shows into the time registers.
    fn latch(&mut self, now: i64) {
        let t = DateTime::from_unix(now + self.s.offset_s);
        let year = t.year.rem_euclid(10_000);
        let regs = [
            (REG_SECONDS, self.encode(t.second)),
            (REG_MINUTES, self.encode(t.minute)),
            (REG_HOURS, self.encode_hour(t.hour)),
            (REG_WEEKDAY, self.encode(t.weekday())),
            (REG_DAY, self.encode(t.day)),
            (REG_MONTH, self.encode(t.month)),
            (REG_YEAR, self.encode((year % 100) as u8)),
            (CMOS_CENTURY, self.encode((year / 100) as u8)),
        ];
        for (r, v) in regs {
            self.s.nvram[r as usize] = v;
        }
    }

    /// Takes the time registers as the guest's new time: the offset from `now`.
    /// Nonsense dates (month 13, day 0) leave the offset as it was.
    fn commit(&mut self, now: i64) {
        let t = DateTime {
            year: i64::from(self.decode(self.reg(CMOS_CENTURY))) * 100
                + i64::from(self.decode(self.reg(REG_YEAR))),
            month: self.decode(self.reg(REG_MONTH)),
            day: self.decode(self.reg(REG_DAY)),
            hour: self.decode_hour(self.reg(REG_HOURS)),
            minute: self.decode(self.reg(REG_MINUTES)),
            second: self.decode(self.reg(REG_SECONDS)),
        };
        let valid = (1..=12).contains(&t.month)
            && (1..=31).contains(&t.day)
            && t.hour < 24
            && t.minute < 60
            && t.second < 60;
        if valid {
            self.s.offset_s = t.to_unix() - now;
        } else {
            tracing::debug!(?t, "guest set an invalid RTC time; ignored");
        }
    }

    fn is_time_reg(r: u8) -> bool {
        matches!(
            r,
            REG_SECONDS
                | REG_MINUTES
                | REG_HOURS
                | REG_WEEKDAY
                | REG_DAY
                | REG_MONTH
                | REG_YEAR
                | CMOS_CENTURY
        )
    }

    fn read_data(&mut self, now: i64) -> u8 {
        let r = self.s.index;
        let setting = self.reg(REG_B) & B_SET != 0;
        match r {
            _ if Self::is_time_reg(r) && !setting => {
                self.latch(now);
                self.reg(r)
            }
            REG_A => self.reg(REG_A) & !A_UIP,
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.reg(r),
        }
    }

    fn write_data(&mut self, value: u8, now: i64) {
        let r = self.s.index;
        let setting = self.reg(REG_B) & B_SET != 0;
        match r {
            REG_A => self.s.nvram[r as usize] = value & !A_UIP,
            REG_B => {
                if value & B_SET != 0 && !setting {
                    // Updates stop: the registers hold the time the guest edits.
                    self.latch(now);
                }
                self.s.nvram[r as usize] = value;
                if value & B_SET == 0 && setting {
                    self.commit(now);
                }
            }
            REG_C | REG_D => {}
            _ if Self::is_time_reg(r) && !setting => {
                // One field changed while the clock runs: the rest keep their time.
                self.latch(now);
                self.s.nvram[r as usize] = value;
                self.commit(now);
            }
            _ => self.s.nvram[r as usize] = value,
        }
    }

    fn read_at(&mut self, offset: u64, now: i64) -> u8 {
        match offset {
            OFFSET_DATA => self.read_data(now),
            _ => 0xff,
        }
    }

    fn write_at(&mut self, offset: u64, value: u8, now: i64) {
        match offset {
            // Bit 7 masks NMIs on a PC; there is nothing to mask here.
            OFFSET_INDEX => self.s.index = value & 0x7f,
            OFFSET_DATA => self.write_data(value, now),
            _ => {}
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.read_at(offset, host_now());
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.write_at(offset, v, host_now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-04 17:40:05 UTC, a Friday.
    const NOW: i64 = 1_796_406_005;

    fn read(rtc: &mut Rtc, r: u8, now: i64) -> u8 {
        rtc.write_at(OFFSET_INDEX, r, now);
        rtc.read_at(OFFSET_DATA, now)
    }

    fn write(rtc: &mut Rtc, r: u8, v: u8, now: i64) {
        rtc.write_at(OFFSET_INDEX, r, now);
        rtc.write_at(OFFSET_DATA, v, now);
    }

    #[test]
    fn bcd_round_trips_every_two_digit_value() {
        assert_eq!(to_bcd(59), 0x59);
        assert_eq!(from_bcd(0x23), 23);
        for v in 0..100 {
            assert_eq!(from_bcd(to_bcd(v)), v);
        }
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(DateTime::from_unix(NOW).to_unix(), NOW);
        let t = DateTime::from_unix(NOW);
        assert_eq!((t.year, t.month, t.day), (2026, 12, 4));
        assert_eq!((t.hour, t.minute, t.second), (17, 40, 5));
        assert_eq!(t.weekday(), 6, "Friday");
        // Leap days and century rules, both ways, over four centuries.
        for days in (-146_097..146_097 * 2).step_by(13) {
            let (y, m, d) = proto::civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(
            proto::civil_from_days(days_from_civil(2024, 2, 29)),
            (2024, 2, 29)
        );
    }

    #[test]
    fn reads_the_host_time_in_bcd_24h_with_the_century() {
        let mut rtc = Rtc::new();
        assert_eq!(read(&mut rtc, REG_SECONDS, NOW), 0x05);
        assert_eq!(read(&mut rtc, REG_MINUTES, NOW), 0x40);
        assert_eq!(read(&mut rtc, REG_HOURS, NOW), 0x17);
        assert_eq!(read(&mut rtc, REG_DAY, NOW), 0x04);
        assert_eq!(read(&mut rtc, REG_MONTH, NOW), 0x12);
        assert_eq!(read(&mut rtc, REG_YEAR, NOW), 0x26);
        assert_eq!(read(&mut rtc, CMOS_CENTURY, NOW), 0x20);
        assert_eq!(read(&mut rtc, REG_WEEKDAY, NOW), 0x06);
        // The NMI-mask bit of the index is ignored.
        assert_eq!(read(&mut rtc, REG_HOURS | 0x80, NOW), 0x17);
        // Binary, 12-hour: 17 h is 5 PM.
        write(&mut rtc, REG_B, B_DM, NOW);
        assert_eq!(read(&mut rtc, REG_HOURS, NOW), 5 | HOUR_PM);
        assert_eq!(read(&mut rtc, REG_MINUTES, NOW), 40);
    }

    #[test]
    fn status_registers_never_show_an_update_in_progress() {
        let mut rtc = Rtc::new();
        assert_eq!(read(&mut rtc, REG_A, NOW), A_DEFAULT);
        write(&mut rtc, REG_A, 0xff, NOW);
        assert_eq!(read(&mut rtc, REG_A, NOW) & A_UIP, 0);
        assert_eq!(read(&mut rtc, REG_B, NOW), B_24H);
        assert_eq!(read(&mut rtc, REG_C, NOW), 0);
        assert_eq!(read(&mut rtc, REG_D, NOW), D_VRT);
        write(&mut rtc, REG_D, 0, NOW);
        assert_eq!(read(&mut rtc, REG_D, NOW), D_VRT);
    }

    #[test]
    fn setting_the_time_with_set_moves_the_clock_and_it_keeps_running() {
        let mut rtc = Rtc::new();
        // Linux's mc146818_set_time: SET on, all fields, SET off. 2030-01-02 03:04:05.
        write(&mut rtc, REG_B, B_24H | B_SET, NOW);
        for (r, v) in [
            (REG_SECONDS, 0x05),
            (REG_MINUTES, 0x04),
            (REG_HOURS, 0x03),
            (REG_DAY, 0x02),
            (REG_MONTH, 0x01),
            (REG_YEAR, 0x30),
            (CMOS_CENTURY, 0x20),
        ] {
            write(&mut rtc, r, v, NOW);
        }
        // While SET is on, reads give what was written, whatever the host time.
        assert_eq!(read(&mut rtc, REG_MINUTES, NOW + 100), 0x04);
        write(&mut rtc, REG_B, B_24H, NOW + 1);
        let set = DateTime {
            year: 2030,
            month: 1,
            day: 2,
            hour: 3,
            minute: 4,
            second: 5,
        };
        assert_eq!(rtc.state().offset_s, set.to_unix() - (NOW + 1));
        assert_eq!(read(&mut rtc, REG_SECONDS, NOW + 1 + 70), 0x15);
        assert_eq!(read(&mut rtc, REG_MINUTES, NOW + 1 + 70), 0x05);
        assert_eq!(read(&mut rtc, REG_YEAR, NOW + 1 + 70), 0x30);
    }

    #[test]
    fn one_field_written_while_running_changes_only_that_field() {
        let mut rtc = Rtc::new();
        write(&mut rtc, REG_HOURS, 0x09, NOW);
        assert_eq!(read(&mut rtc, REG_HOURS, NOW), 0x09);
        assert_eq!(read(&mut rtc, REG_MINUTES, NOW), 0x40);
        assert_eq!(rtc.state().offset_s, -8 * 3600);
        // A nonsense date is ignored.
        write(&mut rtc, REG_MONTH, 0x13, NOW);
        assert_eq!(rtc.state().offset_s, -8 * 3600);
    }

    #[test]
    fn nvram_keeps_what_the_guest_writes_and_the_state_round_trips() {
        let mut rtc = Rtc::new();
        for r in 0x0e..0x80u8 {
            if r != CMOS_CENTURY {
                write(&mut rtc, r, r ^ 0x5a, NOW);
            }
        }
        write(&mut rtc, REG_HOURS, 0x09, NOW);
        write(&mut rtc, 0x20, 0x00, NOW);
        let state = rtc.state();
        let mut back = Rtc::from_state(state.clone());
        assert_eq!(back.state(), state);
        for r in 0x0e..0x80u8 {
            let want = if r == 0x20 { 0 } else { r ^ 0x5a };
            if r != CMOS_CENTURY {
                assert_eq!(read(&mut back, r, NOW), want, "register {r:#x}");
            }
        }
        assert_eq!(read(&mut back, REG_HOURS, NOW + 3600), 0x10);
    }
}
