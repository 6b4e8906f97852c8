//! Crash consistency: `storaged exercise` writes, discards, flushes and snapshots a volume
//! until it is killed with SIGKILL at a random moment; then the pool is imported again and
//! every block must hold what the last acknowledged commit says or something written
//! after it, every snapshot exactly the volume as it was when taken, and fsck must find
//! nothing. `STORAGED_CRASH_KILLS` sets the number of kills (default 200).
//!
//! To chase a failure: `STORAGED_CRASH_DIR=<empty dir>` puts the pool there instead of in a
//! temporary directory and keeps, after each kill, the image and metadata as the killed
//! process left them (`killed.img`, `killed.meta`) with its output (`killed.out`).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use storaged::exercise::{BLOCK, PROGRESS_EVERY, Rng, Step, Workload, Writer, decode_block};
use storaged::{BackingKind, CreateOptions, ImportOptions, ThinPool};

const VOLUME_BLOCKS: u64 = 8192; // 4 MiB

fn import(path: &Path) -> ThinPool {
    ThinPool::import(&ImportOptions {
        kind: BackingKind::File,
        path: path.to_owned(),
        meta_dir: None,
        expected_id: None,
    })
    .expect("the pool imports after a crash")
}

/// The writer of every block of volume `id`; `what` names it in a failure.
fn read_writers(pool: &ThinPool, id: uuid::Uuid, what: &str) -> Vec<Writer> {
    let mut buf = vec![0u8; (VOLUME_BLOCKS as usize) * BLOCK];
    pool.read(id, 0, &mut buf).unwrap();
    buf.chunks(BLOCK)
        .enumerate()
        .map(|(b, data)| {
            decode_block(b as u64, data)
                .unwrap_or_else(|e| panic!("{what}: {e}; {}", describe_block(data)))
        })
        .collect()
}

/// What a block that is not a whole workload block holds, to tell a torn write (a header
/// at offset 0 followed by other bytes), a misplaced one (a header at another offset) and
/// foreign bytes apart.
fn describe_block(data: &[u8]) -> String {
    let nonzero: Vec<usize> = (0..data.len()).filter(|&i| data[i] != 0).collect();
    let magic = 0x7e57_b10cu32.to_le_bytes();
    let headers: Vec<String> = (0..data.len().saturating_sub(28))
        .filter(|&i| data[i..i + 4] == magic)
        .map(|i| {
            let field =
                |at: usize| u64::from_le_bytes(data[i + at..i + at + 8].try_into().unwrap());
            format!(
                "at byte {i}: seed {} op {} block {}",
                field(4),
                field(12),
                field(20)
            )
        })
        .collect();
    format!(
        "{} non-zero bytes (first at {:?}, last at {:?}); workload headers {headers:?}; first 32 bytes {:02x?}",
        nonzero.len(),
        nonzero.first(),
        nonzero.last(),
        &data[..32]
    )
}

/// What the child announced before it died.
#[derive(Debug, Default)]
struct Announced {
    /// The newest op whose commit was acknowledged (flush, snapshot or delete).
    committed: Option<u64>,
    /// The newest progress mark: no op at or past `progress + PROGRESS_EVERY` ran.
    progress: u64,
    lines: usize,
}

fn parse(lines: &[String]) -> Announced {
    let mut a = Announced::default();
    for line in lines {
        let mut parts = line.split_whitespace();
        let tag = parts.next().unwrap_or("");
        let op: Option<u64> = parts.next().and_then(|s| s.parse().ok());
        match (tag, op) {
            ("F" | "S" | "D", Some(op)) => a.committed = a.committed.max(Some(op)),
            ("P", Some(op)) => a.progress = a.progress.max(op),
            _ => {}
        }
        a.lines += 1;
    }
    a
}

struct Replay {
    committed: Vec<Writer>,
    later: HashMap<u64, Vec<Writer>>,
    /// Volume content just before each snapshot op.
    at_snapshot: HashMap<u64, Vec<Writer>>,
}

fn replay(base: &[Writer], seed: u64, announced: &Announced) -> Replay {
    let mut state = base.to_vec();
    let mut committed = base.to_vec();
    let mut later: HashMap<u64, Vec<Writer>> = HashMap::new();
    let mut at_snapshot = HashMap::new();
    let mut w = Workload::new(seed, VOLUME_BLOCKS);
    let bound = announced.progress + PROGRESS_EVERY;
    let after_commit = |op: u64| announced.committed.is_none_or(|c| op > c);
    for _ in 0..bound {
        let (op, step) = w.next_step();
        let mut set = |block: u64, blocks: u64, writer: Writer| {
            for b in block..block + blocks {
                state[b as usize] = writer;
                if after_commit(op) {
                    later.entry(b).or_default().push(writer);
                }
            }
        };
        match step {
            Step::Write { block, blocks } => set(block, blocks, Writer::Op { seed, op }),
            Step::Discard { block, blocks } => set(block, blocks, Writer::Zero),
            Step::Flush => {}
            Step::Snapshot => {
                at_snapshot.insert(op, state.clone());
            }
        }
        if announced.committed == Some(op) {
            committed.clone_from(&state);
        }
    }
    Replay {
        committed,
        later,
        at_snapshot,
    }
}

