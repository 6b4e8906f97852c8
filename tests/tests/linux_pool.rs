//! Stock Linux guests run by the pool: the coordinator and `storaged` run on this machine,
//! the hosts (`hostd` daemons) run where KVM can run Linux — inside the emulated KVM host
//! on a PVM machine (QEMU forwards the pool's ports in and out, so every address reads the
//! same on both sides), or here on a real VT-x/AMD-V host.
//!
//! The guest is Debian's cloud kernel with a busybox initramfs that loads its modules by
//! modalias and switches to its root file system: an ext4 image on a thin volume served by
//! `storaged` over iSCSI (virtio-blk).

use std::net::Ipv4Addr;
use std::time::Duration;

use e2e_tests::emuhost::{self, Failure, Running, Scenario};
use e2e_tests::guest::{self, kernel};
use e2e_tests::pool::{Pool, console_until, field, wait_leader};
use e2e_tests::{Coordinators, PoolArg, Storaged, free_port, poolctl};

/// The initramfs: modules, then the root file system on the first disk.
const INITRAMFS_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
COLDPLUG
echo "INITRAMFS $(uname -r) cpus=$(nproc) modules=[$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')]"
mount -t ext4 /dev/vda /root || { echo "SCENARIO-FAIL no root file system"; poweroff -f; }
mount --move /dev /root/dev
umount /proc /sys
exec switch_root /root /sbin/init
"#;

/// The root file system's init. Each boot adds a file of random data with its digest and
/// checks every earlier one, then does what its boot number says: 1 waits for the power
/// button (and powers off), 2 reboots, 3 powers off by itself, later ones hang (ignoring the
/// button).
const ROOT_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -o remount,rw /
n=$(( $(cat /var/boots 2>/dev/null || echo 0) + 1 ))
echo $n > /var/boots
dd if=/dev/urandom of=/data/file-$n bs=4k count=64 2>/dev/null
(cd /data && sha256sum file-$n >> sums)
sync
ok=$(cd /data && sha256sum -c sums 2>/dev/null | grep -c ': OK$')
echo "ROOTFS boot=$n files=$ok of $(wc -l < /data/sums)"
case $n in
  1)
    for e in /sys/class/input/event*; do
      grep -q "Power Button" "$e/device/name" 2>/dev/null && dev=/dev/input/${e##*/}
    done
    echo "ROOTFS boot=$n waiting for the power button on ${dev:-nothing}"
    head -c 1 "$dev" >/dev/null
    echo "ROOTFS power button: powering off"
    sync; mount -o remount,ro /; poweroff -f ;;
  2) echo "ROOTFS boot=$n rebooting"; sync; mount -o remount,ro /; reboot -f ;;
  3) echo "ROOTFS boot=$n powering off"; sync; mount -o remount,ro /; poweroff -f ;;
  *) echo "ROOTFS boot=$n hanging"; while :; do sleep 1; done ;;
esac
"#;

/// The guest of the network scenario: its network interface (found by its own
/// `virtio_net`, by the DSDT) comes up at the address its command line gives, and it prints
/// its MAC, then its counters every 2 s while the emulated host pings it.
const NET_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
COLDPLUG
[ -e /sys/class/net/eth0 ] || echo "NET no eth0: [$(ls /sys/class/net | tr '\n' ' ')] modules=[$(cut -d' ' -f1 /proc/modules | tr '\n' ' ')]"
ip=$(sed -n 's/.*guestip=\([0-9.]*\).*/\1/p' /proc/cmdline)
ip link set lo up; ip link set eth0 up; ip addr add $ip/24 dev eth0
echo "NET eth0 mac=$(cat /sys/class/net/eth0/address) ip=$ip"
i=0
while :; do
  i=$((i+1))
  echo "NET tick=$i rx=$(cat /sys/class/net/eth0/statistics/rx_packets) tx=$(cat /sys/class/net/eth0/statistics/tx_packets)"
  sleep 2
done
"#;

/// The network scenario's guest address on the external network `lan`.
const GUEST_IP: &str = "192.168.77.10";

/// One host inside the emulated host: its name, the loopback IP and port the pool knows it
/// by, and its TLS directory made here.
struct InnerHost {
    name: String,
    ip: Ipv4Addr,
    port: u16,
}

/// The pool on this machine (one member, storaged) and `hosts` inside the scenario.
struct Setup {
    pool: Pool,
    hosts: Vec<InnerHost>,
    _dir: tempfile::TempDir,
}

