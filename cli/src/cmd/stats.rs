//! A host's or a VM's metrics history (`QueryMetrics` with a step): one row per bucket
//! (its start, the average and the maximum of what fell in it) and a sparkline of the
//! averages. Counters come as rates per second.

use anyhow::bail;
use clap::Subcommand;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, human_number};

#[derive(Debug, Subcommand)]
pub enum StatsCommand {
    /// A VM's metrics history: vcpu_time_ns, rss_bytes, disk_read_bytes,
    /// disk_write_bytes, net_rx_bytes, net_tx_bytes (counters as rates per second).
    #[command(name = "vm-stats")]
    Vm {
        vm: String,
        #[arg(long, default_value = "vcpu_time_ns")]
        metric: String,
        /// How far back: 10m, 2h, 7d (s, m, h, d; up to 365d).
        #[arg(long, default_value = "10m", value_parser = parse_span)]
        since: u64,
    },
    /// A host's metrics history: cpu_percent, memory_used_bytes,
    /// memory_assigned_to_vms_bytes, vms_running.
    #[command(name = "host-stats")]
    Host {
        host: String,
        #[arg(long, default_value = "cpu_percent")]
        metric: String,
        /// How far back: 10m, 2h, 7d (s, m, h, d; up to 365d).
        #[arg(long, default_value = "10m", value_parser = parse_span)]
        since: u64,
    },
}

pub async fn run(ctl: &mut Ctl, command: StatsCommand) -> anyhow::Result<()> {
    let (target_id, metric, since) = match command {
        StatsCommand::Vm { vm, metric, since } => (ctl.vm_id(&vm).await?, metric, since),
        StatsCommand::Host {
            host,
            metric,
            since,
        } => (ctl.host_id(&host).await?, metric, since),
    };
    let from = (proto::unix_ms() / 1000).saturating_sub(since);
    let mut samples = Vec::new();
    let mut token = String::new();
    loop {
        let r = call!(
            ctl.client,
            query_metrics,
            pb::QueryMetricsRequest {
                target_id: target_id.clone(),
                metric: metric.clone(),
                since: Some(proto::timestamp(from * 1000)),
                until: None,
                step_seconds: step_for(since),
                page: Some(pb::PageRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                }),
            }
        )?;
        samples.extend(r.samples);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    if samples.is_empty() && !ctl.json {
        bail!(
            "no history of {metric} yet for {target_id} (this member keeps it from the reports it applied since it started)"
        );
    }
    ctl.print(&stats_table(&samples));
    if !ctl.json {
        let avgs: Vec<f64> = samples.iter().map(|s| s.value).collect();
        println!("{}", sparkline(&avgs));
    }
    Ok(())
}

/// Parses "90s", "10m", "2h", "7d" into seconds.
fn parse_span(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?}: give a number and s, m, h or d (10m, 2h, 7d)"
            ));
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (10m, 2h, 7d)"))?;
    match n.checked_mul(mult) {
        Some(v) if v > 0 && v <= 365 * 86_400 => Ok(v),
        _ => Err(format!("{s:?}: between 1s and 365d")),
    }
}

/// The bucket width that shows `since` seconds: the finest tier that still reaches back
/// that far (5 s for 10 minutes, 1 minute for 2 hours, 1 hour for a week, else 1 day).
fn step_for(since: u64) -> u32 {
    match since {
        0..=600 => 5,
        601..=7200 => 60,
        7201..=604_800 => 3600,
        _ => 86_400,
    }
}

fn stats_table(samples: &[pb::MetricSample]) -> Table {
    let mut t = Table::new(&["TIME", "AVG", "MAX"]);
    for s in samples {
        let at = s.at.as_ref().map_or(0, |t| t.seconds);
        t.row(vec![utc(at).into(), s.value.into(), s.max.into()]);
    }
    t
}

/// "2026-12-05 19:04:05" (UTC) from unix seconds.
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = proto::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The values as one line of block characters, the lowest ▁ and the highest █, followed
/// by the range they span.
pub fn sparkline(values: &[f64]) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let finite = || values.iter().copied().filter(|v| v.is_finite());
    let (Some(lo), Some(hi)) = (finite().reduce(f64::min), finite().reduce(f64::max)) else {
        return String::new();
    };
    let line: String = values
        .iter()
        .map(|v| {
            if !v.is_finite() {
                ' '
            } else if hi > lo {
                let i = ((v - lo) / (hi - lo) * 7.0).round() as usize;
                BLOCKS[i.min(7)]
            } else {
                BLOCKS[0]
            }
        })
        .collect();
    format!("{line}  {} .. {}", human_number(lo), human_number(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkline_spans_the_blocks_from_the_lowest_value_to_the_highest() {
        assert_eq!(
            sparkline(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]),
            "▁▂▃▄▅▆▇█  0 .. 7"
        );
        assert_eq!(sparkline(&[10.0, 40.0, 25.0]), "▁█▅  10 .. 40");
        assert_eq!(sparkline(&[3.0, 3.0]), "▁▁  3 .. 3");
        assert_eq!(sparkline(&[2e9, f64::NAN, 0.0]), "█ ▁  0 .. 2000 M");
        assert_eq!(sparkline(&[]), "");
    }

    #[test]
    fn spans_pick_the_tier_that_reaches_back_that_far() {
        assert_eq!(parse_span("10m"), Ok(600));
        assert_eq!(parse_span("2h"), Ok(7200));
        assert_eq!(parse_span("7d"), Ok(604_800));
        assert!(parse_span("10").is_err());
        assert!(parse_span("400d").is_err());
        assert_eq!(
            ["10m", "2h", "7d", "30d"].map(|s| step_for(parse_span(s).unwrap())),
            [5, 60, 3600, 86_400]
        );
    }

    #[test]
    fn buckets_print_their_utc_start_average_and_maximum() {
        let t = stats_table(&[pb::MetricSample {
            at: Some(proto::timestamp(1_764_961_445_000)),
            value: 12.5,
            max: 31_000.0,
        }]);
        assert_eq!(
            t.render(false),
            "TIME                 AVG   MAX\n2025-12-05 19:04:05  12.5  31 k\n"
        );
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
    }
}
