//! The emulated KVM host: a Debian kernel under QEMU's software emulation with AMD-V
//! (`-cpu qemu64,+svm,+npt` with AES-NI, see [`OUTER_CPU`]), whose own KVM (`kvm_amd`, nested paging) runs real guests.
//! On machines whose `/dev/kvm` cannot run Linux (PVM), scenarios that need real KVM run
//! their script inside it; on a host with real VT-x/AMD-V they run directly.
//!
//! The outer image is Debian's `linux-image-amd64` kernel and one initramfs: static
//! busybox, the kvm modules, this workspace's binaries (stripped) and iproute2's `ip` with
//! their shared libraries, and an `/init` that loads KVM, prints a heartbeat, runs `/scenario/run.sh`
//! and powers off. It is built once per set of binaries and cached under `target/emuhost/`.
//! A scenario's files go in a second cpio appended to it. Everything comes back over the
//! serial console, one line at a time: each expected line has a deadline counted from the
//! one before it, and a try that stalls (a missed deadline, or the outer heartbeat silent)
//! is retried once with a fresh emulated host, because QEMU's emulated SVM sometimes
//! freezes the whole outer VM; the report says how many retries it took, so a real hang
//! (which fails both tries) is never hidden.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::debian::{self, Cpio, Kernel};

/// The workspace binaries every emulated host carries in `/usr/bin`.
const BINARIES: &[&str] = &["hostd", "hostd-vmm"];
/// Kernel modules the outer init loads (with their dependencies): KVM, and tun for the
/// taps of VMs with a network.
const OUTER_MODULES: &[&str] = &["kvm_amd", "tun"];
/// Loaded when a scenario uses the network: the outer NIC, and the bridges and veth pairs
/// that scenarios giving each host a network namespace of its own build.
const NET_MODULES: &[&str] = &["virtio_pci", "virtio_net", "bridge", "veth"];
/// This machine's tools the image carries besides busybox, with their shared libraries:
/// iproute2's `ip` (network namespaces and veth pairs, which busybox's `ip` cannot make).
const TOOLS: &[&str] = &["ip"];
/// The outer VM's memory.
const OUTER_MEMORY_MIB: u32 = 2048;
/// Its vCPUs: with one, a 2-vCPU Linux guest could spin on a lock held by its other vCPU
/// thread, which the single outer CPU never got back to (the emulated host froze in 3 of 5
/// runs; with two, 0 of 4).
const OUTER_VCPUS: u32 = 2;
/// Its CPU: AMD-V with nested paging, and the AES-NI, PCLMULQDQ and SSSE3/SSE4 that every
/// real KVM host has. Without them rustls (ring) encrypts the TLS migration stream in
/// portable code, which under TCG moved 2.5 MB/s: a Linux guest ticking five times a
/// second dirtied memory as fast, so each hop throttled it to 90% for 50-60 s (its ticks
/// up to 7 s apart, and more of its deaths in the emulation). With them a hop takes ~10 s
/// in one round, unthrottled.
const OUTER_CPU: &str = "qemu64,+svm,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq";
/// What the emulated host's kernel prints when a CPU has not scheduled for 20 s or more.
const SOFT_LOCKUP: &str = "watchdog: BUG: soft lockup";
/// What it prints when a CPU has held up RCU for 21 s or more (an emulated CPU wedged in
/// a nested guest, its other CPU still beating).
const RCU_STALL: &str = "detected stalls on CPUs/tasks";
/// What it prints when it dies: seen as "corrupted stack end detected inside scheduler"
/// with and without huge pages, the emulation corrupting the emulated host itself.
const KERNEL_PANIC: &str = "Kernel panic";

/// Whether kernel message `line` (`[ seconds] text`) is stamped within 20 s of `uptime`:
/// a message of the kernel whose uptime that is; a nested guest's kernel has a clock of
/// its own.
fn stamped_near(line: &str, uptime: f64) -> bool {
    line.trim_start()
        .strip_prefix('[')
        .and_then(|l| l.split(']').next())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .is_some_and(|t| (t - uptime).abs() < 20.0)
}
/// The outer init prints a heartbeat every 10 s; this long without one is a frozen emulator.
const HEARTBEAT_SILENCE: Duration = Duration::from_secs(60);

