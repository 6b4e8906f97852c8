//! The emulated KVM host: a Debian kernel under QEMU's software emulation with AMD-V
//! (`-cpu qemu64,+svm,+npt`), whose own KVM (`kvm_amd`, nested paging) runs real guests.
//! On machines whose `/dev/kvm` cannot run Linux (PVM), scenarios that need real KVM run
//! their script inside it; on a host with real VT-x/AMD-V they run directly.
//!
//! The outer image is Debian's `linux-image-amd64` kernel and one initramfs: static
//! busybox, the kvm modules, this workspace's binaries (stripped) with their shared
//! libraries, and an `/init` that loads KVM, prints a heartbeat, runs `/scenario/run.sh`
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
/// Kernel modules the outer init loads (with their dependencies).
const OUTER_MODULES: &[&str] = &["kvm_amd"];
/// The outer VM: one vCPU was as fast as two under TCG, and leaves a CPU to the rest.
const OUTER_MEMORY_MIB: u32 = 2048;
/// The outer init prints a heartbeat this often; three missed ones mean a frozen emulator.
const HEARTBEAT_SILENCE: Duration = Duration::from_secs(35);

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
if [ -c /dev/kvm ]; then
  echo "EMUHOST kvm ok npt=$(cat /sys/module/kvm_amd/parameters/npt) nested=$(cat /sys/module/kvm_amd/parameters/nested) uptime=$(up)"
else
  echo "EMUHOST kvm MISSING"; dmesg | tail -20
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

/// Runs `scenario` inside the emulated host, or directly where this host's KVM runs Linux.
/// Err says why it failed, with the console's last lines.
pub fn run(scenario: &Scenario) -> Result<Report, String> {
    let _one = RunLock::take();
    if host_has_real_kvm() && std::env::var_os("EMUHOST_FORCE").is_none() {
        return run_direct(scenario);
    }
    let host = EmuHost::build()?;
    host.run(scenario)
}

/// One emulated host at a time on this machine (test threads and test binaries alike):
/// two would share the CPUs and miss their deadlines.
struct RunLock {
    _held: std::fs::File,
}

