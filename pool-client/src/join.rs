//! A daemon's certificate from the pool: joining with a join file (`poolctl host-join`,
//! `storage-join`, `member-join` write it; `hostd --join`, `poold --join-file` read it) and
//! renewing a certificate before it expires.
//!
//! Joining: a key made here, a certificate request for the file's identity, `Join` with
//! the file's one-time token on the first member that answers (each checked against the
//! file's CA under the coordinators' name: the pool is trusted from the file, never on
//! first contact), and the TLS directory written in one rename, so a failed join leaves
//! nothing behind. Renewing: a new key, `RenewCertificate` over mutual TLS with the
//! current certificate, the directory replaced in one rename: at two thirds of the
//! certificate's life, or at once when `GetTrust` (asked every [`TRUST_POLL`]) says the
//! pool's CA bundle or signing CA changed (a CA roll).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use pool_trust::{AltName, CaBundle, Credentials, DaemonTls, Identity, LeafKey, PoolId};
use proto::coordinator as pb;
use proto::coordinator::pool_service_client::PoolServiceClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a daemon asks the pool what to trust: a CA roll waits for this at most
/// before every running daemon renews onto the new CA.
pub const TRUST_POLL: Duration = Duration::from_secs(5);

/// What `poolctl host-join` (and the like) writes: everything a new daemon needs to
/// trust the pool and be let in once.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct JoinFile {
    pub pool_id: String,
    /// The identity the token is for, `<role>/<name>` (e.g. `host/h1`).
    pub identity: String,
    /// The coordinator members (`host:port`) to join through.
    pub members: Vec<String>,
    /// When the token expires, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub expires_at_ms: u64,
    /// The pool's CA bundle (PEM): the members must present certificates it signed.
    pub ca_pem: String,
    /// `pooljoin-<id>-<secret>`: spent by the first join. Never logged.
    pub token: String,
}

