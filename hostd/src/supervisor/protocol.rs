//! Messages of the control channel between `hostd` and a VM's process. Commands go to the
//! VM process, each answered by a [`Reply`] with the same id; the VM process also sends
//! [`VmState`] changes and console output unasked.
//!
//! Defined here rather than in `proto/`: this channel never leaves the host and both ends
//! are this crate, so it may change with it. It reuses `proto::host` messages where they
//! fit (the VM's configuration, its metrics).

use proto::host::{IscsiDisk, PowerState, StopReason, VmConfig, VmMetrics};

/// What the VM process is started with, in `vm.pb` in its directory.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<VmConfig>,
    /// The iSCSI name to log in to targets with.
    #[prost(string, tag = "3")]
    pub initiator_iqn: String,
    /// Set when the VM arrives by live migration instead of booting.
    #[prost(message, optional, tag = "4")]
    pub incoming: Option<IncomingRecord>,
    /// Set when the VM starts from a saved state in this volume instead of booting.
    #[prost(message, optional, tag = "5")]
    pub restore_from: Option<IscsiDisk>,
    /// This host's busy-poll ceiling for interfaces whose config gives none (hostd's
    /// `vif_busy_poll_us`); absent: the VMM's own.
    #[prost(uint32, optional, tag = "6")]
    pub vif_busy_poll_us: Option<u32>,
}

/// What an incoming VM's process waits for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IncomingRecord {
    /// The source must present this token.
    #[prost(string, tag = "1")]
    pub token: String,
    /// The address to listen on (the port is chosen by the kernel).
    #[prost(string, tag = "2")]
    pub listen_ip: String,
    /// How long to wait for the source before giving up; 0: ten minutes.
    #[prost(uint32, tag = "3")]
    pub wait_seconds: u32,
    /// The only host whose certificate may send the VM.
    #[prost(string, tag = "4")]
    pub source_host: String,
    /// The host's TLS directory, read when the wait starts.
    #[prost(string, tag = "5")]
    pub tls_dir: String,
}

/// Send the VM to another host (see `proto::host::StartMigrationSendRequest`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MigrateSend {
    #[prost(string, tag = "1")]
    pub migration_id: String,
    #[prost(string, tag = "2")]
    pub destination: String,
    #[prost(string, tag = "3")]
    pub token: String,
    #[prost(uint32, tag = "4")]
    pub downtime_budget_ms: u32,
    #[prost(uint32, tag = "5")]
    pub max_rounds: u32,
    #[prost(uint32, tag = "6")]
    pub timeout_seconds: u32,
    #[prost(bool, tag = "7")]
    pub auto_converge: bool,
    #[prost(uint64, tag = "8")]
    pub bandwidth_limit_bytes_per_second: u64,
    /// The destination host: its certificate must name it.
    #[prost(string, tag = "9")]
    pub destination_host: String,
    /// The host's TLS directory, read when the migration starts.
    #[prost(string, tag = "10")]
    pub tls_dir: String,
    /// The newest stream version the destination reads (0: it did not say).
    #[prost(uint32, tag = "11")]
    pub destination_stream_version: u32,
}

/// Save the VM's memory and device state into a volume (see
/// `proto::host::SaveVmRequest`); answered once the state is durable, with `saved`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Save {
    #[prost(message, optional, tag = "1")]
    pub state_volume: Option<IscsiDisk>,
    /// Run on afterwards; otherwise the VM stops (its last stop: suspended).
    #[prost(bool, tag = "2")]
    pub resume: bool,
}

/// What a save did.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Saved {
    #[prost(uint32, tag = "1")]
    pub pause_ms: u32,
    /// The stream's bytes, header not counted.
    #[prost(uint64, tag = "2")]
    pub bytes_written: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Polite {
    /// Stop (or reset) at once instead of asking the guest.
    #[prost(bool, tag = "1")]
    pub force: bool,
    /// How long the guest may take before it is forced.
    #[prost(uint32, tag = "2")]
    pub timeout_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "command::Op", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12")]
    pub op: Option<command::Op>,
}

pub mod command {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Op {
        #[prost(message, tag = "2")]
        Pause(super::Empty),
        #[prost(message, tag = "3")]
        Resume(super::Empty),
        #[prost(message, tag = "4")]
        Reboot(super::Polite),
        #[prost(message, tag = "5")]
        Shutdown(super::Polite),
        #[prost(message, tag = "6")]
        Status(super::Empty),
        #[prost(message, tag = "7")]
        Metrics(super::Empty),
        #[prost(bytes, tag = "8")]
        ConsoleInput(Vec<u8>),
        /// Stop the VM at once (force stop).
        #[prost(message, tag = "9")]
        Stop(super::Empty),
        /// Start sending the VM to another host; progress comes as `Migration` events.
        #[prost(message, tag = "10")]
        MigrateSend(super::MigrateSend),
        /// Cancel the migration under way (refused once the switchover is committed).
        #[prost(message, tag = "11")]
        CancelMigration(super::Empty),
        /// Save the VM's state into a volume, then stop or run on.
        #[prost(message, tag = "12")]
        Save(super::Save),
    }
}

/// Where the VM is now. `power` and `last_stop` hold `proto::host` enum values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmState {
    #[prost(enumeration = "PowerState", tag = "1")]
    pub power: i32,
    #[prost(enumeration = "StopReason", tag = "2")]
    pub last_stop: i32,
    #[prost(string, tag = "3")]
    pub detail: String,
    /// Boots so far (1 after the first; a guest reset adds one).
    #[prost(uint32, tag = "4")]
    pub boots: u32,
    #[prost(uint64, tag = "5")]
    pub started_at_unix_ms: u64,
    /// Set on the last state a VM process sends before it exits.
    #[prost(bool, tag = "6")]
    pub last: bool,
    /// The VM process.
    #[prost(uint32, tag = "7")]
    pub pid: u32,
    /// An incoming VM's migration listener, host:port.
    #[prost(string, tag = "8")]
    pub migration_address: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Empty on success.
    #[prost(string, tag = "2")]
    pub error: String,
    #[prost(message, optional, tag = "3")]
    pub state: Option<VmState>,
    #[prost(message, optional, tag = "4")]
    pub metrics: Option<VmMetrics>,
    /// The answer to a Save.
    #[prost(message, optional, tag = "5")]
    pub saved: Option<Saved>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(oneof = "event::Kind", tags = "1, 2, 3, 4")]
    pub kind: Option<event::Kind>,
}

pub mod event {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Reply(super::Reply),
        #[prost(message, tag = "2")]
        State(super::VmState),
        #[prost(bytes, tag = "3")]
        Console(Vec<u8>),
        #[prost(message, tag = "4")]
        Migration(proto::host::MigrationProgress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn events_round_trip_with_embedded_proto_messages() {
        let e = Event {
            kind: Some(event::Kind::Reply(Reply {
                id: 9,
                error: String::new(),
                state: Some(VmState {
                    power: PowerState::Paused as i32,
                    last_stop: StopReason::GuestReset as i32,
                    detail: "x".into(),
                    boots: 2,
                    started_at_unix_ms: 1,
                    last: false,
                    pid: 42,
                    migration_address: String::new(),
                }),
                metrics: Some(VmMetrics {
                    vm_id: "vm".into(),
                    vcpu_time_ns: 5,
                    ..Default::default()
                }),
                saved: Some(Saved {
                    pause_ms: 3,
                    bytes_written: 4,
                }),
            })),
        };
        assert_eq!(Event::decode(e.encode_to_vec().as_slice()).unwrap(), e);
    }
}
