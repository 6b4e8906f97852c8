//! The client side of the pool's API, for tools (`poolctl`, tests, benchmarks) and for the
//! host agent: given several coordinator members, it finds one that answers, prefers the
//! leader, and retries a failed call on another member.
//!
//! Retrying a write is safe because every mutating request carries a `request_id`: the
//! caller builds the request once (see [`new_request_id`]) and the closure given to
//! [`PoolClient::call`] sends that same request each time, so a write that committed before
//! its answer was lost returns the first result instead of acting twice.
//!
//! # Layout
//! - [`members`]: the member-rotating channel set ([`Members`]) both [`PoolClient`] and
//!   hostd's heartbeat agent call through, and which failures are worth another member.
//! - [`auth`]: the interceptor that sends the login token with every call.
//! - [`client`]: [`PoolClient`], the `PoolService` client with leader finding and retries
//!   until a deadline.
//! - [`join`]: a daemon's certificate from the pool: joining with a join file, renewing.
//!
//! # Example
//! A call retries on every member until its deadline, then says why none answered:
//!
//! ```
//! use std::time::Duration;
//! use pool_client::{PoolClient, new_request_id};
//! use proto::coordinator as pb;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Port 1: nobody listens there, so every attempt fails and is retried.
//! let mut c = PoolClient::new(["127.0.0.1:1"]);
//! c.deadline = Duration::from_millis(300);
//! // Built once: a retry sends the same request id, so the write happens at most once.
//! let req = pb::JoinHostRequest {
//!     request_id: new_request_id(),
//!     name: "h1".into(),
//!     address: "10.0.0.5:7000".into(),
//! };
//! let err = c
//!     .call(|mut p| {
//!         let req = req.clone();
//!         async move { p.join_host(req).await }
//!     })
//!     .await
//!     .unwrap_err();
//! assert_eq!(err.code(), tonic::Code::Unavailable);
//! assert!(err.message().starts_with("no member answered within"));
//! # }
//! ```

pub mod auth;
pub mod client;
pub mod join;
pub mod members;

pub use auth::{Auth, BadToken};
pub use client::{PoolClient, PoolStub, pool_stub};
pub use members::{
    Members, MembersError, PassError, UNREACHABLE_BACKEND, certificate_refused, retryable,
    unreachable_backend,
};

/// A fresh idempotency key for a mutating request.
pub fn new_request_id() -> String {
    random_uuid().to_string()
}

/// A random (version 4) UUID drawn from the thread's userspace generator; `Uuid::new_v4`
/// makes a `getrandom` system call for each, and the leader makes one or two per write.
pub fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_uuids_are_version_4_and_distinct() {
        let a = random_uuid();
        let b = random_uuid();
        assert_eq!(a.get_version(), Some(uuid::Version::Random));
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
        let id = new_request_id();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    }
}
