//! The coordinator members a client talks to: one lazily connected channel per member,
//! with the member that answered last first in line, and which failures are worth trying
//! on another member.
//!
//! Any member takes any call (a follower forwards writes to the leader), so a client keeps
//! using the member that answered last and moves to the next one when it does not answer.
//! [`Members::pass`] is one such round; [`crate::PoolClient`] repeats rounds until its
//! deadline, hostd's heartbeat agent makes one round per beat and backs off itself.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Response, Status};

/// Whether the call failed because the member's certificate is not one the client
/// trusts (another pool's, or a CA the client was not given): no retry will change that.
pub fn certificate_refused(s: &Status) -> bool {
    s.message().contains("invalid peer certificate")
}

/// The metadata key a member sets on a transient failure that was not its own: a daemon
/// it called for the answer (a storaged, a hostd) did not answer. Its value is that
/// daemon's address.
pub const UNREACHABLE_BACKEND: &str = "x-pool-unreachable-backend";

/// The daemon behind a member's transient failure, when the member answered and the
/// daemon it called did not (see [`UNREACHABLE_BACKEND`]).
pub fn unreachable_backend(s: &Status) -> Option<&str> {
    s.metadata().get(UNREACHABLE_BACKEND)?.to_str().ok()
}

/// Whether a failed call may succeed on another member or later. Anything else is a
/// refusal every member would repeat.
pub fn retryable(s: &Status) -> bool {
    !certificate_refused(s)
        && matches!(
            s.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Cancelled
                | Code::Unknown
        )
}

/// Why a member set could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    #[error("no member address given")]
    NoMembers,
    #[error("member address {address:?} is not valid")]
    BadAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// How a [`Members::pass`] ended without an answer.
#[derive(Debug)]
pub enum PassError {
    /// A member refused in a way every member would repeat (not [`retryable`]).
    Refused(Status),
    /// No member answered; `last` is the last failure, from the member at `address`.
    Unreachable { address: String, last: Status },
}

/// The coordinator members, with the one that answered last first in line.
#[derive(Clone)]
pub struct Members {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    current: usize,
}

impl Members {
    /// Channels to `addrs` (host:port), connected on first use, each connect attempt
    /// limited to `connect_timeout`; over TLS with `tls` (what every daemon and tool
    /// uses: members serve the pool's API over TLS only), in clear without (tests of
    /// one layer).
    pub fn new<S: AsRef<str>>(
        addrs: impl IntoIterator<Item = S>,
        connect_timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, MembersError> {
        let addrs: Vec<String> = addrs.into_iter().map(|a| a.as_ref().to_owned()).collect();
        if addrs.is_empty() {
            return Err(MembersError::NoMembers);
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let channels = addrs
            .iter()
            .map(|a| {
                let bad = |source| MembersError::BadAddress {
                    address: a.clone(),
                    source,
                };
                let mut e = Endpoint::from_shared(format!("{scheme}://{a}")).map_err(bad)?;
                if let Some(tls) = tls {
                    e = e.tls_config(tls.clone()).map_err(bad)?;
                }
                Ok(e.connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .connect_lazy())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Members {
            addrs,
            channels,
            current: 0,
        })
    }

    /// How many members there are (at least one).
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Always false: a member set has at least one member.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The index of the member calls go to first.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Sends later calls to member `i` first.
    pub fn set_current(&mut self, i: usize) {
        assert!(i < self.addrs.len(), "member {i} of {}", self.addrs.len());
        self.current = i;
    }

    pub fn addresses(&self) -> &[String] {
        &self.addrs
    }

    /// The channel to member `i`.
    pub fn channel(&self, i: usize) -> Channel {
        self.channels[i].clone()
    }

    /// Runs `f` on each member at most once, from the current one, until one answers or
    /// refuses for good; the one that answered stays current. No member is tried after
    /// `until` (the first always is), and each attempt is limited to `attempt_timeout`.
    pub async fn pass<T, F, Fut>(
        &mut self,
        attempt_timeout: Duration,
        until: Option<Instant>,
        mut f: F,
    ) -> Result<T, PassError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut last = None;
        for n in 0..self.addrs.len() {
            if n > 0 && until.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            let i = self.current;
            match tokio::time::timeout(attempt_timeout, f(self.channels[i].clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) if !retryable(&s) => return Err(PassError::Refused(s)),
                Ok(Err(s)) => last = Some((i, s)),
                Err(_) => {
                    let s =
                        Status::deadline_exceeded(format!("no answer within {attempt_timeout:?}"));
                    last = Some((i, s));
                }
            }
            self.current = (i + 1) % self.addrs.len();
        }
        let (i, last) = last.expect("a pass tries at least one member");
        Err(PassError::Unreachable {
            address: self.addrs[i].clone(),
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use proto::coordinator as pb;
    use proto::coordinator::host_agent_service_client::HostAgentServiceClient;
    use proto::coordinator::host_agent_service_server::{HostAgentService, HostAgentServiceServer};
    use tonic::Request;

    use super::*;

    /// A coordinator that takes heartbeats of host "h1" and counts them.
    struct Counting(Arc<AtomicU32>);

    #[tonic::async_trait]
    impl HostAgentService for Counting {
        async fn heartbeat(
            &self,
            r: Request<pb::HeartbeatRequest>,
        ) -> Result<Response<pb::HeartbeatResponse>, Status> {
            if r.into_inner().host_id != "h1" {
                return Err(Status::not_found("no such host"));
            }
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(pb::HeartbeatResponse::default()))
        }
    }

    #[tokio::test]
    async fn a_pass_moves_past_a_dead_member_and_stays_with_the_live_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap().to_string();
        let count = Arc::new(AtomicU32::new(0));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(HostAgentServiceServer::new(Counting(count.clone())))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        // A port nobody listens on: bound, then closed.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let t = Duration::from_secs(5);
        let mut m = Members::new([&dead, &live], Duration::from_secs(1), None).unwrap();
        let beat = |host: &'static str| {
            move |ch: Channel| async move {
                HostAgentServiceClient::new(ch)
                    .heartbeat(pb::HeartbeatRequest {
                        host_id: host.into(),
                        ..Default::default()
                    })
                    .await
            }
        };
        m.pass(t, None, beat("h1")).await.unwrap();
        assert_eq!(m.current(), 1, "the live member is first in line now");
        m.pass(t, None, beat("h1")).await.unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // A refusal is final: not retried on the dead member, and its code is kept.
        match m.pass(t, None, beat("nobody")).await {
            Err(PassError::Refused(s)) => assert_eq!(s.code(), Code::NotFound),
            Err(e) => panic!("expected a refusal, got {e:?}"),
            Ok(_) => panic!("expected a refusal"),
        }
        assert_eq!(m.current(), 1);
        // With every member gone the error says which was tried last.
        server.abort();
        let _ = server.await;
        let mut m = Members::new([&dead], Duration::from_secs(1), None).unwrap();
        match m.pass(t, None, beat("h1")).await {
            Err(PassError::Unreachable { address, last }) => {
                assert_eq!(address, dead);
                assert!(retryable(&last), "{last:?}");
            }
            Err(e) => panic!("expected Unreachable, got {e:?}"),
            Ok(_) => panic!("expected Unreachable"),
        }
    }

    #[test]
    fn addresses_are_checked_when_the_set_is_made() {
        let none: [&str; 0] = [];
        assert!(matches!(
            Members::new(none, Duration::from_secs(1), None),
            Err(MembersError::NoMembers)
        ));
        assert!(matches!(
            Members::new(["bad address"], Duration::from_secs(1), None),
            Err(MembersError::BadAddress { .. })
        ));
    }
}