impl std::fmt::Debug for JoinFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinFile")
            .field("pool_id", &self.pool_id)
            .field("identity", &self.identity)
            .field("members", &self.members)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("reading the join file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a join file")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("already joined: the TLS directory {0} exists")]
    AlreadyJoined(String),
    #[error("the pool refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("no coordinator member answered (last: {0})")]
    Unreachable(String),
    #[error("writing the TLS directory {dir}")]
    Save {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(e: &dyn std::error::Error) -> JoinError {
    JoinError::Invalid(proto::error_chain(e))
}

impl JoinFile {
    pub fn load(path: &Path) -> Result<JoinFile, JoinError> {
        let text = std::fs::read_to_string(path).map_err(|source| JoinError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| JoinError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// The file as TOML (its writer adds a comment and keeps it 0600).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// Joins as `identity` (named also by `ips`, where others dial it) with `file`, and
/// writes the TLS directory `tls_dir`, which must not exist yet.
pub async fn join(
    file: &JoinFile,
    identity: &Identity,
    ips: &[IpAddr],
    tls_dir: &Path,
) -> Result<DaemonTls, JoinError> {
    if tls_dir.exists() {
        return Err(JoinError::AlreadyJoined(tls_dir.display().to_string()));
    }
    if file.identity != identity.path() {
        return Err(JoinError::Invalid(format!(
            "the join file is for {}, but this daemon runs as {}",
            file.identity,
            identity.path()
        )));
    }
    let pool = PoolId::parse(&file.pool_id).map_err(|e| invalid(&e))?;
    let bundle = CaBundle::from_pem(&file.ca_pem).map_err(|e| invalid(&e))?;
    if bundle.pool_id() != &pool {
        return Err(JoinError::Invalid(format!(
            "the join file's CA bundle is of pool {}, not {pool}",
            bundle.pool_id()
        )));
    }
    let tls = pool_trust::tls::client_tls(&bundle, None, None)
        .map_err(|e| invalid(&e))?
        .domain_name(pool_trust::coordinators_name(&pool));
    let key = LeafKey::generate().map_err(|e| invalid(&e))?;
    let names: Vec<AltName> = ips.iter().map(|ip| AltName::Ip(*ip)).collect();
    let csr = key
        .csr_pem(&pool, identity, &names)
        .map_err(|e| invalid(&e))?;
    let request = pb::JoinRequest {
        token: file.token.clone(),
        csr_pem: csr,
    };
    let answer = first_answer(&file.members, &tls, |mut c| {
        let request = request.clone();
        async move { c.join(request).await }
    })
    .await?;
    let got = credentials(&answer, &key, &pool, identity)?;
    save_replacing(&got, tls_dir, false)?;
    Ok(got)
}

/// A new certificate for the holder of `current`, asked of `members` over mutual TLS
/// with `current`: a new key, the same identity and names. Replaces the TLS directory
/// `tls_dir` in one rename and returns what it now holds.
pub async fn renew(
    current: &DaemonTls,
    names: &[AltName],
    members: &[String],
    tls_dir: &Path,
) -> Result<DaemonTls, JoinError> {
    let pool = current.pool_id().clone();
    let identity = current.identity().clone();
    let tls = current.coordinators_client().map_err(|e| invalid(&e))?;
    let key = LeafKey::generate().map_err(|e| invalid(&e))?;
    let csr = key
        .csr_pem(&pool, &identity, names)
        .map_err(|e| invalid(&e))?;
    let request = pb::RenewCertificateRequest { csr_pem: csr };
    let answer = first_answer(members, &tls, |mut c| {
        let request = request.clone();
        async move { c.renew_certificate(request).await }
    })
    .await?;
    let got = credentials(&answer, &key, &pool, &identity)?;
    save_replacing(&got, tls_dir, true)?;
    Ok(got)
}

/// The names a renewal asks for again: the current certificate's addresses and DNS
/// names, less those under `pool.internal`, which the CA adds itself.
pub fn names_to_renew(tls: &DaemonTls) -> Vec<AltName> {
    let info = tls.creds.info();
    info.ips
        .iter()
        .map(|ip| AltName::Ip(*ip))
        .chain(info.dns_names.iter().map(|n| AltName::Dns(n.clone())))
        .filter(|n| !n.is_pool_internal())
        .collect()
}

/// Renews `tls` (kept in `dir`) from the coordinator members `members()` names each time
/// two thirds of its validity have passed, until `stop` turns true; `renewed` gets each
/// new one (to reload a listener, rebuild clients). A failed renewal is retried, sooner
/// as expiry nears.
pub async fn keep_renewed(
    mut tls: DaemonTls,
    members: impl Fn() -> Vec<String>,
    dir: std::path::PathBuf,
    renewed: impl Fn(&DaemonTls),
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let names = names_to_renew(&tls);
    let mut retry: Option<Duration> = None;
    loop {
        let due = retry.unwrap_or_else(|| {
            Duration::from_millis(tls.creds.renew_at_ms().saturating_sub(proto::unix_ms()))
        });
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(due.min(TRUST_POLL)) => {}
        }
        if due > TRUST_POLL {
            match trust_changed(&tls, &members()).await {
                Ok(Some(why)) => tracing::info!(%why, "the pool's trust changed: renewing now"),
                Ok(None) => {
                    retry = retry.map(|r| r - TRUST_POLL);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %proto::error_chain(&e), "asking the pool what to trust");
                    retry = retry.map(|r| r - TRUST_POLL);
                    continue;
                }
            }
        }
        match renew(&tls, &names, &members(), &dir).await {
            Ok(next) => {
                tracing::info!(
                    identity = %next.identity(),
                    valid_until_ms = next.creds.not_after_ms(),
                    "certificate renewed"
                );
                tls = next;
                renewed(&tls);
                retry = None;
            }
            Err(e) => {
                // A tenth of what is left, between a second and a minute.
                let left = tls.creds.not_after_ms().saturating_sub(proto::unix_ms());
                let next = Duration::from_millis(left / 10)
                    .clamp(Duration::from_secs(1), Duration::from_secs(60));
                tracing::warn!(error = %proto::error_chain(&e), retry_in = ?next, "renewing the certificate failed");
                retry = Some(next);
            }
        }
    }
}

/// Why `tls` is out of date with what the pool trusts now (`GetTrust` on `members`):
/// another CA bundle, or a certificate not of the signing CA. `None` when it is not.
pub async fn trust_changed(
    tls: &DaemonTls,
    members: &[String],
) -> Result<Option<String>, JoinError> {
    let client = tls.coordinators_client().map_err(|e| invalid(&e))?;
    let trust = first_answer(members, &client, |mut c| async move {
        c.get_trust(pb::GetTrustRequest {}).await
    })
    .await?;
    let bundle = CaBundle::from_pem(&trust.ca_bundle_pem).map_err(|e| invalid(&e))?;
    let fingerprints = |b: &CaBundle| {
        let mut v: Vec<String> = b
            .certs()
            .iter()
            .map(|c| c.fingerprint().to_string())
            .collect();
        v.sort();
        v
    };
    if fingerprints(&bundle) != fingerprints(&tls.bundle) {
        return Ok(Some(format!(
            "the pool trusts {:?}, this daemon {:?}",
            fingerprints(&bundle),
            fingerprints(&tls.bundle)
        )));
    }
    let signing = bundle
        .certs()
        .iter()
        .find(|c| c.fingerprint().to_string() == trust.signing_ca_fingerprint);
    Ok(match signing {
        // Two CAs of a pool differ in name: the issuer's name says which signed it.
        Some(ca) if ca.info().subject != tls.creds.info().issuer => Some(format!(
            "the pool signs with {}, this daemon's certificate is of another CA",
            trust.signing_ca_fingerprint
        )),
        _ => None,
    })
}

/// The answer of the first member that gives one; a refusal (anything but Unavailable)
/// is the pool's and ends the search.
async fn first_answer<T, F, Fut>(
    members: &[String],
    tls: &ClientTlsConfig,
    call: F,
) -> Result<T, JoinError>
where
    F: Fn(PoolServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = "the join file names no coordinator member".to_owned();
    for member in members {
        let endpoint = Endpoint::from_shared(format!("https://{member}"))
            .and_then(|e| e.tls_config(tls.clone()));
        let channel = match endpoint {
            Ok(e) => e.connect_timeout(CONNECT_TIMEOUT).connect().await,
            Err(e) => Err(e),
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                last = format!("{member}: {}", proto::error_chain(&e));
                continue;
            }
        };
        match call(PoolServiceClient::new(channel)).await {
            Ok(a) => return Ok(a.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                last = format!("{member}: {}", s.message());
            }
            Err(s) => {
                return Err(JoinError::Refused {
                    code: s.code(),
                    message: s.message().to_owned(),
                });
            }
        }
    }
    Err(JoinError::Unreachable(last))
}

/// The pool's answer as credentials, refused unless it is for `identity` and `key`.
fn credentials(
    answer: &pb::JoinResponse,
    key: &LeafKey,
    pool: &PoolId,
    identity: &Identity,
) -> Result<DaemonTls, JoinError> {
    let creds = Credentials::new(&answer.certificate_pem, key, pool).map_err(|e| invalid(&e))?;
    if creds.identity() != identity {
        return Err(JoinError::Invalid(format!(
            "the pool signed a certificate for {}, not {identity}",
            creds.identity()
        )));
    }
    let bundle = CaBundle::from_pem(&answer.ca_bundle_pem).map_err(|e| invalid(&e))?;
    Ok(DaemonTls { bundle, creds })
}

/// Writes `tls` into a new directory beside `dir` and renames it into place (over the
/// old one when `replace`, which is kept until the rename so a crash leaves one whole).
fn save_replacing(tls: &DaemonTls, dir: &Path, replace: bool) -> Result<(), JoinError> {
    let save_err = |source| JoinError::Save {
        dir: dir.display().to_string(),
        source,
    };
    let name = dir
        .file_name()
        .ok_or_else(|| JoinError::Invalid(format!("{} has no name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => Path::new(".").to_owned(),
    };
    std::fs::create_dir_all(&parent).map_err(save_err)?;
    let tmp = parent.join(format!(".{name}.new-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = tls
        .save(&tmp)
        .map_err(|e| save_err(std::io::Error::other(proto::error_chain(&e))))
        .and_then(|()| {
            if !replace {
                if dir.exists() {
                    return Err(JoinError::AlreadyJoined(dir.display().to_string()));
                }
                return std::fs::rename(&tmp, dir).map_err(save_err);
            }
            // One atomic swap where the file system can (a VM process reading the directory
            // at that instant sees the old one or the new one, whole); else rename(2), which
            // cannot replace a non-empty directory: the old one steps aside first, and comes
            // back if the new one cannot take its place.
            if exchange(&tmp, dir).is_ok() {
                let _ = std::fs::remove_dir_all(&tmp);
                return Ok(());
            }
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dir, &old).map_err(save_err)?;
            if let Err(e) = std::fs::rename(&tmp, dir) {
                let _ = std::fs::rename(&old, dir);
                return Err(save_err(e));
            }
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Swaps the two paths in one step (`renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_files_round_trip_and_never_show_their_token() {
        let dir = std::env::temp_dir().join(format!("join-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("join.toml");
        let file = JoinFile {
            pool_id: "p".into(),
            identity: "host/h1".into(),
            members: vec!["127.0.0.1:1".into()],
            expires_at_ms: 5,
            ca_pem: "PEM".into(),
            token: "pooljoin-secret".into(),
        };
        std::fs::write(&path, format!("# comment\n{}", file.to_toml().unwrap())).unwrap();
        let back = JoinFile::load(&path).unwrap();
        assert_eq!(back.identity, "host/h1");
        assert_eq!(back.members, ["127.0.0.1:1"]);
        assert_eq!(back.token, "pooljoin-secret");
        assert!(!format!("{back:?}").contains("secret"));
        std::fs::write(&path, "pool_id = \"p\"\n").unwrap();
        assert!(matches!(
            JoinFile::load(&path),
            Err(JoinError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_renewed_directory_replaces_the_old_one_with_no_instant_without_one() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;

        use pool_trust::{PoolCa, Validity};

        let root = std::env::temp_dir().join(format!("tls-swap-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let dir = root.join("tls");
        let pool = PoolId::parse("pool-a").unwrap();
        let ca = PoolCa::create(
            pool,
            Validity::starting(proto::unix_ms(), Duration::from_secs(3600)),
        )
        .unwrap();
        let host = Identity::Host("h1".into());
        let issue = || {
            let v = Validity::starting(proto::unix_ms(), Duration::from_secs(3600));
            DaemonTls {
                bundle: ca.bundle(),
                creds: ca.issue(&host, &[], v).unwrap(),
            }
        };
        save_replacing(&issue(), &dir, false).unwrap();
        let done = AtomicBool::new(false);
        let (loads, last) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut loads = 0u32;
                while !done.load(Ordering::Relaxed) {
                    DaemonTls::load(&dir).expect("the directory is always there, whole");
                    loads += 1;
                }
                loads
            });
            let mut last = issue();
            for _ in 0..30 {
                last = issue();
                save_replacing(&last, &dir, true).unwrap();
            }
            done.store(true, Ordering::Relaxed);
            (reader.join().unwrap(), last)
        });
        assert!(loads > 0);
        let now = DaemonTls::load(&dir).unwrap();
        assert_eq!(now.creds.cert_der(), last.creds.cert_der());
        let left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["tls"], "nothing left beside it");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
