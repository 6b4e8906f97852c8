//! The VMM core against real KVM: boots the test guest (`guest/`) in this process and
//! checks what it reports on its serial port, what it leaves on its disks, and how the
//! VM stops.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostd::console::Console;
use hostd::devices::virtio::block::{Disk, FileBackend};
use hostd::testguest::{self, check_pattern, heartbeat_sum, heartbeats};
use hostd::vmm::{BootError, BootProtocol, BootSpec, Vm, VmError, VmExit, VmSpec};

const WAIT: Duration = Duration::from_secs(30);

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

fn boot(spec: &VmSpec) -> (Vm, Arc<Console>) {
    let console = Console::new(1 << 20, None).unwrap();
    let mut vm = Vm::new(spec, console.clone()).expect("VM builds");
    vm.start().unwrap();
    (vm, console)
}

fn run_to_exit(spec: &VmSpec) -> (VmExit, String) {
    let (vm, console) = boot(spec);
    let exit = vm.wait_exit(Some(WAIT)).expect("guest stops in time");
    (exit, console.text())
}

fn image(dir: &tempfile::TempDir, name: &str, bytes: u64) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    path
}

fn disk(id: &str, path: &Path, read_only: bool) -> Disk {
    Disk::new(
        id,
        Arc::new(FileBackend::open(path, read_only).unwrap()),
        read_only,
    )
}

#[test]
fn guest_boots_prints_and_powers_off() {
    let (exit, text) = run_to_exit(&spec("seed=3"));
    assert_eq!(exit, VmExit::Poweroff { status: Some(0) }, "{text}");
    assert!(
        text.contains("GUEST start version=1 cmdline=\"seed=3\""),
        "{text}"
    );
    assert!(text.contains("GUEST done status=0 then=poweroff"), "{text}");
}

#[test]
fn heartbeats_carry_the_expected_checksums_and_dirty_memory_stays_intact() {
    let mut s = spec("seed=11 mode=heartbeat hb_ms=50 hb_count=8 dirty_mib_s=40 dirty_mib=4");
    s.vcpus = 2;
    let (exit, text) = run_to_exit(&s);
    assert_eq!(exit, VmExit::Poweroff { status: Some(0) }, "{text}");
    let hbs = heartbeats(&text);
    assert_eq!(hbs.len(), 8, "{text}");
    for (i, hb) in hbs.iter().enumerate() {
        assert_eq!(hb.seq, i as u64 + 1);
        assert_eq!(hb.sum, heartbeat_sum(11, hb.seq), "heartbeat {hb:?}");
        assert_eq!(hb.bad, 0, "{text}");
    }
    let last = hbs.last().unwrap();
    assert!(last.writes > 0, "the guest dirtied memory: {last:?}");
    assert!(last.ms >= 350, "heartbeats are paced by the TSC: {last:?}");
}

