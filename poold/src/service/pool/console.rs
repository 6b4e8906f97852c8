//! A VM's serial console, relayed between the caller and the host that runs the VM: over
//! gRPC (`StreamVmConsole`), or as a websocket on the web console's port, opened with a
//! one-shot ticket from `CreateConsoleTicket`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Status;
use tonic::codegen::tokio_stream::{Stream, StreamExt};

use super::PoolHandler;
use crate::auth::Caller;

/// What the VM's console prints, as the host sends it.
pub type ConsoleStream =
    Pin<Box<dyn Stream<Item = Result<hpb::ConsoleOutput, Status>> + Send + 'static>>;

/// The websocket's path on the console port.
pub const WEBSOCKET_PATH: &str = "/console/ws";
/// How long a ticket may wait to be used.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// Tickets outstanding on one member at most (each is 30 s of a little memory).
const MAX_TICKETS: usize = 1024;

/// `StreamVmConsole`: the caller's first message names the VM, the rest is its input.
/// Returns the VM's id with the stream.
pub(super) async fn stream(
    svc: &PoolHandler,
    mut input: tonic::Streaming<hpb::ConsoleInput>,
) -> Result<(String, ConsoleStream), Status> {
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the first message must name the VM"))?;
    let vm_id = first.vm_id.clone();
    let rest = input.take_while(|m| m.is_ok()).filter_map(|m| m.ok());
    let out = relay(svc, first, rest).await?;
    Ok((vm_id, out))
}

/// Connects to the host of the VM `first` names and sends it `first`, then `rest` as it
/// comes; returns what the console prints.
pub(crate) async fn relay(
    svc: &PoolHandler,
    first: hpb::ConsoleInput,
    rest: impl Stream<Item = hpb::ConsoleInput> + Send + 'static,
) -> Result<ConsoleStream, Status> {
    let addr = host_of(svc, &first.vm_id).await?;
    let ch = crate::tls::endpoint(&addr, svc.c.tls.as_ref(), None)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("host {addr}: {}", proto::error_chain(&e))))?;
    let upstream = tonic::codegen::tokio_stream::iter(vec![first]).chain(rest);
    let out = hpb::host_service_client::HostServiceClient::new(ch)
        .stream_console(upstream)
        .await?
        .into_inner();
    Ok(Box::pin(out))
}

/// The address of the host running `vm_id`.
async fn host_of(svc: &PoolHandler, vm_id: &str) -> Result<String, Status> {
    svc.c
        .read(|s| {
            let vm = s
                .vms
                .get(vm_id)
                .ok_or_else(|| Status::not_found(format!("no VM with id {vm_id}")))?;
            s.hosts
                .get(&vm.host_id)
                .map(|h| h.address.clone())
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "VM {vm_id} is not on any host; start it first"
                    ))
                })
        })
        .await?
}

/// The websocket's side of a console: spends `ticket`, checks its caller's token again (one
/// revoked since opens nothing), and opens the relay; audited as `StreamVmConsole` is.
/// Returns what the console prints and where the browser's input goes.
pub(crate) async fn open_ticket(
    svc: &PoolHandler,
    ticket: &str,
    peer: Option<std::net::SocketAddr>,
) -> Result<(ConsoleStream, tokio::sync::mpsc::Sender<hpb::ConsoleInput>), Status> {
    let t = svc.c.console_tickets.redeem(ticket).ok_or_else(|| {
        Status::permission_denied(
            "unknown, used or expired console ticket: ask for another (CreateConsoleTicket)",
        )
    })?;
    // The same checks as a gRPC call, on the request the ticket stands for.
    let mut req = tonic::Request::new(());
    if let Some(h) = t.header.as_deref().and_then(|h| h.parse().ok()) {
        req.metadata_mut().insert("authorization", h);
    }
    req.extensions_mut()
        .insert(tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: peer,
        });
    let who = svc.authorize(&req, "StreamVmConsole")?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let first = hpb::ConsoleInput {
        vm_id: t.vm_id.clone(),
        ..Default::default()
    };
    let input = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let res = relay(svc, first, input).await;
    let opened = res.as_ref().map(|_| {
        Status::ok(format!(
            "console session of VM {} (web, ticket of {})",
            t.vm_id, t.who.peer
        ))
    });
    svc.audit(&who, opened.as_ref().unwrap_or_else(|e| e));
    res.map(|out| (out, tx))
}

