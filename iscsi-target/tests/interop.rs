//! The target against real peers: libiscsi's utilities, qemu-img and qemu-io, and a raw
//! initiator for hostile input, revocation and reinstatement. Each test that needs a peer
//! tool prints why it skips when the tool is missing.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use iscsi_pdu::bhs::{self, BHS_LEN, Header, NopOut, login_status};
use iscsi_target::{
    BlockDevice, BlockError, ChapCredentials, FileBlockDevice, FilePrStore, InitiatorAccess,
    LunConfig, ServerOptions, TargetConfig, TargetServer, naa_from_serial,
};

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn libiscsi_tools_see_the_lun() {
    let (Some(ls), Some(inq), Some(rc16)) = (
        tool("iscsi-ls", "libiscsi-bin"),
        tool("iscsi-inq", "libiscsi-bin"),
        tool("iscsi-readcapacity16", "libiscsi-bin"),
    ) else {
        return;
    };
    let h = Harness::start(64 * MIB, vec![]);
    let out = run(
        Command::new(ls).args(["-s", &format!("iscsi://127.0.0.1:{}", h.addr.port())]),
        LIMIT,
    );
    let t = text_of(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&h.iqn), "{t}");
    assert!(t.contains("Lun:0") && t.contains("DIRECT_ACCESS"), "{t}");

    let out = run(
        Command::new(&inq).args(["-e", "1", "-c", "128", &h.url()]),
        LIMIT,
    );
    let t = text_of(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("interop-serial-0"), "{t}");

    let out = run(Command::new(rc16).arg(h.url()), LIMIT);
    let t = text_of(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("Total size:67108864"), "{t}");
    assert!(
        t.contains("LBPME:1"),
        "thin file LUNs report provisioning: {t}"
    );
}

/// Writes an image to the LUN through `qemu-img convert` and reads it back byte-exact.
/// ISCSI_TEST_IMAGE_MB sets the image size (256 MiB by default; the report's run used
/// 2048).
#[test]
fn qemu_img_round_trips_an_image_byte_exact() {
    let Some(qemu) = tool("qemu-img", "qemu-utils") else {
        return;
    };
    if !qemu_has_iscsi(&qemu) {
        return;
    }
    let mb: u64 = std::env::var("ISCSI_TEST_IMAGE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let h = Harness::start(mb * MIB, vec![]);
    let src = h.dir.path().join("src.raw");
    let back = h.dir.path().join("back.raw");
    // A pattern that differs per 4 KiB block, with holes, so a misplaced block shows.
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(mb * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        let mut block = vec![0u8; 1 << 20];
        let mut i = 0u64;
        while i < mb {
            if i % 3 != 2 {
                for (j, chunk) in block.chunks_mut(8).enumerate() {
                    chunk.copy_from_slice(&(i * 131_072 + j as u64).to_le_bytes());
                }
                f.write_all_at(&block, i * MIB).unwrap();
            }
            i += 1;
        }
    }
    let out = run(
        Command::new(&qemu).args([
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &h.url(),
        ]),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "{}", text_of(&out));
    let out = run(
        Command::new(&qemu).args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &h.url(),
            back.to_str().unwrap(),
        ]),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "{}", text_of(&out));
    let out = run(
        Command::new(&qemu).args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            back.to_str().unwrap(),
        ]),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "images differ: {}", text_of(&out));
    // And what landed on the LUN's own file is the image too.
    let out = run(
        Command::new(&qemu).args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            h.lun_path().to_str().unwrap(),
        ]),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "LUN file differs: {}", text_of(&out));
}

fn qemu_io(
    qemu_io: &std::path::Path,
    h: &Harness,
    initiator: &str,
    cmds: &[&str],
) -> std::process::Output {
    let opts = format!(
        "driver=iscsi,transport=tcp,portal=127.0.0.1:{},target={},lun=0,initiator-name={initiator}",
        h.addr.port(),
        h.iqn
    );
    let mut c = Command::new(qemu_io);
    c.args(["--image-opts", &opts]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c, LIMIT)
}

