//! The founding step on one machine: a pool CA kept in a directory there, issuing TLS
//! directories for the daemons started beside it (`poolctl pool-init` and
//! `pool-issue`, `poolctl lab`, the test harnesses, the deploy scripts).
//!
//! The CA directory holds the pool's root key (0600 in a 0700 directory); the public
//! bundle clients pin sits beside it as [`LocalCa::bundle_path`].

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ca::{AltName, CaError, DEFAULT_CA_VALIDITY, DEFAULT_LEAF_VALIDITY, PoolCa, Validity};
use crate::dir::{BUNDLE_FILE, DaemonTls, TlsDirError};
use crate::files;
use crate::identity::{Identity, PoolId};

/// A pool CA in a directory on this machine.
#[derive(Debug)]
pub struct LocalCa {
    ca: PoolCa,
    dir: PathBuf,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ca_error(dir: &Path) -> impl FnOnce(CaError) -> TlsDirError + '_ {
    move |source| TlsDirError::Bundle {
        path: dir.to_owned(),
        source,
    }
}

impl LocalCa {
    /// Opens the CA in `dir`, or creates it for `pool` when `dir` holds none. An existing
    /// CA of another pool is refused.
    pub fn open_or_create(dir: &Path, pool: &PoolId) -> Result<LocalCa, TlsDirError> {
        let ca_dir = dir.join("ca");
        let ca = if ca_dir.join(crate::ca::CA_KEY_FILE).exists() {
            PoolCa::load(&ca_dir).map_err(ca_error(&ca_dir))?
        } else {
            let ca = PoolCa::create(
                pool.clone(),
                Validity::starting(now_ms(), DEFAULT_CA_VALIDITY),
            )
            .map_err(ca_error(&ca_dir))?;
            ca.save(&ca_dir).map_err(ca_error(&ca_dir))?;
            ca
        };
        if ca.pool_id() != pool {
            return Err(TlsDirError::Bundle {
                path: ca_dir,
                source: CaError::InvalidName {
                    name: ca.pool_id().to_string(),
                    reason: "this directory's CA is of another pool",
                },
            });
        }
        let bundle = dir.join(BUNDLE_FILE);
        files::write_public(&bundle, ca.bundle().to_pem().as_bytes()).map_err(|source| {
            TlsDirError::Dir {
                dir: dir.to_owned(),
                source,
            }
        })?;
        Ok(LocalCa {
            ca,
            dir: dir.to_owned(),
        })
    }

    /// Issues fresh credentials for `identity`, named also by `names` (the addresses
    /// clients dial it at), into the TLS directory `into`.
    pub fn issue(
        &self,
        identity: &Identity,
        names: &[&str],
        into: &Path,
    ) -> Result<DaemonTls, TlsDirError> {
        let names = names
            .iter()
            .map(|n| AltName::parse(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsDirError::Issue {
                identity: identity.clone(),
                source,
            })?;
        self.ca.issue_dir(
            identity,
            &names,
            Validity::starting(now_ms(), DEFAULT_LEAF_VALIDITY),
            into,
        )
    }

    /// The pool's CA bundle (public): what clients are given with `--ca`.
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join(BUNDLE_FILE)
    }

    pub fn ca(&self) -> &PoolCa {
        &self.ca
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_ca_is_kept_and_reopened_for_its_pool_only() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = PoolId::parse("lab").unwrap();
        let a = LocalCa::open_or_create(tmp.path(), &pool).unwrap();
        let tls = a
            .issue(&Identity::Member(1), &["127.0.0.1"], &tmp.path().join("m1"))
            .unwrap();
        let b = LocalCa::open_or_create(tmp.path(), &pool).unwrap();
        assert_eq!(a.ca().cert().fingerprint(), b.ca().cert().fingerprint());
        assert!(tls.bundle.contains(&b.ca().cert().fingerprint()));
        let bundle = crate::CaBundle::load(&a.bundle_path()).unwrap();
        assert_eq!(bundle.pool_id(), &pool);
        let other = PoolId::parse("other").unwrap();
        assert!(LocalCa::open_or_create(tmp.path(), &other).is_err());
        assert!(
            a.issue(
                &Identity::Member(2),
                &["not a name"],
                &tmp.path().join("m2")
            )
            .is_err()
        );
    }
}
