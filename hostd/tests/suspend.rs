//! Suspend to a state volume and resume on another host, through `HostService` on two
//! `hostd` servers (127.0.0.1 and 127.0.0.2) with the test guest in `hostd-vmm`
//! processes, its disk and state volumes LUNs of an iscsi-target server on loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, Pki, Target, WAIT};
use hostd::migration::saved;
use hostd::testguest::{check_pattern, heartbeat_sum, heartbeats};
use proto::host::host_service_client::HostServiceClient;
use proto::host::*;
use tonic::transport::Channel;

const SEED: u64 = 11;
const HOSTS: [&str; 2] = ["host-a", "host-b"];
const HOST_IQNS: [&str; 2] = [
    "iqn.2026-11.lab.pool:suspend-a",
    "iqn.2026-11.lab.pool:suspend-b",
];
const MEMORY: u64 = 64 << 20;
/// The LUNs: the disk, the state volume, an empty one, and one for a corrupted copy.
const DISK: u32 = 0;
const STATE: u32 = 1;
const EMPTY: u32 = 2;
const CORRUPT: u32 = 3;

fn state_volume(target: &Target, lun: u32) -> IscsiDisk {
    match target.disk("state", lun, false, None).backend {
        Some(disk_config::Backend::Iscsi(v)) => v,
        _ => unreachable!("an iSCSI disk"),
    }
}

async fn console_text(d: &Daemon, id: &str) -> String {
    d.manager.console(id).await.unwrap().text()
}

