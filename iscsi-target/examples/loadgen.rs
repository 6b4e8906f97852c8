//! A fixed-load iSCSI client for benchmarks: one session, a fixed queue depth of READ(16)
//! or WRITE(16) commands (random 4 KiB or sequential 1 MiB, say) for a fixed time, the
//! same client for every target compared. Writes use immediate data, unsolicited Data-Out
//! and R2T as the target negotiates. Prints one line: `iops=N mib_s=N lat_us=N`.
//!
//! With `--local FILE` it measures the file itself instead (pread/pwrite from QD threads),
//! the "raw" row of the benchmark. With `--tcp-ceiling` it measures the most any target
//! could send over loopback TCP here: one thread writes a cached `--bs` buffer over and
//! over, another reads it (no storage, no iSCSI). With `--once` it covers the span once
//! (sequentially) and stops, to fill a LUN before it is measured.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::Parser;
use iscsi_pdu::bhs::{DataOut, Header, LoginRequest, RESERVED_TAG, ScsiCommand, stage};
use iscsi_pdu::frame::{self, FrameConfig};
use iscsi_pdu::text;

#[derive(Parser, Debug, Clone)]
#[command(about = "Fixed-load iSCSI client")]
struct Args {
    /// iscsi://HOST:PORT/IQN/LUN
    #[arg(long)]
    url: Option<String>,
    /// Measure this file locally instead of a target.
    #[arg(long)]
    local: Option<std::path::PathBuf>,
    /// read or write.
    #[arg(long, default_value = "write")]
    op: String,
    /// Bytes per command.
    #[arg(long, default_value_t = 4096)]
    bs: u64,
    /// Commands in flight.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Random offsets (else sequential).
    #[arg(long)]
    random: bool,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes of the LUN (or file) to use; the LUN's capacity when left out.
    #[arg(long)]
    span: Option<u64>,
    #[arg(long, default_value = "iqn.2024-01.org.pool:loadgen")]
    initiator: String,
    /// Cover the span once, sequentially, then stop (instead of running --seconds).
    #[arg(long)]
    once: bool,
    /// Measure a plain loopback TCP stream instead of a target or file.
    #[arg(long)]
    tcp_ceiling: bool,
}

struct Stats {
    ios: AtomicU64,
    lat_ns: AtomicU64,
}

/// Offsets: random over the span, or sequential wrapping around.
struct Offsets {
    random: bool,
    bs: u64,
    slots: u64,
    next: u64,
    rng: u64,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        let slot = if self.random {
            // xorshift64*: cheap and good enough to spread offsets.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.slots
        } else {
            let s = self.next % self.slots;
            self.next += 1;
            s
        };
        slot * self.bs
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.op != "read" && args.op != "write" {
        bail!("--op is read or write");
    }
    let (ios, secs, lat_ns) = match (&args.local, &args.url) {
        _ if args.tcp_ceiling => tcp_ceiling(&args)?,
        (Some(path), _) => local(&args, path)?,
        (None, Some(url)) => remote(&args, url)?,
        _ => bail!("give --url or --local"),
    };
    let iops = ios as f64 / secs;
    let mib_s = iops * args.bs as f64 / (1 << 20) as f64;
    let lat_us = if ios > 0 {
        lat_ns as f64 / ios as f64 / 1000.0
    } else {
        0.0
    };
    println!("iops={iops:.0} mib_s={mib_s:.1} lat_us={lat_us:.1}");
    Ok(())
}

/// One sender writing the same cached buffer, one receiver reading into its own, over
/// loopback TCP: the ceiling for any target's sequential reads on this machine.
fn tcp_ceiling(args: &Args) -> anyhow::Result<(u64, f64, u64)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let bs = args.bs as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut s = TcpStream::connect(addr)?;
            let buf = vec![0x5au8; bs];
            while !stop.load(Ordering::Relaxed) {
                s.write_all(&buf)?;
            }
            Ok(())
        })
    };
    let (mut rx, _) = listener.accept()?;
    let mut buf = vec![0u8; bs];
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut bytes = 0u64;
    while Instant::now() < deadline {
        rx.read_exact(&mut buf)?;
        bytes += bs as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    // The sender ends with a write error once the receiver is gone.
    let _ = sender.join();
    Ok((bytes / args.bs, elapsed, 0))
}

