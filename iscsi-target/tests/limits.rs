//! Limits on what an initiator can hold or send before anyone trusts it: idle discovery
//! sessions are closed, sessions per initiator name are bounded (the login past the
//! bound is refused with a status, not a dropped socket), and Data-Out whose offset and
//! length would wrap ends only that connection.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, INIT_A, INIT_B, LoginResult, RawInitiator};
use iscsi_pdu::bhs::{DataOut, Header, ScsiCommand, login_status};
use iscsi_target::ServerOptions;

fn options() -> ServerOptions {
    ServerOptions {
        nop_interval: None,
        ..ServerOptions::default()
    }
}

fn isid(n: u8) -> [u8; 6] {
    [0x80, 0, 0, 0, 0, n]
}

#[test]
fn an_idle_discovery_session_is_closed_and_a_busy_one_is_not() {
    let idle = Duration::from_millis(500);
    let h = Harness::start_with_options(
        1 << 20,
        vec![],
        ServerOptions {
            discovery_idle_timeout: idle,
            ..options()
        },
    );
    // One that keeps asking stays open well past the idle time.
    let mut busy = RawInitiator::connect(h.addr);
    assert_eq!(busy.login_discovery(INIT_A, isid(1)), LoginResult::Ok);
    let mut quiet = RawInitiator::connect(h.addr);
    assert_eq!(quiet.login_discovery(INIT_B, isid(1)), LoginResult::Ok);
    let started = Instant::now();
    while started.elapsed() < 3 * idle {
        let keys = busy.send_targets().expect("the busy session stays open");
        assert!(
            keys.contains(&("TargetName".into(), h.iqn.clone())),
            "{keys:?}"
        );
        std::thread::sleep(idle / 4);
    }
    // The quiet one was closed meanwhile: its first read sees the end of the stream.
    assert!(quiet.closed_within(Duration::from_millis(100)));
    // An idle session is closed only after the idle time.
    let mut late = RawInitiator::connect(h.addr);
    assert_eq!(late.login_discovery(INIT_B, isid(2)), LoginResult::Ok);
    let t = Instant::now();
    assert!(late.closed_within(Duration::from_secs(10)));
    assert!(
        t.elapsed() >= idle - Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn the_login_past_an_initiators_bound_is_refused_with_out_of_resources() {
    let h = Harness::start_with_options(
        1 << 20,
        vec![],
        ServerOptions {
            max_connections_per_initiator: 2,
            ..options()
        },
    );
    // Two sessions of A: a normal one and a discovery one.
    let mut a1 = RawInitiator::connect(h.addr);
    assert_eq!(
        a1.login(INIT_A, &h.iqn, isid(1), None, None),
        LoginResult::Ok
    );
    let mut a2 = RawInitiator::connect(h.addr);
    assert_eq!(a2.login_discovery(INIT_A, isid(2)), LoginResult::Ok);
    // The third of A, normal or discovery, is answered with a login status.
    let refused = LoginResult::Refused(
        login_status::OUT_OF_RESOURCES.0,
        login_status::OUT_OF_RESOURCES.1,
    );
    let mut a3 = RawInitiator::connect(h.addr);
    assert_eq!(a3.login(INIT_A, &h.iqn, isid(3), None, None), refused);
    let mut a4 = RawInitiator::connect(h.addr);
    assert_eq!(a4.login_discovery(INIT_A, isid(4)), refused);
    // Another initiator is not affected, and A's sessions work on.
    let mut b = RawInitiator::connect(h.addr);
    assert_eq!(
        b.login(INIT_B, &h.iqn, isid(1), None, None),
        LoginResult::Ok
    );
    assert_eq!(a1.test_unit_ready(), Some(0));
    assert!(a2.send_targets().is_some());
    // Reinstating a session (same ISID) is not a new one.
    let mut a1_again = RawInitiator::connect(h.addr);
    assert_eq!(
        a1_again.login(INIT_A, &h.iqn, isid(1), None, None),
        LoginResult::Ok
    );
    assert!(a1.closed_within(Duration::from_secs(10)));
    // Once a session ends, its place is free again.
    drop(a2);
    let until = Instant::now() + Duration::from_secs(10);
    let _a5 = loop {
        let mut again = RawInitiator::connect(h.addr);
        match again.login(INIT_A, &h.iqn, isid(5), None, None) {
            LoginResult::Ok => break again,
            r => {
                assert_eq!(r, refused);
                assert!(
                    Instant::now() < until,
                    "the discovery session's place came back"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(h.server.sessions().len(), 3);
}

#[test]
fn data_out_whose_offset_wraps_ends_only_that_connection() {
    let h = Harness::start_with_options(1 << 20, vec![], options());
    let mut bad = RawInitiator::connect(h.addr);
    assert_eq!(
        bad.login(INIT_A, &h.iqn, isid(1), None, None),
        LoginResult::Ok
    );
    let mut good = RawInitiator::connect(h.addr);
    assert_eq!(
        good.login(INIT_B, &h.iqn, isid(1), None, None),
        LoginResult::Ok
    );
    // WRITE(10) of 16 blocks, no immediate data (InitialR2T=Yes): the target asks for
    // the data with an R2T.
    let mut cdb = [0u8; 16];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&16u16.to_be_bytes());
    let itt = 0x77;
    let cmd = ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: true,
        attr: 1,
        lun: 0,
        itt,
        expected_data_len: 16 * 512,
        cmd_sn: bad.cmd_sn,
        exp_stat_sn: bad.exp_stat_sn,
        cdb,
    };
    bad.cmd_sn = bad.cmd_sn.wrapping_add(1);
    bad.send(&Header::ScsiCommand(cmd), &[]);
    let r2t = loop {
        let p = bad.recv().expect("an R2T");
        match p.header().unwrap() {
            Header::R2t(r) => break r,
            Header::NopIn(_) | Header::AsyncMessage(_) => {}
            other => panic!("expected an R2T, got {other:?}"),
        }
    };
    assert_eq!((r2t.buffer_offset, r2t.desired_len), (0, 16 * 512));
    // Data at an offset that wraps to 0 when 4096 is added in 32 bits.
    let hostile = DataOut {
        final_: true,
        itt,
        ttt: r2t.ttt,
        exp_stat_sn: bad.exp_stat_sn,
        data_sn: 0,
        buffer_offset: u32::MAX - 4095,
        ..Default::default()
    };
    bad.send(&Header::DataOut(hostile), &[0x5a; 4096]);
    assert!(bad.closed_within(Duration::from_secs(10)));
    // The other session and new logins of the same initiator go on.
    assert_eq!(good.test_unit_ready(), Some(0));
    let mut again = RawInitiator::connect(h.addr);
    assert_eq!(
        again.login(INIT_A, &h.iqn, isid(1), None, None),
        LoginResult::Ok
    );
    let (status, _, _) = again
        .command(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, &[0xa5; 512])
        .unwrap();
    assert_eq!(status, 0);
    let lun = std::fs::read(h.lun_path()).unwrap();
    assert!(lun[..512].iter().all(|&b| b == 0xa5));
    assert!(
        lun[512..].iter().all(|&b| b == 0),
        "the refused data went nowhere"
    );
}