/// Two hosts on one LUN (live migration's shared storage): each sees what the other
/// wrote and flushed, and an initiator without a grant is refused.
#[test]
fn two_initiators_see_each_others_writes() {
    let Some(qio) = tool("qemu-io", "qemu-utils") else {
        return;
    };
    let Some(qemu) = tool("qemu-img", "qemu-utils") else {
        return;
    };
    if !qemu_has_iscsi(&qemu) {
        return;
    }
    let h = Harness::start(
        64 * MIB,
        vec![InitiatorAccess::open(INIT_A), InitiatorAccess::open(INIT_B)],
    );
    let w = qemu_io(&qio, &h, INIT_A, &["write -P 0xa1 1M 256k", "flush"]);
    assert!(w.status.success(), "{}", text_of(&w));
    let r = qemu_io(&qio, &h, INIT_B, &["read -P 0xa1 1M 256k"]);
    assert!(
        r.status.success(),
        "B does not see A's write: {}",
        text_of(&r)
    );
    let w = qemu_io(&qio, &h, INIT_B, &["write -P 0xb2 1M 4k", "flush"]);
    assert!(w.status.success(), "{}", text_of(&w));
    let r = qemu_io(
        &qio,
        &h,
        INIT_A,
        &["read -P 0xb2 1M 4k", "read -P 0xa1 1028k 252k"],
    );
    assert!(
        r.status.success(),
        "A does not see B's write: {}",
        text_of(&r)
    );
    let r = qemu_io(
        &qio,
        &h,
        "iqn.2024-01.org.pool.test:stranger",
        &["read 0 4k"],
    );
    assert!(!r.status.success(), "an initiator without a grant got in");
}

#[test]
fn chap_failure_is_refused_and_mutual_chap_proves_the_target() {
    let access = InitiatorAccess {
        name: INIT_A.into(),
        chap: Some(ChapCredentials {
            user: "host-a".into(),
            secret: b"initiator-secret".to_vec(),
        }),
        mutual_chap: Some(ChapCredentials {
            user: "target".into(),
            secret: b"target-secret-12".to_vec(),
        }),
    };
    let h = Harness::start(16 * MIB, vec![access]);
    let isid = [0x80, 0, 0, 0, 0, 1];
    let mut bad = RawInitiator::connect(h.addr);
    assert_eq!(
        bad.login(
            INIT_A,
            &h.iqn,
            isid,
            Some(("host-a", b"wrong-secret")),
            None
        ),
        LoginResult::Refused(
            login_status::AUTHENTICATION_FAILURE.0,
            login_status::AUTHENTICATION_FAILURE.1
        )
    );
    let mut none = RawInitiator::connect(h.addr);
    assert_eq!(
        none.login(INIT_A, &h.iqn, isid, None, None),
        LoginResult::Refused(
            login_status::AUTHENTICATION_FAILURE.0,
            login_status::AUTHENTICATION_FAILURE.1
        ),
        "CHAP is required for this initiator"
    );
    let mut good = RawInitiator::connect(h.addr);
    assert_eq!(
        good.login(
            INIT_A,
            &h.iqn,
            isid,
            Some(("host-a", b"initiator-secret")),
            Some(b"target-secret-12")
        ),
        LoginResult::Ok
    );
    assert_eq!(good.test_unit_ready(), Some(0));

    // libiscsi as the peer: the secret travels in the URL.
    if let Some(inq) = tool("iscsi-inq", "libiscsi-bin") {
        let url = |pw: &str| {
            format!(
                "iscsi://host-a%{pw}@127.0.0.1:{}/{}/0",
                h.addr.port(),
                h.iqn
            )
        };
        let out = run(
            Command::new(&inq)
                .args(["-i", INIT_A, &url("wrong-secret")])
                .env("LIBISCSI_CHAP_TARGET_USERNAME", "target")
                .env("LIBISCSI_CHAP_TARGET_PASSWORD", "target-secret-12"),
            LIMIT,
        );
        assert!(
            !out.status.success(),
            "a wrong CHAP secret got in: {}",
            text_of(&out)
        );
        let out = run(
            Command::new(&inq)
                .args(["-i", INIT_A, &url("initiator-secret")])
                .env("LIBISCSI_CHAP_TARGET_USERNAME", "target")
                .env("LIBISCSI_CHAP_TARGET_PASSWORD", "target-secret-12"),
            LIMIT,
        );
        assert!(out.status.success(), "{}", text_of(&out));
        let out = run(
            Command::new(&inq)
                .args(["-i", INIT_A, &url("initiator-secret")])
                .env("LIBISCSI_CHAP_TARGET_USERNAME", "target")
                .env("LIBISCSI_CHAP_TARGET_PASSWORD", "not-the-target"),
            LIMIT,
        );
        assert!(
            !out.status.success(),
            "the initiator accepted a target that failed mutual CHAP"
        );
    }
}

