//! A VM's serial console, relayed between the caller and the host that runs the VM.

use std::pin::Pin;
use std::time::Duration;

use proto::host as hpb;
use tonic::Status;
use tonic::codegen::tokio_stream::{Stream, StreamExt};

use super::PoolHandler;

/// What the VM's console prints, as the host sends it.
pub type ConsoleStream =
    Pin<Box<dyn Stream<Item = Result<hpb::ConsoleOutput, Status>> + Send + 'static>>;

/// Connects to the VM's host and relays: the caller's first message names the VM, the
/// rest is its input. Returns the VM's id with the stream.
pub(super) async fn stream(
    svc: &PoolHandler,
    mut input: tonic::Streaming<hpb::ConsoleInput>,
) -> Result<(String, ConsoleStream), Status> {
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the first message must name the VM"))?;
    let vm_id = first.vm_id.clone();
    let addr = svc
        .c
        .read(|s| {
            let vm = s
                .vms
                .get(&vm_id)
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
        .await??;
    let ch = crate::tls::endpoint(&addr, svc.c.tls.as_ref(), None)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("host {addr}: {}", proto::error_chain(&e))))?;
    // The host's stream: the first message, then the client's input as it comes.
    let rest = input.take_while(|m| m.is_ok()).filter_map(|m| m.ok());
    let upstream = tonic::codegen::tokio_stream::iter(vec![first]).chain(rest);
    let out = hpb::host_service_client::HostServiceClient::new(ch)
        .stream_console(upstream)
        .await?
        .into_inner();
    Ok((vm_id, Box::pin(out)))
}
