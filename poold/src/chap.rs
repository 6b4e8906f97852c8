//! CHAP for the pool's iSCSI grants: every grant the pool makes carries CHAP, so an
//! initiator name alone opens nothing, and mutual CHAP lets the initiator check the target.
//!
//! Secrets are derived, not stored: HMAC-SHA256 of the pool's key (the replicated
//! `token_key`) over the initiator's name and the direction. Any member computes the same
//! secret for the same initiator, so a VM's disks are granted (by the leader) and handed
//! to its host (inside `CreateVm`, over mutual TLS) without a secret ever being written to
//! the log; each initiator's secret is its own, and rotating the pool key rotates them all.

use std::fmt;

use proto::storage as spb;
use tonic::Status;

use crate::auth::hmac_sha256;

/// The user name the target answers mutual CHAP with.
pub const TARGET_USER: &str = "pool-storage";

/// One side's CHAP user and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
}

impl fmt::Debug for Chap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Chap {
    pub fn to_proto(&self) -> spb::ChapCredentials {
        spb::ChapCredentials {
            username: self.user.clone(),
            secret: self.secret.clone(),
        }
    }
}

/// What an initiator logs in with, and what the target proves itself with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secrets {
    pub initiator: Chap,
    pub target: Chap,
}

/// The CHAP secrets of `initiator_iqn` under the pool's key.
pub fn secrets(pool_key: &[u8], initiator_iqn: &str) -> Result<Secrets, Status> {
    if pool_key.is_empty() {
        return Err(Status::failed_precondition(
            "the pool has no key for iSCSI CHAP yet (it is made with the first user)",
        ));
    }
    let derive = |direction: &str| {
        let mac = hmac_sha256(
            pool_key,
            format!("pool iSCSI CHAP/{direction}/{initiator_iqn}").as_bytes(),
        );
        // 24 hex characters: 96 bits, within every target's secret length (12 to 16+).
        crate::auth::hex(&mac[..12])
    };
    Ok(Secrets {
        initiator: Chap {
            user: initiator_iqn.to_owned(),
            secret: derive("initiator"),
        },
        target: Chap {
            user: TARGET_USER.to_owned(),
            secret: derive("target"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_initiator_has_its_own_secrets_and_every_member_derives_the_same() {
        let key = [7u8; 32];
        let a = secrets(&key, "iqn.2026-12.lab:h1").unwrap();
        assert_eq!(a, secrets(&key, "iqn.2026-12.lab:h1").unwrap());
        let b = secrets(&key, "iqn.2026-12.lab:h2").unwrap();
        assert_ne!(a.initiator.secret, b.initiator.secret);
        assert_ne!(a.initiator.secret, a.target.secret);
        assert_ne!(a, secrets(&[8u8; 32], "iqn.2026-12.lab:h1").unwrap());
        assert_eq!(a.initiator.secret.len(), 24);
        assert_eq!(a.initiator.user, "iqn.2026-12.lab:h1");
        assert!(!format!("{a:?}").contains(&a.initiator.secret));
        assert_eq!(
            secrets(&[], "iqn.x").unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    }
}
