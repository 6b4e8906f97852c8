//! Recovery: a target restarted under a write load (tgt killed with SIGKILL, ours
//! stopped), a target that stays away past the replacement timeout, a target that
//! accepts and never answers, and a connection that freezes mid-session. Callers must
//! see no error while the session can come back, a typed error within a bounded time
//! when it cannot, and their acknowledged data afterwards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Peer, PeerOptions, Proxy, pattern};
use iscsi_initiator::error::Error;
use iscsi_initiator::login::LoginError;
use iscsi_initiator::{Session, SessionState};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const WRITERS: u64 = 16;
/// Blocks each writer owns (8 blocks per write).
const SPAN: u64 = 64;

/// Writers loop over their own blocks, each write a new pattern; every write must
/// succeed, across a restart of the target, and the last acknowledged pattern of every
/// block must read back afterwards.
fn restart_during_write_load(mut p: Peer) {
    let rt = runtime();
    let mut cfg = p.config();
    cfg.isid = Some([0x80, 1, 2, 3, 4, 5]);
    let session = rt.block_on(Session::connect(cfg)).unwrap();
    let lun = rt.block_on(session.lun(p.lun())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (lun, stop, writes) = (lun.clone(), stop.clone(), writes.clone());
        handles.push(rt.spawn(async move {
            // The last round acknowledged for each 8-block group of this writer.
            let mut last = vec![0u64; (SPAN / 8) as usize];
            let mut round = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for (g, done) in last.iter_mut().enumerate() {
                    let lba = w * SPAN + g as u64 * 8;
                    let data = Bytes::from(pattern(lba, round, 4096));
                    if let Err(e) = lun.write(lba, data).await {
                        panic!("write of block {lba} failed: {e}");
                    }
                    *done = round;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                round += 1;
            }
            last
        }));
    }
    std::thread::sleep(Duration::from_millis(800));
    let before = writes.load(Ordering::Relaxed);
    assert!(before > 0, "no write went through before the restart");
    p.restart(Duration::from_millis(500));
    // Keep writing until a good number of writes went through the new target.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after_restart = writes.load(Ordering::Relaxed);
    while writes.load(Ordering::Relaxed) < after_restart + 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<Vec<u64>> = rt.block_on(async {
        let mut v = Vec::new();
        for h in handles {
            v.push(h.await.expect("a writer failed"));
        }
        v
    });
    let stats = session.stats();
    assert!(
        stats.reconnects >= 1,
        "the session never reconnected: {stats:?}"
    );
    rt.block_on(async {
        lun.flush().await.unwrap();
        for (w, last) in lasts.iter().enumerate() {
            for (g, &round) in last.iter().enumerate() {
                let lba = w as u64 * SPAN + g as u64 * 8;
                let back = lun.read(lba, 8).await.unwrap();
                assert!(
                    back == pattern(lba, round, 4096),
                    "block {lba} does not hold round {round}"
                );
            }
        }
    });
    eprintln!(
        "{}: {} writes ({before} before the restart), stats {stats:?}",
        p.name(),
        writes.load(Ordering::Relaxed)
    );
    if let Peer::Ours(o) = &p {
        // The session was reinstated with the same ISID.
        let s = o.sessions();
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].isid, [0x80, 1, 2, 3, 4, 5]);
    }
    rt.block_on(session.logout()).unwrap();
}
against_both!(
    restart_during_write_load,
    PeerOptions::default(),
    restart_during_write_load
);

/// A target that stays away: calls fail with SessionFailed once the replacement timeout
/// passes (not before, not much after), new calls fail fast, and the session comes back
/// by itself when the target does.
#[test]
fn replacement_timeout_then_recovery() {
    let Peer::Ours(mut o) = Peer::ours(PeerOptions::default()) else {
        unreachable!()
    };
    let p_portal = format!("127.0.0.1:{}", o.port);
    let rt = runtime();
    let mut cfg = iscsi_initiator::SessionConfig::new(&p_portal, &o.iqn, common::INITIATOR);
    cfg.timeouts.replacement = Duration::from_millis(1500);
    cfg.timeouts.connect = Duration::from_secs(1);
    cfg.timeouts.login = Duration::from_secs(1);
    cfg.timeouts.max_backoff = Duration::from_millis(200);
    let session = rt.block_on(Session::connect(cfg)).unwrap();
    let lun = rt.block_on(session.lun(0)).unwrap();
    o.stop();
    let t0 = Instant::now();
    let r = rt.block_on(lun.write(0, Bytes::from(vec![5u8; 512])));
    let waited = t0.elapsed();
    match r {
        Err(Error::SessionFailed { .. }) => {}
        other => panic!("write with the target gone: {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(8),
        "failed after {waited:?}"
    );
    assert!(matches!(session.state(), SessionState::Failed { .. }));
    let t1 = Instant::now();
    assert!(matches!(
        rt.block_on(lun.read(0, 1)),
        Err(Error::SessionFailed { .. })
    ));
    assert!(
        t1.elapsed() < Duration::from_secs(2),
        "a failed session fails fast"
    );
    o.start_again();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match lun.write(0, Bytes::from(vec![6u8; 512])).await {
                Ok(()) => break,
                Err(Error::SessionFailed { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("after the target came back: {e}"),
            }
        }
        assert_eq!(&lun.read(0, 1).await.unwrap()[..], &[6u8; 512][..]);
    });
    assert_eq!(session.state(), SessionState::Up);
    rt.block_on(session.logout()).unwrap();
}

