//! `HostService` end to end: a real gRPC server on loopback, VMs in real `hostd vmm`
//! processes running the test guest on real KVM.

use std::time::{Duration, Instant};

mod common;

use common::*;
use hostd::testguest::{self, heartbeat_sum};
use proto::host::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_create_start_pause_resume_reboot_shutdown_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;

    let vm = create(
        &mut c,
        "vm1",
        config("seed=4 mode=heartbeat hb_ms=20"),
        false,
    )
    .await;
    assert_eq!(vm.power_state, PowerState::Stopped as i32);
    assert_eq!(vm.last_stop_reason, StopReason::None as i32);

    let vm = c
        .start_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Running as i32);
    let pid = vm.vmm_pid;
    assert!(pid > 0 && process_alive(pid));
    assert!(vm.started_at.is_some());
    // The VM's record may hold CHAP secrets or a migration token: owner-only.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("vms/vm1/vm.pb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    let mut console = ConsoleReader::open(&mut c, "vm1").await;
    assert!(console.wait_for("HB seq=3 ").await, "{}", console.text);

    // A second start of a running VM is refused and changes nothing.
    let err = c
        .start_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(get(&mut c, "vm1").await.vmm_pid, pid);

    let vm = c
        .pause_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Paused as i32);
    let log = d.manager.console_log_path("vm1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let frozen = std::fs::metadata(&log).unwrap().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        frozen,
        "a paused guest printed"
    );
    let err = c
        .pause_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let vm = c
        .resume_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Running as i32);
    let seen = console.text.len();
    assert!(console.wait_for_from("HB seq=", seen).await);

    // Forced reboot: the guest starts again in the same VM process.
    let mark = console.text.len();
    let vm = c
        .reboot_vm(RebootVmRequest {
            vm_id: "vm1".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Running as i32);
    assert!(
        console.wait_for_from("GUEST start", mark).await,
        "{}",
        &console.text[mark..]
    );
    assert!(console.wait_for_from("HB seq=2 ", mark).await);
    assert_eq!(
        get(&mut c, "vm1").await.vmm_pid,
        pid,
        "reboot stays in one process"
    );

    // Polite shutdown: the guest sees Ctrl-Alt-Del and powers off.
    let vm = c
        .shutdown_vm(ShutdownVmRequest {
            vm_id: "vm1".into(),
            force: false,
            timeout_seconds: 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Stopped as i32, "{vm:?}");
    assert_eq!(
        vm.last_stop_reason,
        StopReason::GuestPoweroff as i32,
        "{vm:?}"
    );
    assert!(console.wait_for("GUEST shutdown requested").await);
    assert_eq!(vm.vmm_pid, 0);
    let deadline = Instant::now() + WAIT;
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "the VM process outlived its VM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Start again, then force it off.
    let vm = c
        .start_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Running as i32);
    let vm = c
        .shutdown_vm(ShutdownVmRequest {
            vm_id: "vm1".into(),
            force: true,
            timeout_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Stopped as i32);
    assert_eq!(vm.last_stop_reason, StopReason::Forced as i32);

    c.destroy_vm(VmRequest {
        vm_id: "vm1".into(),
    })
    .await
    .unwrap();
    let err = c
        .get_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        !dir.path().join("vms/vm1").exists(),
        "destroy removes the VM's directory"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_poweroff_reset_and_triple_fault_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;

    create(&mut c, "off", config("seed=1"), true).await;
    let vm = wait_state(&mut c, "off", PowerState::Stopped).await;
    assert_eq!(
        vm.last_stop_reason,
        StopReason::GuestPoweroff as i32,
        "{vm:?}"
    );
    assert!(vm.last_stop_detail.contains("status 0"), "{vm:?}");

    create(&mut c, "tf", config("then=triple-fault"), true).await;
    let vm = wait_state(&mut c, "tf", PowerState::Crashed).await;
    assert_eq!(
        vm.last_stop_reason,
        StopReason::TripleFault as i32,
        "{vm:?}"
    );

    // A guest that resets is booted again: it keeps running, and says why it last stopped.
    create(&mut c, "rst", config("then=reset"), true).await;
    let mut console = ConsoleReader::open(&mut c, "rst").await;
    let mut starts = 0;
    while starts < 3 {
        assert!(
            console
                .wait_for_from(
                    "GUEST start",
                    console.text.rfind("GUEST start").map_or(0, |i| i + 1)
                )
                .await
        );
        starts = console.text.matches("GUEST start").count();
    }
    let vm = get(&mut c, "rst").await;
    assert_eq!(vm.power_state, PowerState::Running as i32);
    assert_eq!(vm.last_stop_reason, StopReason::GuestReset as i32);
    for id in ["off", "tf", "rst"] {
        c.destroy_vm(VmRequest { vm_id: id.into() }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_vm_process_leaves_the_daemon_and_other_vms_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;
    for i in 0..3 {
        create(
            &mut c,
            &format!("vm{i}"),
            config(&format!("seed={i} mode=heartbeat hb_ms=20")),
            true,
        )
        .await;
    }
    let victim = get(&mut c, "vm1").await.vmm_pid;
    // As if the VMM hit a bug: the process dies on a signal.
    // SAFETY: kill(2) of a process this test's daemon started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let vm = wait_state(&mut c, "vm1", PowerState::Crashed).await;
    assert_eq!(vm.last_stop_reason, StopReason::VmmError as i32);
    assert!(vm.last_stop_detail.contains("signal: 9"), "{vm:?}");

    for (i, id) in [(0u64, "vm0"), (2, "vm2")] {
        let mut console = ConsoleReader::open(&mut c, id).await;
        assert!(console.wait_for("HB seq=").await);
        let mark = console.text.len();
        let hb = console
            .heartbeat_after(mark)
            .await
            .unwrap_or_else(|| panic!("{id} stopped beating"));
        assert_eq!(hb.sum, heartbeat_sum(i, hb.seq));
        assert_eq!(
            get(&mut c, id).await.power_state,
            PowerState::Running as i32
        );
    }
    // The crashed VM can be started again.
    let vm = c
        .start_vm(VmRequest {
            vm_id: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.power_state, PowerState::Running as i32);
    let vms = c
        .list_vms(ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(
        vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        ["vm0", "vm1", "vm2"]
    );
    for i in 0..3 {
        c.destroy_vm(VmRequest {
            vm_id: format!("vm{i}"),
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;
    let code = |r: Result<tonic::Response<Vm>, tonic::Status>| r.unwrap_err().code();

    let mut cfg = config("");
    cfg.boot.as_mut().unwrap().kernel_path = "/nonexistent/kernel".into();
    let err = c
        .create_vm(CreateVmRequest {
            vm_id: "a".into(),
            config: Some(cfg),
            start: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("/nonexistent/kernel"), "{err}");

    let mut cfg = config("");
    cfg.memory_bytes = hostd::vmm::host_memory_bytes() * 2;
    create(&mut c, "big", cfg, false).await;
    let err = c
        .start_vm(VmRequest {
            vm_id: "big".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(
        get(&mut c, "big").await.power_state,
        PowerState::Stopped as i32
    );

    // A file that exists but is no kernel: the create is rolled back when the start fails.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let mut cfg = config("");
    cfg.boot.as_mut().unwrap().kernel_path = junk.display().to_string();
    let err = c
        .create_vm(CreateVmRequest {
            vm_id: "junk".into(),
            config: Some(cfg),
            start: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("not a loadable ELF or bzImage"),
        "{err}"
    );
    assert_eq!(
        code(
            c.get_vm(VmRequest {
                vm_id: "junk".into()
            })
            .await
        ),
        Code::NotFound
    );
    assert!(!dir.path().join("vms/junk").exists());

    assert_eq!(
        code(
            c.pause_vm(VmRequest {
                vm_id: "big".into()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            c.start_vm(VmRequest {
                vm_id: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );
    let err = c
        .create_vm(CreateVmRequest {
            vm_id: "big".into(),
            config: Some(config("")),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = c
        .create_vm(CreateVmRequest {
            vm_id: "../x".into(),
            config: Some(config("")),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .create_vm(CreateVmRequest {
            vm_id: "v0".into(),
            config: Some(VmConfig {
                vcpus: 0,
                ..config("")
            }),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c
        .start_migration_send(StartMigrationSendRequest {
            vm_id: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("destination_address"), "{err:?}");
    let vms = c
        .list_vms(ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1, "only the one good create is left: {vms:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn disks_metrics_and_console_input_through_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;
    let img = dir.path().join("vda.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();

    create(
        &mut c,
        "io",
        config("seed=8 blk=rw blk_kib=256 then=echo"),
        false,
    )
    .await;
    // Disks are attached while stopped; a second disk with the same id is refused.
    let disk = DiskConfig {
        id: "vda".into(),
        backend: Some(disk_config::Backend::FilePath(img.display().to_string())),
        read_only: false,
    };
    c.attach_disk(AttachDiskRequest {
        vm_id: "io".into(),
        disk: Some(disk.clone()),
    })
    .await
    .unwrap();
    let err = c
        .attach_disk(AttachDiskRequest {
            vm_id: "io".into(),
            disk: Some(disk.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    c.start_vm(VmRequest { vm_id: "io".into() }).await.unwrap();
    let mut console = ConsoleReader::open(&mut c, "io").await;
    assert!(
        console.wait_for("BLK done devices=1 result=ok").await,
        "{}",
        console.text
    );
    let err = c
        .detach_disk(DetachDiskRequest {
            vm_id: "io".into(),
            disk_id: "vda".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "no hot-unplug: {err}");

    console
        .input
        .send(ConsoleInput {
            data: b"hello guest\r".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        console.wait_for("ECHO hello guest").await,
        "{}",
        console.text
    );

    let m = c
        .get_vm_metrics(VmRequest { vm_id: "io".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.memory_bytes, 64 << 20);
    assert!(m.vcpu_time_ns > 0 && m.rss_bytes > 0, "{m:?}");
    assert!(
        m.guest_resident_bytes > 0 && m.guest_resident_bytes < m.rss_bytes,
        "the guest's touched RAM is part of the VM process's RSS: {m:?}"
    );
    let disk_m = &m.disks[0];
    assert_eq!(disk_m.disk_id, "vda");
    assert!(
        disk_m.write_bytes >= 256 << 10 && disk_m.read_bytes >= 256 << 10,
        "{disk_m:?}"
    );
    assert!(
        disk_m.flush_ops >= 1 && disk_m.discard_ops >= 2,
        "{disk_m:?}"
    );

    let host = c
        .get_host_metrics(GetHostMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(host.vms_running, 1);
    assert_eq!(host.vcpus_assigned, 1);
    assert_eq!(host.memory_assigned_to_vms_bytes, 64 << 20);
    assert_eq!(host.vms.len(), 1);
    let info = c
        .get_host_info(GetHostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.kvm_available);
    assert_eq!(info.host_id, "test-host");
    assert!(info.memory_available_bytes < info.memory_total_bytes);
    assert!(!info.cpu.unwrap().cpuid.is_empty());

    c.shutdown_vm(ShutdownVmRequest {
        vm_id: "io".into(),
        force: false,
        timeout_seconds: 20,
    })
    .await
    .unwrap();
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        testguest::check_pattern(8, 0, 0, &bytes[..256 << 10]),
        Ok(())
    );
    c.detach_disk(DetachDiskRequest {
        vm_id: "io".into(),
        disk_id: "vda".into(),
    })
    .await
    .unwrap();
    c.destroy_vm(VmRequest { vm_id: "io".into() })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_outlive_clients_and_a_daemon_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path()).await;
    {
        let mut c = d.client().await;
        create(
            &mut c,
            "keep",
            config("seed=6 mode=heartbeat hb_ms=20"),
            true,
        )
        .await;
    } // the client goes away
    let mut c = d.client().await;
    let pid = get(&mut c, "keep").await.vmm_pid;
    let mut console = ConsoleReader::open(&mut c, "keep").await;
    assert!(console.wait_for("HB seq=2 ").await);
    drop(console);
    drop(c);

    // The daemon stops serving and forgets everything; the VM process runs on.
    d.stop_serving().await;
    drop(d);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(process_alive(pid));

    let d2 = Daemon::start(dir.path()).await;
    let mut c = d2.client().await;
    let vm = get(&mut c, "keep").await;
    assert_eq!(vm.power_state, PowerState::Running as i32, "{vm:?}");
    assert_eq!(vm.vmm_pid, pid, "the same VM process");
    let mut console = ConsoleReader::open(&mut c, "keep").await;
    let hb = console
        .heartbeat_after(0)
        .await
        .expect("the guest kept beating");
    assert_eq!(hb.sum, heartbeat_sum(6, hb.seq), "the guest kept its state");
    c.destroy_vm(VmRequest {
        vm_id: "keep".into(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "destroy did not end the VM process"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The daemon binary itself: serves over mutual TLS on the port it prints, and with
/// `--tie-vms` takes its VMs with it when told to stop.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_binary_serves_and_stops_its_tied_vms_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let host = pool_trust::Identity::Host(HOST.into());
    pki.issue(&host, &["127.0.0.1"]);
    let member = pki.issue(&pool_trust::Identity::Member(1), &[]);
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_hostd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tie-vms",
            "--host-id",
            HOST,
            "--log",
            "warn",
            "--tls-dir",
        ])
        .arg(pki.dir_of(&host))
        .arg("--run-dir")
        .arg(dir.path())
        // Where the test guest is built.
        .arg("--image-dir")
        .arg(
            std::path::Path::new(hostd::testguest::ELF_PATH)
                .parent()
                .unwrap(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("hostd.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(daemon.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the daemon prints its address")
        .unwrap()
        .unwrap();
    let addr = line
        .strip_prefix("hostd listening on ")
        .expect("address line")
        .to_owned();
    let mut c = connect_as(&addr, &member).await;
    let vm = create(&mut c, "tied", config("then=spin"), true).await;
    assert_eq!(vm.power_state, PowerState::Running as i32);
    let pid = vm.vmm_pid;
    assert!(process_alive(pid));
    get(&mut c, "tied").await;
    // A host's certificate is refused (and that is audited too).
    let other = pki.issue(&pool_trust::Identity::Host("other".into()), &[]);
    let err = connect_as(&addr, &other)
        .await
        .list_vms(ListVmsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(daemon.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + WAIT;
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "a tied VM outlived its daemon");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The audit trail, whatever the log level: the change and the refusal, by whom; not
    // the read that went through.
    let log = std::fs::read_to_string(dir.path().join("hostd.log")).unwrap();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains(" audit:")).collect();
    assert!(
        audit.iter().any(|l| l.contains("who=member/1")
            && l.contains("call=/pool.host.v1.HostService/CreateVm")
            && l.contains("result=Ok")),
        "{log}"
    );
    assert!(
        audit.iter().any(|l| l.contains("who=host/other")
            && l.contains("ListVms")
            && l.contains("result=PermissionDenied")),
        "{log}"
    );
    assert!(!audit.iter().any(|l| l.contains("GetVm")), "{log}");
}
