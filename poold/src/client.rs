//! A PoolService client for tools (poolctl, tests, benchmarks): given several member
//! addresses, it finds one that answers, prefers the leader, and retries a failed call on
//! another member until a deadline.
//!
//! Retrying a write is safe because every mutating request carries a `request_id`: the
//! caller builds the request once (see [`new_request_id`]) and the closure given to
//! [`PoolClient::call`] sends that same request each time, so a write that committed before
//! its answer was lost returns the first result instead of acting twice.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tonic::Status> {
//! use poold::client::{PoolClient, new_request_id};
//! use proto::coordinator::{JoinHostRequest};
//! let mut c = PoolClient::new(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]);
//! let req = JoinHostRequest { request_id: new_request_id(), name: "h1".into(), address: "10.0.0.5:7000".into() };
//! let task = c.call(|mut p| { let req = req.clone(); async move { p.join_host(req).await } }).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use proto::coordinator::pool_service_client::PoolServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// Sends `authorization: Bearer <token>` on every call once a token is set.
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// The PoolService client a [`PoolClient::call`] closure gets.
pub type PoolApi = PoolServiceClient<InterceptedService<Channel, Auth>>;

/// A token that cannot go in a gRPC header.
#[derive(Debug, thiserror::Error)]
#[error("the token is not a valid header value (printable ASCII only)")]
pub struct BadToken;

/// A fresh idempotency key.
pub fn new_request_id() -> String {
    random_uuid().to_string()
}

/// A random (version 4) UUID drawn from the thread's userspace generator; `Uuid::new_v4`
/// makes a `getrandom` system call for each, and the leader makes one or two per write.
pub fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// Whether a failed call may succeed on another member or later.
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
    )
}

#[derive(Clone)]
pub struct PoolClient {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    auth: Auth,
    current: usize,
    /// How long one call may keep retrying.
    pub deadline: Duration,
    /// Limit of one attempt.
    pub attempt_timeout: Duration,
}

impl PoolClient {
    pub fn new<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> Self {
        let addrs: Vec<String> = addrs.into_iter().map(|a| a.as_ref().to_owned()).collect();
        assert!(
            !addrs.is_empty(),
            "PoolClient needs at least one member address"
        );
        let channels = addrs
            .iter()
            .map(|a| {
                Endpoint::from_shared(format!("http://{a}"))
                    .expect("member address")
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .connect_lazy()
            })
            .collect();
        PoolClient {
            addrs,
            channels,
            auth: Auth::default(),
            current: 0,
            deadline: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(10),
        }
    }

    /// The address calls go to first.
    pub fn current(&self) -> &str {
        &self.addrs[self.current]
    }

    /// Sends `token` (from Login) with every later call.
    pub fn set_token(&mut self, token: &str) -> Result<(), BadToken> {
        let v = format!("Bearer {token}").parse().map_err(|_| BadToken)?;
        self.auth = Auth(Some(v));
        Ok(())
    }

    /// A client of the member calls go to first, with the token: for a call that must
    /// stay on one member (a stream), without [`PoolClient::call`]'s retries.
    pub fn current_api(&self) -> PoolApi {
        self.pool(self.current)
    }

    fn pool(&self, i: usize) -> PoolApi {
        PoolServiceClient::with_interceptor(self.channels[i].clone(), self.auth.clone())
            .max_decoding_message_size(64 << 20)
    }

    /// Asks the members who leads and sends later calls there; false when none knows.
    pub async fn find_leader(&mut self) -> bool {
        for i in 0..self.addrs.len() {
            let mut p = CoordinatorPeerServiceClient::new(self.channels[i].clone());
            let Ok(Ok(st)) = tokio::time::timeout(
                Duration::from_secs(1),
                p.get_member_status(pb::MemberStatusRequest {}),
            )
            .await
            else {
                continue;
            };
            let st = st.into_inner();
            if st.leader_id == 0 {
                continue;
            }
            if st.leader_id == st.member_id {
                self.current = i;
                return true;
            }
            if let Ok(Ok(m)) = tokio::time::timeout(
                Duration::from_secs(1),
                self.pool(i).list_members(pb::ListMembersRequest {}),
            )
            .await
                && let Some(l) = m.into_inner().members.iter().find(|m| m.id == st.leader_id)
                && let Some(j) = self.addrs.iter().position(|a| *a == l.address)
            {
                self.current = j;
                return true;
            }
        }
        false
    }

    /// Runs `f` against a member, moving to the next member on a retryable failure, until
    /// it succeeds, fails for good, or the deadline passes.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(PoolApi) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut last = Status::unavailable("no member tried");
        let mut tries = 0usize;
        while start.elapsed() < self.deadline {
            let i = self.current;
            match tokio::time::timeout(self.attempt_timeout, f(self.pool(i))).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) if !retryable(&s) => return Err(s),
                Ok(Err(s)) => last = s,
                Err(_) => last = Status::deadline_exceeded("attempt timed out"),
            }
            tries += 1;
            self.current = (self.current + 1) % self.addrs.len();
            if tries.is_multiple_of(self.addrs.len()) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(Status::new(
            last.code(),
            format!(
                "no member answered within {:?}: {}",
                self.deadline,
                last.message()
            ),
        ))
    }
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
