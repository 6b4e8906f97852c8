//! Load generator for bench/raft.sh: drives small writes into a pool (PoolService
//! UpdatePoolSettings through the leader) or into etcd (KV.Put over etcd's gRPC API) with
//! N concurrent clients, the same shape for both, and times the scheduler.
//!
//! For scale, it also drives each system's cheapest unary call on the leader, one that
//! involves no Raft at all (poold's GetMemberStatus, etcd's serializable Range): what is
//! left of a write's cost once that is taken away is the consensus path.
//!
//! The pool is called over TLS as poolctl calls it (`--ca`, the pool's CA bundle; any
//! member's certificate is accepted by the coordinators' name); GetMemberStatus answers
//! members only, so `pool-status` also presents a member's certificate (`--tls-dir`).
//! etcd is called in clear, or with `--etcd-ca`, `--etcd-cert` and `--etcd-key` over TLS
//! with a client certificate (etcd's `--client-cert-auth`), for bench/trust.sh.
//!
//! Prints one line: `RESULT <name> ops=<n> secs=<s> ops_per_s=<x> p50_us=<x> p99_us=<x>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pool_client::PoolClient;
use poold::scheduler::{BatchScheduler, Demand, HostCandidate, Policy};
use proto::coordinator as pb;
use proto::coordinator::HostState;
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use tonic::transport::{ClientTlsConfig, Endpoint};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How hard to drive a system: clients, each with one call in flight, for some seconds.
#[derive(clap::Args)]
struct Load {
    #[arg(long)]
    clients: usize,
    #[arg(long, default_value = "10")]
    seconds: u64,
    /// Threads of the client's runtime. One (the default) keeps the load generator's own
    /// CPU per call low: the clients share the machine's cores with the servers.
    #[arg(long, default_value = "1")]
    client_threads: usize,
}

/// How to reach etcd: in clear, or over TLS presenting a client certificate when all three
/// files are given.
#[derive(clap::Args)]
struct EtcdTls {
    /// The CA (PEM) etcd's server certificate is checked against.
    #[arg(long, requires_all = ["etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    /// The client certificate (PEM) presented to etcd.
    #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires_all = ["etcd_ca", "etcd_cert"])]
    etcd_key: Option<PathBuf>,
}

impl EtcdTls {
    /// The TLS settings for etcd, or None to call it in clear. The server's certificate
    /// must name the endpoint's host (for `127.0.0.1:PORT`, an IP address SAN).
    fn config(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let (Some(ca), Some(cert), Some(key)) = (&self.etcd_ca, &self.etcd_cert, &self.etcd_key)
        else {
            return Ok(None);
        };
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(Some(
            ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
                .identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                )),
        ))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Small pool writes through the leader.
    Pool {
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        /// The pool's CA bundle (PEM), the only CA the members' certificates are checked
        /// against.
        #[arg(long)]
        ca: PathBuf,
        /// A file holding the first admin's password (the members' --admin-password-file):
        /// the writes are made as the admin.
        #[arg(long)]
        password_file: PathBuf,
        #[command(flatten)]
        load: Load,
    },
    /// etcd KV.Put of a similar size.
    Etcd {
        #[arg(long)]
        endpoint: String,
        #[command(flatten)]
        tls: EtcdTls,
        #[command(flatten)]
        load: Load,
    },
    /// GetMemberStatus on the leader: a local call, no Raft.
    PoolStatus {
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        /// The pool's CA bundle (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// A member's TLS directory: the peer service answers members only, so the calls
        /// present this member's certificate.
        #[arg(long)]
        tls_dir: PathBuf,
        /// The first admin's password, to find the leader through PoolService.
        #[arg(long)]
        password_file: PathBuf,
        #[command(flatten)]
        load: Load,
    },
    /// etcd KV.Range with serializable set: answered from the member's store, no Raft.
    EtcdRange {
        #[arg(long)]
        endpoint: String,
        #[command(flatten)]
        tls: EtcdTls,
        #[command(flatten)]
        load: Load,
    },
    /// Placements per second of the batch scheduler.
    Scheduler {
        #[arg(long, default_value = "1000")]
        hosts: usize,
        #[arg(long, default_value = "10000")]
        vms: usize,
    },
}