/// A connection that sends garbage is closed; a session beside it keeps working.
#[test]
fn malformed_pdu_closes_only_that_connection() {
    let h = Harness::start(16 * MIB, vec![]);
    let mut good = RawInitiator::connect(h.addr);
    assert_eq!(
        good.login(INIT_A, &h.iqn, [0x80, 0, 0, 0, 0, 1], None, None),
        LoginResult::Ok
    );
    let mut bad = RawInitiator::connect(h.addr);
    assert_eq!(
        bad.login(INIT_B, &h.iqn, [0x80, 0, 0, 0, 0, 2], None, None),
        LoginResult::Ok
    );
    // A data segment far over the negotiated MaxRecvDataSegmentLength.
    let mut hdr = Header::NopOut(NopOut {
        immediate: true,
        itt: 5,
        ttt: NO_TAG,
        ..Default::default()
    })
    .to_bytes();
    bhs::set_lengths(&mut hdr, 0, (1 << 24) - 1);
    bad.send_raw(&hdr);
    assert!(
        bad.closed_within(Duration::from_secs(10)),
        "the target kept a connection that sent an oversized segment"
    );
    assert_eq!(good.test_unit_ready(), Some(0));

    // An unknown opcode is rejected, not fatal.
    let mut odd = RawInitiator::connect(h.addr);
    assert_eq!(
        odd.login(INIT_B, &h.iqn, [0x80, 0, 0, 0, 0, 3], None, None),
        LoginResult::Ok
    );
    let mut raw = [0u8; BHS_LEN];
    raw[0] = 0x1c;
    raw[16..20].copy_from_slice(&9u32.to_be_bytes());
    odd.send_raw(&raw);
    let p = odd.recv().expect("a Reject");
    assert!(
        matches!(p.header().unwrap(), Header::Reject(r) if r.reason == bhs::reject_reason::COMMAND_NOT_SUPPORTED)
    );
    assert_eq!(&p.data[..], &raw[..]);
    assert_eq!(odd.test_unit_ready(), Some(0));

    // Garbage before login ends that connection too.
    let mut junk = RawInitiator::connect(h.addr);
    junk.send_raw(&[0xffu8; 96]);
    assert!(junk.closed_within(Duration::from_secs(10)));
    assert_eq!(good.test_unit_ready(), Some(0));
}

/// The pool's fencing primitive: a revoke drops the sessions at once and refuses new
/// logins; other initiators keep going.
#[test]
fn revoke_drops_the_session_and_refuses_new_logins() {
    let h = Harness::start(
        16 * MIB,
        vec![InitiatorAccess::open(INIT_A), InitiatorAccess::open(INIT_B)],
    );
    let mut a = RawInitiator::connect(h.addr);
    assert_eq!(
        a.login(INIT_A, &h.iqn, [0x80, 0, 0, 0, 0, 1], None, None),
        LoginResult::Ok
    );
    let mut b = RawInitiator::connect(h.addr);
    assert_eq!(
        b.login(INIT_B, &h.iqn, [0x80, 0, 0, 0, 0, 2], None, None),
        LoginResult::Ok
    );
    assert_eq!(a.test_unit_ready(), Some(0));
    assert_eq!(h.server.sessions().len(), 2);

    h.rt.block_on(h.server.revoke(&h.iqn, INIT_A)).unwrap();
    assert!(
        a.closed_within(Duration::from_secs(5)),
        "the revoked session is still open"
    );
    let sessions = h.server.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].initiator, INIT_B);
    let mut again = RawInitiator::connect(h.addr);
    assert_eq!(
        again.login(INIT_A, &h.iqn, [0x80, 0, 0, 0, 0, 1], None, None),
        LoginResult::Refused(
            login_status::AUTHORIZATION_FAILURE.0,
            login_status::AUTHORIZATION_FAILURE.1
        )
    );
    assert_eq!(b.test_unit_ready(), Some(0));
    // Granting again lets it back in.
    h.server
        .grant(&h.iqn, InitiatorAccess::open(INIT_A))
        .unwrap();
    let mut back = RawInitiator::connect(h.addr);
    assert_eq!(
        back.login(INIT_A, &h.iqn, [0x80, 0, 0, 0, 0, 1], None, None),
        LoginResult::Ok
    );
}

