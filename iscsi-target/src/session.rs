//! Sessions: what login negotiated, who is on the other end, the tasks in flight, and the
//! handles the management API uses to drop a session and wait until it is gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

/// The operational parameters of a session, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest data segment we accept (our declared MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
    /// The largest data segment we may send (the initiator's MaxRecvDataSegmentLength).
    pub max_xmit_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
}

impl Default for SessionParams {
    /// The RFC 7143 defaults, which hold for every key never negotiated.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 8192,
            max_xmit_data_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// Normal sessions reach LUNs; discovery sessions only ask SendTargets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// A task the target is running for a session: enough to abort it and wait for it.
#[derive(Debug)]
pub struct TaskEntry {
    pub lun: u16,
    /// Set by ABORT TASK and friends: the task's response is not sent.
    pub aborted: AtomicBool,
    /// Becomes true when the task has finished touching the device.
    pub done: watch::Sender<bool>,
}

/// A logged-in session, as the server and the management API see it.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub tsih: u16,
    pub isid: [u8; 6],
    pub initiator: String,
    pub target: String,
    pub peer: SocketAddr,
    pub since: SystemTime,
    /// The initiator port name, `iqn,i,0x<isid>`: the I_T nexus for reservations.
    pub nexus: String,
    /// Send `true` to make the session's connection close.
    pub kill: watch::Sender<bool>,
    /// Becomes true once the connection is closed and every task has finished.
    pub closed: watch::Sender<bool>,
    /// Tasks in flight by initiator task tag.
    pub tasks: Mutex<HashMap<u32, Arc<TaskEntry>>>,
    /// The connection's socket, shut down by [`SessionHandle::request_close`] so a
    /// blocked read ends at once.
    socket: Mutex<Option<std::net::TcpStream>>,
}

impl SessionHandle {
    pub fn new(
        id: u64,
        tsih: u16,
        isid: [u8; 6],
        initiator: String,
        target: String,
        peer: SocketAddr,
    ) -> Self {
        let nexus = initiator_port(&initiator, &isid);
        Self {
            id,
            tsih,
            isid,
            initiator,
            target,
            peer,
            since: SystemTime::now(),
            nexus,
            kill: watch::channel(false).0,
            closed: watch::channel(false).0,
            tasks: Mutex::new(HashMap::new()),
            socket: Mutex::new(None),
        }
    }

    /// Gives the session the socket `request_close` shuts down.
    pub(crate) fn attach_socket(&self, s: std::net::TcpStream) {
        let closing = *self.kill.borrow();
        if closing {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        *self.socket.lock().expect("socket lock poisoned") = Some(s);
    }

    /// Asks the connection to close; returns at once.
    pub fn request_close(&self) {
        self.kill.send_replace(true);
        if let Some(s) = &*self.socket.lock().expect("socket lock poisoned") {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until the connection is closed and its tasks are finished.
    pub async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        // The sender lives in `self`, so the channel stays open while we wait.
        let _ = rx.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Marks the session's tasks on `lun` (all LUNs with `None`) aborted and returns them.
    pub fn abort_tasks(&self, lun: Option<u16>) -> Vec<Arc<TaskEntry>> {
        let tasks = self.tasks.lock().expect("task map poisoned");
        tasks
            .values()
            .filter(|t| lun.is_none_or(|l| l == t.lun))
            .map(|t| {
                t.aborted.store(true, Ordering::SeqCst);
                t.clone()
            })
            .collect()
    }
}

/// Waits until every task given has finished.
pub async fn wait_tasks(tasks: Vec<Arc<TaskEntry>>) {
    for t in tasks {
        let mut rx = t.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// `iqn,i,0x<isid>`: the SCSI initiator port name of an iSCSI initiator (RFC 7143 §4.4.2).
pub fn initiator_port(initiator: &str, isid: &[u8; 6]) -> String {
    let mut s = format!("{initiator},i,0x");
    for b in isid {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// What `TargetServer::sessions` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub target: String,
    pub initiator: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub peer: SocketAddr,
    pub since: SystemTime,
}

impl From<&SessionHandle> for SessionInfo {
    fn from(s: &SessionHandle) -> Self {
        Self {
            target: s.target.clone(),
            initiator: s.initiator.clone(),
            isid: s.isid,
            tsih: s.tsih,
            peer: s.peer,
            since: s.since,
        }
    }
}