mod etcd {
    //! The messages of etcd's `etcdserverpb.KV/Put` and `KV/Range` this benchmark uses
    //! (only the fields it sets or reads), with etcd's field numbers
    //! (api/etcdserverpb/rpc.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bool, tag = "7")]
        pub serializable: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }
}

fn report(name: &str, mut lat: Vec<u64>, secs: f64) {
    lat.sort_unstable();
    let n = lat.len();
    let pct = |p: f64| {
        if n == 0 {
            0
        } else {
            lat[((n as f64 * p) as usize).min(n - 1)]
        }
    };
    println!(
        "RESULT {name} ops={n} secs={secs:.2} ops_per_s={:.0} p50_us={} p99_us={}",
        n as f64 / secs,
        pct(0.50),
        pct(0.99)
    );
}

fn settings(name: String) -> pb::PoolSettings {
    pb::PoolSettings {
        name,
        placement: pb::PlacementStrategy::Spread as i32,
        cpu_overcommit_percent: 400,
        memory_overcommit_percent: 100,
        host_heartbeat_timeout_seconds: 30,
        migration_downtime_budget_ms: 300,
        schedules: Vec::new(),
    }
}

/// Runs `clients` tasks made by `make(client, until)`, each looping until `until` (now +
/// `seconds`); returns every latency they recorded and the seconds the whole run took.
async fn run_clients<F, Fut>(clients: usize, seconds: u64, make: F) -> (Vec<u64>, f64)
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Vec<u64>> + Send + 'static,
{
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients).map(|i| tokio::spawn(make(i, until))).collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    (all, start.elapsed().as_secs_f64())
}

/// A channel to `address` (in clear, or over TLS with `tls`), with TCP_NODELAY as every
/// client here uses.
async fn channel(
    address: &str,
    what: &str,
    tls: Option<ClientTlsConfig>,
) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = match tls {
        None => Endpoint::from_shared(format!("http://{address}"))?,
        Some(tls) => Endpoint::from_shared(format!("https://{address}"))?.tls_config(tls)?,
    };
    endpoint
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {what} at {address}"))
}

/// The first line of a password file.
fn read_password(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim_end()
        .to_owned())
}

/// How to call any member: trusting only the pool's CA in `ca`, accepting a certificate
/// with the coordinators' name, presenting the credentials in `tls_dir` when given.
fn pool_tls(ca: &Path, tls_dir: Option<&Path>) -> anyhow::Result<ClientTlsConfig> {
    let bundle = pool_trust::CaBundle::load(ca)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .with_context(|| format!("reading the pool's CA bundle {}", ca.display()))?;
    let creds = match tls_dir {
        Some(dir) => Some(
            pool_trust::DaemonTls::load(dir)
                .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
                .with_context(|| format!("loading the TLS directory {}", dir.display()))?
                .creds,
        ),
        None => None,
    };
    Ok(pool_trust::tls::client_tls(&bundle, creds.as_ref(), None)?
        .domain_name(pool_trust::coordinators_name(bundle.pool_id())))
}