fn local(args: &Args, path: &std::path::Path) -> anyhow::Result<(u64, f64, u64)> {
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(args.op == "write")
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?,
    );
    let span = args.span.unwrap_or(file.metadata()?.len());
    let stats = Arc::new(Stats {
        ios: AtomicU64::new(0),
        lat_ns: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..args.qd)
        .map(|t| {
            let (file, stats, stop, args) =
                (file.clone(), stats.clone(), stop.clone(), args.clone());
            std::thread::spawn(move || {
                let mut offs = Offsets {
                    random: args.random,
                    bs: args.bs,
                    slots: (span / args.bs).max(1),
                    next: t as u64 * (span / args.bs / args.qd as u64),
                    rng: 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1),
                };
                let mut buf = vec![0x5au8; args.bs as usize];
                while !stop.load(Ordering::Relaxed) {
                    let off = offs.next();
                    let t0 = Instant::now();
                    if args.op == "read" {
                        file.read_exact_at(&mut buf, off).expect("pread");
                    } else {
                        file.write_all_at(&buf, off).expect("pwrite");
                    }
                    stats
                        .lat_ns
                        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    stats.ios.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("worker");
    }
    Ok((
        stats.ios.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        stats.lat_ns.load(Ordering::Relaxed),
    ))
}

struct Url {
    addr: String,
    iqn: String,
    lun: u16,
}

fn parse_url(url: &str) -> anyhow::Result<Url> {
    let rest = url
        .strip_prefix("iscsi://")
        .context("URL must start with iscsi://")?;
    let mut parts = rest.splitn(3, '/');
    let addr = parts.next().context("no portal")?.to_string();
    let iqn = parts.next().context("no target name")?.to_string();
    let lun = parts.next().context("no LUN")?.parse()?;
    Ok(Url { addr, iqn, lun })
}

/// What login settled.
struct Negotiated {
    immediate_data: bool,
    initial_r2t: bool,
    first_burst: u64,
    /// The target's MaxRecvDataSegmentLength: the longest Data-Out segment we may send.
    target_mrdsl: u64,
    cmd_sn: u32,
}

fn send(stream: &mut TcpStream, h: &Header, data: &[u8]) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(64 + data.len());
    frame::encode(h, &[], data, &FrameConfig::default(), &mut out)?;
    stream.write_all(&out)?;
    Ok(())
}

struct Reader {
    stream: TcpStream,
    buf: BytesMut,
    cfg: FrameConfig,
}

impl Reader {
    fn next(&mut self) -> anyhow::Result<iscsi_pdu::RawPdu> {
        loop {
            if let Some(p) = frame::decode(&mut self.buf, &self.cfg)? {
                return Ok(p);
            }
            let mut chunk = [0u8; 256 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("target closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn login(
    stream: &mut TcpStream,
    reader: &mut Reader,
    args: &Args,
    url: &Url,
) -> anyhow::Result<Negotiated> {
    let isid = [0x80, 0x12, 0x34, 0x56, 0x78, std::process::id() as u8];
    let mut req = LoginRequest {
        transit: true,
        csg: stage::SECURITY,
        nsg: stage::OPERATIONAL,
        isid,
        itt: 1,
        cmd_sn: 1,
        ..Default::default()
    };
    let keys = text::encode(&[
        ("InitiatorName", args.initiator.as_str()),
        ("SessionType", "Normal"),
        ("TargetName", url.iqn.as_str()),
        ("AuthMethod", "None"),
    ]);
    send(stream, &Header::LoginRequest(req), &keys)?;
    let mut exp_stat_sn = expect_login(reader)?.1;
    req.csg = stage::OPERATIONAL;
    req.nsg = stage::FULL_FEATURE;
    req.exp_stat_sn = exp_stat_sn;
    let keys = text::encode(&[
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("FirstBurstLength", "262144"),
        ("MaxBurstLength", "1048576"),
        ("MaxOutstandingR2T", "1"),
        ("ErrorRecoveryLevel", "0"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
    ]);
    send(stream, &Header::LoginRequest(req), &keys)?;
    let (pairs, sn) = expect_login(reader)?;
    exp_stat_sn = sn;
    let _ = exp_stat_sn;
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    Ok(Negotiated {
        immediate_data: get("ImmediateData") == Some("Yes"),
        initial_r2t: get("InitialR2T") != Some("No"),
        first_burst: get("FirstBurstLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(65536),
        target_mrdsl: get("MaxRecvDataSegmentLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192),
        cmd_sn: 1,
    })
}

fn expect_login(reader: &mut Reader) -> anyhow::Result<(Vec<(String, String)>, u32)> {
    let p = reader.next()?;
    match p.header()? {
        Header::LoginResponse(r) if r.status_class == 0 => {
            Ok((text::parse(&p.data)?, r.stat_sn.wrapping_add(1)))
        }
        Header::LoginResponse(r) => bail!("login refused: {}/{}", r.status_class, r.status_detail),
        other => bail!("unexpected {other:?} during login"),
    }
}

/// One run of Data-Out: `offset..offset+len` of task `itt`, answering R2T `ttt` (or
/// unsolicited with the reserved tag).
struct Burst {
    itt: u32,
    ttt: u32,
    lun: u64,
    offset: u64,
    len: u64,
}

/// Sends the Data-Out PDUs of a burst, `seg` bytes at most each.
fn data_out(w: &mut TcpStream, b: Burst, payload: &[u8], seg: u64) -> anyhow::Result<()> {
    let Burst {
        itt,
        ttt,
        lun,
        offset,
        len,
    } = b;
    let mut out = Vec::with_capacity(len as usize + 64);
    let mut at = offset;
    let mut sn = 0;
    while at < offset + len {
        let n = seg.min(offset + len - at);
        let d = DataOut {
            final_: at + n == offset + len,
            lun,
            itt,
            ttt,
            data_sn: sn,
            buffer_offset: at as u32,
            ..Default::default()
        };
        frame::encode(
            &Header::DataOut(d),
            &[],
            &payload[at as usize..(at + n) as usize],
            &FrameConfig::default(),
            &mut out,
        )?;
        sn += 1;
        at += n;
    }
    w.write_all(&out)?;
    Ok(())
}

fn capacity(
    stream: &mut TcpStream,
    reader: &mut Reader,
    lun: u64,
    cmd_sn: &mut u32,
) -> anyhow::Result<u64> {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let c = ScsiCommand {
        final_: true,
        read: true,
        attr: 1,
        lun,
        itt: 2,
        expected_data_len: 32,
        cmd_sn: *cmd_sn,
        cdb,
        ..ScsiCommand::default_for_tool()
    };
    *cmd_sn += 1;
    send(stream, &Header::ScsiCommand(c), &[])?;
    let mut data = Vec::new();
    loop {
        let p = reader.next()?;
        match p.header()? {
            Header::DataIn(d) => {
                data.extend_from_slice(&p.data);
                if d.has_status {
                    break;
                }
            }
            Header::ScsiResponse(r) if r.status == 0 => break,
            Header::ScsiResponse(r) => bail!("READ CAPACITY failed: status {}", r.status),
            Header::NopIn(_) | Header::AsyncMessage(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    if data.len() < 12 {
        bail!("short READ CAPACITY data");
    }
    let last = u64::from_be_bytes(data[..8].try_into()?);
    let bs = u32::from_be_bytes(data[8..12].try_into()?);
    Ok((last + 1) * u64::from(bs))
}

trait ToolDefault {
    fn default_for_tool() -> Self;
}

impl ToolDefault for ScsiCommand {
    fn default_for_tool() -> Self {
        ScsiCommand {
            immediate: false,
            final_: true,
            read: false,
            write: false,
            attr: 1,
            lun: 0,
            itt: 0,
            expected_data_len: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
            cdb: [0; 16],
        }
    }
}

fn remote(args: &Args, url: &str) -> anyhow::Result<(u64, f64, u64)> {
    let url = parse_url(url)?;
    let mut stream =
        TcpStream::connect(&url.addr).with_context(|| format!("connecting {}", url.addr))?;
    stream.set_nodelay(true)?;
    let mut reader = Reader {
        stream: stream.try_clone()?,
        buf: BytesMut::with_capacity(1 << 20),
        cfg: FrameConfig {
            max_recv_data_segment: 1 << 24,
            ..FrameConfig::default()
        },
    };
    let neg = login(&mut stream, &mut reader, args, &url)?;
    let lun_field = iscsi_pdu::bhs::encode_lun(url.lun);
    let mut cmd_sn = neg.cmd_sn;
    // A new nexus may first get a unit attention (power on, reset): ask again.
    let mut cap = Err(anyhow::anyhow!("no answer"));
    for _ in 0..5 {
        cap = capacity(&mut stream, &mut reader, lun_field, &mut cmd_sn);
        if cap.is_ok() {
            break;
        }
    }
    let cap = cap?;
    let span = args.span.unwrap_or(cap).min(cap);
    let bs = args.bs;
    let write = args.op == "write";
    let payload: Arc<Vec<u8>> = Arc::new((0..bs).map(|i| (i * 7 + 3) as u8).collect());
    // In-flight commands: ITT → start time.
    let inflight: Arc<(Mutex<HashMap<u32, Instant>>, Condvar)> =
        Arc::new((Mutex::new(HashMap::new()), Condvar::new()));
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let stats = Arc::new(Stats {
        ios: AtomicU64::new(0),
        lat_ns: AtomicU64::new(0),
    });
    let done_rx = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));

    // Receiver: completions and R2Ts.
    let rx = {
        let (inflight, writer, stats, payload, done_rx, failed) = (
            inflight.clone(),
            writer.clone(),
            stats.clone(),
            payload.clone(),
            done_rx.clone(),
            failed.clone(),
        );
        let seg = neg.target_mrdsl;
        std::thread::spawn(move || -> anyhow::Result<()> {
            loop {
                let p = reader.next()?;
                let finished = match p.header()? {
                    Header::DataIn(d) if d.has_status => Some((d.itt, d.status)),
                    Header::DataIn(_) => None,
                    Header::ScsiResponse(r) => Some((r.itt, r.status)),
                    Header::R2t(r) => {
                        let mut w = writer.lock().expect("writer");
                        let burst = Burst {
                            itt: r.itt,
                            ttt: r.ttt,
                            lun: r.lun,
                            offset: u64::from(r.buffer_offset),
                            len: u64::from(r.desired_len),
                        };
                        data_out(&mut w, burst, &payload, seg)?;
                        None
                    }
                    Header::NopIn(n) if n.ttt != RESERVED_TAG => {
                        let reply = iscsi_pdu::bhs::NopOut {
                            immediate: true,
                            itt: RESERVED_TAG,
                            ttt: n.ttt,
                            lun: n.lun,
                            ..Default::default()
                        };
                        send(
                            &mut writer.lock().expect("writer"),
                            &Header::NopOut(reply),
                            &[],
                        )?;
                        None
                    }
                    _ => None,
                };
                if let Some((itt, status)) = finished {
                    if status != 0 {
                        failed.store(true, Ordering::Relaxed);
                        bail!("command failed with status {status:#x}");
                    }
                    let (lock, cv) = &*inflight;
                    let mut m = lock.lock().expect("inflight");
                    if let Some(t0) = m.remove(&itt) {
                        stats
                            .lat_ns
                            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        stats.ios.fetch_add(1, Ordering::Relaxed);
                    }
                    let empty = m.is_empty();
                    drop(m);
                    cv.notify_all();
                    if empty && done_rx.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                }
            }
        })
    };

    let mut offs = Offsets {
        random: args.random,
        bs,
        slots: (span / bs).max(1),
        next: 0,
        rng: 0x9e37_79b9_7f4a_7c15,
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut itt: u32 = 16;
    let block = 512u64;
    let mut issued = 0u64;
    while if args.once {
        issued < offs.slots
    } else {
        Instant::now() < deadline
    } {
        issued += 1;
        {
            let (lock, cv) = &*inflight;
            let mut m = lock.lock().expect("inflight");
            while m.len() >= args.qd {
                m = cv.wait(m).expect("inflight");
            }
            itt = itt.wrapping_add(1);
            if itt == RESERVED_TAG {
                itt = 16;
            }
            m.insert(itt, Instant::now());
        }
        let off = offs.next();
        let mut cdb = [0u8; 16];
        cdb[0] = if write { 0x8a } else { 0x88 };
        cdb[2..10].copy_from_slice(&(off / block).to_be_bytes());
        cdb[10..14].copy_from_slice(&((bs / block) as u32).to_be_bytes());
        let immediate = if write && neg.immediate_data {
            bs.min(neg.first_burst).min(neg.target_mrdsl)
        } else {
            0
        };
        let unsolicited_rest = if write && !neg.initial_r2t {
            bs.min(neg.first_burst) - immediate
        } else {
            0
        };
        let c = ScsiCommand {
            final_: unsolicited_rest == 0,
            read: !write,
            write,
            lun: lun_field,
            itt,
            expected_data_len: bs as u32,
            cmd_sn,
            cdb,
            ..ScsiCommand::default_for_tool()
        };
        cmd_sn = cmd_sn.wrapping_add(1);
        let mut w = writer.lock().expect("writer");
        send(
            &mut w,
            &Header::ScsiCommand(c),
            &payload[..immediate as usize],
        )?;
        if unsolicited_rest > 0 {
            let burst = Burst {
                itt,
                ttt: RESERVED_TAG,
                lun: lun_field,
                offset: immediate,
                len: unsolicited_rest,
            };
            data_out(&mut w, burst, &payload, neg.target_mrdsl)?;
        }
        drop(w);
        if failed.load(Ordering::Relaxed) || rx.is_finished() {
            break;
        }
    }
    // Let the last commands finish, then stop the receiver.
    done_rx.store(true, Ordering::Relaxed);
    {
        let (lock, cv) = &*inflight;
        let mut m = lock.lock().expect("inflight");
        let limit = Instant::now() + Duration::from_secs(10);
        while !m.is_empty() && Instant::now() < limit {
            m = cv
                .wait_timeout(m, Duration::from_millis(100))
                .expect("inflight")
                .0;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    match rx.join() {
        Ok(Ok(())) => {}
        // Reading fails once we shut the socket down; that is the normal end.
        Ok(Err(e)) if failed.load(Ordering::Relaxed) => bail!("{e}"),
        Ok(Err(_)) => {}
        Err(_) => bail!("receiver panicked"),
    }
    Ok((
        stats.ios.load(Ordering::Relaxed),
        elapsed,
        stats.lat_ns.load(Ordering::Relaxed),
    ))
}