/// `CreateConsoleTicket`, for a caller already allowed the console: the VM must be on a
/// host now, so the browser hears why not before it opens a websocket.
pub(super) async fn ticket(
    svc: &PoolHandler,
    who: &Caller,
    header: Option<String>,
    vm_id: String,
) -> Result<pb::ConsoleTicket, Status> {
    host_of(svc, &vm_id).await?;
    let ticket = svc.c.console_tickets.issue(who, header, &vm_id)?;
    Ok(pb::ConsoleTicket {
        ticket,
        path: WEBSOCKET_PATH.to_owned(),
        expires_at: Some(proto::timestamp(
            proto::unix_ms() + TICKET_TTL.as_millis() as u64,
        )),
    })
}

/// The tickets this member issued and that are not used yet. In memory only: a ticket
/// is for the member that served the page, and lives seconds.
#[derive(Default)]
pub struct Tickets {
    open: Mutex<HashMap<String, Ticket>>,
}

struct Ticket {
    who: Caller,
    /// The caller's authorization header, checked again when the ticket is used (a token
    /// revoked meanwhile opens nothing).
    header: Option<String>,
    vm_id: String,
    expires: Instant,
}

/// What a spent ticket stood for.
pub struct Redeemed {
    pub who: Caller,
    pub header: Option<String>,
    pub vm_id: String,
}

impl Tickets {
    pub fn issue(
        &self,
        who: &Caller,
        header: Option<String>,
        vm_id: &str,
    ) -> Result<String, Status> {
        let mut open = self.open.lock().expect("tickets lock");
        let now = Instant::now();
        open.retain(|_, t| t.expires > now);
        if open.len() >= MAX_TICKETS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_TICKETS} console tickets are waiting to be used on this member; retry \
                 within {} s",
                TICKET_TTL.as_secs()
            )));
        }
        let ticket = crate::auth::hex(&rand::random::<[u8; 32]>());
        open.insert(
            ticket.clone(),
            Ticket {
                who: who.clone(),
                header,
                vm_id: vm_id.to_owned(),
                expires: now + TICKET_TTL,
            },
        );
        Ok(ticket)
    }

    /// Who the ticket was issued to, and for which VM; it is spent either way.
    pub fn redeem(&self, ticket: &str) -> Option<Redeemed> {
        let t = self.open.lock().expect("tickets lock").remove(ticket)?;
        (t.expires > Instant::now()).then_some(Redeemed {
            who: t.who,
            header: t.header,
            vm_id: t.vm_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Level;

    fn caller() -> Caller {
        Caller {
            name: "ops".into(),
            level: Level::VmOperator,
            method: "CreateConsoleTicket".into(),
            peer: "127.0.0.1:5000".into(),
        }
    }

    #[test]
    fn a_ticket_opens_once_for_its_vm_and_caller() {
        let t = Tickets::default();
        let a = t.issue(&caller(), None, "vm1").unwrap();
        let b = t.issue(&caller(), Some("Bearer x".into()), "vm2").unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        let r = t.redeem(&a).unwrap();
        assert_eq!((r.who.name.as_str(), r.vm_id.as_str()), ("ops", "vm1"));
        assert!(t.redeem(&a).is_none(), "spent");
        assert!(t.redeem("").is_none());
        assert!(t.redeem(&b[..63]).is_none());
        let r = t.redeem(&b).unwrap();
        assert_eq!(
            (r.vm_id.as_str(), r.header.as_deref()),
            ("vm2", Some("Bearer x"))
        );
    }

    #[test]
    fn expired_tickets_open_nothing_and_outstanding_ones_are_bounded() {
        let t = Tickets::default();
        let a = t.issue(&caller(), None, "vm1").unwrap();
        t.open.lock().unwrap().get_mut(&a).unwrap().expires = Instant::now();
        assert!(t.redeem(&a).is_none());
        for _ in 0..MAX_TICKETS {
            t.issue(&caller(), None, "vm1").unwrap();
        }
        let e = t.issue(&caller(), None, "vm1").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }
}
