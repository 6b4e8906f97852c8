//! A new member joining with a join file (`poolctl member-join ID --out FILE`, then
//! `poold --join-file FILE`): when its TLS directory does not exist yet, the member makes
//! a key, has the pool sign its certificate request with the file's one-time token, and
//! writes the directory; it then starts empty and waits to be added (AddMember).
//!
//! The pool is trusted from the file: the members it calls must show a certificate of
//! the file's CA under the coordinators' name. hostd's `--join` is the same exchange for
//! a host.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use pool_trust::{AltName, CaBundle, Credentials, DaemonTls, Identity, LeafKey, PoolId};
use proto::coordinator::pool_service_client::PoolServiceClient;
use serde::Deserialize;

/// The fields of a join file this member reads (poolctl writes a few more).
#[derive(Deserialize)]
struct JoinFile {
    pool_id: String,
    identity: String,
    members: Vec<String>,
    ca_pem: String,
    /// The secret: never logged.
    token: String,
}

fn chain(e: &dyn std::error::Error) -> anyhow::Error {
    anyhow::anyhow!(proto::error_chain(e))
}

/// Joins as `identity` (named also by `ips`) with the join file `file`, writing the TLS
/// directory `tls_dir` in one rename. Refused when `tls_dir` exists: already joined.
pub async fn join(
    file: &Path,
    identity: &Identity,
    ips: &[IpAddr],
    tls_dir: &Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !tls_dir.exists(),
        "already joined: the TLS directory {} exists; start without --join-file",
        tls_dir.display()
    );
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let join: JoinFile =
        toml::from_str(&text).with_context(|| format!("{} is not a join file", file.display()))?;
    anyhow::ensure!(
        join.identity == identity.path(),
        "the join file is for {}, but this member is {}",
        join.identity,
        identity.path()
    );
    let pool = PoolId::parse(&join.pool_id).map_err(|e| chain(&e))?;
    let bundle = CaBundle::from_pem(&join.ca_pem).map_err(|e| chain(&e))?;
    anyhow::ensure!(
        bundle.pool_id() == &pool,
        "the join file's CA bundle is of pool {}, not {pool}",
        bundle.pool_id()
    );
    let key = LeafKey::generate().map_err(|e| chain(&e))?;
    let names: Vec<AltName> = ips.iter().map(|ip| AltName::Ip(*ip)).collect();
    let csr = key
        .csr_pem(&pool, identity, &names)
        .map_err(|e| chain(&e))?;
    let tls = pool_trust::tls::client_tls(&bundle, None, None)
        .map_err(|e| chain(&e))?
        .domain_name(pool_trust::coordinators_name(&pool));
    let mut last = anyhow::anyhow!("the join file names no coordinator member");
    for member in &join.members {
        let channel = match tonic::transport::Endpoint::from_shared(format!("https://{member}"))
            .and_then(|e| e.tls_config(tls.clone()))
        {
            Ok(e) => e.connect_timeout(Duration::from_secs(3)).connect().await,
            Err(e) => Err(e),
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                last = anyhow::anyhow!("{member}: {}", proto::error_chain(&e));
                continue;
            }
        };
        let request = proto::coordinator::JoinRequest {
            token: join.token.clone(),
            csr_pem: csr.clone(),
        };
        let answer = match PoolServiceClient::new(channel).join(request).await {
            Ok(a) => a.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                last = anyhow::anyhow!("{member}: {}", s.message());
                continue;
            }
            Err(s) => anyhow::bail!("the pool refused to join: {:?}: {}", s.code(), s.message()),
        };
        let creds =
            Credentials::new(&answer.certificate_pem, &key, &pool).map_err(|e| chain(&e))?;
        anyhow::ensure!(
            creds.identity() == identity,
            "the pool signed a certificate for {}, not {identity}",
            creds.identity()
        );
        let bundle = CaBundle::from_pem(&answer.ca_bundle_pem).map_err(|e| chain(&e))?;
        save_new_dir(&DaemonTls { bundle, creds }, tls_dir)?;
        tracing::info!(%identity, dir = %tls_dir.display(), "certificate issued by the pool");
        return Ok(());
    }
    Err(last.context("no coordinator member answered"))
}

/// Writes `tls` into a new directory beside `dir`, then renames it into place.
fn save_new_dir(tls: &DaemonTls, dir: &Path) -> anyhow::Result<()> {
    let name = dir
        .file_name()
        .context("the TLS directory has no name")?
        .to_string_lossy();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.joining-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = tls.save(&tmp).map_err(|e| chain(&e)).and_then(|()| {
        anyhow::ensure!(!dir.exists(), "{} appeared while joining", dir.display());
        std::fs::rename(&tmp, dir).with_context(|| format!("renaming into {}", dir.display()))
    });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}