/// A client of the pool that knows its leader (members started a moment ago may still be
/// electing).
async fn leader_client(
    members: &[String],
    tls: &ClientTlsConfig,
    password: &str,
) -> anyhow::Result<PoolClient> {
    let mut c = PoolClient::with_tls(members, tls);
    let deadline = Instant::now() + Duration::from_secs(30);
    // The leader makes the first admin a moment after its election; until then the pool
    // answers anyone, after it refuses a caller without a token.
    loop {
        let r = c
            .call(|mut p| async move { p.list_members(pb::ListMembersRequest {}).await })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::Unauthenticated => break,
            _ => anyhow::ensure!(
                Instant::now() < deadline,
                "the pool made no admin among {members:?} in 30 s"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let login = pb::LoginRequest {
        user_name: "admin".into(),
        password: password.to_owned(),
    };
    let token = c
        .call(|mut p| {
            let login = login.clone();
            async move { p.login(login).await }
        })
        .await?
        .token;
    c.set_token(&token)?;
    while !c.find_leader().await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no pool leader found among {members:?} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(c)
}

async fn pool(
    members: Vec<String>,
    tls: ClientTlsConfig,
    password: String,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let c = Arc::new(leader_client(&members, &tls, &password).await?);
    let (lat, secs) = run_clients(clients, seconds, |i, until| {
        let mut c = (*c).clone();
        async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let req = pb::UpdatePoolSettingsRequest {
                    request_id: pool_client::new_request_id(),
                    settings: Some(settings(format!("bench-{i}-{n}"))),
                };
                let t = Instant::now();
                let r = c
                    .call(|mut p| {
                        let req = req.clone();
                        async move { p.update_pool_settings(req).await }
                    })
                    .await;
                if r.is_ok() {
                    lat.push(t.elapsed().as_micros() as u64);
                }
            }
            lat
        }
    })
    .await;
    report(&format!("pool_c{clients}"), lat, secs);
    Ok(())
}

async fn pool_status(
    members: Vec<String>,
    tls: ClientTlsConfig,
    password: String,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let leader = leader_client(&members, &tls, &password)
        .await?
        .current()
        .to_owned();
    let ch = channel(&leader, "the pool leader", Some(tls)).await?;
    let (lat, secs) = run_clients(clients, seconds, |_, until| {
        let mut p = CoordinatorPeerServiceClient::new(ch.clone());
        async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                if p.get_member_status(pb::MemberStatusRequest {})
                    .await
                    .is_ok()
                {
                    lat.push(t.elapsed().as_micros() as u64);
                }
            }
            lat
        }
    })
    .await;
    report(&format!("pool_status_c{clients}"), lat, secs);
    Ok(())
}

/// `clients` loops of one etcd unary call, built by `make(client, n)`, for `seconds`.
async fn etcd_unary<Req, Resp>(
    name: &str,
    endpoint: String,
    tls: Option<ClientTlsConfig>,
    path: &'static str,
    clients: usize,
    seconds: u64,
    make: fn(usize, u64) -> Req,
) -> anyhow::Result<()>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let ch = channel(&endpoint, "etcd", tls).await?;
    let (lat, secs) = run_clients(clients, seconds, |i, until| {
        let ch = ch.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(ch);
            let mut lat = Vec::new();
            let mut n = 0u64;
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            while Instant::now() < until {
                n += 1;
                let req = make(i, n);
                let t = Instant::now();
                if grpc.ready().await.is_err() {
                    break;
                }
                let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
                let r = grpc
                    .unary(tonic::Request::new(req), path.clone(), codec)
                    .await;
                if r.is_ok() {
                    lat.push(t.elapsed().as_micros() as u64);
                }
            }
            lat
        }
    })
    .await;
    report(&format!("{name}_c{clients}"), lat, secs);
    Ok(())
}

async fn etcd_put(
    endpoint: String,
    tls: Option<ClientTlsConfig>,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    // Key and value sized like the pool write (a name and a request id).
    let make = |i: usize, n: u64| etcd::PutRequest {
        key: format!("bench/{i}").into_bytes(),
        value: format!("bench-{i}-{n}-{}", pool_client::random_uuid()).into_bytes(),
    };
    etcd_unary::<_, etcd::PutResponse>(
        "etcd",
        endpoint,
        tls,
        "/etcdserverpb.KV/Put",
        clients,
        seconds,
        make,
    )
    .await
}

