//! `poolctl vm-console`: a VM's serial console on the terminal, both ways.

use proto::host as hpb;

use crate::ctl::{Ctl, explain};

/// Streams a VM's console to stdout and stdin to the VM until Ctrl-] or the stream ends.
pub async fn console(ctl: &mut Ctl, vm_id: String) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, rx) = tokio::sync::mpsc::channel::<hpb::ConsoleInput>(16);
    tx.send(hpb::ConsoleInput {
        vm_id,
        data: Vec::new(),
        live_only: false,
    })
    .await?;
    // A console stream cannot be replayed on another member once it has started, so it
    // goes to one member (the leader found at start), without the client's retries.
    let mut p = ctl.client.current_stub();
    let mut outputs = p
        .stream_vm_console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(explain)?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            msg = outputs.message() => match msg.map_err(explain)? {
                Some(out) => {
                    stdout.write_all(&out.data).await?;
                    stdout.flush().await?;
                }
                None => return Ok(()),
            },
            n = stdin.read(&mut buf) => {
                let n = n?;
                if n == 0 || buf[..n].contains(&0x1d) {
                    return Ok(());
                }
                let _ = tx.send(hpb::ConsoleInput { vm_id: String::new(), data: buf[..n].to_vec(), live_only: false }).await;
            }
        }
    }
}
