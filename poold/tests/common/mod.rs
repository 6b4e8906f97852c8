//! A pool of real `poold` processes on 127.0.0.1 for the cluster tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pool_client::PoolClient;
use proto::coordinator as pb;
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Cluster tests start several processes each; running them one at a time keeps a
/// 2-core machine from starving elections.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The pool id the members are started with (`--pool-id`), which the test CA names.
pub const TEST_POOL_ID: &str = "test-pool";

/// The first admin's password the pool is founded with (`--admin-password-file`).
pub const ADMIN_PASSWORD: &str = "admin password 1";

/// A port free now, for a member started later. Drawn below the kernel's ephemeral range
/// (32768 and up here), where processes binding port 0 (other suites running beside
/// these) would take it in the meantime.
pub fn free_port() -> u16 {
    loop {
        let port = 20000 + rand::random::<u16>() % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: BTreeMap<u64, String>,
    pub procs: BTreeMap<u64, Child>,
    pub extra: Vec<String>,
    /// Members started with --join (not founding members).
    pub joined: BTreeMap<u64, String>,
    /// The first admin's token, once [`Cluster::admin_token`] has logged in.
    token: std::sync::OnceLock<String>,
}

impl Cluster {
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        Self::start_with_env(n, extra, &[])
    }

    /// Like [`Cluster::start`], with extra environment for every member (knobs a test
    /// shortens, such as the login throttle's window). A member started again with
    /// [`Cluster::spawn`] runs without the environment.
    pub fn start_with_env(n: u64, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let addrs: BTreeMap<u64, String> = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut c = Cluster {
            dir,
            addrs,
            procs: BTreeMap::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            joined: BTreeMap::new(),
            token: std::sync::OnceLock::new(),
        };
        for id in 1..=n {
            let addr = c.addrs[&id].clone();
            let child = c
                .command(id, &addr, false)
                .envs(env.iter().copied())
                .spawn()
                .expect("spawn poold");
            c.procs.insert(id, child);
        }
        c
    }

    /// The test pool's CA, under `dir/pki` (created the first time).
    pub fn pki(&self) -> pool_trust::LocalCa {
        let pool = pool_trust::PoolId::parse(TEST_POOL_ID).expect("a valid pool id");
        pool_trust::LocalCa::open_or_create(&self.dir.path().join("pki"), &pool)
            .expect("the test pool's CA")
    }

    /// A client of every member over TLS, trusting the test pool's CA and nothing else
    /// (as `poolctl --ca` does).
    pub fn tls_client(&self) -> PoolClient {
        let mut all: Vec<String> = self.addrs.values().cloned().collect();
        all.extend(self.joined.values().cloned());
        PoolClient::with_tls(all, &self.client_tls())
    }

    /// [`Cluster::tls_client`] of the members `ids` only.
    pub fn tls_client_of(&self, ids: &[u64]) -> PoolClient {
        PoolClient::with_tls(ids.iter().map(|id| self.addr(*id)), &self.client_tls())
    }

    fn client_tls(&self) -> tonic::transport::ClientTlsConfig {
        let bundle = self.pki().ca().bundle();
        pool_trust::tls::client_tls(&bundle, None, None)
            .expect("no credentials, nothing to mismatch")
            .domain_name(pool_trust::coordinators_name(bundle.pool_id()))
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("m{id}"))
    }

    /// Member `id`'s TLS directory, issued by [`Cluster::pki`] the first time it is asked
    /// for (a restarted member keeps its certificate).
    pub fn member_tls_dir(&self, id: u64) -> PathBuf {
        let dir = self.dir.path().join(format!("pki/member-{id}"));
        if !dir.join("cert.pem").exists() {
            self.pki()
                .issue(&pool_trust::Identity::Member(id), &["127.0.0.1"], &dir)
                .expect("issue a member's TLS directory");
        }
        dir
    }

    /// A TLS directory `pki/<name>` for `identity` (a host, a client), issued the first
    /// time.
    pub fn issue(&self, identity: &pool_trust::Identity, name: &str) -> pool_trust::DaemonTls {
        let dir = self.dir.path().join(format!("pki/{name}"));
        if dir.join("cert.pem").exists() {
            return pool_trust::DaemonTls::load_as(&dir, identity).expect("load a TLS directory");
        }
        self.pki()
            .issue(identity, &["127.0.0.1"], &dir)
            .expect("issue a TLS directory")
    }

    fn command(&self, id: u64, addr: &str, join: bool) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_poold"));
        cmd.arg("--member-id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(addr)
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .arg("--pool-id")
            .arg(TEST_POOL_ID)
            .arg("--tls-dir")
            .arg(self.member_tls_dir(id))
            .arg("--admin-password-file")
            .arg(self.admin_password_file())
            .arg("--log")
            .arg(std::env::var("POOLD_TEST_LOG").unwrap_or_else(|_| "warn".into()));
        for (m, a) in &self.addrs {
            cmd.arg("--member").arg(format!("{m}={a}"));
        }
        if join {
            cmd.arg("--join");
        }
        cmd.args(&self.extra)
            .env("POOLD_FAULT_INJECTION", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if std::env::var("POOLD_TEST_LOG").is_err() {
            cmd.stderr(Stdio::null());
        }
        cmd
    }

    pub fn spawn(&mut self, id: u64) {
        let (addr, join) = match self.addrs.get(&id) {
            Some(a) => (a.clone(), false),
            None => (self.joined[&id].clone(), true),
        };
        let child = self.command(id, &addr, join).spawn().expect("spawn poold");
        self.procs.insert(id, child);
    }

    /// Starts a new member that joins the pool (after AddMember).
    pub fn spawn_joiner(&mut self, id: u64) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        self.joined.insert(id, addr.clone());
        self.spawn(id);
        addr
    }

    /// SIGKILL: the member dies without any chance to flush.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGINT, as Ctrl-C: the member shuts down cleanly (saving what it saves on the way
    /// out), waited for up to 30 s.
    pub fn stop(&mut self, id: u64) {
        let mut child = self.procs.remove(&id).expect("a running member");
        let pid = child.id().to_string();
        let st = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -INT {pid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait for poold").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("member {id} did not stop within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP (`stop == true`) or SIGCONT: the member stalls with its sockets open, the way
    /// a process blocked on a slow disk does.
    pub fn freeze(&self, id: u64, stop: bool) {
        let pid = self.procs[&id].id().to_string();
        let sig = if stop { "-STOP" } else { "-CONT" };
        let st = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {sig} {pid}");
    }

    pub fn alive(&self) -> Vec<u64> {
        self.procs.keys().copied().collect()
    }

    pub fn addr(&self, id: u64) -> String {
        self.addrs
            .get(&id)
            .or_else(|| self.joined.get(&id))
            .cloned()
            .expect("member address")
    }

    /// A client of every member, logged in as the first admin.
    pub async fn client(&self) -> PoolClient {
        let mut c = self.tls_client();
        c.set_token(&self.admin_token().await).expect("a token");
        c
    }

    /// A client of the members `ids` only, logged in as the first admin.
    pub async fn client_of(&self, ids: &[u64]) -> PoolClient {
        let token = self.admin_token().await;
        let mut c = self.tls_client_of(ids);
        c.set_token(&token).expect("a token");
        c
    }

    /// The file holding [`ADMIN_PASSWORD`] (0600), written the first time.
    pub fn admin_password_file(&self) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.path().join("admin-password");
        if !path.exists() {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .expect("admin password file");
            std::io::Write::write_all(&mut f, format!("{ADMIN_PASSWORD}\n").as_bytes())
                .expect("write the admin password");
        }
        path
    }

    /// The first admin's token: logs in once the pool has made the admin (until then the
    /// pool answers anyone; once it has, it refuses a caller without a token), so no
    /// attempt counts against the login throttle.
    pub async fn admin_token(&self) -> String {
        if let Some(t) = self.token.get() {
            return t.clone();
        }
        let mut anyone = self.tls_client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = anyone
                .call(|mut p| async move { p.list_members(pb::ListMembersRequest {}).await })
                .await;
            match r {
                Err(s) if s.code() == tonic::Code::Unauthenticated => break,
                _ => {
                    assert!(
                        Instant::now() < deadline,
                        "the pool made no admin within 60 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let req = pb::LoginRequest {
            user_name: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        };
        let token = anyone
            .call(|mut p| {
                let req = req.clone();
                async move { p.login(req).await }
            })
            .await
            .expect("the first admin logs in")
            .token;
        self.token.get_or_init(|| token).clone()
    }

    /// Member `id`'s peer service, called with `id`'s own certificate (the service
    /// answers members only) and accepting only `id`'s.
    pub fn peer(&self, id: u64) -> CoordinatorPeerServiceClient<Channel> {
        let tls = pool_trust::DaemonTls::load(&self.member_tls_dir(id)).expect("member TLS");
        let cfg = tls
            .client(&pool_trust::Identity::Member(id))
            .expect("member TLS config");
        CoordinatorPeerServiceClient::new(self.channel(id, cfg))
    }

    /// A lazy TLS channel to member `id` with `cfg`.
    pub fn channel(&self, id: u64, cfg: ClientTlsConfig) -> Channel {
        Endpoint::from_shared(format!("https://{}", self.addr(id)))
            .unwrap()
            .tls_config(cfg)
            .expect("TLS endpoint")
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy()
    }

    pub async fn status(&self, id: u64) -> Option<pb::MemberStatus> {
        let mut p = self.peer(id);
        match tokio::time::timeout(
            Duration::from_secs(1),
            p.get_member_status(pb::MemberStatusRequest {}),
        )
        .await
        {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Waits until one of `among` leads and every other of them agrees.
    pub async fn leader_among(&self, among: &[u64], within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let mut leaders = Vec::new();
            for id in among {
                if let Some(s) = self.status(*id).await {
                    leaders.push((s.member_id, s.leader_id, s.role.clone()));
                }
            }
            if let Some((l, _, _)) = leaders.iter().find(|(_, _, r)| r == "leader")
                && leaders.len() == among.len()
                && leaders.iter().all(|(_, x, _)| x == l)
            {
                return *l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} within {within:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn leader(&self, within: Duration) -> u64 {
        let alive = self.alive();
        self.leader_among(&alive, within).await
    }

    /// Cuts `id` off from every other member (both ways, on both sides).
    pub async fn isolate(&self, id: u64) {
        let all: Vec<u64> = self
            .addrs
            .keys()
            .chain(self.joined.keys())
            .copied()
            .collect();
        for m in self.alive() {
            let isolate_from: Vec<u64> = if m == id {
                all.iter().copied().filter(|x| *x != id).collect()
            } else {
                vec![id]
            };
            self.peer(m)
                .set_faults(pb::SetFaultsRequest { isolate_from })
                .await
                .expect("set_faults");
        }
    }

    /// Splits the members into two sides that cannot talk to each other.
    pub async fn partition(&self, side_a: &[u64]) {
        let all: Vec<u64> = self
            .addrs
            .keys()
            .chain(self.joined.keys())
            .copied()
            .collect();
        for m in self.alive() {
            let mine = side_a.contains(&m);
            let isolate_from: Vec<u64> = all
                .iter()
                .copied()
                .filter(|x| side_a.contains(x) != mine)
                .collect();
            let _ = self
                .peer(m)
                .set_faults(pb::SetFaultsRequest { isolate_from })
                .await;
        }
    }

    pub async fn heal(&self) {
        for m in self.alive() {
            let _ = self
                .peer(m)
                .set_faults(pb::SetFaultsRequest {
                    isolate_from: vec![],
                })
                .await;
        }
    }

    /// Waits until `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64, within: Duration) -> pb::MemberStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.status(id).await
                && s.applied_index >= index
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "member {id} did not apply index {index} within {within:?}: {:?}",
                self.status(id).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// Joins a host with a given address through the client (retrying safely).
pub async fn join_host(c: &mut PoolClient, address: &str) -> Result<pb::Task, tonic::Status> {
    join_named_host(c, address, address).await
}

/// Joins a host named `name` (what its certificate must name to heartbeat as it).
pub async fn join_named_host(
    c: &mut PoolClient,
    name: &str,
    address: &str,
) -> Result<pb::Task, tonic::Status> {
    let req = pb::JoinHostRequest {
        request_id: pool_client::new_request_id(),
        name: name.to_owned(),
        address: address.to_owned(),
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.join_host(req).await }
    })
    .await
    .map(|r| r.task.unwrap_or_default())
}

pub async fn list_hosts(c: &mut PoolClient) -> Vec<pb::Host> {
    c.call(|mut p| async move {
        p.list_hosts(pb::ListHostsRequest {
            page: Some(pb::PageRequest {
                page_size: 1000,
                page_token: String::new(),
            }),
            state: 0,
        })
        .await
    })
    .await
    .expect("list hosts")
    .hosts
}