async fn etcd_range(
    endpoint: String,
    tls: Option<ClientTlsConfig>,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let make = |i: usize, _: u64| etcd::RangeRequest {
        key: format!("bench/{i}").into_bytes(),
        serializable: true,
    };
    etcd_unary::<_, etcd::RangeResponse>(
        "etcd_range",
        endpoint,
        tls,
        "/etcdserverpb.KV/Range",
        clients,
        seconds,
        make,
    )
    .await
}
fn scheduler(hosts: usize, vms: usize) {
    let features: Vec<String> = ["sse4_2", "avx", "avx2", "aes", "xsave", "avx512f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cands: Vec<HostCandidate> = (0..hosts)
        .map(|i| HostCandidate {
            id: format!("host-{i:05}"),
            state: if i % 50 == 0 {
                HostState::Disabled
            } else {
                HostState::Enabled
            },
            memory_bytes: (256u64 + (i as u64 % 4) * 128) << 30,
            logical_cpus: 64,
            memory_allocated_bytes: 0,
            vcpus_allocated: 0,
            cpu_features: features[..if i % 3 == 0 { 6 } else { 5 }].to_vec(),
            ip: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
            groups: vec![],
            nics: vec![],
        })
        .collect();
    let demands: Vec<Demand> = (0..vms)
        .map(|i| Demand {
            vcpus: 1 + (i % 4) as u32,
            memory_bytes: (1u64 + (i % 8) as u64) << 30,
            required_cpu_features: if i % 10 == 0 {
                vec!["avx512f".into()]
            } else {
                vec![]
            },
            affinity_group: if i % 7 == 0 {
                format!("aff-{}", i % 70)
            } else {
                String::new()
            },
            anti_affinity_group: if i % 5 == 0 {
                format!("anti-{}", i % 500)
            } else {
                String::new()
            },
            srs: vec![],
            networks: vec![],
        })
        .collect();
    let policy = Policy {
        cpu_overcommit_percent: 400,
        ..Policy::default()
    };
    let start = Instant::now();
    let mut s = BatchScheduler::new(&cands, policy);
    let mut placed = 0usize;
    for d in &demands {
        if s.place(d).is_some() {
            placed += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT scheduler hosts={hosts} vms={vms} placed={placed} secs={secs:.3} placements_per_s={:.0}",
        vms as f64 / secs
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = match &args.cmd {
        Cmd::Pool { load, .. }
        | Cmd::Etcd { load, .. }
        | Cmd::PoolStatus { load, .. }
        | Cmd::EtcdRange { load, .. } => load.client_threads,
        Cmd::Scheduler { .. } => 1,
    };
    anyhow::ensure!(threads >= 1, "--client-threads must be at least 1");
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    match args.cmd {
        Cmd::Pool {
            members,
            ca,
            password_file,
            load,
        } => {
            let tls = pool_tls(&ca, None)?;
            let password = read_password(&password_file)?;
            rt.block_on(pool(members, tls, password, load.clients, load.seconds))
        }
        Cmd::Etcd {
            endpoint,
            tls,
            load,
        } => rt.block_on(etcd_put(
            endpoint,
            tls.config()?,
            load.clients,
            load.seconds,
        )),
        Cmd::PoolStatus {
            members,
            ca,
            tls_dir,
            password_file,
            load,
        } => {
            let tls = pool_tls(&ca, Some(&tls_dir))?;
            let password = read_password(&password_file)?;
            rt.block_on(pool_status(
                members,
                tls,
                password,
                load.clients,
                load.seconds,
            ))
        }
        Cmd::EtcdRange {
            endpoint,
            tls,
            load,
        } => rt.block_on(etcd_range(
            endpoint,
            tls.config()?,
            load.clients,
            load.seconds,
        )),
        Cmd::Scheduler { hosts, vms } => {
            scheduler(hosts, vms);
            Ok(())
        }
    }
}
