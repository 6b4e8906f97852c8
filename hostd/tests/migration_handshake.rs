//! The migration handshake against strangers, with real KVM and TCP on loopback: a
//! connection that sends nothing, or one byte, is closed once the Hello deadline passes,
//! connections past the cap are closed at once, and meanwhile the prepared receive
//! survives and completes for the real source (over TLS, as the host it was prepared
//! for).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use hostd::console::Console;
use hostd::migration::{self, Handshake, Incoming, SendOptions, StreamTls};
use hostd::testguest::{self, heartbeat_sum, heartbeats};
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmSpec};
use pool_trust::Identity;
use proto::host::MigrationProgress;

const WAIT: Duration = Duration::from_secs(30);
const HELLO_DEADLINE: Duration = Duration::from_secs(1);

fn spec(cmdline: &str) -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_bytes: 64 << 20,
        boot: BootSpec {
            kernel: testguest::elf_path().to_owned(),
            initrd: None,
            cmdline: cmdline.into(),
            protocol: BootProtocol::Auto,
        },
        disks: vec![],
        nets: vec![],
        cpuid_mask: vec![],
    }
}

fn wait_heartbeats(console: &Console, n: usize) {
    let deadline = Instant::now() + WAIT;
    while heartbeats(&console.text()).len() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} heartbeats: {}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the destination closed `s` within `limit` (whatever it said first: a TLS
/// alert, say).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut b = [0u8; 256];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn slow_loris_connections_are_dropped_and_the_real_migration_still_completes() {
    let cmd = "seed=21 mode=heartbeat hb_ms=20";
    let console_a = Console::new(1 << 20, None).unwrap();
    let mut a = Vm::new(&spec(cmd), console_a.clone()).unwrap();
    a.start().unwrap();
    wait_heartbeats(&console_a, 2);

    let pki = common::Pki::new();
    let tls = |h: &str| StreamTls::new(&pki.issue(&Identity::Host(h.into()), &[])).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let inc = Incoming {
        vm_id: "vm1".into(),
        token: "s3cret".into(),
        source_host: "src".into(),
        tls: tls("dst"),
        spec: spec(cmd),
    };
    let limits = Handshake {
        deadline: HELLO_DEADLINE,
        max_pending: 3,
    };
    let dest = std::thread::spawn(move || {
        let console = Console::new(1 << 20, None).unwrap();
        let vm = migration::receive_with(
            &listener,
            &inc,
            limits,
            console.clone(),
            &AtomicBool::new(false),
            Instant::now() + WAIT,
            &mut || {},
        );
        (vm, console)
    });

    // Two strangers: one silent, one that sends the first byte of a TLS handshake record
    // and no more.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut trickle = TcpStream::connect(addr).unwrap();
    trickle.write_all(&[0x16]).unwrap();
    assert!(closed_within(
        &mut silent,
        HELLO_DEADLINE + Duration::from_secs(5)
    ));
    assert!(closed_within(&mut trickle, Duration::from_secs(5)));
    assert!(started.elapsed() >= HELLO_DEADLINE - Duration::from_millis(50));
    assert!(!dest.is_finished(), "the prepared receive survives them");

    // Three strangers fill the pending set; a fourth is closed at once.
    let mut fill: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut extra = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut extra, Duration::from_secs(5)));
    assert!(
        t.elapsed() < HELLO_DEADLINE,
        "closed on accept: {:?}",
        t.elapsed()
    );
    // Once the deadline has cleared them, the real source gets through while a new
    // stranger sits silent beside it.
    for s in &mut fill {
        assert!(closed_within(s, Duration::from_secs(5)));
    }
    let mut beside = TcpStream::connect(addr).unwrap();
    let sent = migration::send(
        &a,
        &SendOptions {
            vm_id: "vm1".into(),
            token: "s3cret".into(),
            destination: addr.to_string(),
            destination_host: "dst".into(),
            tls: tls("src"),
            downtime_budget: migration::DEFAULT_DOWNTIME,
            max_rounds: migration::DEFAULT_MAX_ROUNDS,
            timeout: Duration::from_secs(60),
            auto_converge: false,
            bandwidth_limit: 0,
            stream_version: migration::wire::VERSION,
        },
        &AtomicBool::new(false),
        MigrationProgress::default(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{}", proto::error_chain(&e)));
    assert!(sent.confirmed);
    a.stop();
    let (vm, console) = dest.join().unwrap();
    let vm = vm.unwrap_or_else(|e| panic!("{}", proto::error_chain(&e)));
    let n = heartbeats(&console.text()).len();
    wait_heartbeats(&console, n + 2);
    vm.stop();
    // The receive is over: the stranger beside it is gone too.
    assert!(closed_within(&mut beside, Duration::from_secs(5)));
    // One guest, every heartbeat once and in order across the move.
    let all = format!("{}{}", console_a.text(), console.text());
    let hbs = heartbeats(&all);
    assert!(hbs.len() > 4, "{all}");
    for (i, hb) in hbs.iter().enumerate() {
        assert_eq!(hb.seq, i as u64 + 1, "{all}");
        assert_eq!(hb.sum, heartbeat_sum(21, hb.seq), "{all}");
    }
}
