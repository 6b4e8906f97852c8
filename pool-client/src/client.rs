//! [`PoolClient`]: the `PoolService` client of tools, with leader finding and retries on
//! other members until a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use proto::coordinator::pool_service_client::PoolServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Response, Status};

use crate::auth::{Auth, BadToken};
use crate::members::{Members, PassError};

/// The generated `PoolService` client stub, sending the token: what a
/// [`PoolClient::call`] closure gets.
pub type PoolStub = PoolServiceClient<InterceptedService<Channel, Auth>>;

/// A `PoolService` stub on `channel` that sends `auth` and takes answers up to 64 MiB
/// (a page of a large listing).
pub fn pool_stub(channel: Channel, auth: Auth) -> PoolStub {
    PoolServiceClient::with_interceptor(channel, auth).max_decoding_message_size(64 << 20)
}

/// A `PoolService` client over several members: calls go to the leader once found, and a
/// failed call moves on to the next member (see [`PoolClient::call`]).
#[derive(Clone)]
pub struct PoolClient {
    members: Members,
    auth: Auth,
    /// How long one call may keep retrying.
    pub deadline: Duration,
    /// Limit of one attempt.
    pub attempt_timeout: Duration,
}

impl PoolClient {
    /// A client of the members at `addrs` (host:port). Panics when there is none or one
    /// is not a valid address: tools pass what a person typed, checked by [`Members::new`]
    /// where that must not panic.
    pub fn new<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> Self {
        Self::build(addrs, None)
    }

    /// As [`PoolClient::new`], over TLS: how tools and daemons reach a pool.
    pub fn with_tls<S: AsRef<str>>(
        addrs: impl IntoIterator<Item = S>,
        tls: &ClientTlsConfig,
    ) -> Self {
        Self::build(addrs, Some(tls))
    }

    fn build<S: AsRef<str>>(
        addrs: impl IntoIterator<Item = S>,
        tls: Option<&ClientTlsConfig>,
    ) -> Self {
        let members = Members::new(addrs, Duration::from_millis(500), tls)
            .unwrap_or_else(|e| panic!("PoolClient: {e}"));
        PoolClient {
            members,
            auth: Auth::default(),
            deadline: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(10),
        }
    }

    /// The address calls go to first.
    pub fn current(&self) -> &str {
        &self.members.addresses()[self.members.current()]
    }

    /// Sends `token` (from Login) with every later call.
    pub fn set_token(&mut self, token: &str) -> Result<(), BadToken> {
        self.auth = Auth::bearer(token)?;
        Ok(())
    }

    /// A stub of the member calls go to first, with the token: for a call that must stay
    /// on one member (a stream), without [`PoolClient::call`]'s retries.
    pub fn current_stub(&self) -> PoolStub {
        self.stub(self.members.current())
    }

    fn stub(&self, i: usize) -> PoolStub {
        pool_stub(self.members.channel(i), self.auth.clone())
    }

    /// Asks the members who leads and sends later calls there; false when none knows.
    pub async fn find_leader(&mut self) -> bool {
        // Through PoolService (ListMembers names the leader): the members' own service
        // answers members only.
        for i in 0..self.members.len() {
            let Ok(Ok(m)) = tokio::time::timeout(
                Duration::from_secs(1),
                self.stub(i).list_members(pb::ListMembersRequest {}),
            )
            .await
            else {
                continue;
            };
            let Some(leader) = m.into_inner().members.into_iter().find(|m| m.leader) else {
                continue;
            };
            if let Some(j) = self
                .members
                .addresses()
                .iter()
                .position(|a| *a == leader.address)
            {
                self.members.set_current(j);
                return true;
            }
        }
        false
    }

    /// Runs `f` against a member, moving to the next member on a retryable failure, until
    /// it succeeds, fails for good, or the deadline passes; pauses briefly after each
    /// round in which no member answered.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(PoolStub) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let until = Instant::now() + self.deadline;
        let mut last = Status::unavailable("no member tried");
        while Instant::now() < until {
            let auth = &self.auth;
            let pass = self
                .members
                .pass(self.attempt_timeout, Some(until), |ch| {
                    f(pool_stub(ch, auth.clone()))
                })
                .await;
            match pass {
                Ok(v) => return Ok(v),
                Err(PassError::Refused(s)) => return Err(s),
                Err(PassError::Unreachable { last: s, .. }) => last = s,
            }
            if Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let message = match crate::unreachable_backend(&last) {
            Some(_) => format!("{} (tried for {:?})", last.message(), self.deadline),
            None => format!(
                "no member answered within {:?}: {}",
                self.deadline,
                last.message()
            ),
        };
        Err(Status::with_metadata(
            last.code(),
            message,
            last.metadata().clone(),
        ))
    }
}