const OUTER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin:/sbin:/usr/sbin S=/scenario
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
up() { cut -d' ' -f1 /proc/uptime; }
echo "EMUHOST init uptime=$(up)"
for m in $(cat /etc/outer-modules); do modprobe $m || echo "EMUHOST modprobe $m failed"; done
# Guests here triple-faulted or stalled around live migrations (hostd's dirty logging,
# which splits huge pages eagerly when it starts) in about one hop of five; with eager
# splitting off, about one in sixteen (turning transparent huge pages off did not stop it;
# neither did one thread for the emulated CPUs). Under KVM tracing a guest also died at boot, with no migration, walking
# its page tables to an address beyond its RAM: the emulation (TCG's SVM with this nested
# KVM) corrupts guests now and then, so the emulated host does without eager splitting.
# With guest RAM in transparent huge pages (QEMU's, and hostd's since it aligns its RAM)
# guests died more: at boot, in hops, and once the emulated host's own kernel froze or
# panicked; 40 hops and 4 boots passed without them. Both VMMs go without here.
echo N > /sys/module/kvm/parameters/eager_page_split 2>/dev/null
echo never > /sys/kernel/mm/transparent_hugepage/enabled
if [ -c /dev/kvm ]; then
  echo "EMUHOST kvm ok npt=$(cat /sys/module/kvm_amd/parameters/npt) nested=$(cat /sys/module/kvm_amd/parameters/nested) eager_split=$(cat /sys/module/kvm/parameters/eager_page_split) uptime=$(up)"
else
  echo "EMUHOST kvm MISSING"; dmesg | tail -20
fi
ip link set lo up
if [ -e /scenario/outside ]; then
  for m in $(cat /etc/net-modules); do modprobe $m || echo "EMUHOST modprobe $m failed"; done
  ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up
  ip route add default via 10.0.2.2
  # The host's loopback is 10.0.2.2 here; what the scenario dials at 127.0.0.1:PORT is
  # relayed there, so addresses read the same inside and out.
  for port in $(cat /scenario/outside); do
    printf '#!/bin/sh\nexec nc 10.0.2.2 %s\n' $port > /tmp/out-$port; chmod +x /tmp/out-$port
    nc -ll -p $port -e /tmp/out-$port &
  done
  echo "EMUHOST net ok uptime=$(up)"
fi
(while :; do sleep 10; echo "EMUHOST-HB uptime=$(up)"; done) &
if [ -x /scenario/run.sh ]; then
  cd /scenario && ./run.sh 2>&1
  echo "EMUHOST scenario rc=$? uptime=$(up)"
else
  echo "EMUHOST no scenario"
fi
sync
poweroff -f
"#;

/// The lines of `line` as they were written. The init's heartbeat (one write of a whole
/// line) can land inside a line the scenario is writing in pieces ("LINUX acpi=[APIC" +
/// heartbeat + " DSDT ...]"): it comes out as a line of its own, and what came before it
/// waits in `unfinished` for the rest of its line.
fn unmix_heartbeat(unfinished: &mut String, line: &str) -> Vec<String> {
    const BEAT: &str = "EMUHOST-HB uptime=";
    let mut line = std::mem::take(unfinished) + line;
    match line.find(BEAT) {
        Some(at) if at > 0 => {
            let beat = line.split_off(at);
            *unfinished = line;
            vec![beat]
        }
        _ => vec![line],
    }
}

/// Where the emulated host's inputs and outputs are cached: `target/emuhost`.
pub fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target
    exe.ancestors()
        .nth(3)
        .expect("the target directory")
        .join("emuhost")
}

/// How a scenario ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Inside the emulated host, after this many retries of a stalled emulator.
    EmulatedHost { retries: u32 },
    /// On this host's own KVM (real VT-x/AMD-V).
    Direct,
}

impl std::fmt::Display for Way {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Way::EmulatedHost { retries } => write!(
                f,
                "inside the emulated KVM host (QEMU TCG with SVM), {retries} retries"
            ),
            Way::Direct => write!(f, "directly on this host's KVM"),
        }
    }
}

/// One line the scenario must print (a substring), within `within` of the previous one.
#[derive(Clone, Debug)]
pub struct Expect {
    pub text: String,
    pub within: Duration,
}

pub fn expect(text: &str, within_s: u64) -> Expect {
    Expect {
        text: text.to_owned(),
        within: Duration::from_secs(within_s),
    }
}