fn setup(n_hosts: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let coordinators = Coordinators::start(dir.path(), 1);
    let p = coordinators.pool_arg();
    wait_leader(&p);
    let storaged = Storaged::start(&dir.path().join("storaged"), &p);
    let hosts = (0..n_hosts)
        .map(|i| InnerHost {
            name: format!("h{}", i + 1),
            ip: Ipv4Addr::new(127, 0, 0, 11 + i as u8),
            port: free_port(),
        })
        .collect();
    Setup {
        pool: Pool {
            coordinators,
            storaged,
            hosts: vec![],
            p,
            token: None,
        },
        hosts,
        _dir: dir,
    }
}

/// A host's address on the emulated host's management bridge (with `lan`).
fn mgmt_ip(h: &InnerHost) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, h.ip.octets()[3])
}

/// How long one poolctl command may take.
const CTL_LIMIT: Duration = Duration::from_secs(180);

/// The port of a `host:port` address.
fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// A scenario that starts the hosts (with the guest's kernel and initramfs in their image
/// folder) and keeps them running until the test ends it.
///
/// With `lan`, each host runs in a network namespace of its own (as on separate machines:
/// a VM's tap and bridge exist once per host, and the two ends of a migration both have
/// them), with two veth links to bridges of the emulated host: `mgmt` (10.99.0.0/24, the
/// hosts' migration streams) and `uplink` (the external network `lan`, whose outside world
/// is the emulated host itself at 192.168.77.1). Busybox `nc` relays carry the pool's
/// addresses across: 127.0.0.1:PORT in a host's namespace to the emulated host's relays
/// out, and each host's port in from QEMU's forward. Such a scenario runs in the emulated
/// host on any machine (see [`Scenario::emulated_only`]).
fn hosts_scenario(name: &str, s: &Setup, p: &PoolArg, lan: bool) -> Scenario {
    let cloud = kernel("linux-image-cloud-amd64");
    let member = &s.pool.coordinators.addrs[0];
    let mut script = String::from("#!/bin/sh\nmkdir -p /tmp/images\n");
    let mut scenario = Scenario::new(name, "").file(
        "images/bzimage",
        0o644,
        std::fs::read(cloud.bzimage()).unwrap(),
    );
    scenario = if lan {
        let init = NET_INIT.replace("COLDPLUG\n", &format!("{}\n", guest::COLDPLUG));
        let modules = [guest::MODULES, &["virtio_net"]].concat();
        // A function: busybox's shell runs its own applet before anything on PATH.
        script += "ip() { /usr/bin/ip \"$@\"; }\nmount -t tmpfs tmpfs /run\n\
                   for b in mg0:10.99.0.1 lan0:192.168.77.1; do \
                   ip link add ${b%:*} type bridge && ip addr add ${b#*:}/24 dev ${b%:*} && ip link set ${b%:*} up \
                   || echo \"SCENARIO-FAIL bridge $b\"; done\n";
        scenario.file(
            "images/initramfs",
            0o644,
            guest::initramfs(&cloud, &init, &modules),
        )
    } else {
        let init = INITRAMFS_INIT.replace("COLDPLUG\n", &format!("{}\n", guest::COLDPLUG));
        scenario.file(
            "images/initramfs",
            0o644,
            guest::initramfs(&cloud, &init, guest::MODULES),
        )
    };
    for h in &s.hosts {
        let tls = p.tls_dir(
            pool_trust::Identity::Host(h.name.clone()),
            &[&h.ip.to_string()],
        );
        for e in std::fs::read_dir(&tls).unwrap() {
            let e = e.unwrap();
            let mode = if e.file_name().to_string_lossy().contains("key") {
                0o600
            } else {
                0o644
            };
            scenario = scenario.file(
                &format!("tls-{}/{}", h.name, e.file_name().to_string_lossy()),
                mode,
                std::fs::read(e.path()).unwrap(),
            );
        }
        let mut exec = String::new();
        if lan {
            let mgmt = mgmt_ip(h);
            script += &format!(
                "ip netns add {n} && ip link add {n}m type veth peer name mgmt netns {n} \
                 && ip link add {n}u type veth peer name uplink netns {n} \
                 && ip link set {n}m master mg0 up && ip link set {n}u master lan0 up \
                 && ip -n {n} link set lo up && ip -n {n} addr add {mgmt}/24 dev mgmt \
                 && ip -n {n} link set mgmt up && ip -n {n} link set uplink up \
                 || echo \"SCENARIO-FAIL namespace {n}\"\n\
                 for port in $(cat $S/outside); do printf '#!/bin/sh\\nexec nc 10.99.0.1 %s\\n' $port > /tmp/{n}-out-$port; \
                 chmod +x /tmp/{n}-out-$port; ip netns exec {n} nc -ll -p $port -e /tmp/{n}-out-$port & done\n\
                 printf '#!/bin/sh\\nexec nc {mgmt} {port}\\n' > /tmp/in-{port}; chmod +x /tmp/in-{port}; \
                 nc -ll -p {port} -e /tmp/in-{port} &\n\
                 echo 'migration_listen = \"{mgmt}:0\"' > /tmp/{n}.toml\n",
                n = h.name,
                port = h.port
            );
            exec = format!("ip netns exec {n} hostd -c /tmp/{n}.toml", n = h.name);
        } else {
            exec.push_str("hostd");
        }
        script += &format!(
            "mkdir -p /tmp/{n}; chmod 700 $S/tls-{n}; : > /tmp/{n}.log\n\
             {exec} --listen 0.0.0.0:{port} --pool-advertise {ip}:{port} --tie-vms --run-dir /tmp/{n} \
             --initiator-iqn iqn.2026-11.org.pool.e2e:{n} --host-id {n} --tls-dir $S/tls-{n} \
             --image-dir $S/images --pool {member} --heartbeat-ms 500 --log info > /tmp/{n}.log 2>&1 &\n\
             tail -s 1 -f /tmp/{n}.log | sed 's/^/{n}: /' &\n\
             (seen=''; while :; do for f in /tmp/{n}/vms/*/vmm.log; do [ -e \"$f\" ] || continue; \
             k=\"$f:$(stat -c %i \"$f\")\"; case \"$seen\" in *\" $k\"*) continue ;; esac; seen=\"$seen $k\"; \
             tail -f \"$f\" | sed 's/^/{n} vmm: /' & done; sleep 1; done) &\n",
            n = h.name,
            ip = h.ip,
            port = h.port
        );
    }
    // Every 30 s, where each VM process's threads wait: a hang shows its place. With
    // EMUHOST_KVM_TRACE set, also the last KVM exits and interrupts (the guest's RIPs).
    let trace = std::env::var_os("EMUHOST_KVM_TRACE").is_some();
    if trace {
        script += "mount -t tracefs nodev /sys/kernel/tracing; T=/sys/kernel/tracing\n\
                   echo 4096 > $T/buffer_size_kb\n\
                   for e in kvm_exit kvm_apic_ipi kvm_apic_accept_irq kvm_inj_virq kvm_inj_exception kvm_pio kvm_msr kvm_cr; do \
                   echo 1 > $T/events/kvm/$e/enable; done\n\
                   echo 'exit_reason != 96 && exit_reason != 123' > $T/events/kvm/kvm_exit/filter\n";
    }
    if lan {
        // Pings the guest five times a second once it first answers: every reply is a line.
        script += &format!(
            "(until ping -c 1 -W 1 {GUEST_IP} >/dev/null 2>&1; do sleep 1; done; \
             echo 'PINGER the guest answers'; exec ping -i 0.2 {GUEST_IP}) &\n"
        );
    }
    script += "echo HOSTS STARTED\nwhile :; do sleep 30; for p in $(pidof hostd-vmm); do \
               echo \"VMM $p: $(for t in /proc/$p/task/*; do echo \"$(cat $t/comm)=$(cat $t/wchan)\"; done | tr '\\n' ' ')\"; \
               done;";
    if trace {
        script += " grep -v 'pio_.* at 0x3f[8-9d]\\|reason io rip 0xffffffff816c22' /sys/kernel/tracing/trace | tail -n 150 | sed 's/^/KVM-TRACE /'; \
                   echo > /sys/kernel/tracing/trace;";
    }
    script += " done\n";
    scenario.script = script;
    scenario.outside = vec![
        port(member),
        port(&s.pool.storaged.addr),
        port(&s.pool.storaged.iscsi),
    ];
    scenario.inside = s.hosts.iter().map(|h| (h.ip, h.port)).collect();
    scenario.fail_on.push("panicked at".into());
    scenario.emulated_only = lan;
    scenario
}

