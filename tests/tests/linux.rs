//! Stock Linux guests: Debian's own kernels (`linux-image-amd64` and the cloud flavour)
//! with a busybox initramfs that loads the kernel's modules the way a distribution's
//! initramfs does (by each device's modalias), booted by `hostd run` on a KVM that runs
//! Linux: this host's when it has VT-x/AMD-V, otherwise the emulated KVM host
//! (`e2e_tests::emuhost`). Each test says which way it ran.
//!
//! The guest's init prints what it found (vCPUs, ACPI tables, modules, virtio disks), keeps
//! a boot counter on its disk, and does what the kernel command line's `emu.actions` says
//! for that boot: reboot by ACPI, the keyboard controller or a triple fault, power off, or
//! wait for the power button.

use std::time::Duration;

use e2e_tests::debian::{self, Kernel};
use e2e_tests::emuhost::{self, Report, Scenario};
use e2e_tests::guest::{self, kernel};

/// The guest's init. Everything it prints starts with `LINUX`.
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "LINUX-INIT-OK $(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
COLDPLUG
echo "LINUX cpus=$(nproc) online=$(cat /sys/devices/system/cpu/online)"
echo "LINUX clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "LINUX acpi=[$(ls /sys/firmware/acpi/tables 2>/dev/null | tr '\n' ' ')]"
echo "LINUX modules=[$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')]"
echo "LINUX disks=[$(cd /dev && ls vd* 2>/dev/null | tr '\n' ' ')]"
[ -b /dev/vda ] || { echo "LINUX no disk"; poweroff -f; }
echo "LINUX disk says $(head -c 15 /dev/vda)"
n=$(dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | tr -dc 0-9)
n=$(( ${n:-0} + 1 ))
printf '%s\n' "$n" | dd of=/dev/vda bs=512 seek=1 conv=notrunc,fsync 2>/dev/null
actions=$(sed -n 's/.*emu.actions=\([^ ]*\).*/\1/p' /proc/cmdline)
action=$(echo "$actions" | cut -d, -f"$n")
echo "LINUX boot=$n action=${action:-off}"
case "$action" in
  acpi|kbd|triple)
    echo "$action" > /sys/kernel/reboot/type
    echo "LINUX rebooting by $(cat /sys/kernel/reboot/type)"
    reboot -f ;;
  button)
    for e in /sys/class/input/event*; do
      grep -q "Power Button" "$e/device/name" 2>/dev/null && dev=/dev/input/${e##*/}
    done
    [ -n "$dev" ] || { echo "LINUX no power button"; poweroff -f; }
    echo "LINUX waiting for the power button on $dev"
    head -c 1 "$dev" >/dev/null
    echo "LINUX power button pressed"
    poweroff -f ;;
  *) echo "LINUX powering off"; poweroff -f ;;
esac
"#;

/// What a scenario's `run.sh` uses: `vm NAME ARGS...` starts `hostd run` with the guest's
/// console in /tmp/NAME.log (copied to the console), `await NAME TEXT SECONDS` waits for a
/// line, `finish NAME` waits for the VM to end and prints its exit code.
const RUN_LIB: &str = r#"
up() { cut -d' ' -f1 /proc/uptime; }
vm() {
  name=$1; shift
  : > /tmp/$name.log
  echo "VM $name start uptime=$(up)"
  hostd run "$@" > /tmp/$name.log 2>&1 &
  echo $! > /tmp/$name.pid
  tail -f /tmp/$name.log &
  echo $! > /tmp/$name.tail
}
await() {
  i=0
  while [ $i -lt $(( $3 * 2 )) ]; do
    grep -q "$2" /tmp/$1.log && return 0
    sleep 0.5; i=$((i+1))
  done
  echo "SCENARIO-FAIL $1: no '$2' within $3 s"; exit 1
}
finish() {
  pid=$(cat /tmp/$1.pid); i=0
  while kill -0 $pid 2>/dev/null && [ $i -lt $(( $2 * 2 )) ]; do sleep 0.5; i=$((i+1)); done
  kill -0 $pid 2>/dev/null && { echo "SCENARIO-FAIL $1 still running after $2 s"; kill -9 $pid; }
  wait $pid; rc=$?
  # tail -f reads every second: let it copy the last lines before it goes.
  sleep 2; kill $(cat /tmp/$1.tail) 2>/dev/null
  echo "VM $1 exit=$rc uptime=$(up)"
}
"#;

/// A busybox initramfs with [`GUEST_INIT`] and the modules a guest of `k` loads.
fn guest_initramfs(k: &Kernel) -> Vec<u8> {
    let init = GUEST_INIT.replace("COLDPLUG\n", &format!("{}\n", guest::COLDPLUG));
    guest::initramfs(k, &init, guest::MODULES)
}