/// What runs: `run.sh` (a busybox `sh` script; the scenario's folder is `$S`) and its
/// files, and the lines it must print in order.
pub struct Scenario {
    pub name: String,
    pub script: String,
    /// (path under `$S`, mode, bytes)
    pub files: Vec<(String, u32, Vec<u8>)>,
    pub expect: Vec<Expect>,
    /// Lines that fail the scenario at once (no retry): a panic, a wrong result.
    pub fail_on: Vec<String>,
    /// A cap on one try, whatever the deadlines say.
    pub total: Duration,
    /// Ports on this host's loopback the scenario dials at 127.0.0.1 (the pool's members,
    /// storaged): inside the emulated host, forwarded out through QEMU's user network.
    pub outside: Vec<u16>,
    /// Addresses on this host's loopback (e.g. 127.0.0.11:7011) that reach the same port
    /// of the scenario (a hostd it starts listening on 0.0.0.0): QEMU forwards them in.
    pub inside: Vec<(std::net::Ipv4Addr, u16)>,
    /// Runs in the emulated host even where this host's KVM runs Linux: the script builds
    /// what only a machine of its own may have (its `/run`, bridges, network namespaces).
    pub emulated_only: bool,
}

impl Scenario {
    pub fn new(name: &str, script: &str) -> Scenario {
        Scenario {
            name: name.to_owned(),
            script: script.to_owned(),
            files: Vec::new(),
            expect: Vec::new(),
            fail_on: vec!["Kernel panic".into(), "SCENARIO-FAIL".into()],
            total: Duration::from_secs(900),
            outside: Vec::new(),
            inside: Vec::new(),
            emulated_only: false,
        }
    }

    pub fn file(mut self, name: &str, mode: u32, data: Vec<u8>) -> Scenario {
        self.files.push((name.to_owned(), mode, data));
        self
    }

    pub fn expect(mut self, text: &str, within_s: u64) -> Scenario {
        self.expect.push(expect(text, within_s));
        self
    }
}

/// A scenario that passed: how it ran and every console line with its time.
#[derive(Debug)]
pub struct Report {
    pub way: Way,
    /// (seconds since the try started, line)
    pub lines: Vec<(f64, String)>,
    /// When each expected line came.
    pub marks: Vec<(f64, String)>,
    pub log: PathBuf,
}

impl Report {
    /// The rest of the first line that contains `prefix`, after it.
    pub fn after(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|(_, l)| l.find(prefix).map(|at| &l[at + prefix.len()..]))
    }

    /// Every line containing `text`.
    pub fn all(&self, text: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(_, l)| l.contains(text))
            .map(|(_, l)| l.as_str())
            .collect()
    }

    /// When the first line containing `text` came.
    pub fn time_of(&self, text: &str) -> Option<f64> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(text))
            .map(|(t, _)| *t)
    }
}

/// The cached outer kernel and base initramfs.
pub struct EmuHost {
    kernel: PathBuf,
    base: PathBuf,
}

/// Whether `/dev/kvm` runs Linux guests itself (VT-x/AMD-V, not PVM).
pub fn host_has_real_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

/// Runs `scenario` inside the emulated host, or directly where this host's KVM runs Linux:
/// its expected lines in order, then its script's end. Err says why it failed, with the
/// console's last lines.
pub fn run(scenario: &Scenario) -> Result<Report, String> {
    retrying(&scenario.name, |attempt| {
        let mut r = start(scenario, attempt)?;
        for e in &scenario.expect {
            r.wait(&e.text, e.within)?;
        }
        r.wait_end(Duration::from_secs(120))?;
        Ok(r.report())
    })
}

/// Runs `body` (which starts the scenario and drives it), once more when the emulated host
/// stalled; returns its value and the number of retries.
pub fn retrying<T>(name: &str, body: impl FnMut(u32) -> Result<T, Failure>) -> Result<T, String> {
    retrying_up_to(name, 2, body)
}

/// [`retrying`] with up to `tries` emulated hosts.
pub fn retrying_up_to<T>(
    name: &str,
    tries: u32,
    mut body: impl FnMut(u32) -> Result<T, Failure>,
) -> Result<T, String> {
    let mut last = String::new();
    for attempt in 0..tries {
        match body(attempt) {
            Ok(v) => return Ok(v),
            Err(Failure::Stalled(why)) => {
                println!("{name}: emulated host try {attempt} stalled: {why}");
                last = why;
            }
            Err(Failure::Failed(why)) => return Err(with_summary(name, why)),
        }
    }
    Err(with_summary(
        name,
        format!("{name} stalled {tries} times; the last time: {last}"),
    ))
}

