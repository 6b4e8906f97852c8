//! Every feature of the initiator against tgt and against our own target, each started
//! on loopback by the test: login (plain, CHAP, mutual CHAP, refusals), digests,
//! pipelining, transfers across burst and segment boundaries, the SCSI command set with
//! its typed errors, persistent reservations, task management, NOP keepalive both ways,
//! logout and discovery.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Peer, PeerOptions, pattern, run};
use iscsi_initiator::error::Error;
use iscsi_initiator::login::LoginError;
use iscsi_initiator::{Chap, Limits, PrOut, PrType, Session, SessionState, discover};

const LIMIT: Duration = Duration::from_secs(90);

fn login_and_identify(p: Peer) {
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        assert_eq!(s.state(), SessionState::Up);
        let luns = s.report_luns().await.unwrap();
        assert!(luns.contains(&p.lun()), "{luns:?}");
        let lun = s.lun(p.lun()).await.unwrap();
        assert_eq!(lun.block_size(), 512);
        assert_eq!(lun.size(), 64 << 20);
        let inq = lun.inquiry().await.unwrap();
        assert_eq!(inq.device_type, 0, "a disk");
        assert!(!inq.vendor.is_empty());
        assert!(!lun.serial().await.unwrap().is_empty());
        assert!(!lun.device_ids().await.unwrap().is_empty());
        lun.test_unit_ready().await.unwrap();
        s.ping().await.unwrap();
        s.logout().await.unwrap();
    });
}
against_both!(
    login_and_identify,
    PeerOptions::default(),
    login_and_identify
);

/// Writes then reads back `len`-byte transfers at several offsets and checks the data.
async fn roundtrip(lun: &iscsi_initiator::Lun, lens: &[usize]) {
    let mut lba = 0u64;
    for (i, &len) in lens.iter().enumerate() {
        let data = Bytes::from(pattern(lba, i as u64, len));
        lun.write(lba, data.clone()).await.unwrap();
        let back = lun.read(lba, (len / 512) as u32).await.unwrap();
        assert!(
            back == data,
            "{len} bytes at block {lba} read back differently"
        );
        lba += (len / 512) as u64 + 3;
    }
}

/// Lengths around every boundary that splits a transfer: the data segment limits
/// (tgt's 8 KiB, ours 256 KiB, our own 1 MiB), FirstBurstLength (64 KiB, 256 KiB),
/// MaxBurstLength (256 KiB, 1 MiB) and our own maximum transfer (8 MiB).
const LENGTHS: &[usize] = &[
    512,
    4096,
    8192 - 512,
    8192,
    8192 + 512,
    65536 - 512,
    65536,
    65536 + 512,
    262144 - 512,
    262144,
    262144 + 512,
    (1 << 20) - 512,
    1 << 20,
    (1 << 20) + 512,
    3 << 20,
    (8 << 20) + 4096,
];

fn burst_boundaries(p: Peer) {
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        roundtrip(&lun, LENGTHS).await;
        let st = s.stats();
        assert!(
            st.direct_bytes > 0,
            "long Data-In went through direct placement"
        );
        s.logout().await.unwrap();
    });
}
against_both!(burst_boundaries, PeerOptions::default(), burst_boundaries);

/// Small limits of our own force many PDUs per transfer, R2T sequences and unsolicited
/// data in every combination of ImmediateData and InitialR2T.
fn small_bursts_every_data_mode(p: Peer) {
    run(LIMIT, async {
        for (immediate, initial_r2t) in [(true, true), (true, false), (false, true), (false, false)]
        {
            let mut cfg = p.config();
            cfg.limits = Limits {
                max_recv_data_segment: 4096,
                max_burst: 16384,
                first_burst: 8192,
                immediate_data: immediate,
                initial_r2t,
                max_outstanding_r2t: 1,
                queue_depth: 16,
            };
            let s = Session::connect(cfg).await.unwrap();
            let n = s.negotiated();
            assert_eq!(n.max_recv_data_segment, 4096);
            assert!(n.max_burst <= 16384 && n.first_burst <= 8192);
            assert!(!n.immediate_data || immediate);
            assert!(n.initial_r2t || !initial_r2t);
            let lun = s.lun(p.lun()).await.unwrap();
            roundtrip(&lun, &[512, 4096, 8192, 12288, 16384, 20480, 65536 + 512]).await;
            assert!(
                s.stats().r2ts > 0,
                "writes past the first burst were solicited"
            );
            s.logout().await.unwrap();
        }
    });
}
against_both!(
    small_bursts_every_data_mode,
    PeerOptions::default(),
    small_bursts_every_data_mode
);