#[test]
fn guest_writes_a_pattern_the_host_finds_in_the_image_and_read_only_disks_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let rw = image(&dir, "rw.img", 4 << 20);
    let ro = image(&dir, "ro.img", 1 << 20);
    std::fs::write(&ro, vec![0x11u8; 1 << 20]).unwrap();
    let mut s = spec("seed=5 blk=rw blk_kib=512");
    s.disks = vec![disk("vda", &rw, false), disk("vdb", &ro, true)];
    let metrics = s.disks[0].metrics.clone();
    let (exit, text) = run_to_exit(&s);
    assert!(text.contains("BLK dev=0 result=ok"), "{text}");
    assert!(text.contains("BLK dev=1 ro-write=rejected"), "{text}");
    assert!(text.contains("BLK dev=1 result=ok"), "{text}");
    assert!(text.contains("BLK done devices=2 result=ok"), "{text}");
    assert_eq!(exit, VmExit::Poweroff { status: Some(0) }, "{text}");

    let bytes = std::fs::read(&rw).unwrap();
    assert_eq!(check_pattern(5, 0, 0, &bytes[..512 << 10]), Ok(()));
    // 16 write-zeroed sectors, then 16 discarded ones, right after the pattern.
    assert!(
        bytes[512 << 10..(512 << 10) + 16 * 512]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(
        bytes[(512 << 10) + 16 * 512..(512 << 10) + 32 * 512]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(bytes[(512 << 10) + 32 * 512..].iter().all(|&b| b == 0));
    assert_eq!(std::fs::read(&ro).unwrap(), vec![0x11u8; 1 << 20]);
    let m = metrics.snapshot();
    assert!(
        m.write_bytes >= 512 << 10 && m.read_bytes >= 512 << 10,
        "{m:?}"
    );
    assert!(
        m.flush_ops >= 1 && m.discard_ops == 1 && m.write_zeroes_ops == 1,
        "{m:?}"
    );
    assert_eq!(m.errors, 0);
    assert_eq!(m.invalid, 1, "the read past the end: {m:?}");
}

#[test]
fn disk_contents_survive_a_reboot_into_a_new_vm() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, "disk.img", 1 << 20);
    let d = disk("vda", &path, false);
    let mut first = spec("seed=9 blk=write blk_kib=128 then=reset");
    first.disks = vec![d.clone()];
    let (exit, text) = run_to_exit(&first);
    assert_eq!(exit, VmExit::Reset, "{text}");
    let mut second = spec("seed=9 blk=verify blk_kib=128");
    second.disks = vec![d.clone()];
    let (exit, text) = run_to_exit(&second);
    assert_eq!(exit, VmExit::Poweroff { status: Some(0) }, "{text}");
    assert!(
        text.contains("BLK dev=0 result=ok sectors=256 write=skipped verify=ok"),
        "{text}"
    );
    let m = d.metrics.snapshot();
    assert!(
        m.write_ops > 0 && m.read_ops > 0,
        "counters span both boots: {m:?}"
    );
}

#[test]
fn pause_freezes_the_guest_and_resume_lets_it_go_on() {
    let (vm, console) = boot(&spec("seed=2 mode=heartbeat hb_ms=20"));
    assert!(console.wait_for("HB seq=3 ", WAIT));
    vm.pause(Duration::from_secs(5)).unwrap();
    assert!(vm.is_paused());
    let frozen = console.total_bytes();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(console.total_bytes(), frozen, "a paused guest printed");
    vm.resume().unwrap();
    let before = heartbeats(&console.text()).last().unwrap().seq;
    let deadline = Instant::now() + WAIT;
    while heartbeats(&console.text()).last().unwrap().seq < before + 3 {
        assert!(Instant::now() < deadline, "no heartbeats after resume");
        std::thread::sleep(Duration::from_millis(10));
    }
    for hb in heartbeats(&console.text()) {
        assert_eq!(hb.sum, heartbeat_sum(2, hb.seq));
    }
    vm.stop();
    assert_eq!(vm.wait_exit(Some(WAIT)), Some(VmExit::Stopped));
}

#[test]
fn shutdown_request_reaches_the_guest_which_powers_off() {
    let (vm, console) = boot(&spec("then=spin"));
    assert!(console.wait_for("GUEST done", WAIT));
    vm.request_shutdown();
    assert_eq!(
        vm.wait_exit(Some(WAIT)),
        Some(VmExit::Poweroff { status: Some(0) })
    );
    assert!(console.text().contains("GUEST shutdown requested"));
}

#[test]
fn guest_crashes_are_reported_with_their_kind() {
    let (exit, text) = run_to_exit(&spec("then=triple-fault"));
    assert_eq!(exit, VmExit::TripleFault { vcpu: 0 }, "{text}");

    let (exit, text) = run_to_exit(&spec("then=fault"));
    assert_eq!(exit, VmExit::Poweroff { status: Some(4) }, "{text}");
    assert!(
        text.contains("GUEST fault vector=6 "),
        "#UD reported: {text}"
    );

    let (exit, text) = run_to_exit(&spec("then=bad-mmio"));
    assert!(text.contains("GUEST bad-mmio survived"), "{text}");
    assert_eq!(exit, VmExit::Poweroff { status: Some(0) });
}