/// A failure's text ends with its first line again: the logs in between are long, and a
/// report that keeps only the head and tail of the output still says what failed.
fn with_summary(name: &str, why: String) -> String {
    let first = why.lines().next().unwrap_or_default().to_owned();
    format!("{why}\n=== {name} failed: {first}")
}

/// Starts `scenario` and waits for the emulated host's KVM.
pub fn start(scenario: &Scenario, attempt: u32) -> Result<Running, Failure> {
    let lock = RunLock::take();
    let fail = |e: String| Failure::Failed(e);
    let direct = host_has_real_kvm()
        && !scenario.emulated_only
        && std::env::var_os("EMUHOST_FORCE").is_none();
    let mut running = if direct {
        start_direct(scenario).map_err(fail)?
    } else {
        EmuHost::build()
            .map_err(fail)?
            .start(scenario)
            .map_err(fail)?
    };
    running._lock = Some(lock);
    if let Way::EmulatedHost { retries } = &mut running.way {
        *retries = attempt;
    }
    if matches!(running.way, Way::EmulatedHost { .. }) {
        running.wait("EMUHOST init", Duration::from_secs(150))?;
        running.wait("EMUHOST kvm ok", Duration::from_secs(60))?;
        if !scenario.outside.is_empty() {
            running.wait("EMUHOST net ok", Duration::from_secs(60))?;
        }
    }
    Ok(running)
}

/// One emulated host at a time on this machine (test threads and test binaries alike):
/// two would share the CPUs and miss their deadlines.
struct RunLock {
    _held: std::fs::File,
}

impl RunLock {
    fn take() -> RunLock {
        let dir = cache_dir();
        std::fs::create_dir_all(&dir).expect("target/emuhost");
        RunLock {
            _held: debian::lock(&dir.join(".lock")).expect("the emulated host's lock"),
        }
    }
}

impl EmuHost {
    /// The outer image for the binaries built now, built the first time.
    fn build() -> Result<EmuHost, String> {
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            return Err("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)".into());
        }
        let cache = cache_dir();
        let debs = cache.join("debian");
        std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
        let outer = Kernel::fetch(&debs, "linux-image-amd64")?;
        let busybox = debian::busybox(&debs)?;
        let bins: Vec<PathBuf> = BINARIES.iter().map(|b| crate::binary(b)).collect();
        let tools = TOOLS
            .iter()
            .map(|t| tool(t))
            .collect::<Result<Vec<_>, _>>()?;
        let key = cache_key(&outer, &[bins.as_slice(), &tools].concat());
        let dir = cache.join(format!("outer-{key:016x}"));
        let host = EmuHost {
            kernel: outer.bzimage(),
            base: dir.join("base.cpio"),
        };
        if host.base.exists() {
            return Ok(host);
        }
        let mut c = Cpio::new();
        for d in [
            "bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "usr",
        ] {
            c.dir(d);
        }
        c.dir("usr/bin").char_dev("dev/console", 5, 1);
        c.file(
            "bin/busybox",
            0o755,
            &std::fs::read(&busybox).map_err(|e| e.to_string())?,
        );
        c.file("init", 0o755, OUTER_INIT.as_bytes());
        c.file(
            "etc/outer-modules",
            0o644,
            OUTER_MODULES.join(" ").as_bytes(),
        );
        c.file("etc/net-modules", 0o644, NET_MODULES.join(" ").as_bytes());
        outer.add_modules(&[OUTER_MODULES, NET_MODULES].concat(), &mut c)?;
        let mut libs = std::collections::BTreeSet::new();
        for (name, path) in BINARIES.iter().zip(&bins) {
            c.file(&format!("usr/bin/{name}"), 0o755, &stripped(path)?);
            libs.extend(shared_libraries(path)?);
        }
        for (name, path) in TOOLS.iter().zip(&tools) {
            let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            c.file(&format!("usr/bin/{name}"), 0o755, &data);
            libs.extend(shared_libraries(path)?);
        }
        let mut made = std::collections::BTreeSet::new();
        for lib in libs {
            let mut at = String::new();
            let parent = Path::new(&lib).parent().expect("an absolute path");
            for part in parent.components().skip(1) {
                at = format!("{at}/{}", part.as_os_str().to_string_lossy());
                if made.insert(at.clone()) && !["/bin", "/usr", "/usr/bin"].contains(&at.as_str()) {
                    c.dir(&at[1..]);
                }
            }
            let data = std::fs::read(&lib).map_err(|e| format!("{lib}: {e}"))?;
            c.file(&lib[1..], 0o755, &data);
        }
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let tmp = dir.join("base.cpio.tmp");
        std::fs::write(&tmp, c.finish()).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &host.base).map_err(|e| e.to_string())?;
        Ok(host)
    }

    fn start(&self, scenario: &Scenario) -> Result<Running, String> {
        let runs = cache_dir().join("runs");
        std::fs::create_dir_all(&runs).map_err(|e| e.to_string())?;
        let initrd = runs.join(format!("{}.initrd", scenario.name));
        {
            let mut f = std::fs::File::create(&initrd).map_err(|e| e.to_string())?;
            let base = std::fs::read(&self.base).map_err(|e| e.to_string())?;
            f.write_all(&base).map_err(|e| e.to_string())?;
            // Each archive starts 4-byte aligned, or the kernel ignores it.
            f.write_all(&vec![0; (4 - base.len() % 4) % 4])
                .map_err(|e| e.to_string())?;
            f.write_all(&payload(scenario)).map_err(|e| e.to_string())?;
        }
        let tries = std::fs::read_dir(&runs)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{}.try", scenario.name))
                    })
                    .count()
            })
            .unwrap_or(0);
        let log = runs.join(format!("{}.try{tries}.log", scenario.name));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", OUTER_CPU])
            .args(["-smp", &OUTER_VCPUS.to_string()])
            .args(["-m", &OUTER_MEMORY_MIB.to_string()])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-monitor",
                "none",
            ])
            .args(["-serial", "stdio", "-kernel"])
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"]);
        if !scenario.outside.is_empty() || !scenario.inside.is_empty() {
            let mut netdev = String::from("user,id=n0,net=10.0.2.0/24,host=10.0.2.2");
            for (ip, port) in &scenario.inside {
                netdev += &format!(",hostfwd=tcp:{ip}:{port}-10.0.2.15:{port}");
            }
            cmd.args(["-netdev", &netdev])
                .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        }
        let mut running = Running::spawn(cmd, scenario, log, Way::EmulatedHost { retries: 0 })?;
        running.initrd = Some(initrd);
        Ok(running)
    }
}