/// A portal that accepts connections and never answers: the first login fails within
/// the login timeout.
#[test]
fn silent_portal_times_out_the_login() {
    let rt = runtime();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let portal = listener.local_addr().unwrap().to_string();
        let hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let mut cfg =
            iscsi_initiator::SessionConfig::new(portal, "iqn.2024-01.org.x:t", common::INITIATOR);
        cfg.timeouts.login = Duration::from_millis(700);
        let t0 = Instant::now();
        match Session::connect(cfg).await {
            Err(Error::Login {
                source: LoginError::Conn(iscsi_initiator::connection::ConnError::Timeout { .. }),
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(3));
        hold.abort();
    });
}

/// The connection freezes mid-session (a relay stops moving bytes): the command times
/// out, its ABORT TASK is not answered either, the session drops the connection and
/// tries to log in again; past the replacement timeout the caller gets SessionFailed.
/// When bytes flow again the session recovers by itself.
#[test]
fn frozen_connection_is_abandoned_and_recovered() {
    let Peer::Ours(o) = Peer::ours(PeerOptions::default()) else {
        unreachable!()
    };
    let rt = runtime();
    rt.block_on(async {
        let proxy = Proxy::start(format!("127.0.0.1:{}", o.port)).await;
        let mut cfg =
            iscsi_initiator::SessionConfig::new(proxy.portal(), &o.iqn, common::INITIATOR);
        cfg.timeouts.command = Duration::from_millis(800);
        cfg.timeouts.task_management = Duration::from_millis(800);
        cfg.timeouts.connect = Duration::from_millis(500);
        cfg.timeouts.login = Duration::from_millis(800);
        cfg.timeouts.replacement = Duration::from_secs(3);
        cfg.timeouts.nop_interval = None;
        cfg.timeouts.max_backoff = Duration::from_millis(200);
        let session = Session::connect(cfg).await.unwrap();
        let lun = session.lun(0).await.unwrap();
        lun.write(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
        proxy.pause(true);
        let t0 = Instant::now();
        match lun.write(8, Bytes::from(vec![2u8; 4096])).await {
            Err(Error::SessionFailed { .. }) => {}
            other => panic!("write into a frozen connection: {other:?}"),
        }
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(12),
            "failed after {waited:?}"
        );
        let st = session.stats();
        assert!(
            st.aborts >= 1,
            "the timed-out command was not aborted: {st:?}"
        );
        proxy.pause(false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match lun.read(0, 8).await {
                Ok(d) => {
                    assert!(d.iter().all(|&b| b == 1));
                    break;
                }
                Err(Error::SessionFailed { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("after the connection thawed: {e}"),
            }
        }
        session.logout().await.unwrap();
    });
}

/// A command that times out once on a live connection is aborted and sent again; the
/// caller sees it succeed. The relay freezes for less than the replacement timeout.
#[test]
fn short_freeze_is_invisible_to_callers() {
    let Peer::Ours(o) = Peer::ours(PeerOptions::default()) else {
        unreachable!()
    };
    let rt = runtime();
    rt.block_on(async {
        let proxy = Proxy::start(format!("127.0.0.1:{}", o.port)).await;
        let mut cfg =
            iscsi_initiator::SessionConfig::new(proxy.portal(), &o.iqn, common::INITIATOR);
        cfg.timeouts.command = Duration::from_millis(500);
        cfg.timeouts.task_management = Duration::from_millis(500);
        cfg.timeouts.connect = Duration::from_millis(500);
        cfg.timeouts.login = Duration::from_millis(800);
        cfg.timeouts.replacement = Duration::from_secs(20);
        cfg.timeouts.nop_interval = None;
        cfg.timeouts.max_backoff = Duration::from_millis(200);
        let session = Session::connect(cfg).await.unwrap();
        let lun = session.lun(0).await.unwrap();
        proxy.pause(true);
        let thaw = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            proxy.pause(false);
        };
        let (r, ()) = tokio::join!(lun.write(16, Bytes::from(vec![3u8; 8192])), thaw);
        r.unwrap();
        assert!(lun.read(16, 16).await.unwrap().iter().all(|&b| b == 3));
        assert!(session.stats().reconnects >= 1);
        session.logout().await.unwrap();
    });
}

/// A device with a volatile write cache: writes are kept in memory until a flush moves
/// them to the file; `crash` throws away what was not flushed, as a power loss or a
/// thin pool that commits its chunk map on flush would. `refuse_writes` makes every
/// later write fail.
struct VolatileDevice {
    inner: iscsi_target::FileBlockDevice,
    cache: std::sync::Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
    flushes: AtomicU64,
    refuse_writes: AtomicBool,
}

impl VolatileDevice {
    fn crash(&self) {
        self.cache.lock().unwrap().clear();
    }
}

impl iscsi_target::BlockDevice for VolatileDevice {
    fn block_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), iscsi_target::BlockError> {
        self.inner.read_at(offset, buf)?;
        let cache = self.cache.lock().unwrap();
        for (i, block) in buf.chunks_mut(512).enumerate() {
            if let Some(c) = cache.get(&(offset / 512 + i as u64)) {
                block.copy_from_slice(c);
            }
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), iscsi_target::BlockError> {
        if self.refuse_writes.load(Ordering::Relaxed) {
            return Err(iscsi_target::BlockError::NoSpace);
        }
        let mut cache = self.cache.lock().unwrap();
        for (i, block) in data.chunks(512).enumerate() {
            cache.insert(offset / 512 + i as u64, block.to_vec());
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), iscsi_target::BlockError> {
        let blocks = std::mem::take(&mut *self.cache.lock().unwrap());
        for (lba, data) in blocks {
            self.inner.write_at(lba * 512, &data)?;
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flush()
    }
}

fn volatile_peer() -> (Arc<VolatileDevice>, common::Ours) {
    let dir = tempfile::tempdir().unwrap();
    let inner =
        iscsi_target::FileBlockDevice::open(&dir.path().join("v.img"), Some(16 << 20), 512, false)
            .unwrap();
    std::mem::forget(dir);
    let dev = Arc::new(VolatileDevice {
        inner,
        cache: Default::default(),
        flushes: AtomicU64::new(0),
        refuse_writes: AtomicBool::new(false),
    });
    let o = common::Ours::start(PeerOptions {
        device: Some(dev.clone()),
        ..PeerOptions::default()
    });
    (dev, o)
}

/// Writes acknowledged before a target restart that loses its unflushed writes are
/// written again by the session after it reconnects: the flush that follows really
/// covers them.
#[test]
fn unflushed_writes_survive_a_target_that_loses_its_cache() {
    let (dev, mut o) = volatile_peer();
    let rt = runtime();
    let mut cfg = common::test_config(format!("127.0.0.1:{}", o.port), &o.iqn);
    if std::env::var_os("INITIATOR_TEST_NO_JOURNAL").is_some() {
        // Shows the test can fail: without the journal the unflushed writes are gone.
        cfg.journal_limit = 0;
    }
    cfg.timeouts.max_backoff = Duration::from_millis(100);
    let session = rt.block_on(Session::connect(cfg)).unwrap();
    let lun = rt.block_on(session.lun(0)).unwrap();
    rt.block_on(async {
        // Durable before the crash.
        lun.write(0, Bytes::from(pattern(0, 1, 4096)))
            .await
            .unwrap();
        lun.flush().await.unwrap();
        // Acknowledged, not flushed; block 8 written twice (the later one must win).
        lun.write(8, Bytes::from(pattern(8, 1, 4096)))
            .await
            .unwrap();
        lun.write(100, Bytes::from(pattern(100, 1, 8192)))
            .await
            .unwrap();
        lun.write(8, Bytes::from(pattern(8, 2, 4096)))
            .await
            .unwrap();
        lun.write_same(300, 8, Bytes::from(pattern(300, 1, 512)), false)
            .await
            .unwrap();
    });
    // The target dies with its cache.
    o.stop();
    dev.crash();
    o.start_again();
    rt.block_on(async {
        lun.flush().await.unwrap();
    });
    // The device (after yet another crash) holds everything that was acknowledged.
    dev.crash();
    rt.block_on(async {
        assert!(lun.read(0, 8).await.unwrap() == pattern(0, 1, 4096));
        assert!(
            lun.read(8, 8).await.unwrap() == pattern(8, 2, 4096),
            "the newer write won"
        );
        assert!(lun.read(100, 16).await.unwrap() == pattern(100, 1, 8192));
        let same = lun.read(300, 8).await.unwrap();
        assert!(same.chunks(512).all(|c| c == &pattern(300, 1, 512)[..]));
    });
    let st = session.stats();
    assert!(st.replayed >= 4, "{st:?}");
    rt.block_on(session.logout()).unwrap();
}

/// Past its limit the journal flushes by itself; and when a replay is refused, the next
/// flush says that writes may be lost instead of succeeding.
#[test]
fn journal_is_bounded_and_lost_writes_are_reported() {
    let (dev, mut o) = volatile_peer();
    let rt = runtime();
    let mut cfg = iscsi_initiator::SessionConfig::new(
        format!("127.0.0.1:{}", o.port),
        o.iqn.clone(),
        common::INITIATOR,
    );
    cfg.journal_limit = 256 * 1024;
    cfg.timeouts.max_backoff = Duration::from_millis(100);
    let session = rt.block_on(Session::connect(cfg)).unwrap();
    let lun = rt.block_on(session.lun(0)).unwrap();
    rt.block_on(async {
        for i in 0..64u64 {
            lun.write(i * 16, Bytes::from(vec![i as u8; 8192]))
                .await
                .unwrap();
        }
    });
    // Our flush runs beside the callers' commands: give it a moment to finish.
    let deadline = Instant::now() + Duration::from_secs(10);
    while session.stats().own_flushes == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = session.stats();
    assert!(
        st.own_flushes >= 1,
        "no flush of our own after 512 KiB: {st:?}"
    );
    assert!(dev.flushes.load(Ordering::Relaxed) >= 1);
    rt.block_on(async {
        lun.write(2000, Bytes::from(vec![7u8; 4096])).await.unwrap();
    });
    o.stop();
    dev.crash();
    dev.refuse_writes.store(true, Ordering::Relaxed);
    o.start_again();
    match rt.block_on(lun.flush()) {
        Err(Error::WritesLost { .. }) => {}
        other => panic!("flush after a refused replay: {other:?}"),
    }
    // Reported once; the session goes on.
    dev.refuse_writes.store(false, Ordering::Relaxed);
    rt.block_on(lun.flush()).unwrap();
    rt.block_on(session.logout()).unwrap();
}

/// A device whose first `slow` reads of block 4096 take two seconds.
struct SlowDevice {
    inner: iscsi_target::FileBlockDevice,
    slow: AtomicU64,
}

impl iscsi_target::BlockDevice for SlowDevice {
    fn block_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), iscsi_target::BlockError> {
        if offset == 4096 * 512
            && self
                .slow
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        {
            std::thread::sleep(Duration::from_secs(2));
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), iscsi_target::BlockError> {
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), iscsi_target::BlockError> {
        self.inner.flush()
    }
}

/// A command that takes longer than the command timeout on a live connection is
/// aborted with ABORT TASK and sent again; the caller sees it succeed, and the session
/// keeps its connection.
#[test]
fn slow_command_is_aborted_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let inner =
        iscsi_target::FileBlockDevice::open(&dir.path().join("s.img"), Some(8 << 20), 512, false)
            .unwrap();
    let o = common::Ours::start(PeerOptions {
        device: Some(Arc::new(SlowDevice {
            inner,
            slow: AtomicU64::new(1),
        })),
        ..PeerOptions::default()
    });
    let rt = runtime();
    let mut cfg = common::test_config(format!("127.0.0.1:{}", o.port), &o.iqn);
    cfg.timeouts.command = Duration::from_millis(700);
    cfg.timeouts.task_management = Duration::from_secs(5);
    rt.block_on(async {
        let session = Session::connect(cfg).await.unwrap();
        let lun = session.lun(0).await.unwrap();
        lun.write(4096, Bytes::from(vec![4u8; 512])).await.unwrap();
        let t0 = Instant::now();
        let data = lun.read(4096, 1).await.unwrap();
        assert!(data.iter().all(|&b| b == 4));
        assert!(t0.elapsed() >= Duration::from_millis(700));
        let st = session.stats();
        assert!(st.aborts >= 1, "{st:?}");
        assert_eq!(
            st.reconnects, 0,
            "the abort was answered: no reconnect needed"
        );
        session.logout().await.unwrap();
    });
}