/// Waits for a whole console line of `vm` containing `text` (the guest writes `\r\n`).
fn console_has(p: &PoolArg, vm: &str, text: &str, limit: Duration) -> Option<String> {
    console_until(p, None, vm, limit, |seen| {
        let complete = &seen[..seen.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .find(|l| l.contains(text))
            .map(|l| l.trim_end().to_owned())
    })
}

/// Polls `f` (which may read what the console showed so far) until it returns something,
/// reading the emulated host's console meanwhile.
fn until<T>(
    host: &mut Running,
    limit: Duration,
    mut f: impl FnMut(&Running) -> Option<T>,
) -> Result<T, Failure> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f(host) {
            return Ok(v);
        }
        if start.elapsed() > limit {
            return Err(Failure::Failed(format!("not within {limit:?}")));
        }
        host.idle(Duration::from_millis(500))?;
    }
}

/// Like `Pool::wait_vm`, a stall of the emulated host (its heartbeat stops) ending the
/// wait early.
fn wait_vm(
    pool: &Pool,
    host: &mut Running,
    vm: &str,
    want: &str,
    limit: Duration,
) -> Result<String, Failure> {
    let start = std::time::Instant::now();
    loop {
        if let Some(l) = pool.vm(vm).filter(|l| l.contains(want)) {
            return Ok(l);
        }
        if start.elapsed() > limit {
            return Err(Failure::Failed(format!(
                "VM {vm} not {want} within {limit:?}: {:?}\n{}",
                pool.vm(vm),
                pool.logs()
            )));
        }
        host.idle(Duration::from_secs(1))?;
    }
}