impl RunLock {
    fn take() -> RunLock {
        use std::os::fd::AsRawFd;
        let dir = cache_dir();
        std::fs::create_dir_all(&dir).expect("target/emuhost");
        let f = std::fs::File::create(dir.join(".lock")).expect("the emulated host's lock");
        // SAFETY: flock on a descriptor this function owns; blocks until it is ours.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        RunLock { _held: f }
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
        let key = cache_key(&outer, &bins);
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
        outer.add_modules(OUTER_MODULES, &mut c)?;
        let mut libs = std::collections::BTreeSet::new();
        for (name, path) in BINARIES.iter().zip(&bins) {
            c.file(&format!("usr/bin/{name}"), 0o755, &stripped(path)?);
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

    fn run(&self, scenario: &Scenario) -> Result<Report, String> {
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
        let mut expects = vec![expect("EMUHOST init", 150), expect("EMUHOST kvm ok", 60)];
        expects.extend(scenario.expect.iter().cloned());
        let mut last = String::new();
        for attempt in 0..2 {
            let log = runs.join(format!("{}.try{attempt}.log", scenario.name));
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-accel", "tcg", "-cpu", "qemu64,+svm,+npt", "-smp", "1"])
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
            match watch(cmd, scenario, &expects, &log, true) {
                Ok((lines, marks)) => {
                    let _ = std::fs::remove_file(&initrd);
                    return Ok(Report {
                        way: Way::EmulatedHost { retries: attempt },
                        lines,
                        marks,
                        log,
                    });
                }
                Err(Failure::Stalled(why)) => {
                    println!("emulated host try {attempt} stalled: {why}");
                    last = why;
                }
                Err(Failure::Failed(why)) => return Err(why),
            }
        }
        Err(format!("stalled twice; the last: {last}"))
    }
}

/// The scenario's files under `scenario/`, as a cpio to append to the base.
fn payload(s: &Scenario) -> Vec<u8> {
    let mut c = Cpio::new();
    c.dir("scenario");
    c.file("scenario/run.sh", 0o755, s.script.as_bytes());
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
fn run_direct(scenario: &Scenario) -> Result<Report, String> {
    let stage = tempfile::tempdir().map_err(|e| e.to_string())?;
    for (name, mode, data) in std::iter::once(&(
        "run.sh".to_owned(),
        0o755,
        scenario.script.as_bytes().to_vec(),
    ))
    .chain(&scenario.files)
    {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.path().join(name);
        std::fs::create_dir_all(path.parent().expect("under the stage"))
            .map_err(|e| e.to_string())?;
        std::fs::write(&path, data).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| e.to_string())?;
    }
    let bin_dir = crate::binary("hostd")
        .parent()
        .expect("target dir")
        .to_owned();
    for b in BINARIES {
        crate::binary(b);
    }
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
    let log = cache_dir().join(format!("{}.direct.log", scenario.name));
    std::fs::create_dir_all(cache_dir()).map_err(|e| e.to_string())?;
    match watch(cmd, scenario, &scenario.expect, &log, false) {
        Ok((lines, marks)) => Ok(Report {
            way: Way::Direct,
            lines,
            marks,
            log,
        }),
        Err(Failure::Stalled(why) | Failure::Failed(why)) => Err(why),
    }
}

enum Failure {
    /// A deadline passed or the outer heartbeat stopped: worth a fresh emulated host.
    Stalled(String),
    Failed(String),
}

type Lines = Vec<(f64, String)>;

/// Starts `cmd` in its own process group, reads its output line by line against `expects`,
/// and kills the group on every way out. `emulated`: the outer init's heartbeat and exit
/// lines apply.
fn watch(
    mut cmd: Command,
    scenario: &Scenario,
    expects: &[Expect],
    log: &Path,
    emulated: bool,
) -> Result<(Lines, Lines), Failure> {
    use std::os::unix::process::CommandExt;
    let fail = |why: String| Failure::Failed(why);
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("starting {:?}: {e}", cmd.get_program())))?;
    let mut group = Group(child);
    let mut logf = std::fs::File::create(log).map_err(|e| fail(e.to_string()))?;
    let (tx, rx) = mpsc::channel::<String>();
    for out in [
        Box::new(group.0.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(group.0.stderr.take().expect("piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { return };
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_owned();
                if tx.send(text).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let start = Instant::now();
    let (mut lines, mut marks) = (Vec::new(), Vec::new());
    let mut next = 0;
    let mut last_match = start;
    let mut last_beat: Option<Instant> = None;
    let tail = |lines: &Lines| {
        let from = lines.len().saturating_sub(40);
        lines[from..]
            .iter()
            .map(|(t, l)| format!("[{t:8.2}] {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    loop {
        let now = Instant::now();
        let finished = next == expects.len();
        if !finished && now - last_match > expects[next].within {
            let outer = match last_beat {
                Some(b) if now - b < HEARTBEAT_SILENCE => "the emulated host still beats",
                Some(_) => "the emulated host is frozen too",
                None => "no heartbeat yet",
            };
            return Err(Failure::Stalled(format!(
                "{}: waited {:?} for {:?} ({outer}); log {}\n{}",
                scenario.name,
                expects[next].within,
                expects[next].text,
                log.display(),
                tail(&lines)
            )));
        }
        if let Some(b) = last_beat
            && now - b > HEARTBEAT_SILENCE
        {
            return Err(Failure::Stalled(format!(
                "{}: the emulated host's heartbeat stopped {:?} ago; log {}\n{}",
                scenario.name,
                now - b,
                log.display(),
                tail(&lines)
            )));
        }
        if now - start > scenario.total {
            return Err(Failure::Stalled(format!(
                "{}: over its {:?} cap; log {}\n{}",
                scenario.name,
                scenario.total,
                log.display(),
                tail(&lines)
            )));
        }
        let line = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = group.0.wait().ok();
                if !emulated && finished && status.is_some_and(|s| s.success()) {
                    return Ok((lines, marks));
                }
                return Err(fail(format!(
                    "{}: ended ({status:?}) before {:?}; log {}\n{}",
                    scenario.name,
                    expects
                        .get(next)
                        .map(|e| e.text.as_str())
                        .unwrap_or("its exit status 0"),
                    log.display(),
                    tail(&lines)
                )));
            }
        };
        let t = start.elapsed().as_secs_f64();
        let _ = writeln!(logf, "[{t:8.2}] {line}");
        println!("[{t:8.2}] {line}");
        if line.starts_with("EMUHOST-HB") {
            last_beat = Some(Instant::now());
        }
        if let Some(bad) = scenario.fail_on.iter().find(|f| line.contains(f.as_str())) {
            lines.push((t, line));
            return Err(fail(format!(
                "{}: printed {bad:?}; log {}\n{}",
                scenario.name,
                log.display(),
                tail(&lines)
            )));
        }
        if emulated && let Some(rc) = line.strip_prefix("EMUHOST scenario rc=") {
            let ok = rc.split_whitespace().next() == Some("0");
            lines.push((t, line));
            if ok && finished {
                return Ok((lines, marks));
            }
            return Err(fail(format!(
                "{}: its script ended ({}) before {:?}; log {}\n{}",
                scenario.name,
                lines.last().expect("pushed").1,
                expects.get(next).map(|e| e.text.as_str()).unwrap_or("-"),
                log.display(),
                tail(&lines)
            )));
        }
        if !finished && line.contains(&expects[next].text) {
            marks.push((t, expects[next].text.clone()));
            next += 1;
            last_match = Instant::now();
            // The first heartbeat comes 10 s after the init; count from here.
            if emulated && last_beat.is_none() && next >= 2 {
                last_beat = Some(Instant::now());
            }
        }
        lines.push((t, line));
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
    for b in bins {
        b.hash(&mut h);
        if let Ok(m) = std::fs::metadata(b) {
            m.len().hash(&mut h);
            m.modified().ok().hash(&mut h);
        }
    }
    h.finish()
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
