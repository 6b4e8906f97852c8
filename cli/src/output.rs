//! Tables for people, JSON for scripts: every listing is built once as rows of named
//! fields and printed either way; and how the pool's values read for people (sizes, ages,
//! state names).

use std::io::{IsTerminal, Write};

use proto::coordinator as pb;
use proto::host as hpb;

/// One value of a row: text, or a number that JSON keeps as a number.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i128),
    /// Printed for people with up to two decimals and an SI prefix past 10,000.
    Float(f64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i128::from(v))
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i128::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Float(v) => human_number(*v),
            Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        }
    }

    fn json(&self) -> String {
        match self {
            Value::Text(s) => json_string(s),
            Value::Int(i) => i.to_string(),
            Value::Float(v) if v.is_finite() => v.to_string(),
            Value::Float(_) => "null".to_owned(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Rows with the same fields, in order.
#[derive(Debug, Default)]
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    pub fn new(columns: &[&'static str]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, values: Vec<Value>) {
        debug_assert_eq!(values.len(), self.columns.len());
        self.rows.push(values);
    }

    pub fn render(&self, json: bool) -> String {
        if json {
            let rows: Vec<String> = self
                .rows
                .iter()
                .map(|r| {
                    let fields: Vec<String> = self
                        .columns
                        .iter()
                        .zip(r)
                        .map(|(c, v)| format!("{}: {}", json_string(&c.to_lowercase()), v.json()))
                        .collect();
                    format!("  {{{}}}", fields.join(", "))
                })
                .collect();
            return if rows.is_empty() {
                "[]\n".to_owned()
            } else {
                format!("[\n{}\n]\n", rows.join(",\n"))
            };
        }
        let texts: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(Value::text).collect())
            .collect();
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                texts
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([c.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let line = |cells: Vec<String>, out: &mut String| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(padded.join("  ").trim_end());
            out.push('\n');
        };
        line(
            self.columns.iter().map(|c| c.to_string()).collect(),
            &mut out,
        );
        for r in texts {
            line(r, &mut out);
        }
        out
    }
}

/// A number for people: 12.5, 1.23 k, 4.5 G (SI prefixes past 10,000).
pub fn human_number(v: f64) -> String {
    const PREFIXES: [&str; 5] = ["", " k", " M", " G", " T"];
    let mut x = v;
    let mut p = 0;
    while x.abs() >= 10_000.0 && p < PREFIXES.len() - 1 {
        x /= 1000.0;
        p += 1;
    }
    let s = format!("{x:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{}", PREFIXES[p])
}

/// Binary sizes for people: 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses "4096", "512M", "20G", "1.5T" (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    if v.is_nan() || v < 0.0 || v * mult as f64 > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((v * mult as f64) as u64)
}

/// How long ago `t` was, for people ("5m ago"); "-" when unset.
pub fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let now = proto::unix_ms() / 1000;
            // A time to come (a schedule's next run) reads "in 5m".
            let (d, before, after) = if secs > now {
                (secs - now, "in ", "")
            } else {
                (now - secs, "", " ago")
            };
            let n = match d {
                0..=59 => format!("{d}s"),
                60..=3599 => format!("{}m", d / 60),
                3600..=86399 => format!("{}h", d / 3600),
                _ => format!("{}d", d / 86400),
            };
            Some(format!("{before}{n}{after}"))
        })
        .unwrap_or_else(|| "-".into())
}

/// What a table shows for nothing: "-".
pub fn or_dash(s: String) -> String {
    if s.is_empty() { "-".to_owned() } else { s }
}

/// A protobuf enum value's name without its prefix, in kebab case ("HOST_STATE_ENABLED" →
/// "enabled"); "?" for a value this poolctl does not know.
pub fn enum_name(name: Option<&str>, prefix: &str) -> String {
    name.map(|n| {
        n.trim_start_matches(prefix)
            .to_lowercase()
            .replace('_', "-")
    })
    .unwrap_or_else(|| "?".into())
}

pub fn host_state(v: i32) -> String {
    enum_name(
        pb::HostState::try_from(v).ok().map(|s| s.as_str_name()),
        "HOST_STATE_",
    )
}

pub fn power(v: i32) -> String {
    enum_name(
        hpb::PowerState::try_from(v).ok().map(|s| s.as_str_name()),
        "POWER_STATE_",
    )
}

pub fn task_state(v: i32) -> String {
    enum_name(
        pb::TaskState::try_from(v).ok().map(|s| s.as_str_name()),
        "TASK_STATE_",
    )
}

/// A one-line progress bar on stderr, redrawn in place when stderr is a terminal.
pub struct Progress {
    tty: bool,
    last: String,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
        }
    }

    pub fn show(&mut self, percent: u32, message: &str) {
        let filled = (percent.min(100) / 5) as usize;
        let line = format!(
            "[{}{}] {:>3}% {}",
            "#".repeat(filled),
            ".".repeat(20 - filled),
            percent.min(100),
            message
        );
        if line == self.last {
            return;
        }
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        self.last = line;
    }

    pub fn done(&mut self) {
        if self.tty && !self.last.is_empty() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_json_show_the_same_rows() {
        let mut t = Table::new(&["ID", "NAME", "SIZE", "UP"]);
        t.row(vec![
            "a1".into(),
            "web \"1\"".into(),
            1024u64.into(),
            true.into(),
        ]);
        t.row(vec!["b2".into(), "db".into(), 5u64.into(), false.into()]);
        let text = t.render(false);
        assert_eq!(text.lines().next().unwrap(), "ID  NAME     SIZE  UP");
        assert!(text.contains("a1  web \"1\"  1024  yes"));
        let json = t.render(true);
        assert!(
            json.contains(r#"{"id": "a1", "name": "web \"1\"", "size": 1024, "up": true}"#),
            "{json}"
        );
        assert_eq!(Table::new(&["X"]).render(true), "[]\n");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("3X").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10), "10 B");
    }
}