/// The scenario's files under `scenario/`, as a cpio to append to the base.
fn payload(s: &Scenario) -> Vec<u8> {
    let mut c = Cpio::new();
    c.dir("scenario");
    c.file("scenario/run.sh", 0o755, s.script.as_bytes());
    if !s.outside.is_empty() {
        let ports: Vec<String> = s.outside.iter().map(u16::to_string).collect();
        c.file("scenario/outside", 0o644, ports.join(" ").as_bytes());
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (name, mode, data) in &s.files {
        let mut at = String::from("scenario");
        for part in Path::new(name)
            .parent()
            .into_iter()
            .flat_map(Path::components)
        {
            at = format!("{at}/{}", part.as_os_str().to_string_lossy());
            if dirs.insert(at.clone()) {
                c.dir(&at);
            }
        }
        c.file(&format!("scenario/{name}"), *mode, data);
    }
    c.finish()
}

/// The scenario's script on this host, with the binaries first in `PATH`.
fn start_direct(scenario: &Scenario) -> Result<Running, String> {
    let stage = tempfile::tempdir().map_err(|e| e.to_string())?;
    let script = (
        "run.sh".to_owned(),
        0o755,
        scenario.script.as_bytes().to_vec(),
    );
    for (name, mode, data) in std::iter::once(&script).chain(&scenario.files) {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.path().join(name);
        std::fs::create_dir_all(path.parent().expect("under the stage"))
            .map_err(|e| e.to_string())?;
        std::fs::write(&path, data).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| e.to_string())?;
    }
    for b in BINARIES {
        crate::binary(b);
    }
    let bin_dir = crate::binary("hostd")
        .parent()
        .expect("target dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exec ./run.sh 2>&1"])
        .current_dir(stage.path())
        .env("S", stage.path())
        .env("PATH", path);
    std::fs::create_dir_all(cache_dir()).map_err(|e| e.to_string())?;
    let log = cache_dir().join(format!("{}.direct.log", scenario.name));
    let mut running = Running::spawn(cmd, scenario, log, Way::Direct)?;
    running._stage = Some(stage);
    Ok(running)
}