fn digests(p: Peer) {
    run(LIMIT, async {
        for (header, data) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut cfg = p.config();
            cfg.header_digest = header;
            cfg.data_digest = data;
            let s = Session::connect(cfg).await.unwrap();
            let n = s.negotiated();
            assert_eq!((n.header_digest, n.data_digest), (header, data));
            let lun = s.lun(p.lun()).await.unwrap();
            roundtrip(&lun, &[512, 8192, 65536 + 512, 1 << 20]).await;
            s.logout().await.unwrap();
        }
    });
}
against_both!(digests, PeerOptions::default(), digests);

fn chap_options() -> PeerOptions {
    PeerOptions {
        chap: true,
        mutual: true,
        ..PeerOptions::default()
    }
}

fn chap_good_and_bad(p: Peer) {
    run(LIMIT, async {
        // One-way CHAP.
        let s = Session::connect(p.chap_config()).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        roundtrip(&lun, &[4096]).await;
        s.logout().await.unwrap();
        // Mutual CHAP: the target proves it knows its secret.
        let mut cfg = p.chap_config();
        cfg.mutual_chap = Some(Chap::new(common::MUTUAL_USER, common::MUTUAL_SECRET));
        let s = Session::connect(cfg).await.unwrap();
        s.lun(p.lun()).await.unwrap();
        s.logout().await.unwrap();
        // A wrong secret is refused by the target as an authentication failure.
        let mut cfg = p.config();
        cfg.chap = Some(Chap::new(common::CHAP_USER, "not-the-secret"));
        match Session::connect(cfg).await {
            Err(Error::Login {
                source: LoginError::Refused { status },
                ..
            }) => assert!(status.is_auth_failure(), "{status}"),
            other => panic!("wrong secret: {other:?}"),
        }
        // No credentials at all: refused too.
        match Session::connect(p.config()).await {
            Err(Error::Login { .. }) => {}
            other => panic!("no credentials: {other:?}"),
        }
        // A target that cannot prove the mutual secret is refused by us.
        let mut cfg = p.chap_config();
        cfg.mutual_chap = Some(Chap::new(common::MUTUAL_USER, "a-different-secret"));
        match Session::connect(cfg).await {
            Err(Error::Login {
                source: LoginError::MutualAuth,
                ..
            }) => {}
            other => panic!("bad mutual secret: {other:?}"),
        }
    });
}
against_both!(chap_good_and_bad, chap_options(), chap_good_and_bad);

fn unknown_target_is_refused(p: Peer) {
    run(LIMIT, async {
        let mut cfg = p.config();
        cfg.target = "iqn.2024-01.org.pool.test:no-such-target".into();
        match Session::connect(cfg).await {
            Err(Error::Login {
                source: LoginError::Refused { status },
                ..
            }) => assert_eq!(status.class, 2, "{status}"),
            other => panic!("{other:?}"),
        }
    });
}
against_both!(
    unknown_target_is_refused,
    PeerOptions::default(),
    unknown_target_is_refused
);

