//! Guest disks on iSCSI volumes: the test guest's virtio-blk requests go through the VM
//! process's iscsi-initiator session to an iscsi-target server on loopback, and the
//! pattern it writes is found in the target's LUN file.

mod common;

use std::sync::Arc;

use common::*;
use hostd::testguest;
use proto::host::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_pattern_lands_on_the_iscsi_volume_and_read_only_volumes_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start(dir.path(), &[8 << 20, 4 << 20], true);
    std::fs::write(&target.luns[1], vec![0x33u8; 4 << 20]).unwrap();
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;
    let mut cfg = config("seed=13 blk=rw blk_kib=1024 then=spin");
    let chap = Some((CHAP_USER, CHAP_SECRET));
    cfg.disks = vec![
        target.disk("vda", 0, false, chap),
        target.disk("vdb", 1, true, chap),
    ];
    let vm = create(&mut c, "iscsi", cfg, true).await;
    assert_eq!(vm.power_state, PowerState::Running as i32);
    let mut console = ConsoleReader::open(&mut c, "iscsi").await;
    assert!(
        console.wait_for("BLK done devices=2 result=ok\n").await,
        "{}",
        console.text
    );
    assert!(
        console.text.contains("BLK dev=1 ro-write=rejected"),
        "{}",
        console.text
    );
    let m = c
        .get_vm_metrics(VmRequest {
            vm_id: "iscsi".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let vda = m.disks.iter().find(|d| d.disk_id == "vda").unwrap();
    assert!(vda.write_bytes >= 1 << 20 && vda.flush_ops >= 1, "{vda:?}");
    // The guest flushed; the bytes are on the target's LUN, whatever the VM does next.
    c.destroy_vm(VmRequest {
        vm_id: "iscsi".into(),
    })
    .await
    .unwrap();
    let lun0 = std::fs::read(&target.luns[0]).unwrap();
    assert_eq!(testguest::check_pattern(13, 0, 0, &lun0[..1 << 20]), Ok(()));
    assert!(
        lun0[(1 << 20)..(1 << 20) + 16 * 512]
            .iter()
            .all(|&b| b == 0),
        "write-zeroes"
    );
    assert_eq!(
        std::fs::read(&target.luns[1]).unwrap(),
        vec![0x33u8; 4 << 20]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_refuses_login_or_lacks_the_lun_is_a_clear_error_and_nothing_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start(dir.path(), &[4 << 20], true);
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;
    let attempt = |disk: DiskConfig| {
        let mut cfg = config("");
        cfg.disks = vec![disk];
        CreateVmRequest {
            vm_id: "v".into(),
            config: Some(cfg),
            start: true,
        }
    };

    let err = c
        .create_vm(attempt(target.disk(
            "vda",
            0,
            false,
            Some((CHAP_USER, "wrong-secret-000")),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("cannot log in"), "{err}");
    assert!(err.message().contains("refused"), "{err}");

    let err = c
        .create_vm(attempt(target.disk("vda", 0, false, None)))
        .await
        .unwrap_err();
    assert!(err.message().contains("cannot log in"), "{err}");

    let err = c
        .create_vm(attempt(target.disk(
            "vda",
            7,
            false,
            Some((CHAP_USER, CHAP_SECRET)),
        )))
        .await
        .unwrap_err();
    assert!(err.message().contains("has no LUN 7"), "{err}");

    let mut nowhere = target.disk("vda", 0, false, None);
    if let Some(disk_config::Backend::Iscsi(i)) = &mut nowhere.backend {
        i.portal = format!("127.0.0.1:{}", common_free_port());
    }
    let err = c.create_vm(attempt(nowhere)).await.unwrap_err();
    assert!(err.message().contains("cannot log in"), "{err}");

    let vms = c
        .list_vms(ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(vms.is_empty(), "{vms:?}");
    assert!(!dir.path().join("vms/v").exists());

    // Bad settings are refused before anything starts.
    let mut half_chap = target.disk("vda", 0, false, None);
    if let Some(disk_config::Backend::Iscsi(i)) = &mut half_chap.backend {
        i.chap_username = CHAP_USER.into();
    }
    let err = c.create_vm(attempt(half_chap)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

fn common_free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// LUN 0 of `target` as a VM process opens it, without CHAP.
fn open_lun0(
    rt: Arc<tokio::runtime::Runtime>,
    target: &Target,
) -> hostd::devices::virtio::block::iscsi::IscsiBackend {
    use hostd::devices::virtio::block::iscsi::{IscsiBackend, IscsiTarget};
    IscsiBackend::open(
        rt,
        &IscsiTarget {
            portal: format!("127.0.0.1:{}", target.port),
            target_iqn: TARGET_IQN.into(),
            lun: 0,
            initiator_iqn: INITIATOR.into(),
            chap: None,
            mutual_chap: None,
        },
    )
    .unwrap()
}

/// The last reference to a disk can go on a runtime's thread (a stopping disk's final
/// completion runs on the session's runtime): its logout must neither block on a runtime
/// there nor drop one, both of which panic, and must still happen.
#[test]
fn a_disk_let_go_on_a_runtime_thread_still_logs_out() {
    use hostd::devices::virtio::block::iscsi::runtime;
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start(dir.path(), &[4 << 20], false);
    let disk = open_lun0(runtime().unwrap(), &target);
    assert_eq!(target.server.sessions().len(), 1);
    let other = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    other.block_on(async move { drop(disk) });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !target.server.sessions().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the session is still logged in: {:?}",
            target.server.sessions()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The device starts a whole pass over the guest's ring from a task on the session's
/// runtime: those requests reach the session together, and their commands leave in one
/// write rather than a write (and a wake-up of the target) each.
#[test]
fn requests_started_in_one_pass_leave_in_one_write() {
    use hostd::devices::virtio::block::backend::AsyncBlockIo;
    use hostd::devices::virtio::block::iscsi::runtime;
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start(dir.path(), &[4 << 20], false);
    std::fs::write(&target.luns[0], vec![7u8; 4 << 20]).unwrap();
    let rt = runtime().unwrap();
    let disk = Arc::new(open_lun0(rt.clone(), &target));
    let before = disk.stats();
    let (tx, rx) = std::sync::mpsc::channel();
    let d = disk.clone();
    rt.spawn(async move {
        for i in 0..8u64 {
            let tx = tx.clone();
            d.read(
                i * 4096,
                4096,
                Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
            );
        }
    });
    for _ in 0..8 {
        let data = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(data, vec![7u8; 4096]);
    }
    let after = disk.stats();
    assert_eq!(after.commands - before.commands, 8);
    assert!(
        after.sends - before.sends <= 2,
        "8 reads took {} writes",
        after.sends - before.sends
    );
}