/// Waits for a console line, in slices, so a stalled emulated host is seen.
fn wait_console(
    pool: &Pool,
    host: &mut Running,
    vm: &str,
    text: &str,
    limit: Duration,
) -> Result<String, Failure> {
    const SLICE: Duration = Duration::from_secs(15);
    let start = std::time::Instant::now();
    loop {
        let slice = std::time::Instant::now();
        if let Some(l) = console_has(&pool.p, vm, text, SLICE) {
            return Ok(l);
        }
        if start.elapsed() > limit {
            return Err(Failure::Failed(format!(
                "the console of {vm} never showed {text:?} within {limit:?}; the VM: {:?}\n{}",
                pool.vm(vm),
                pool.logs()
            )));
        }
        // A console that ended at once (the VM on no host yet) is asked again in a while.
        let early = slice.elapsed() < SLICE;
        host.idle(Duration::from_millis(if early { 2000 } else { 100 }))?;
    }
}

/// Runs poolctl, reading the emulated host's console while it waits (a stalled emulated
/// host fails the wait instead of hanging it), for at most `CTL_LIMIT`.
fn ctl(pool: &Pool, host: &mut Running, args: &[&str]) -> Result<String, Failure> {
    let mut child = pool
        .p
        .poolctl()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run poolctl");
    let start = std::time::Instant::now();
    while child.try_wait().expect("poolctl status").is_none() {
        let waited = host.idle(Duration::from_millis(200));
        if waited.is_err() || start.elapsed() > CTL_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            waited?;
            return Err(Failure::Failed(format!(
                "poolctl {} did not finish within {CTL_LIMIT:?}\n{}",
                args.join(" "),
                pool.logs()
            )));
        }
    }
    let o = child.wait_with_output().expect("poolctl output");
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(Failure::Failed(format!(
            "poolctl {}: {}\n{}",
            args.join(" "),
            e2e_tests::text(&o),
            pool.logs()
        )))
    }
}

/// Starts the scenario's hosts (see [`hosts_scenario`]) and waits until they all joined.
fn start_hosts(name: &str, s: &Setup, lan: bool, attempt: u32) -> Result<Running, Failure> {
    let pool = &s.pool;
    let scenario = hosts_scenario(name, s, &pool.p, lan);
    let mut host = emuhost::start(&scenario, attempt)?;
    host.wait("HOSTS STARTED", Duration::from_secs(60))?;
    println!("ran {}", host.way);
    let n = s.hosts.len();
    until(&mut host, Duration::from_secs(90), |_| {
        let o = poolctl(&pool.p, &["host-list", "--json"]);
        (String::from_utf8_lossy(&o.stdout)
            .matches("\"state\": \"enabled\"")
            .count()
            == n)
            .then_some(())
    })
    .map_err(|e| Failure::Failed(format!("{n} hosts join the pool: {e}\n{}", pool.logs())))?;
    Ok(host)
}

/// Starts the scenario's hosts, waits until they all joined, and starts the VM `deb`: the
/// cloud kernel, 2 vCPUs, 256 MiB, its root an ext4 image with `init` imported to a thin
/// volume of a new storage repository.
fn start_linux_vm(name: &str, s: &Setup, init: &str, attempt: u32) -> Result<Running, Failure> {
    let pool = &s.pool;
    let mut host = start_hosts(name, s, false, attempt)?;
    let dir = s._dir.path();
    let img = dir.join("sr1.img").display().to_string();
    ctl(
        pool,
        &mut host,
        &[
            "sr-create",
            "sr1",
            &pool.storaged.addr,
            "--file",
            &img,
            "--size",
            "1G",
        ],
    )?;
    let root = dir.join("root.img");
    std::fs::write(&root, guest::ext4_root(init, 64)).unwrap();
    ctl(
        pool,
        &mut host,
        &["vdi-import", root.to_str().unwrap(), "root", "--sr", "sr1"],
    )?;
    ctl(
        pool,
        &mut host,
        &[
            "vm-create",
            "deb",
            "--disk",
            "root",
            "--vcpus",
            "2",
            "--memory",
            "256M",
            "--kernel",
            "/scenario/images/bzimage",
            "--initrd",
            "/scenario/images/initramfs",
            "--cmdline",
            if std::env::var_os("EMUHOST_KVM_TRACE").is_some() {
                "console=ttyS0 panic=-1 nokaslr"
            } else {
                "console=ttyS0 panic=-1 quiet"
            },
            "--start",
        ],
    )?;
    Ok(host)
}