/// 128 commands submitted at once, from 128 tasks sharing the session.
fn pipelining_128(p: Peer) {
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..128u64 {
            let lun = lun.clone();
            tasks.spawn(async move {
                let data = Bytes::from(pattern(i * 16, 1, 8192));
                lun.write(i * 16, data).await.unwrap();
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let writes_in_flight = s.stats().max_in_flight;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..128u64 {
            let lun = lun.clone();
            tasks.spawn(async move {
                let back = lun.read(i * 16, 16).await.unwrap();
                assert!(back == pattern(i * 16, 1, 8192), "block {} differs", i * 16);
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let st = s.stats();
        eprintln!(
            "{}: max in flight {} (writes {writes_in_flight})",
            p.name(),
            st.max_in_flight
        );
        assert!(
            st.max_in_flight >= 32,
            "commands were not pipelined: at most {} in flight",
            st.max_in_flight
        );
        s.logout().await.unwrap();
    });
}
against_both!(pipelining_128, PeerOptions::default(), pipelining_128);

fn flush_unmap_write_same_compare(p: Peer) {
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        let a = Bytes::from(pattern(100, 1, 4096));
        lun.write(100, a.clone()).await.unwrap();
        lun.write_fua(108, a.clone()).await.unwrap();
        lun.flush().await.unwrap();
        // WRITE SAME: one block over a range.
        let block = Bytes::from(pattern(7, 7, 512));
        lun.write_same(200, 16, block.clone(), false).await.unwrap();
        let back = lun.read(200, 16).await.unwrap();
        assert!(back.chunks(512).all(|c| c == &block[..]));
        lun.write_zeroes(200, 16, false).await.unwrap();
        assert!(lun.read(200, 16).await.unwrap().iter().all(|&b| b == 0));
        // COMPARE AND WRITE: succeeds on a match, typed miscompare otherwise.
        // (tgt answers INVALID OPCODE for it on file-backed LUNs.)
        let new = pattern(100, 2, 512);
        match lun.compare_and_write(100, &a[..512], &new).await {
            Ok(()) => {
                assert_eq!(&lun.read(100, 1).await.unwrap()[..], &new[..]);
                match lun.compare_and_write(100, &a[..512], &new).await {
                    Err(Error::Miscompare { offset, .. }) => assert_eq!(offset, Some(0)),
                    other => panic!("stale compare: {other:?}"),
                }
            }
            Err(Error::Unsupported { .. }) if p.name() == "tgt" => {
                eprintln!("tgt: COMPARE AND WRITE not supported");
            }
            Err(e) => panic!("compare and write: {e}"),
        }
        // UNMAP: ours is thin; tgt's plain file LUN may not implement it.
        match lun.unmap(&[(300, 64), (1000, 8)]).await {
            Ok(()) => {}
            Err(Error::Unsupported { .. }) => eprintln!("{}: UNMAP not supported", p.name()),
            Err(e) => panic!("unmap: {e}"),
        }
        s.logout().await.unwrap();
    });
}
against_both!(
    flush_unmap_write_same_compare,
    PeerOptions::default(),
    flush_unmap_write_same_compare
);

fn out_of_range_is_typed(p: Peer) {
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        let end = lun.blocks();
        match lun.read(end - 1, 2).await {
            Err(Error::OutOfRange { lba, blocks, .. }) => assert_eq!((lba, blocks), (end - 1, 2)),
            other => panic!("read past the end: {other:?}"),
        }
        match lun.write(end, Bytes::from(vec![0u8; 512])).await {
            Err(Error::OutOfRange { .. }) => {}
            other => panic!("write past the end: {other:?}"),
        }
        // Bad input is refused before anything is sent.
        assert!(matches!(
            lun.write(0, Bytes::from(vec![0u8; 100])).await,
            Err(Error::InvalidArgument { .. })
        ));
        // The session is unharmed.
        lun.read(end - 1, 1).await.unwrap();
        s.logout().await.unwrap();
    });
}
against_both!(
    out_of_range_is_typed,
    PeerOptions::default(),
    out_of_range_is_typed
);

/// Two I_T nexuses (two ISIDs): a WRITE EXCLUSIVE reservation held by one makes the
/// other's writes fail with the typed error, while its reads still work.
fn reservation_conflict(p: Peer) {
    run(LIMIT, async {
        let mut ca = p.config();
        ca.isid = Some([0x80, 0, 0, 0, 0, 0xa]);
        let mut cb = p.config();
        cb.isid = Some([0x80, 0, 0, 0, 0, 0xb]);
        cb.initiator = common::INITIATOR_B.into();
        let sa = Session::connect(ca).await.unwrap();
        let sb = Session::connect(cb).await.unwrap();
        let a = sa.lun(p.lun()).await.unwrap();
        let b = sb.lun(p.lun()).await.unwrap();
        let (ka, kb) = (0xaaaa_0001u64, 0xbbbb_0002u64);
        a.persistent_reserve_out(PrOut::RegisterAndIgnore {
            new: ka,
            aptpl: false,
        })
        .await
        .unwrap();
        b.persistent_reserve_out(PrOut::RegisterAndIgnore {
            new: kb,
            aptpl: false,
        })
        .await
        .unwrap();
        a.persistent_reserve_out(PrOut::Reserve {
            key: ka,
            kind: PrType::WriteExclusive,
        })
        .await
        .unwrap();
        let keys = b.read_keys().await.unwrap();
        assert!(
            keys.keys.contains(&ka) && keys.keys.contains(&kb),
            "{keys:?}"
        );
        let r = b.read_reservation().await.unwrap();
        assert_eq!(r.holder, Some((ka, PrType::WriteExclusive)));
        let data = Bytes::from(vec![1u8; 512]);
        match b.write(10, data.clone()).await {
            Err(Error::ReservationConflict { .. }) => {}
            other => panic!("write by the other nexus: {other:?}"),
        }
        b.read(10, 1).await.unwrap();
        a.write(10, data.clone()).await.unwrap();
        // B preempts A (as the pool fences a dead host), then A is the one refused.
        b.persistent_reserve_out(PrOut::Preempt {
            key: kb,
            victim: ka,
            kind: PrType::WriteExclusive,
        })
        .await
        .unwrap();
        b.write(10, data.clone()).await.unwrap();
        match a.write(10, data.clone()).await {
            Err(Error::ReservationConflict { .. }) => {}
            other => panic!("write by the preempted nexus: {other:?}"),
        }
        b.persistent_reserve_out(PrOut::Clear { key: kb })
            .await
            .unwrap();
        a.write(10, data).await.unwrap();
        assert!(b.read_keys().await.unwrap().keys.is_empty());
        sa.logout().await.unwrap();
        sb.logout().await.unwrap();
    });
}
against_both!(
    reservation_conflict,
    PeerOptions::default(),
    reservation_conflict
);