/// Why a try of a scenario ended badly.
#[derive(Debug)]
pub enum Failure {
    /// A deadline passed or the outer heartbeat stopped: worth a fresh emulated host.
    Stalled(String),
    /// A wrong result, a panic, a script that gave up: not retried.
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Stalled(w) => write!(f, "stalled: {w}"),
            Failure::Failed(w) => write!(f, "failed: {w}"),
        }
    }
}

type Lines = Vec<(f64, String)>;

/// A scenario that runs: its console read line by line, its process group killed when
/// this is dropped, however the test ends.
pub struct Running {
    pub way: Way,
    group: Group,
    /// Each line with when it came (stamped as read, so a test busy elsewhere does not
    /// make the emulated host look silent).
    rx: mpsc::Receiver<(Instant, String)>,
    logf: std::fs::File,
    log: PathBuf,
    name: String,
    fail_on: Vec<String>,
    total: Duration,
    started: Instant,
    lines: Lines,
    marks: Lines,
    /// The outer heartbeat's last line (or the init's, or the emulator's start).
    last_beat: Instant,
    /// When a line said the emulated host's uptime, and what it said.
    uptime: Option<(Instant, f64)>,
    /// The script's exit status once it ended.
    ended: Option<i32>,
    /// The per-run initrd, removed with this.
    initrd: Option<PathBuf>,
    _lock: Option<RunLock>,
    _stage: Option<tempfile::TempDir>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(initrd) = &self.initrd {
            let _ = std::fs::remove_file(initrd);
        }
    }
}

impl Running {
    /// Starts `cmd` in its own process group with its output in lines on a channel.
    fn spawn(mut cmd: Command, s: &Scenario, log: PathBuf, way: Way) -> Result<Running, String> {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and makes one
        // async-signal-safe system call: the emulator dies with the test even when the
        // test is killed and no destructor runs.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
        let mut group = Group(child);
        let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let (tx, rx) = mpsc::channel::<(Instant, String)>();
        for out in [
            Box::new(group.0.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(group.0.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut unfinished = String::new();
                for line in std::io::BufReader::new(out).split(b'\n') {
                    let Ok(line) = line else { return };
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches('\r');
                    for text in unmix_heartbeat(&mut unfinished, text) {
                        if tx.send((Instant::now(), text)).is_err() {
                            return;
                        }
                    }
                }
                if !unfinished.is_empty() {
                    let _ = tx.send((Instant::now(), unfinished));
                }
            });
        }
        Ok(Running {
            way,
            group,
            rx,
            logf,
            log,
            name: s.name.clone(),
            fail_on: s.fail_on.clone(),
            total: s.total,
            started: Instant::now(),
            lines: Vec::new(),
            marks: Vec::new(),
            // An emulator frozen before its first beat is as stalled as one that stops.
            last_beat: Instant::now(),
            uptime: None,
            ended: None,
            initrd: None,
            _lock: None,
            _stage: None,
        })
    }

    fn tail(&self) -> String {
        let from = self.lines.len().saturating_sub(40);
        let lines: Vec<String> = self.lines[from..]
            .iter()
            .map(|(t, l)| format!("[{t:8.2}] {l}"))
            .collect();
        format!("log {}\n{}", self.log.display(), lines.join("\n"))
    }