/// The guest's root file system lives on a thin volume: files it writes survive an ACPI
/// shutdown (`vm-shutdown`: the power button), a guest reboot (Linux's default way) boots
/// it again by itself, a guest power-off stops it, and a guest that ignores the button is
/// stopped by `--force`.
#[test]
fn linux_on_an_iscsi_root_shuts_down_by_acpi_and_keeps_its_files() {
    emuhost::retrying("linux-root", |attempt| {
        let s = setup(1);
        let mut host = start_linux_vm("linux-root", &s, ROOT_INIT, attempt)?;
        // A guest that died of the emulation (its power-off a triple fault, say) is worth
        // a fresh emulated host, as in the migration scenarios.
        root_scenario(&s.pool, &mut host)
            .map_err(|f| died_in_emulation(&s.pool, &mut host, f, Guest::Root))
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

fn root_scenario(pool: &Pool, host: &mut Running) -> Result<(), Failure> {
    let modules = wait_console(pool, host, "deb", "INITRAMFS ", Duration::from_secs(300))?;
    assert!(
        modules.contains("cpus=2") && modules.contains("virtio_blk"),
        "{modules}"
    );
    let first = wait_console(
        pool,
        host,
        "deb",
        "ROOTFS boot=1 waiting for the power button on /dev/input/",
        Duration::from_secs(120),
    )?;
    println!("{first}");

    // vm-shutdown presses the power button; the guest's init powers off.
    ctl(pool, host, &["vm-shutdown", "deb"])?;
    let line = wait_vm(
        pool,
        host,
        "deb",
        "\"power\": \"stopped\"",
        Duration::from_secs(120),
    )?;
    assert_eq!(field(&line, "stopped"), "guest-poweroff", "{line}");

    // Booted again: the files of boot 1 verify; the guest reboots (the VM restarts by
    // itself), and then powers off.
    ctl(pool, host, &["vm-start", "deb"])?;
    let second = wait_console(
        pool,
        host,
        "deb",
        "ROOTFS boot=2 ",
        Duration::from_secs(300),
    )?;
    assert!(second.contains("files=2 of 2"), "{second}");
    let third = wait_console(
        pool,
        host,
        "deb",
        "ROOTFS boot=3 ",
        Duration::from_secs(300),
    )?;
    assert!(third.contains("files=3 of 3"), "{third}");
    let line = wait_vm(
        pool,
        host,
        "deb",
        "\"power\": \"stopped\"",
        Duration::from_secs(120),
    )?;
    assert_eq!(field(&line, "stopped"), "guest-poweroff", "{line}");

    // A guest that ignores the power button is stopped by --force (a polite shutdown
    // would force it itself after 60 s).
    ctl(pool, host, &["vm-start", "deb"])?;
    wait_console(
        pool,
        host,
        "deb",
        "ROOTFS boot=4 hanging",
        Duration::from_secs(300),
    )?;
    ctl(pool, host, &["vm-shutdown", "deb", "--force"])?;
    let line = wait_vm(
        pool,
        host,
        "deb",
        "\"power\": \"stopped\"",
        Duration::from_secs(60),
    )?;
    assert_eq!(field(&line, "stopped"), "forced", "{line}");
    Ok(())
}

/// The migration guest: a tick every 0.2 s with its uptime and wall clock, checked by the
/// guest itself (a clock going backwards, and the longest gap between ticks), and every
/// tenth tick a file of random data with its digest, all checked again.
const TICK_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -o remount,rw /
i=0; prev=0; prevwall=0; maxgap=0
while :; do
  i=$((i+1))
  up=$(cut -d' ' -f1 /proc/uptime); wall=$(date +%s)
  maxgap=$(awk -v a="$up" -v b="$prev" -v m="$maxgap" 'BEGIN { d = a - b; if (b > 0 && d > m) m = d; print m }')
  if [ "$prev" != 0 ] && awk -v a="$up" -v b="$prev" 'BEGIN { exit !(a < b) }'; then echo "CLOCK-BACKWARDS uptime $prev -> $up"; fi
  [ "$wall" -lt "$prevwall" ] && echo "CLOCK-BACKWARDS wall $prevwall -> $wall"
  prev=$up; prevwall=$wall
  echo "TICK $i up=$up wall=$wall"
  if [ $((i % 10)) -eq 0 ]; then
    dd if=/dev/urandom of=/data/m-$i bs=4k count=16 2>/dev/null
    (cd /data && sha256sum m-$i >> sums)
    sync
    bad=$(cd /data && sha256sum -c sums 2>/dev/null | grep -vc ': OK$')
    echo "VERIFY tick=$i files=$(wc -l < /data/sums) bad=$bad maxgap=$maxgap"
  fi
  usleep 200000
done
"#;

/// The host names and ids the pool knows.
fn host_ids(pool: &Pool) -> Vec<(String, String)> {
    let o = poolctl(&pool.p, &["host-list", "--json"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("\"id\""))
        .map(|l| (field(l, "name"), field(l, "id")))
        .collect()
}

/// What the emulated host or the guest's console shows when the guest itself died (a
/// triple fault, a panic, a CPU that stopped taking interrupts).
const GUEST_DEATH: &[&str] = &[
    "triple fault",
    "Kernel panic",
    "rcu_preempt detected stalls",
    "self-detected stall",
    "soft lockup",
];

/// The first line of the emulated host's report, else of the guest's console, that says
/// the guest died ([`GUEST_DEATH`]).
fn death_line(report: &emuhost::Report, console: &str) -> Option<String> {
    GUEST_DEATH.iter().find_map(|m| {
        report
            .all(m)
            .first()
            .map(|l| l.trim().to_owned())
            .or_else(|| {
                console
                    .lines()
                    .find(|l| l.contains(m))
                    .map(|l| l.trim().to_owned())
            })
    })
}

/// How the emulated host's report shows a VM process whose two vCPUs wait for an
/// interrupt (a guest that stopped ticking).
const BOTH_HALTED: &str = "vcpu0=kvm_vcpu_block vcpu1=kvm_vcpu_block";

/// The guest console's last lines (what the hosts still hold of it).
fn console_tail(pool: &Pool, lines: usize) -> String {
    let mut console = String::new();
    console_until(&pool.p, None, "deb", Duration::from_secs(5), |seen| {
        console = seen.to_owned();
        None
    });
    let tail: Vec<&str> = console.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The number of the last `TICK` line in `console`.
fn last_tick(console: &str) -> Option<u64> {
    console.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("TICK ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// A failure in which the guest died is the emulation's, worth a fresh emulated host:
/// Linux guests in it die about once in sixteen migrations (triple faults, RCU stalls, or
/// a guest that stops ticking with nothing said, both vCPUs halted, also right at the
/// switchover, before its first line on the new host), and without migrating
/// too when the emulation is slowed (under KVM tracing, a guest page-table walk to an
/// address beyond its RAM at boot). Wrong data, a clock that goes back, or a failure with a
/// guest that still ticks still fails the test, with the console's last lines.
///
/// A root-file-system guest (which does not tick) is taken for dead only on what the
/// host's report or its console say.
fn died_in_emulation(pool: &Pool, host: &mut Running, failure: Failure, guest: Guest) -> Failure {
    // On real KVM a dead guest is the VMM's failure.
    if matches!(host.way, emuhost::Way::Direct) {
        return failure;
    }
    let Failure::Failed(why) = failure else {
        return failure;
    };
    let before = console_tail(pool, 60);
    // A guest that lives ticks five times a second, even under emulation.
    if guest == Guest::Ticking
        && let Err(f) = host.idle(Duration::from_secs(10))
    {
        return f;
    }
    let after = console_tail(pool, 60);
    let report = host.report();
    let death = death_line(&report, &after).or_else(|| {
        if guest != Guest::Ticking {
            return None;
        }
        if last_tick(&before).is_some() && last_tick(&before) == last_tick(&after) {
            return Some(format!(
                "no tick in 10 s after TICK {}",
                last_tick(&after).unwrap_or(0)
            ));
        }
        // The same death right at a switchover: on the host it moved to the guest never
        // printed a line, and its VM process has both vCPUs halted.
        let silent = last_tick(&before).is_none() && last_tick(&after).is_none();
        let halted = !report.all(BOTH_HALTED).is_empty();
        (silent && halted).then(|| format!("no tick since it arrived; {BOTH_HALTED}"))
    });
    let why = format!("{why}\nthe guest's console, last lines:\n{after}");
    match death {
        Some(line) => Failure::Stalled(format!("the guest died ({line}): {why}")),
        None => Failure::Failed(why),
    }
}

/// The guests of these scenarios, as `died_in_emulation` tells them dead.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    /// `TICK_INIT`'s and `NET_INIT`'s: they print while they live (the tick rules
    /// read `TICK_INIT`'s lines).
    Ticking,
    /// `ROOT_INIT`'s: quiet between boots, hanging on purpose at the end.
    Root,
}

/// Waits for the guest's first check of its files, then moves it `hops` times between
/// the two hosts, each time waiting for a check on the destination; the downtimes.
fn hop_between_hosts(pool: &Pool, host: &mut Running, hops: u32) -> Result<Vec<f64>, Failure> {
    wait_console(
        pool,
        host,
        "deb",
        "VERIFY tick=10 ",
        Duration::from_secs(300),
    )?;
    let ids = host_ids(pool);
    let mut downtimes = Vec::new();
    for hop in 1..=hops {
        let on = field(&pool.vm("deb").unwrap_or_default(), "host");
        let to = ids
            .iter()
            .find(|(_, id)| *id != on)
            .map(|(name, _)| name.clone())
            .expect("the other host");
        let out = ctl(pool, host, &["vm-migrate", "deb", "--host", &to])?;
        let Some(ms) = out.lines().find_map(|l| {
            l.strip_prefix("downtime ")?
                .strip_suffix(" ms")?
                .parse::<f64>()
                .ok()
        }) else {
            // The hosts' VMM logs reach the test a few seconds late: wait for them,
            // and show what the guest said last.
            host.idle(Duration::from_secs(5))?;
            return Err(Failure::Failed(format!(
                "hop {hop}: vm-migrate gave no downtime: {out}\nthe guest's console, last lines:\n{}\n{}",
                console_tail(pool, 40),
                pool.logs()
            )));
        };
        println!("hop {hop} to {to}: downtime {ms} ms");
        downtimes.push(ms);
        // On the destination the guest goes on: a check of its files after the hop.
        let line = wait_console(pool, host, "deb", "VERIFY tick=", Duration::from_secs(120))
            .map_err(|f| match f {
                Failure::Failed(why) => Failure::Failed(format!("after hop {hop} to {to}: {why}")),
                f => f,
            })?;
        assert!(line.contains(" bad=0 "), "hop {hop}: {line}");
    }
    Ok(downtimes)
}

/// A running Linux guest on an iSCSI root moves between two hosts five times: each hop
/// reports its downtime, the guest's clock never goes backwards, its longest gap between
/// ticks stays near the downtime, and every file it wrote verifies.
#[test]
fn linux_migrates_live_five_hops_keeping_its_clock_and_data() {
    // Three emulated hosts at most: see `died_in_emulation`.
    emuhost::retrying_up_to("linux-migrate", 3, |attempt| {
        let s = setup(2);
        let mut host = start_linux_vm("linux-migrate", &s, TICK_INIT, attempt)?;
        let pool = &s.pool;
        let mut downtimes =
            hop_between_hosts(pool, &mut host, 5)
            .map_err(|f| died_in_emulation(pool, &mut host, f, Guest::Ticking))?;
        let text = console_has(&pool.p, "deb", "VERIFY tick=", Duration::from_secs(30))
            .unwrap_or_default();
        let all = console_until(&pool.p, None, "deb", Duration::from_secs(10), |seen| {
            seen.matches("VERIFY").nth(1).map(|_| seen.to_owned())
        })
        .unwrap_or(text);
        assert!(!all.contains("CLOCK-BACKWARDS"), "{all}");
        let maxgap: f64 = all
            .lines()
            .filter_map(|l| l.split("maxgap=").nth(1)?.trim().parse().ok())
            .fold(0.0, f64::max);
        downtimes.sort_by(f64::total_cmp);
        println!(
            "5 hops: downtime median {} ms (all {downtimes:?}); the guest's longest gap between ticks {maxgap:.2} s",
            downtimes[2]
        );
        assert!(maxgap < 5.0, "the guest's clock jumped or stalled: {maxgap} s\n{all}");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The replies the emulated host's pinger got so far: their sequence numbers.
fn ping_replies(host: &Running) -> Vec<u64> {
    let prefix = format!("64 bytes from {GUEST_IP}: seq=");
    host.report()
        .lines
        .iter()
        .filter_map(|(_, l)| l.split(&prefix).nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

/// Reads the console until the pinger has `at_least` replies; their sequence numbers.
fn wait_replies(host: &mut Running, at_least: usize, limit: Duration) -> Result<Vec<u64>, Failure> {
    until(host, limit, |h| {
        let r = ping_replies(h);
        (r.len() >= at_least).then_some(r)
    })
}

/// Scenario 5: a stock kernel's `virtio_net` comes up with the MAC the pool gave its VIF on
/// the external network `lan` (each host in a network namespace of its own, `uplink` its
/// NIC), and the guest answers the emulated host's pings (5 a second) through live
/// migrations there and back: after each hop the replies go on, and the pings lost in a
/// hop stay within what its downtime and one second of the MAC announcement explain.
#[test]
fn linux_keeps_its_mac_and_answers_ping_through_live_migration() {
    emuhost::retrying_up_to("linux-net", 3, |attempt| {
        let s = setup(2);
        let mut host = start_hosts("linux-net", &s, true, attempt)?;
        let pool = &s.pool;
        // Placement needs every host to have reported its uplink.
        until(&mut host, Duration::from_secs(60), |_| {
            let o = poolctl(&pool.p, &["host-list", "--json"]);
            (String::from_utf8_lossy(&o.stdout).matches("uplink").count() >= 2).then_some(())
        })
        .map_err(|e| Failure::Failed(format!("the hosts report uplink: {e}\n{}", pool.logs())))?;
        ctl(
            pool,
            &mut host,
            &["network-create", "lan", "--kind", "external", "--nic", "uplink"],
        )?;
        let cmdline = format!("console=ttyS0 panic=-1 quiet guestip={GUEST_IP}");
        ctl(
            pool,
            &mut host,
            &[
                "vm-create",
                "deb",
                "--vcpus",
                "1",
                "--memory",
                "192M",
                "--kernel",
                "/scenario/images/bzimage",
                "--initrd",
                "/scenario/images/initramfs",
                "--cmdline",
                &cmdline,
                "--network",
                "lan",
                "--start",
            ],
        )?;
        let vifs = ctl(pool, &mut host, &["vif-list", "--vm", "deb", "--json"])?;
        let mac = vifs
            .lines()
            .find(|l| l.contains("\"mac\""))
            .map(|l| field(l, "mac"))
            .unwrap_or_else(|| panic!("deb has a VIF: {vifs}"));
        let up = wait_console(pool, &mut host, "deb", "NET eth0 ", Duration::from_secs(300))?;
        assert!(up.contains(&format!("mac={mac} ")), "the pool's MAC {mac}: {up}");
        host.wait("PINGER the guest answers", Duration::from_secs(120))?;
        wait_replies(&mut host, 10, Duration::from_secs(30))?;
        let ids = host_ids(pool);
        for hop in 1..=2 {
            let before = ping_replies(&host);
            let on = field(&pool.vm("deb").unwrap_or_default(), "host");
            let to = ids
                .iter()
                .find(|(_, id)| *id != on)
                .map(|(name, _)| name.clone())
                .expect("the other host");
            let out = ctl(pool, &mut host, &["vm-migrate", "deb", "--host", &to])?;
            let downtime: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix("downtime ")?.strip_suffix(" ms")?.parse().ok())
                .ok_or_else(|| Failure::Failed(format!("hop {hop}: no downtime in {out}")))?;
            // Ten replies after the migration ended: the guest answers on its new host.
            let at_end = ping_replies(&host).len();
            // (A guest that died in the emulation counts as the emulation's: retried.)
            let after = match wait_replies(&mut host, at_end + 10, Duration::from_secs(30)) {
                Ok(r) => r,
                Err(Failure::Failed(why)) => {
                    let why = format!("hop {hop} to {to}: no pings answered after it: {why}");
                    return Err(died_in_emulation(
                        pool,
                        &mut host,
                        Failure::Failed(why),
                        Guest::Ticking,
                    ));
                }
                Err(stalled) => return Err(stalled),
            };
            let (first, last) = (before.last().copied().unwrap_or(0), after.last().copied().unwrap_or(0));
            let lost = (last - first) - (after.len() - before.len()) as u64;
            let bound = ((downtime + 1000.0) / 200.0).ceil() as u64 + 1;
            println!("hop {hop} to {to}: downtime {downtime} ms, pings lost {lost} of {} (bound {bound})", last - first);
            assert!(lost <= bound, "hop {hop}: {lost} pings lost, more than {bound}");
            let to_id = ids.iter().find(|(n, _)| *n == to).map(|(_, id)| id.as_str());
            let now_on = field(&pool.vm("deb").unwrap_or_default(), "host");
            assert_eq!(Some(now_on.as_str()), to_id, "hop {hop}: deb runs on {to}");
        }
        let vifs_after = ctl(pool, &mut host, &["vif-list", "--vm", "deb", "--json"])?;
        assert!(vifs_after.contains(&mac), "the VIF keeps its MAC: {vifs_after}");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}