fn task_management_and_logout(p: Peer) {
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        lun.reset().await.unwrap();
        // After the reset the target reports a unit attention; the retry hides it.
        lun.read(0, 8).await.unwrap();
        s.logout().await.unwrap();
        assert_eq!(s.state(), SessionState::Closed);
        assert!(matches!(lun.read(0, 1).await, Err(Error::Closed)));
        if let Peer::Ours(o) = &p {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !o.sessions().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(o.sessions().is_empty(), "the target still has the session");
        }
    });
}
against_both!(
    task_management_and_logout,
    PeerOptions::default(),
    task_management_and_logout
);

fn discovery(p: Peer) {
    run(LIMIT, async {
        let found = discover(&p.config()).await.unwrap();
        let t = found
            .iter()
            .find(|t| t.name == p.iqn())
            .unwrap_or_else(|| panic!("{} not in {found:?}", p.iqn()));
        assert!(
            t.portals.iter().any(|a| a.address == p.portal()),
            "{:?}",
            t.portals
        );
    });
}
against_both!(discovery, PeerOptions::default(), discovery);

/// We ping an idle target; the session stays up and keeps working.
fn keepalive_pings(p: Peer) {
    run(LIMIT, async {
        let mut cfg = p.config();
        cfg.timeouts.nop_interval = Some(Duration::from_millis(200));
        cfg.timeouts.nop_timeout = Duration::from_secs(2);
        let s = Session::connect(cfg).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let st = s.stats();
        assert!(
            st.pings >= 3,
            "only {} pings in 1.5 s of idleness",
            st.pings
        );
        assert_eq!(st.reconnects, 0);
        lun.read(0, 1).await.unwrap();
        s.logout().await.unwrap();
    });
}
against_both!(keepalive_pings, PeerOptions::default(), keepalive_pings);

/// The target pings us: we answer, so it keeps the session.
#[test]
fn target_pings_are_answered_ours() {
    let mut opts = PeerOptions::default();
    opts.server.nop_interval = Some(Duration::from_millis(200));
    opts.server.nop_timeout = Duration::from_secs(1);
    let p = Peer::ours(opts);
    run(LIMIT, async {
        let mut cfg = p.config();
        cfg.timeouts.nop_interval = None;
        let s = Session::connect(cfg).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let st = s.stats();
        assert!(
            st.target_pings >= 3,
            "answered {} target pings",
            st.target_pings
        );
        assert_eq!(st.reconnects, 0, "the target dropped us");
        lun.read(0, 1).await.unwrap();
        s.logout().await.unwrap();
    });
}

