//! A daemon's TLS directory, what its `--tls-dir` names: the pool's CA bundle
//! ([`BUNDLE_FILE`]), the daemon's certificate and key ([`crate::leaf::CERT_FILE`],
//! [`crate::leaf::KEY_FILE`], 0600), in a directory nobody else may enter (0700).
//!
//! A daemon loads it at start and refuses to run when anything is missing, too open, of
//! another pool, or names another identity than the one it runs as.

use std::path::{Path, PathBuf};

use tonic::transport::{ClientTlsConfig, ServerTlsConfig};

use crate::ca::{AltName, CaBundle, CaError, PoolCa, Validity};
use crate::files::{self, FileError};
use crate::identity::{Identity, PoolId, coordinators_name};
use crate::leaf::{Credentials, LeafError};
use crate::tls::{self, ClientAuth, TlsError};

/// The pool's CA bundle in a TLS directory.
pub const BUNDLE_FILE: &str = "ca.pem";

/// Errors loading or saving a TLS directory.
#[derive(Debug, thiserror::Error)]
pub enum TlsDirError {
    #[error("TLS directory {dir}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: FileError,
    },
    #[error("CA bundle {path}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: CaError,
    },
    #[error("credentials in {dir}")]
    Credentials {
        dir: PathBuf,
        #[source]
        source: LeafError,
    },
    #[error("issuing credentials for {identity}")]
    Issue {
        identity: Identity,
        #[source]
        source: CaError,
    },
    #[error("the certificate in {dir} is for {found}, but this daemon runs as {expected}")]
    WrongIdentity {
        dir: PathBuf,
        found: Identity,
        expected: Identity,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A daemon's credentials and the CAs it trusts.
#[derive(Clone)]
pub struct DaemonTls {
    pub bundle: CaBundle,
    pub creds: Credentials,
}

impl std::fmt::Debug for DaemonTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonTls")
            .field("pool", self.pool_id())
            .field("identity", self.identity())
            .finish_non_exhaustive()
    }
}

impl DaemonTls {
    /// Reads `dir`: it must be 0700, the key 0600, the certificate of the bundle's pool.
    /// The files are read from the one directory opened first, so a renewal swapping a
    /// new directory into `dir` meanwhile never mixes an old certificate with a new key;
    /// if the renewal removed the old one under the reader, the new one is read again.
    pub fn load(dir: &Path) -> Result<DaemonTls, TlsDirError> {
        Self::load_once(dir).or_else(|_| Self::load_once(dir))
    }

    fn load_once(dir: &Path) -> Result<DaemonTls, TlsDirError> {
        let opened = std::fs::File::open(dir);
        let pinned = match &opened {
            Ok(f) => {
                use std::os::fd::AsRawFd;
                let via = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                if via.is_dir() { via } else { dir.to_owned() }
            }
            Err(_) => dir.to_owned(),
        };
        let tls = Self::load_from(&pinned, dir);
        drop(opened);
        tls
    }