#[test]
fn several_vms_run_at_once_and_one_crashing_leaves_the_others_running() {
    let vms: Vec<_> = (0..3)
        .map(|i| boot(&spec(&format!("seed={i} mode=heartbeat hb_ms=20"))))
        .collect();
    let (crasher, _) = boot(&spec("then=triple-fault"));
    assert_eq!(
        crasher.wait_exit(Some(WAIT)),
        Some(VmExit::TripleFault { vcpu: 0 })
    );
    drop(crasher);
    for (i, (vm, console)) in vms.iter().enumerate() {
        let seen = heartbeats(&console.text()).len();
        let deadline = Instant::now() + WAIT;
        while heartbeats(&console.text()).len() < seen + 2 {
            assert!(Instant::now() < deadline, "VM {i} stopped beating");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(vm.exit_reason(), None);
        let hb = *heartbeats(&console.text()).last().unwrap();
        assert_eq!(hb.sum, heartbeat_sum(i as u64, hb.seq));
    }
}

#[test]
fn bad_specs_are_refused_before_anything_runs() {
    let mut s = spec("");
    s.boot.kernel = "/nonexistent/vmlinux".into();
    let err = Vm::new(&s, Console::new(16, None).unwrap()).err().unwrap();
    assert!(
        matches!(err, VmError::Boot(BootError::KernelOpen { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent/vmlinux"));

    let mut s = spec("");
    s.memory_bytes = hostd::vmm::host_memory_bytes() + (1 << 30);
    assert!(matches!(
        Vm::new(&s, Console::new(16, None).unwrap()),
        Err(VmError::MemorySize { .. })
    ));
    s.memory_bytes = (64 << 20) + 1;
    assert!(matches!(
        Vm::new(&s, Console::new(16, None).unwrap()),
        Err(VmError::MemorySize { .. })
    ));

    let mut s = spec("");
    s.vcpus = 0;
    assert!(matches!(
        Vm::new(&s, Console::new(16, None).unwrap()),
        Err(VmError::VcpuCount { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, "d.img", 1 << 20);
    let mut s = spec("");
    s.disks = vec![disk("vda", &img, false), disk("vda", &img, true)];
    assert!(matches!(
        Vm::new(&s, Console::new(16, None).unwrap()),
        Err(VmError::DuplicateDisk { .. })
    ));

    // Not an ELF and not a bzImage.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let mut s = spec("");
    s.boot.kernel = junk.clone();
    assert!(matches!(
        Vm::new(&s, Console::new(16, None).unwrap()),
        Err(VmError::Boot(BootError::KernelLoad { .. }))
    ));
    s.boot.protocol = BootProtocol::Pvh;
    assert!(matches!(
        Vm::new(&s, Console::new(16, None).unwrap()),
        Err(VmError::Boot(BootError::PvhNeedsElf { .. }))
    ));

    let mut s = spec("");
    s.boot.initrd = Some("/nonexistent/initrd".into());
    assert!(matches!(
        Vm::new(&s, Console::new(16, None).unwrap()),
        Err(VmError::Boot(BootError::InitrdOpen { .. }))
    ));
}

#[test]
fn a_vm_starts_once() {
    let (mut vm, _console) = boot(&spec("then=spin"));
    assert!(matches!(vm.start(), Err(VmError::AlreadyStarted)));
    vm.stop();
    assert_eq!(vm.wait_exit(Some(WAIT)), Some(VmExit::Stopped));
}

#[test]
fn vcpu_time_is_accounted() {
    let (vm, console) = boot(&spec("mode=heartbeat hb_ms=10"));
    assert!(console.wait_for("HB seq=20 ", WAIT));
    assert!(
        vm.vcpu_cpu_ns() > 50_000_000,
        "a spinning guest used CPU: {}",
        vm.vcpu_cpu_ns()
    );
}

/// Pauses `vm`, saves it, drops it, and builds and starts a new VM from the snapshot.
fn move_vm(vm: Vm, spec: &VmSpec) -> (Vm, Arc<Console>) {
    vm.pause(Duration::from_secs(5)).unwrap();
    let snapshot = vm.save().expect("a paused VM saves");
    drop(vm);
    let console = Console::new(1 << 20, None).unwrap();
    let mut next = Vm::restore(spec, console.clone(), &snapshot).expect("the snapshot restores");
    assert_eq!(next.entry(), None);
    next.start().unwrap();
    (next, console)
}

#[test]
fn a_saved_vm_restored_into_a_new_vm_goes_on_where_it_paused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, "d.img", 8 << 20);
    let mut s = spec(
        "seed=21 blk=randread blk_s=1 blk_qd=8 mode=heartbeat hb_ms=20 dirty_mib_s=50 dirty_mib=4",
    );
    s.vcpus = 2;
    s.disks = vec![disk("vda", &img, true)];
    let (a, console_a) = boot(&s);
    // First move: in the middle of the disk reads, eight requests in flight.
    assert!(console_a.wait_for("BLK dev=0 capacity=", WAIT));
    std::thread::sleep(Duration::from_millis(300));
    let (b, console_b) = move_vm(a, &s);
    assert!(
        console_b.wait_for("BLK done devices=1 result=ok\n", WAIT),
        "no request lost: {}",
        console_b.text()
    );
    let text_b = console_b.text();
    assert!(
        text_b.contains(" errors=0\n") && !text_b.contains("timeout"),
        "{text_b}"
    );
    // Second move: while it dirties memory and beats.
    assert!(console_b.wait_for("HB seq=10 ", WAIT));
    let (c, console_c) = move_vm(b, &s);
    let text_b = console_b.text();
    let deadline = Instant::now() + WAIT;
    while heartbeats(&console_c.text()).len() < 5 {
        assert!(
            Instant::now() < deadline,
            "no heartbeats after the move: {}",
            console_c.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c.stop();
    // One output stream across the three VMs: every heartbeat once, in order, with the
    // checksum of its sequence number and no page of dirtied memory lost.
    let all = format!("{}{}{}", console_a.text(), text_b, console_c.text());
    let hbs = heartbeats(&all);
    for (i, hb) in hbs.iter().enumerate() {
        assert_eq!(hb.seq, i as u64 + 1, "{all}");
        assert_eq!(hb.sum, heartbeat_sum(21, hb.seq));
        assert_eq!(hb.bad, 0, "{all}");
    }
    assert!(hbs.last().unwrap().writes > 0);
}

#[test]
fn snapshots_are_refused_while_running_and_do_not_fit_other_vms() {
    let (vm, _console) = boot(&spec("mode=heartbeat hb_ms=20"));
    assert!(matches!(
        vm.save(),
        Err(VmError::Persist(hostd::vmm::PersistError::NotPaused))
    ));
    vm.pause(Duration::from_secs(5)).unwrap();
    let snap = vm.save().unwrap();
    let mut other = spec("");
    other.memory_bytes = 128 << 20;
    assert!(matches!(
        Vm::restore(&other, Console::new(16, None).unwrap(), &snap),
        Err(VmError::Persist(
            hostd::vmm::PersistError::MemorySize { .. }
        ))
    ));
    other.memory_bytes = 64 << 20;
    other.vcpus = 2;
    assert!(matches!(
        Vm::restore(&other, Console::new(16, None).unwrap(), &snap),
        Err(VmError::Persist(hostd::vmm::PersistError::VcpuCount { .. }))
    ));
    vm.resume().unwrap();
    vm.stop();
}