#[test]
fn target_pings_are_answered_tgt() {
    let Some(p) = Peer::tgt(PeerOptions::default()) else {
        return;
    };
    let Peer::Tgt(t) = &p else { unreachable!() };
    t.set_param("nop_interval", "1");
    t.set_param("nop_count", "2");
    run(LIMIT, async {
        let mut cfg = p.config();
        cfg.timeouts.nop_interval = None;
        let s = Session::connect(cfg).await.unwrap();
        let lun = s.lun(p.lun()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let st = s.stats();
        assert!(
            st.target_pings >= 2,
            "answered {} target pings",
            st.target_pings
        );
        assert_eq!(st.reconnects, 0, "the target dropped us");
        lun.read(0, 1).await.unwrap();
        s.logout().await.unwrap();
    });
}

/// A device whose writes past `full_from` find the pool full and whose reads of block
/// `bad` fail: what a thin volume and a failing disk tell the target.
struct FailingDevice {
    inner: iscsi_target::FileBlockDevice,
    full_from: u64,
    bad: u64,
}

impl iscsi_target::BlockDevice for FailingDevice {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), iscsi_target::BlockError> {
        let bad = self.bad * 512;
        if offset <= bad && bad < offset + buf.len() as u64 {
            return Err(iscsi_target::BlockError::Io(std::io::Error::other(
                "bad sector",
            )));
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), iscsi_target::BlockError> {
        if offset + data.len() as u64 > self.full_from * 512 {
            return Err(iscsi_target::BlockError::NoSpace);
        }
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), iscsi_target::BlockError> {
        self.inner.flush()
    }
}

#[test]
fn space_exhausted_and_medium_errors_are_typed_ours() {
    let dir = tempfile::tempdir().unwrap();
    let inner =
        iscsi_target::FileBlockDevice::open(&dir.path().join("d.img"), Some(8 << 20), 512, false)
            .unwrap();
    let opts = PeerOptions {
        device: Some(std::sync::Arc::new(FailingDevice {
            inner,
            full_from: 4096,
            bad: 5000,
        })),
        ..PeerOptions::default()
    };
    let p = Peer::ours(opts);
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        let lun = s.lun(0).await.unwrap();
        lun.write(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
        match lun.write(4090, Bytes::from(vec![1u8; 8192])).await {
            Err(Error::SpaceExhausted { lba, blocks, .. }) => assert_eq!((lba, blocks), (4090, 16)),
            other => panic!("write into a full pool: {other:?}"),
        }
        match lun.read(4996, 8).await {
            Err(Error::MediumError { .. }) => {}
            other => panic!("read of a bad block: {other:?}"),
        }
        lun.read(0, 8).await.unwrap();
        s.logout().await.unwrap();
    });
}

#[test]
fn read_only_lun_is_write_protected_ours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let dev = iscsi_target::FileBlockDevice::open(&path, None, 512, true).unwrap();
    let p = Peer::ours(PeerOptions {
        device: Some(std::sync::Arc::new(dev)),
        ..PeerOptions::default()
    });
    run(LIMIT, async {
        let s = Session::connect(p.config()).await.unwrap();
        let lun = s.lun(0).await.unwrap();
        match lun.write(0, Bytes::from(vec![1u8; 512])).await {
            Err(Error::WriteProtected { .. }) => {}
            other => panic!("write to a read-only LUN: {other:?}"),
        }
        lun.read(0, 1).await.unwrap();
        s.logout().await.unwrap();
    });
}

/// The synchronous adapter, driven from plain threads as a virtio-blk worker would.
fn blocking_adapter(p: Peer) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lun = rt.block_on(async {
        let s = Session::connect(p.config()).await.unwrap();
        s.lun(p.lun()).await.unwrap()
    });
    let dev = iscsi_initiator::blocking::BlockingLun::new(lun, rt.handle().clone());
    assert_eq!(dev.size(), 64 << 20);
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let dev = &dev;
            scope.spawn(move || {
                for i in 0..16u64 {
                    let off = (t * 16 + i) * 8192;
                    let data = pattern(off, t, 8192);
                    dev.write_at(off, &data).unwrap();
                    let mut back = vec![0u8; 8192];
                    dev.read_at(off, &mut back).unwrap();
                    assert!(back == data);
                }
            });
        }
    });
    dev.flush().unwrap();
    dev.write_zeroes(0, 8192, false).unwrap();
    let mut back = vec![1u8; 8192];
    dev.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert!(matches!(
        dev.read_at(100, &mut back),
        Err(Error::InvalidArgument { .. })
    ));
    match dev.discard(8192, 65536) {
        Ok(()) | Err(Error::Unsupported { .. }) => {}
        Err(e) => panic!("discard: {e}"),
    }
    rt.block_on(dev.lun().session().logout()).unwrap();
}
against_both!(blocking_adapter, PeerOptions::default(), blocking_adapter);
