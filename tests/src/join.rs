//! Daemons that join a pool founded with its CA ([`crate::Coordinators::start`]) with a
//! join file (`hostd --join FILE`) instead of a TLS directory issued offline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{PoolArg, Process, binary};

/// `hostd --join FILE` for host `name` on `ip`, with `tls_dir` (which it writes when it
/// joins) and its state under `dir/<name>`. No `--pool`: the members come from the file.
pub fn hostd_joining(dir: &Path, name: &str, ip: &str, join: &Path, tls_dir: &Path) -> Command {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).expect("hostd run dir");
    let _ = binary("hostd-vmm");
    let mut cmd = Command::new(binary("hostd"));
    cmd.args(["--listen", &format!("{ip}:0"), "--tie-vms"])
        .arg("--run-dir")
        .arg(&run)
        .args([
            "--initiator-iqn",
            &format!("iqn.2026-12.org.pool.e2e:{name}"),
        ])
        .args(["--host-id", name])
        .arg("--tls-dir")
        .arg(tls_dir)
        .arg("--image-dir")
        .arg(dir)
        .arg("--join")
        .arg(join)
        .args(["--heartbeat-ms", "500", "--log", "info"]);
    cmd
}

/// Runs `cmd` until it exits, killing it after `limit`: `None` if it was still running
/// (a daemon that should have been refused and was not).
pub fn run_until_exit(mut cmd: Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return Some(child.wait_with_output().expect("output"));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `poolctl host-join NAME --out DIR/NAME.join [extra...]`, retried while the pool's CA
/// is not yet committed; the join file's path.
pub fn host_join_file(pool: &PoolArg, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    join_file(pool, dir, "host-join", name, extra)
}

/// `poolctl VERB NAME --out DIR/NAME.join [extra...]` (`host-join`, `member-join`,
/// `storage-join`), retried while the pool's CA is not yet committed.
pub fn join_file(pool: &PoolArg, dir: &Path, verb: &str, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{name}.join"));
    let mut last = String::new();
    crate::wait_for(Duration::from_secs(20), || {
        let o = pool
            .poolctl()
            .args([verb, name, "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .expect("run poolctl");
        last = crate::text(&o);
        o.status.success().then_some(())
    })
    .unwrap_or_else(|| panic!("poolctl {verb} {name}: {last}"));
    out
}

/// `poold --join-file FILE` as member `id` at `addr`, with the existing members as seeds;
/// it writes `tls_dir` when it joins, then waits to be added.
pub fn member_joining(dir: &Path, seeds: &[String], id: u64, addr: &str, join: &Path) -> Process {
    let mut cmd = Command::new(binary("poold"));
    cmd.args(["--member-id", &id.to_string(), "--listen", addr])
        .arg("--data-dir")
        .arg(dir.join(format!("poold-{id}")))
        .arg("--tls-dir")
        .arg(dir.join(format!("member-{id}-tls")))
        .arg("--join-file")
        .arg(join)
        .args(["--log", "info,raft=warn"]);
    for (j, a) in seeds.iter().enumerate() {
        cmd.arg("--member").arg(format!("{}={a}", j + 1));
    }
    let log = std::fs::File::create(dir.join(format!("poold-{id}.log")))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    cmd.stdout(Stdio::null()).stderr(log);
    Process::spawn(&format!("poold-{id}"), cmd)
}

/// `AddMember` (poolctl has no verb for it) as the pool's admin, tried on each member
/// until one takes it.
pub fn add_member(pool: &PoolArg, id: u64, addr: &str) -> Result<(), String> {
    use proto::coordinator::pool_service_client::PoolServiceClient;
    let bundle = pool_trust::CaBundle::load(&pool.bundle()).map_err(|e| e.to_string())?;
    let tls = pool_trust::tls::client_tls(&bundle, None, None)
        .map_err(|e| e.to_string())?
        .domain_name(pool_trust::coordinators_name(bundle.pool_id()));
    let token = pool.token.clone().ok_or("no admin token")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut last = String::new();
        for member in pool.addrs.split(',') {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{member}"))
                .and_then(|e| e.tls_config(tls.clone()))
                .map_err(|e| e.to_string())?;
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let mut request = tonic::Request::new(proto::coordinator::AddMemberRequest {
                request_id: format!("add-member-{id}"),
                member_id: id,
                address: addr.to_owned(),
                ..Default::default()
            });
            let bearer = format!("Bearer {token}").parse().map_err(|_| "bad token")?;
            request.metadata_mut().insert("authorization", bearer);
            match PoolServiceClient::new(channel).add_member(request).await {
                Ok(_) => return Ok(()),
                Err(s) => last = format!("{member}: {:?}: {}", s.code(), s.message()),
            }
        }
        Err(last)
    })
}