/// The command-line words every guest gets: its console, and an ACPI-less reboot default
/// it does not need (the init picks the way per boot).
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// The boot's checks, from the lines the guest printed for it.
fn check_boot(report: &Report, name: &str, release: &str) {
    let log = |l: &str| format!("{name}: {l}\n(log {})", report.log.display());
    let init = report
        .after(&format!("LINUX-INIT-OK {release}"))
        .unwrap_or_else(|| panic!("{}", log("never reached its init")));
    println!("{name}: init reached ({init})");
    let cpus = report.after("LINUX cpus=").unwrap_or_default();
    assert!(cpus.starts_with("2 "), "{}", log(&format!("cpus={cpus}")));
    let acpi = report.after("LINUX acpi=").unwrap_or_default();
    for t in ["APIC", "DSDT", "FACP"] {
        assert!(acpi.contains(t), "{}", log(&format!("ACPI tables {acpi}")));
    }
    let modules = report.after("LINUX modules=").unwrap_or_default();
    assert!(
        modules.contains("virtio_mmio") && modules.contains("virtio_blk"),
        "{}",
        log(&format!("modules {modules}"))
    );
    assert_eq!(
        report.after("LINUX disks="),
        Some("[vda ]"),
        "{}",
        log("disks")
    );
    assert_eq!(
        report.after("LINUX disk says "),
        Some("EMUHOST-DISK-OK"),
        "{}",
        log("the disk's first bytes")
    );
}

#[test]
fn stock_kernels_boot_through_each_entry_and_find_their_disks() {
    let cloud = kernel("linux-image-cloud-amd64");
    let generic = kernel("linux-image-amd64");
    let vmlinux = debian::extract_vmlinux(&std::fs::read(cloud.bzimage()).unwrap())
        .expect("the cloud bzImage holds an LZ4 vmlinux");
    let script = format!(
        r#"#!/bin/sh
{RUN_LIB}
for entry in cloud-bzimage:bzimage-cloud:auto:cloud cloud-vmlinux:vmlinux-cloud:linux64:cloud cloud-pvh:vmlinux-cloud:pvh:cloud generic-bzimage:bzimage-generic:auto:generic; do
  IFS=: read name image boot initrd <<EOF
$entry
EOF
  truncate -s 16M /tmp/$name.img
  printf 'EMUHOST-DISK-OK' | dd of=/tmp/$name.img conv=notrunc 2>/dev/null
  vm $name --kernel $S/$image --boot $boot --initrd $S/initramfs-$initrd --vcpus 2 --memory-mib 256 \
    --disk /tmp/$name.img --cmdline "{CMDLINE} emu.entry=$name"
  finish $name 400
done
"#
    );
    let mut scenario = Scenario::new("linux-entries", &script)
        .file(
            "bzimage-cloud",
            0o644,
            std::fs::read(cloud.bzimage()).unwrap(),
        )
        .file("vmlinux-cloud", 0o644, vmlinux)
        .file(
            "bzimage-generic",
            0o644,
            std::fs::read(generic.bzimage()).unwrap(),
        )
        .file("initramfs-cloud", 0o644, guest_initramfs(&cloud))
        .file("initramfs-generic", 0o644, guest_initramfs(&generic));
    for name in [
        "cloud-bzimage",
        "cloud-vmlinux",
        "cloud-pvh",
        "generic-bzimage",
    ] {
        let release = if name.starts_with("cloud") {
            &cloud.release
        } else {
            &generic.release
        };
        scenario = scenario
            .expect(&format!("VM {name} start"), 120)
            .expect(&format!("LINUX-INIT-OK {release}"), 240)
            .expect("LINUX powering off", 120)
            .expect(&format!("VM {name} exit=0"), 60);
    }
    let report = emuhost::run(&scenario).unwrap_or_else(|e| panic!("{e}"));
    println!("ran {}", report.way);
    // Each boot's lines lie between its start and exit lines.
    for name in [
        "cloud-bzimage",
        "cloud-vmlinux",
        "cloud-pvh",
        "generic-bzimage",
    ] {
        let from = report
            .lines
            .iter()
            .position(|(_, l)| l.contains(&format!("VM {name} start")))
            .unwrap();
        let to = report
            .lines
            .iter()
            .position(|(_, l)| l.contains(&format!("VM {name} exit=")))
            .unwrap();
        let part = Report {
            way: report.way,
            lines: report.lines[from..=to].to_vec(),
            marks: vec![],
            log: report.log.clone(),
        };
        let release = if name.starts_with("cloud") {
            &cloud.release
        } else {
            &generic.release
        };
        check_boot(&part, name, release);
        let secs = part.time_of("LINUX-INIT-OK").unwrap() - part.lines[0].0;
        println!("{name}: init {secs:.1} s after hostd started");
    }
}