/// Copies the image and metadata as the killed process left them, before an import
/// changes anything, with what the process printed.
fn keep_killed_state(img: &Path, dir: &Path, lines: &[String]) {
    std::fs::copy(img, dir.join("killed.img")).unwrap();
    let meta = dir.join("killed.meta");
    let _ = std::fs::remove_dir_all(&meta);
    let mut src = img.as_os_str().to_owned();
    src.push(".meta");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&meta)
        .status()
        .unwrap();
    assert!(copied.success(), "cp -a {src:?} {meta:?} failed");
    std::fs::write(dir.join("killed.out"), lines.join("\n")).unwrap();
}

#[test]
fn survives_sigkill_at_random_points() {
    let kills: u64 = std::env::var("STORAGED_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("STORAGED_CRASH_DIR").map(std::path::PathBuf::from);
    let root = keep.clone().unwrap_or_else(|| dir.path().to_owned());
    let img = root.join("crash.img");
    let vol = {
        let pool = ThinPool::create(&CreateOptions {
            name: "crash".into(),
            kind: BackingKind::File,
            path: img.clone(),
            // Room for the volume (64 chunks) and little more: snapshots soon fill the
            // pool, the workload then commits or deletes snapshots to make room, and
            // freed chunks are reused within moments of being freed.
            size: Some((1 << 20) + 80 * (64 << 10)),
            chunk_size: 64 << 10,
            meta_dir: None,
            warning_threshold_percent: 0,
        })
        .unwrap();
        pool.create_volume(
            "crash",
            VOLUME_BLOCKS * BLOCK as u64,
            BLOCK as u32,
            BTreeMap::new(),
        )
        .unwrap()
        .id
    };
    let mut base = vec![Writer::Zero; VOLUME_BLOCKS as usize];
    let mut snapshots: HashMap<String, Vec<Writer>> = HashMap::new();
    let mut rng = Rng::new(0x5eed);
    let mut commits_seen = 0u64;
    for seed in 1..=kills {
        let mut child = Command::new(env!("CARGO_BIN_EXE_storaged"))
            .args(["exercise", "--file"])
            .arg(&img)
            .args(["--volume", "crash", "--seed", &seed.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start storaged exercise");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l == "READY" => {}
            other => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "iteration {seed}: exercise did not start ({other:?}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(120)));
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        reader.join().unwrap();
        let lines: Vec<String> = rx.try_iter().collect();
        let announced = parse(&lines);
        if announced.committed.is_some() {
            commits_seen += 1;
        }

        if let Some(k) = &keep {
            keep_killed_state(&img, k, &lines);
        }
        let pool = import(&img);
        let r = replay(&base, seed, &announced);
        let actual = read_writers(&pool, vol, &format!("iteration {seed}: the volume"));
        for (b, got) in actual.iter().enumerate() {
            let ok =
                *got == r.committed[b] || r.later.get(&(b as u64)).is_some_and(|l| l.contains(got));
            assert!(
                ok,
                "iteration {seed}: block {b} holds {got:?}; the last acknowledged commit (op {:?}) says {:?}, later writes {:?}",
                announced.committed,
                r.committed[b],
                r.later.get(&(b as u64))
            );
        }
        // Every snapshot holds exactly the volume as it was when it was taken.
        let mut live = HashMap::new();
        for s in pool.list_volumes().into_iter().filter(|v| v.read_only()) {
            let content = read_writers(
                &pool,
                s.id,
                &format!("iteration {seed}: snapshot {}", s.name),
            );
            let expected = match snapshots.get(&s.name) {
                Some(e) => e.clone(),
                None => {
                    let op: u64 = s.name.rsplit('-').next().unwrap().parse().unwrap();
                    r.at_snapshot
                        .get(&op)
                        .unwrap_or_else(|| {
                            panic!("iteration {seed}: snapshot {} was never taken", s.name)
                        })
                        .clone()
                }
            };
            if let Some(b) = (0..expected.len()).find(|&b| content[b] != expected[b]) {
                panic!(
                    "iteration {seed}: snapshot {} block {b} holds {:?}, expected {:?}",
                    s.name, content[b], expected[b]
                );
            }
            live.insert(s.name, expected);
        }
        snapshots = live;
        let report = pool.check(false).unwrap();
        assert!(
            report.clean(),
            "iteration {seed}: fsck after the crash: {report:?}"
        );
        base = actual;
    }
    assert!(
        commits_seen > kills / 4,
        "too few iterations reached a commit ({commits_seen} of {kills}): the test is not testing"
    );
}
