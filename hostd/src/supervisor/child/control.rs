//! The control socket as the VM process serves it: the daemon's connections, the
//! commands read from them, and the events (state, replies, console output, migration
//! progress) sent back on the newest one.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::Msg;
use crate::console::Console;
use crate::supervisor::frame;
use crate::supervisor::protocol::{Command, Event, VmState, event};

/// The control connection the daemon holds now, if any; every event goes through it.
/// The newest connection wins: a restarted daemon takes over from one that is gone. The
/// last state published is kept and sent to each new connection first, so a daemon that
/// connects after the VM booted still learns it did.
#[derive(Clone, Default)]
pub(super) struct Outbox(Arc<Mutex<OutboxInner>>);

#[derive(Default)]
struct OutboxInner {
    generation: u64,
    stream: Option<UnixStream>,
    state: Option<VmState>,
}

impl OutboxInner {
    fn write(&mut self, e: &Event) {
        let bytes = frame::encode(e);
        if let Some(s) = self.stream.as_mut()
            && s.write_all(&bytes).is_err()
        {
            // The daemon went away; the next one connects and gets the state again.
            self.stream = None;
        }
    }
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn send(&self, e: &Event) {
        self.lock().write(e);
    }

    pub(super) fn publish(&self, state: VmState) {
        let mut inner = self.lock();
        inner.write(&Event {
            kind: Some(event::Kind::State(state.clone())),
        });
        inner.state = Some(state);
    }

    /// Makes `stream` the connection events go to, sends it the current state, and
    /// returns its generation.
    pub(super) fn replace(&self, stream: UnixStream) -> u64 {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.stream = Some(stream);
        if let Some(state) = inner.state.clone() {
            inner.write(&Event {
                kind: Some(event::Kind::State(state)),
            });
        }
        inner.generation
    }

    /// Forgets the connection of `generation` if it is still the current one.
    pub(super) fn forget(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.generation == generation {
            inner.stream = None;
        }
    }
}

pub(super) fn accept_loop(listener: UnixListener, outbox: Outbox, tx: mpsc::Sender<Msg>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(writer) = conn.try_clone() else {
            continue;
        };
        let generation = outbox.replace(writer);
        let (outbox, tx) = (outbox.clone(), tx.clone());
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                read_commands(conn, &tx);
                outbox.forget(generation);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot serve a control connection");
        }
    }
}

/// Passes a connection's commands to the runner until it closes.
fn read_commands(mut conn: UnixStream, tx: &mpsc::Sender<Msg>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match frame::decode::<Command>(&mut buf) {
                Ok(Some(cmd)) => {
                    if tx.send(Msg::Cmd(cmd)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad control frame; dropping the connection");
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }
}

pub(super) fn forward_console(console: &Console, outbox: &Outbox) {
    let mut live = console.subscribe().live;
    loop {
        let mut data = match live.blocking_recv() {
            Ok(chunk) => chunk.to_vec(),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                format!("\r\n[hostd: {n} console chunks lost]\r\n").into_bytes()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        // Batch what else is already there into one frame.
        while data.len() < 64 * 1024 {
            match live.try_recv() {
                Ok(more) => data.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        outbox.send(&Event {
            kind: Some(event::Kind::Console(data)),
        });
    }
}