    /// Err when the emulated host printed no heartbeat for too long before `at` (a line's
    /// arrival, or now with nothing queued).
    fn check_beat(&self, at: Instant, waiting_for: &str) -> Result<(), Failure> {
        match self.last_beat {
            b if self.way != Way::Direct && at.saturating_duration_since(b) > HEARTBEAT_SILENCE => {
                Err(Failure::Stalled(format!(
                    "{}: the emulated host's heartbeat stopped {:?} before, waiting for {waiting_for:?}; {}",
                    self.name,
                    at.saturating_duration_since(b),
                    self.tail()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether `line`, which came at `at`, is a message of the emulated host's kernel
    /// (see [`stamped_near`]), its uptime then told by the last heartbeat.
    fn own_kernel_line(&self, at: Instant, line: &str) -> bool {
        self.uptime.is_some_and(|(when, uptime)| {
            stamped_near(
                line,
                uptime + at.saturating_duration_since(when).as_secs_f64(),
            )
        })
    }

    /// The next line, or None when `until` passes first; Err when the try is over.
    fn next_line(&mut self, until: Instant, waiting_for: &str) -> Result<Option<String>, Failure> {
        let emulated = matches!(self.way, Way::EmulatedHost { .. });
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            if now - self.started > self.total {
                return Err(Failure::Stalled(format!(
                    "{}: over its {:?} cap, waiting for {waiting_for:?}; {}",
                    self.name,
                    self.total,
                    self.tail()
                )));
            }
            let wait = (until - now).min(Duration::from_millis(500));
            let (at, line) = match self.rx.recv_timeout(wait) {
                Ok((at, line)) => (at, line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.check_beat(now, waiting_for)?;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.group.0.wait().ok();
                    if !emulated && self.ended.is_none() {
                        self.ended = Some(status.and_then(|s| s.code()).unwrap_or(-1));
                    }
                    let why = format!(
                        "{}: ended ({status:?}) while waiting for {waiting_for:?}; {}",
                        self.name,
                        self.tail()
                    );
                    // The emulated host's kernel does not stop before its init says how
                    // the scenario ended: when QEMU exits first, the emulator reset it.
                    return Err(if emulated && self.ended.is_none() {
                        Failure::Stalled(why)
                    } else {
                        Failure::Failed(why)
                    });
                }
            };
            if emulated {
                self.check_beat(at, waiting_for)?;
            }
            let t = (at - self.started).as_secs_f64();
            let _ = writeln!(self.logf, "[{t:8.2}] {line}");
            println!("[{t:8.2}] {line}");
            // The first heartbeat comes 10 s after the init; count from the init (whose
            // line may follow the firmware's screen-clearing escapes).
            if line.starts_with("EMUHOST-HB") || line.contains("EMUHOST init") {
                self.last_beat = at;
                if let Some(u) = line
                    .split("uptime=")
                    .nth(1)
                    .and_then(|u| u.trim().parse().ok())
                {
                    self.uptime = Some((at, u));
                }
            }
            self.lines.push((t, line.clone()));
            // The emulated host's own kernel finding a CPU stuck: QEMU's emulated SVM
            // livelocked in a nested guest (no process of ours can do that to it).
            if emulated && line.contains(SOFT_LOCKUP) {
                return Err(Failure::Stalled(format!(
                    "{}: the emulated host's kernel reports a stuck CPU, waiting for {waiting_for:?}; {}",
                    self.name,
                    self.tail()
                )));
            }
            // The same, told by RCU, and the emulated host's kernel dying: only from that
            // kernel (a Linux guest's stall or panic, relayed by a scenario, may be ours
            // to answer for, and fails it through `fail_on`).
            if emulated
                && (line.contains(RCU_STALL) || line.contains(KERNEL_PANIC))
                && self.own_kernel_line(at, &line)
            {
                return Err(Failure::Stalled(format!(
                    "{}: the emulated host's kernel reports a stall or died, waiting for {waiting_for:?}; {}",
                    self.name,
                    self.tail()
                )));
            }
            if let Some(bad) = self.fail_on.iter().find(|f| line.contains(f.as_str())) {
                return Err(Failure::Failed(format!(
                    "{}: printed {bad:?}; {}",
                    self.name,
                    self.tail()
                )));
            }
            if emulated && let Some(rc) = line.strip_prefix("EMUHOST scenario rc=") {
                self.ended = rc.split_whitespace().next().and_then(|c| c.parse().ok());
            }
            return Ok(Some(line));
        }
    }

    /// Waits for a line containing `text`, at most `within`; returns it.
    pub fn wait(&mut self, text: &str, within: Duration) -> Result<String, Failure> {
        let until = Instant::now() + within;
        loop {
            match self.next_line(until, text)? {
                Some(line) if line.contains(text) => {
                    let t = self.lines.last().expect("pushed").0;
                    self.marks.push((t, text.to_owned()));
                    return Ok(line);
                }
                Some(_) if self.ended.is_some() => {
                    return Err(Failure::Failed(format!(
                        "{}: its script ended (status {:?}) while waiting for {text:?}; {}",
                        self.name,
                        self.ended,
                        self.tail()
                    )));
                }
                Some(_) => {}
                None => {
                    let outer = match self.last_beat {
                        _ if self.way == Way::Direct => "",
                        b if b.elapsed() < HEARTBEAT_SILENCE => " (the emulated host still beats)",
                        _ => " (the emulated host is frozen too)",
                    };
                    let why = format!(
                        "{}: no {text:?} within {within:?}{outer}; {}",
                        self.name,
                        self.tail()
                    );
                    // Only an emulator is worth a second try; a real KVM host's hang is real.
                    return Err(match self.way {
                        Way::Direct => Failure::Failed(why),
                        Way::EmulatedHost { .. } => Failure::Stalled(why),
                    });
                }
            }
        }
    }

    /// Lets `d` pass while reading the console; Err when the scenario stalls, fails or ends
    /// meanwhile.
    pub fn idle(&mut self, d: Duration) -> Result<(), Failure> {
        let until = Instant::now() + d;
        while self.next_line(until, "nothing in particular")?.is_some() {
            if self.ended.is_some() {
                return Err(Failure::Failed(format!(
                    "{}: its script ended (status {:?}); {}",
                    self.name,
                    self.ended,
                    self.tail()
                )));
            }
        }
        Ok(())
    }

    /// Waits for the script to end, and requires its status 0.
    pub fn wait_end(&mut self, within: Duration) -> Result<(), Failure> {
        let until = Instant::now() + within;
        while self.ended.is_none() {
            match self.next_line(until, "the script's end") {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(Failure::Stalled(format!(
                        "{}: its script did not end within {within:?}; {}",
                        self.name,
                        self.tail()
                    )));
                }
                Err(_) if self.ended.is_some() => break,
                Err(e) => return Err(e),
            }
        }
        match self.ended {
            Some(0) => Ok(()),
            other => Err(Failure::Failed(format!(
                "{}: its script ended with status {other:?}; {}",
                self.name,
                self.tail()
            ))),
        }
    }

    /// Every line so far, and when the awaited ones came.
    pub fn report(&self) -> Report {
        Report {
            way: self.way,
            lines: self.lines.clone(),
            marks: self.marks.clone(),
            log: self.log.clone(),
        }
    }
}

/// A child in its own process group, killed with the group however the watch ends.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signals the process group this struct started (pgid = the child's pid).
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Identifies an outer image: the kernel and the binaries' sizes and times.
fn cache_key(kernel: &Kernel, bins: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    kernel.release.hash(&mut h);
    OUTER_INIT.hash(&mut h);
    OUTER_MODULES.hash(&mut h);
    NET_MODULES.hash(&mut h);
    for b in bins {
        b.hash(&mut h);
        if let Ok(m) = std::fs::metadata(b) {
            m.len().hash(&mut h);
            m.modified().ok().hash(&mut h);
        }
    }
    h.finish()
}

/// Where this machine's `name` is, from the usual system folders.
fn tool(name: &str) -> Result<PathBuf, String> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no {name} on this machine (Debian: iproute2)"))
}

/// A stripped copy of a binary (debug builds are 5× larger, and TCG pays to load them).
fn stripped(path: &Path) -> Result<Vec<u8>, String> {
    let out = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let status = Command::new("strip")
        .arg("-o")
        .arg(out.path())
        .arg(path)
        .status()
        .map_err(|e| format!("strip: {e}"))?;
    if !status.success() {
        return Err(format!("strip {} failed", path.display()));
    }
    std::fs::read(out.path()).map_err(|e| e.to_string())
}

/// The shared libraries a binary loads (its interpreter included), from `ldd`.
fn shared_libraries(path: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_inside_a_line_comes_out_whole_and_the_line_too() {
        let mut unfinished = String::new();
        let mut lines = Vec::new();
        for l in [
            "LINUX cpus=2",
            "LINUX acpi=[APICEMUHOST-HB uptime=32.83",
            " DSDT FACP data dynamic ]",
            "EMUHOST-HB uptime=42.85",
        ] {
            lines.extend(unmix_heartbeat(&mut unfinished, l));
        }
        assert_eq!(
            lines,
            [
                "LINUX cpus=2",
                "EMUHOST-HB uptime=32.83",
                "LINUX acpi=[APIC DSDT FACP data dynamic ]",
                "EMUHOST-HB uptime=42.85",
            ]
        );
        assert!(unfinished.is_empty());
    }

    #[test]
    fn a_kernel_line_is_the_emulated_hosts_when_stamped_with_its_uptime() {
        let stall = "[  283.781604] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:";
        assert!(stamped_near(stall, 281.3));
        assert!(stamped_near(stall, 300.0));
        // A nested guest's kernel, booted a minute ago.
        assert!(!stamped_near(stall, 900.0));
        assert!(!stamped_near(
            "rcu: INFO: rcu_preempt detected stalls",
            283.0
        ));
        assert!(!stamped_near("[ x] rcu", 0.0));
    }
}