/// A login with the ISID of a live session replaces that session (RFC 7143 §6.3.5).
#[test]
fn login_with_the_same_isid_reinstates_the_session() {
    let h = Harness::start(16 * MIB, vec![]);
    let isid = [0x80, 1, 2, 3, 4, 5];
    let mut first = RawInitiator::connect(h.addr);
    assert_eq!(
        first.login(INIT_A, &h.iqn, isid, None, None),
        LoginResult::Ok
    );
    let mut second = RawInitiator::connect(h.addr);
    assert_eq!(
        second.login(INIT_A, &h.iqn, isid, None, None),
        LoginResult::Ok
    );
    assert!(first.closed_within(Duration::from_secs(5)));
    assert_eq!(second.test_unit_ready(), Some(0));
    assert_eq!(h.server.sessions().len(), 1);
    // A different ISID is a second session of the same initiator.
    let mut third = RawInitiator::connect(h.addr);
    assert_eq!(
        third.login(INIT_A, &h.iqn, [0x80, 9, 9, 9, 9, 9], None, None),
        LoginResult::Ok
    );
    assert_eq!(h.server.sessions().len(), 2);
}

fn prout(service_action: u8, key: u64, sa_key: u64, kind: u8) -> ([u8; 10], Vec<u8>) {
    let cdb = [0x5f, service_action, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (cdb, p)
}

#[test]
fn persistent_reservations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let prdir = tempfile::tempdir().unwrap();
    let store = Arc::new(FilePrStore::new(prdir.path()).unwrap());
    let h = Harness::start_in(dir, 16 * MIB, vec![], Some(store.clone()));
    let isid = [0x80, 0, 0, 0, 0, 7];
    let mut a = RawInitiator::connect(h.addr);
    assert_eq!(a.login(INIT_A, &h.iqn, isid, None, None), LoginResult::Ok);
    let (cdb, p) = prout(0, 0, 0xfeed, 0);
    assert_eq!(a.command(&cdb, 0, &p).unwrap().0, 0);
    let (cdb, p) = prout(1, 0xfeed, 0, 3);
    assert_eq!(a.command(&cdb, 0, &p).unwrap().0, 0);
    drop(a);
    let dir = h.stop();

    let h = Harness::start_in(dir, 16 * MIB, vec![], Some(store));
    let mut b = RawInitiator::connect(h.addr);
    assert_eq!(
        b.login(INIT_B, &h.iqn, [0x80, 0, 0, 0, 0, 8], None, None),
        LoginResult::Ok
    );
    let (status, keys, _) = b
        .command(&[0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0], 64, &[])
        .unwrap();
    assert_eq!(status, 0);
    assert_eq!(&keys[4..8], &8u32.to_be_bytes());
    assert_eq!(&keys[8..16], &0xfeedu64.to_be_bytes());
    // Exclusive access held by A's nexus: B's read conflicts.
    let (status, _, _) = b
        .command(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, &[])
        .unwrap();
    assert_eq!(status, 0x18, "RESERVATION CONFLICT expected");
    let mut a = RawInitiator::connect(h.addr);
    assert_eq!(a.login(INIT_A, &h.iqn, isid, None, None), LoginResult::Ok);
    let (status, _, _) = a
        .command(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, &[])
        .unwrap();
    assert_eq!(status, 0, "the holder's nexus reads after the restart");
}

/// A thin pool out of space: writes fail with SPACE ALLOCATION FAILED WRITE PROTECT.
struct FullPool(FileBlockDevice);

impl BlockDevice for FullPool {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), BlockError> {
        Err(BlockError::NoSpace)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.0.flush()
    }
}

#[test]
fn a_full_thin_pool_answers_space_allocation_failed() {
    let dir = tempfile::tempdir().unwrap();
    let dev = FileBlockDevice::open(&dir.path().join("l"), Some(MIB), 512, false).unwrap();
    let server = TargetServer::in_memory(ServerOptions::default());
    server
        .add_target(TargetConfig {
            iqn: "iqn.2024-01.org.pool.test:full".into(),
            alias: None,
            luns: vec![LunConfig {
                id: 0,
                device: Arc::new(FullPool(dev)),
                serial: "full".into(),
                naa: naa_from_serial("full"),
            }],
            initiators: vec![],
            allow_any_initiator: true,
        })
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let task = rt.spawn(async move {
        s.run(listener, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut a = RawInitiator::connect(addr);
    assert_eq!(
        a.login(
            INIT_A,
            "iqn.2024-01.org.pool.test:full",
            [0x80, 0, 0, 0, 0, 1],
            None,
            None
        ),
        LoginResult::Ok
    );
    let (status, _, sense) = a
        .command(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, &[1u8; 512])
        .unwrap();
    assert_eq!(status, 2);
    assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (0x07, 0x27, 0x07));
    let _ = stop.send(());
    rt.block_on(task).unwrap().unwrap();
}