#[test]
fn a_guest_reboots_every_way_powers_off_and_obeys_the_power_button() {
    let cloud = kernel("linux-image-cloud-amd64");
    let script = format!(
        r#"#!/bin/sh
{RUN_LIB}
truncate -s 16M /tmp/d.img
printf 'EMUHOST-DISK-OK' | dd of=/tmp/d.img conv=notrunc 2>/dev/null
vm cycle --kernel $S/bzimage --initrd $S/initramfs --vcpus 2 --memory-mib 256 --disk /tmp/d.img \
  --cmdline "{CMDLINE} emu.actions=acpi,kbd,triple,off"
finish cycle 900
truncate -s 0 /tmp/d.img; truncate -s 16M /tmp/d.img
printf 'EMUHOST-DISK-OK' | dd of=/tmp/d.img conv=notrunc 2>/dev/null
vm button --kernel $S/bzimage --initrd $S/initramfs --vcpus 2 --memory-mib 256 --disk /tmp/d.img \
  --cmdline "{CMDLINE} emu.actions=button"
await button "waiting for the power button" 300
echo "PRESSING the power button"
kill -TERM $(cat /tmp/button.pid)
finish button 120
"#
    );
    let scenario = Scenario::new("linux-power", &script)
        .file("bzimage", 0o644, std::fs::read(cloud.bzimage()).unwrap())
        .file("initramfs", 0o644, guest_initramfs(&cloud))
        .expect("LINUX boot=1 action=acpi", 300)
        .expect("LINUX rebooting by acpi", 60)
        .expect("LINUX boot=2 action=kbd", 240)
        .expect("LINUX rebooting by kbd", 60)
        .expect("LINUX boot=3 action=triple", 240)
        .expect("LINUX rebooting by triple", 60)
        .expect("LINUX boot=4 action=off", 240)
        .expect("VM cycle exit=0", 120)
        .expect("LINUX waiting for the power button", 300)
        .expect("LINUX power button pressed", 60)
        .expect("VM button exit=0", 60);
    let report = emuhost::run(&scenario).unwrap_or_else(|e| panic!("{e}"));
    println!("ran {}", report.way);
    let resets = report.all("hostd run: guest reset");
    assert_eq!(resets.len(), 3, "three reboots: {resets:?}");
    assert!(
        resets[2].contains("triple fault"),
        "reboot=t is a triple fault: {resets:?}"
    );
    assert!(report.all("hostd run: asking the guest to shut down").len() == 1);
    let boots = report.all("LINUX-INIT-OK");
    assert_eq!(
        boots.len(),
        5,
        "4 boots of the cycle and one for the button"
    );
}

/// The guest's init for the network scenario: the interface the kernel found (by the DSDT,
/// like its disk), an address, a ping to the host's end of the tap, and then it answers
/// the host's pings before it powers off.
const NET_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "LINUX-INIT-OK $(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
COLDPLUG
echo "LINUX modules=[$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')]"
[ -e /sys/class/net/eth0 ] || { echo "LINUX no eth0: [$(ls /sys/class/net | tr '\n' ' ')]"; poweroff -f; }
echo "LINUX eth0 mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu)"
ip link set lo up
ip link set eth0 up
ip addr add 10.0.9.2/24 dev eth0
if ping -c 3 -W 10 10.0.9.1 >/dev/null; then echo "LINUX ping host ok"; else echo "LINUX ping host failed"; fi
echos() { awk '/^Icmp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i } else print $c }' /proc/net/snmp; }
i=0
while [ "$(echos)" -lt 3 ] && [ $i -lt 240 ]; do sleep 0.5; i=$((i+1)); done
echo "LINUX answered $(echos) echo requests rx=$(cat /sys/class/net/eth0/statistics/rx_packets) tx=$(cat /sys/class/net/eth0/statistics/tx_packets)"
poweroff -f
"#;