    /// [`DaemonTls::load`] of `dir` read through `at`, errors naming `dir`.
    fn load_from(at: &Path, dir: &Path) -> Result<DaemonTls, TlsDirError> {
        files::ensure_existing_private_dir(at).map_err(|source| TlsDirError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        let path = dir.join(BUNDLE_FILE);
        let bundle =
            CaBundle::load(&at.join(BUNDLE_FILE)).map_err(|source| TlsDirError::Bundle {
                path: path.clone(),
                source,
            })?;
        let creds =
            Credentials::load(at, bundle.pool_id()).map_err(|source| TlsDirError::Credentials {
                dir: dir.to_owned(),
                source,
            })?;
        Ok(DaemonTls { bundle, creds })
    }

    /// As [`DaemonTls::load`], refusing credentials of any identity but `expected`.
    pub fn load_as(dir: &Path, expected: &Identity) -> Result<DaemonTls, TlsDirError> {
        let tls = DaemonTls::load(dir)?;
        if tls.identity() != expected {
            return Err(TlsDirError::WrongIdentity {
                dir: dir.to_owned(),
                found: tls.identity().clone(),
                expected: expected.clone(),
            });
        }
        Ok(tls)
    }

    /// Writes the bundle, certificate and key into `dir` (created 0700).
    pub fn save(&self, dir: &Path) -> Result<(), TlsDirError> {
        let path = dir.join(BUNDLE_FILE);
        self.bundle
            .save(&path)
            .map_err(|source| TlsDirError::Bundle { path, source })?;
        self.creds
            .save(dir)
            .map_err(|source| TlsDirError::Credentials {
                dir: dir.to_owned(),
                source,
            })
    }

    pub fn pool_id(&self) -> &PoolId {
        self.bundle.pool_id()
    }

    pub fn identity(&self) -> &Identity {
        self.creds.identity()
    }

    /// The configuration of this daemon's gRPC server.
    pub fn server(&self, auth: ClientAuth) -> Result<ServerTlsConfig, TlsError> {
        tls::server_tls(&self.creds, &self.bundle, auth)
    }

    /// The configuration for calling the daemon that is `server`, as this daemon.
    pub fn client(&self, server: &Identity) -> Result<ClientTlsConfig, TlsError> {
        tls::client_tls(&self.bundle, Some(&self.creds), Some(server))
    }

    /// The configuration for calling whichever coordinator member answers, as this
    /// daemon.
    pub fn coordinators_client(&self) -> Result<ClientTlsConfig, TlsError> {
        Ok(tls::client_tls(&self.bundle, Some(&self.creds), None)?
            .domain_name(coordinators_name(self.pool_id())))
    }
}

impl PoolCa {
    /// Issues credentials for `identity` here and writes them with the CA bundle into
    /// `dir`: how the founding step (and a lab, or a test) gives daemons on this machine
    /// their TLS directories.
    pub fn issue_dir(
        &self,
        identity: &Identity,
        names: &[AltName],
        validity: Validity,
        dir: &Path,
    ) -> Result<DaemonTls, TlsDirError> {
        let creds = self
            .issue(identity, names, validity)
            .map_err(|source| TlsDirError::Issue {
                identity: identity.clone(),
                source,
            })?;
        let tls = DaemonTls {
            bundle: self.bundle(),
            creds,
        };
        tls.save(dir)?;
        Ok(tls)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn ca() -> PoolCa {
        PoolCa::create(
            PoolId::generate(),
            Validity::starting(NOW, Duration::from_secs(86_400)),
        )
        .unwrap()
    }

    #[test]
    fn issued_directories_load_as_their_identity_only() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = ca();
        let dir = tmp.path().join("h1");
        let v = Validity::starting(NOW, Duration::from_secs(3600));
        let host = Identity::Host("h1".into());
        ca.issue_dir(&host, &[], v, &dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(crate::leaf::KEY_FILE)), 0o600);
        let tls = DaemonTls::load_as(&dir, &host).unwrap();
        assert_eq!(tls.pool_id(), ca.pool_id());
        assert!(matches!(
            DaemonTls::load_as(&dir, &Identity::Member(1)),
            Err(TlsDirError::WrongIdentity { .. })
        ));
        // A directory others may enter is refused, not used.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            DaemonTls::load(&dir),
            Err(TlsDirError::Dir { .. })
        ));
        assert!(matches!(
            DaemonTls::load(&tmp.path().join("missing")),
            Err(TlsDirError::Dir { .. })
        ));
    }

    #[test]
    fn member_certificates_answer_to_the_coordinators_name_and_requests_cannot_ask_for_it() {
        let ca = ca();
        let pool = ca.pool_id().clone();
        let v = Validity::starting(NOW, Duration::from_secs(3600));
        let member = ca.issue(&Identity::Member(2), &[], v).unwrap();
        assert!(member.info().dns_names.contains(&coordinators_name(&pool)));
        let host = ca.issue(&Identity::Host("h1".into()), &[], v).unwrap();
        assert!(!host.info().dns_names.contains(&coordinators_name(&pool)));
        // A host asking for a member's or the coordinators' name is refused.
        for name in [
            coordinators_name(&pool),
            Identity::Member(1).dns_name(&pool),
        ] {
            let err = ca
                .issue(
                    &Identity::Host("h1".into()),
                    &[AltName::parse(&name).unwrap()],
                    v,
                )
                .unwrap_err();
            assert!(
                matches!(&err, CaError::InvalidName { .. }),
                "{name}: {err:?}"
            );
        }
    }
}