async fn wait_heartbeats(d: &Daemon, id: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = console_text(d, id).await;
        if heartbeats(&text).len() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} heartbeats: {text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every heartbeat once, in order, with the checksum of its sequence number.
fn assert_chain(text: &str) -> usize {
    let hbs = heartbeats(text);
    for (i, hb) in hbs.iter().enumerate() {
        assert_eq!(hb.seq, i as u64 + 1, "{text}");
        assert_eq!(hb.sum, heartbeat_sum(SEED, hb.seq), "{text}");
        assert_eq!(hb.bad, 0, "{text}");
    }
    hbs.len()
}

async fn absent(c: &mut HostServiceClient<Channel>, id: &str) -> bool {
    c.get_vm(VmRequest { vm_id: id.into() })
        .await
        .is_err_and(|s| s.code() == tonic::Code::NotFound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_vm_resumes_on_another_host_where_it_was_and_a_bad_state_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state_bytes = saved::volume_bytes_for(MEMORY);
    let target = Target::start(
        dir.path(),
        &[8 << 20, state_bytes, state_bytes, state_bytes],
        false,
    );
    let pki = Arc::new(Pki::new());
    let hosts = [
        Daemon::start_in(
            pki.clone(),
            HOSTS[0],
            &dir.path().join("a"),
            256 << 20,
            "127.0.0.1",
            HOST_IQNS[0],
        )
        .await,
        Daemon::start_in(
            pki,
            HOSTS[1],
            &dir.path().join("b"),
            256 << 20,
            "127.0.0.2",
            HOST_IQNS[1],
        )
        .await,
    ];
    let mut clients = [hosts[0].client().await, hosts[1].client().await];
    let mut cfg = common::config(&format!(
        "seed={SEED} blk=write mode=heartbeat hb_ms=20 dirty_mib_s=16 dirty_mib=8"
    ));
    cfg.memory_bytes = MEMORY;
    cfg.disks = vec![target.disk("vda", DISK, false, None)];
    common::create(&mut clients[0], "s1", cfg.clone(), true).await;
    wait_heartbeats(&hosts[0], "s1", 5).await;

    // A state volume too small for the VM is refused before the guest pauses.
    let small = IscsiDisk {
        lun: DISK,
        ..state_volume(&target, DISK)
    };
    let err = clients[0]
        .save_vm(SaveVmRequest {
            vm_id: "s1".into(),
            state_volume: Some(small),
            resume: false,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("needs one of at least"), "{err:?}");
    common::wait_state(&mut clients[0], "s1", PowerState::Running).await;

    // Suspend: the state is written and the VM stops, as suspended.
    let saved = clients[0]
        .save_vm(SaveVmRequest {
            vm_id: "s1".into(),
            state_volume: Some(state_volume(&target, STATE)),
            resume: false,
        })
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "suspend of a {} MiB guest: paused {} ms, {} bytes written",
        MEMORY >> 20,
        saved.pause_ms,
        saved.bytes_written
    );
    assert!(saved.bytes_written > 0);
    let vm = common::wait_state(&mut clients[0], "s1", PowerState::Stopped).await;
    assert_eq!(vm.last_stop_reason, StopReason::Suspended as i32, "{vm:?}");
    let before = console_text(&hosts[0], "s1").await;
    let beats_before = assert_chain(&before);
    // Nothing runs any more on host a: no heartbeat comes after the suspend.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        heartbeats(&console_text(&hosts[0], "s1").await).len(),
        beats_before
    );

    // An empty volume, and a copy of the state with one byte changed, are refused on
    // host b: nothing runs, no VM is left there.
    let state = std::fs::read(&target.luns[STATE as usize]).unwrap();
    let header = saved::Header::read_from(&state, state.len() as u64).unwrap();
    let mut corrupt = state.clone();
    let at = saved::HEADER_LEN + (header.stream_len as usize) / 2;
    corrupt[at] ^= 0x40;
    std::fs::write(&target.luns[CORRUPT as usize], &corrupt).unwrap();
    for (lun, want) in [(EMPTY, "holds no saved VM"), (CORRUPT, "saved stream")] {
        let err = clients[1]
            .restore_vm(RestoreVmRequest {
                vm_id: "s1".into(),
                config: Some(cfg.clone()),
                state_volume: Some(state_volume(&target, lun)),
            })
            .await
            .unwrap_err();
        assert!(err.message().contains(want), "LUN {lun}: {err:?}");
        assert!(absent(&mut clients[1], "s1").await, "LUN {lun} left a VM");
    }

    // The real state: the guest runs on host b from where it was. While it is read, host
    // b lists the VM arriving, never stopped (the pool would boot a stopped one afresh
    // over it), and a second restore is refused.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (mut c, done) = (hosts[1].client().await, done.clone());
        let (cfg, vol) = (cfg.clone(), state_volume(&target, STATE));
        tokio::spawn(async move {
            let (mut seen, mut second) = (Vec::new(), None);
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let vms = c.list_vms(ListVmsRequest::default()).await.unwrap();
                let Some(v) = vms.into_inner().vms.into_iter().find(|v| v.id == "s1") else {
                    continue;
                };
                if seen.last() != Some(&v.power_state()) {
                    seen.push(v.power_state());
                }
                if v.power_state() == PowerState::Migrating && second.is_none() {
                    let r = c.restore_vm(RestoreVmRequest {
                        vm_id: "s1".into(),
                        config: Some(cfg.clone()),
                        state_volume: Some(vol.clone()),
                    });
                    second = Some(r.await.map(|_| ()));
                }
            }
            (seen, second)
        })
    };
    clients[1]
        .restore_vm(RestoreVmRequest {
            vm_id: "s1".into(),
            config: Some(cfg.clone()),
            state_volume: Some(state_volume(&target, STATE)),
        })
        .await
        .unwrap();
    done.store(true, std::sync::atomic::Ordering::Release);
    let (seen, second) = watcher.await.unwrap();
    let err = second.expect("a second restore was tried").unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        !seen.contains(&PowerState::Stopped) && seen.contains(&PowerState::Migrating),
        "listed while restoring: {seen:?}"
    );
    common::wait_state(&mut clients[1], "s1", PowerState::Running).await;
    let after_start = heartbeats(&console_text(&hosts[1], "s1").await).len();
    wait_heartbeats(&hosts[1], "s1", after_start + 5).await;
    let after = console_text(&hosts[1], "s1").await;
    let first = heartbeats(&after)[0];
    assert!(
        first.seq > beats_before as u64,
        "host b's first heartbeat is {}, host a's last {beats_before}",
        first.seq
    );
    let total = assert_chain(&[before, after].concat());
    assert!(total >= beats_before + 5);
    // Its disk: the pattern it wrote on host a and goes on writing on host b.
    let lun = std::fs::read(&target.luns[DISK as usize]).unwrap();
    assert_eq!(check_pattern(SEED, 0, 0, &lun[..256 << 10]), Ok(()));

    // A checkpoint: saved and running on, on host b, with its heartbeat going on.
    let beats = heartbeats(&console_text(&hosts[1], "s1").await).len();
    let cp = clients[1]
        .save_vm(SaveVmRequest {
            vm_id: "s1".into(),
            state_volume: Some(state_volume(&target, EMPTY)),
            resume: true,
        })
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "checkpoint: paused {} ms, {} bytes written",
        cp.pause_ms, cp.bytes_written
    );
    assert_eq!(
        cp.vm.unwrap().power_state,
        PowerState::Running as i32,
        "a checkpoint runs on"
    );
    wait_heartbeats(&hosts[1], "s1", beats + 3).await;
    // A live VM is not restored over.
    let err = clients[1]
        .restore_vm(RestoreVmRequest {
            vm_id: "s1".into(),
            config: Some(cfg),
            state_volume: Some(state_volume(&target, EMPTY)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}