/// Scenario 5: a stock kernel finds its network interface the way it finds its disk (the
/// DSDT's virtio-mmio windows; its own `virtio_net` driver loaded by modalias), with the
/// MAC and MTU hostd gives it, and pings the host's end of its tap both ways.
#[test]
fn a_stock_kernel_finds_its_network_and_pings_both_ways() {
    let cloud = kernel("linux-image-cloud-amd64");
    let init = NET_INIT.replace("COLDPLUG\n", &format!("{}\n", guest::COLDPLUG));
    let modules = [guest::MODULES, &["virtio_net"]].concat();
    let script = format!(
        r#"#!/bin/sh
{RUN_LIB}
vm net --kernel $S/bzimage --initrd $S/initramfs --vcpus 2 --memory-mib 256 \
  --net tap=lt0,mac=02:00:00:00:09:02 --cmdline "{CMDLINE}"
i=0; while ! ip link show lt0 >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
ip addr add 10.0.9.1/24 dev lt0 && ip link set lt0 up || echo "SCENARIO-FAIL no tap lt0"
await net "LINUX ping host" 600
if ping -c 3 -W 10 10.0.9.2 >/dev/null; then echo "OUTER ping guest ok"; else echo "OUTER ping guest failed"; fi
finish net 180
"#
    );
    let scenario = Scenario::new("linux-net", &script)
        .file("bzimage", 0o644, std::fs::read(cloud.bzimage()).unwrap())
        .file(
            "initramfs",
            0o644,
            guest::initramfs(&cloud, &init, &modules),
        )
        .expect("LINUX eth0 mac=", 300)
        .expect("LINUX ping host", 120)
        .expect("OUTER ping guest", 60)
        .expect("LINUX answered", 180)
        .expect("VM net exit=0", 120);
    let report = emuhost::run(&scenario).unwrap_or_else(|e| panic!("{e}"));
    println!("ran {}", report.way);
    let log = |l: &str| format!("{l}\n(log {})", report.log.display());
    let modules = report.after("LINUX modules=").unwrap_or_default();
    assert!(
        modules.contains("virtio_net"),
        "{}",
        log(&format!("modules {modules}"))
    );
    assert_eq!(
        report.after("LINUX eth0 "),
        Some("mac=02:00:00:00:09:02 mtu=1500"),
        "{}",
        log("the interface hostd announced")
    );
    assert_eq!(
        report.after("LINUX ping host "),
        Some("ok"),
        "{}",
        log("guest to host")
    );
    assert_eq!(
        report.after("OUTER ping guest "),
        Some("ok"),
        "{}",
        log("host to guest")
    );
    let answered = report.after("LINUX answered ").unwrap_or_default();
    let n: u32 = answered
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n >= 3, "{}", log(&format!("answered {answered}")));
}

/// The test guest (guest/) under `hostd run`: one that needs no Linux, so a failure here
/// is the emulated host's or hostd's, not Linux's.
#[test]
fn the_test_guest_runs_inside_the_emulated_host() {
    let guest = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new(e2e_tests::binary("hostd"))
        .args(["guest-elf", "--out"])
        .arg(guest.path())
        .status()
        .unwrap();
    assert!(status.success());
    let script = r#"#!/bin/sh
truncate -s 4M /tmp/disk.img
timeout 120 hostd run --kernel $S/guest.elf --vcpus 2 --memory-mib 64 --disk /tmp/disk.img \
  --cmdline "seed=11 blk=rw mode=heartbeat hb_ms=100 hb_count=5 dirty_mib_s=8 dirty_mib=2"
echo "TESTGUEST rc=$?"
"#;
    let scenario = Scenario::new("testguest", script)
        .file("guest.elf", 0o644, std::fs::read(guest.path()).unwrap())
        .expect("BLK done devices=1 result=ok", 120)
        .expect("HB seq=5", 60)
        .expect("TESTGUEST rc=0", 30);
    let report = emuhost::run(&scenario).unwrap_or_else(|e| panic!("{e}"));
    println!("ran {}", report.way);
    let beats = report.all("HB seq=");
    assert_eq!(beats.len(), 5);
    assert!(beats.iter().all(|b| b.contains("bad=0")), "{beats:?}");
}

/// What even a PVM host shows of a stock kernel (guest CPL 0 is emulated there, so it does
/// not get far): its first messages print the command line and the e820 map it read from
/// hostd's zero page. In-process, on this host's own KVM.
#[test]
fn linux_early_boot_reads_the_zero_page() {
    use hostd::console::Console;
    use hostd::vmm::{BootProtocol, BootSpec, Vm, VmSpec};
    let cloud = kernel("linux-image-cloud-amd64");
    let vmlinux = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        vmlinux.path(),
        debian::extract_vmlinux(&std::fs::read(cloud.bzimage()).unwrap()).unwrap(),
    )
    .unwrap();
    let cmdline = "console=ttyS0 reboot=k panic=-1 i8042.noaux earlyprintk=serial,ttyS0";
    let spec = VmSpec {
        vcpus: 2,
        memory_bytes: 256 << 20,
        boot: BootSpec {
            kernel: vmlinux.path().to_owned(),
            initrd: None,
            cmdline: cmdline.into(),
            protocol: BootProtocol::Linux64,
        },
        disks: vec![],
        nets: vec![],
        cpuid_mask: vec![],
    };
    let console = Console::new(1 << 20, None).unwrap();
    let mut vm = Vm::new(&spec, console.clone()).expect("the Linux VM builds");
    vm.start().unwrap();
    let wanted = [
        format!("Command line: {cmdline}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".into(),
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".into(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable".into(),
    ];
    for w in wanted {
        assert!(
            console.wait_for(&w, Duration::from_secs(60)),
            "kernel never printed {w:?}; exit {:?}\nconsole:\n{}",
            vm.exit_reason(),
            console.text()
        );
    }
    vm.stop();
}
