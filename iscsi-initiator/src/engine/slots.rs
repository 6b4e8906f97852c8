//! The tasks in flight on one connection, by Initiator Task Tag, and who waits for each.
//!
//! An ITT is a slot index and that slot's generation, so a late PDU for a finished task
//! never matches the task that reuses its slot.

use std::time::Duration;

use tokio::time::Instant;

use super::Engine;
use crate::journal::Entry;
use crate::task::{Command, Op, Request};

/// Who waits for a task.
#[derive(Debug)]
pub(super) enum Owner {
    Caller(Request),
    /// Our ABORT TASK of a command that timed out.
    Abort {
        victim: u32,
    },
    /// Our NOP-Out ping of an idle connection.
    KeepAlive,
    /// Our Logout Request.
    Logout,
    /// A journaled write sent again on a new connection.
    Replay {
        entry: Entry,
        cmd: Command,
        attempts: u32,
    },
    /// Our own SYNCHRONIZE CACHE, when the journal grows past its limit.
    Flush {
        cmd: Command,
    },
}

#[derive(Debug)]
pub(super) struct Task {
    pub(super) itt: u32,
    pub(super) owner: Owner,
    pub(super) cmd_sn: u32,
    pub(super) deadline: Instant,
    /// Data-In bytes placed so far.
    pub(super) received: usize,
    pub(super) next_data_sn: u32,
    /// Our ABORT TASK for this command, once it timed out.
    pub(super) aborting: Option<u32>,
    /// For a SYNCHRONIZE CACHE: the journal mark it covers.
    pub(super) flush_mark: u64,
}

impl Task {
    pub(super) fn command(&mut self) -> Option<&mut Command> {
        match &mut self.owner {
            Owner::Caller(Request {
                op: Op::Scsi(c), ..
            })
            | Owner::Replay { cmd: c, .. }
            | Owner::Flush { cmd: c } => Some(c),
            _ => None,
        }
    }

    /// A SCSI command (of a caller or our own), which holds a CmdSN and a queue slot.
    pub(super) fn is_scsi(&self) -> bool {
        match &self.owner {
            Owner::Caller(r) => r.is_scsi(),
            Owner::Replay { .. } | Owner::Flush { .. } => true,
            _ => false,
        }
    }
}

/// Tasks by ITT: the low 16 bits index a slot, the next 15 are the slot's generation.
#[derive(Debug, Default)]
pub(super) struct Slots {
    slots: Vec<(u16, Option<Task>)>,
    free: Vec<u16>,
    live: usize,
}

impl Slots {
    pub(super) fn insert(&mut self, make: impl FnOnce(u32) -> Task) -> Option<u32> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() > usize::from(u16::MAX) {
                    return None;
                }
                self.slots.push((0, None));
                (self.slots.len() - 1) as u16
            }
        };
        let slot = &mut self.slots[usize::from(idx)];
        slot.0 = (slot.0 + 1) & 0x7fff;
        let itt = (u32::from(slot.0) << 16) | u32::from(idx);
        slot.1 = Some(make(itt));
        self.live += 1;
        Some(itt)
    }

    pub(super) fn full(&self) -> bool {
        self.free.is_empty() && self.slots.len() > usize::from(u16::MAX)
    }

    pub(super) fn get_mut(&mut self, itt: u32) -> Option<&mut Task> {
        let slot = self.slots.get_mut((itt & 0xffff) as usize)?;
        if u32::from(slot.0) != itt >> 16 {
            return None;
        }
        slot.1.as_mut()
    }

    pub(super) fn remove(&mut self, itt: u32) -> Option<Task> {
        let idx = (itt & 0xffff) as usize;
        let slot = self.slots.get_mut(idx)?;
        if u32::from(slot.0) != itt >> 16 {
            return None;
        }
        let t = slot.1.take()?;
        self.free.push(idx as u16);
        self.live -= 1;
        Some(t)
    }

    pub(super) fn drain(&mut self) -> Vec<Task> {
        let mut out = Vec::with_capacity(self.live);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(t) = slot.1.take() {
                out.push(t);
                self.free.push(i as u16);
            }
        }
        self.live = 0;
        out
    }

    pub(super) fn itts(&self) -> impl Iterator<Item = (u32, &Task)> {
        self.slots
            .iter()
            .filter_map(|(_, t)| t.as_ref().map(|t| (t.itt, t)))
    }
}

impl Engine<'_> {
    /// Registers a task. Callers check [`Slots::full`] first.
    pub(super) fn new_task(&mut self, owner: Owner, cmd_sn: u32, limit: Duration) -> u32 {
        let deadline = Instant::now() + limit;
        self.slots
            .insert(|itt| Task {
                itt,
                owner,
                cmd_sn,
                deadline,
                received: 0,
                next_data_sn: 0,
                aborting: None,
                flush_mark: 0,
            })
            .expect("callers check for a free slot")
    }
}

#[cfg(test)]
mod tests {
    use iscsi_pdu::bhs::RESERVED_TAG;

    use super::*;

    #[test]
    fn slots_tag_generations_so_stale_tags_never_match() {
        let mut s = Slots::default();
        let mk = |itt| Task {
            itt,
            owner: Owner::KeepAlive,
            cmd_sn: 0,
            deadline: Instant::now(),
            received: 0,
            next_data_sn: 0,
            aborting: None,
            flush_mark: 0,
        };
        let a = s.insert(mk).unwrap();
        assert!(s.remove(a).is_some());
        let b = s.insert(mk).unwrap();
        // Same slot, new generation.
        assert_eq!(a & 0xffff, b & 0xffff);
        assert_ne!(a, b);
        assert!(s.get_mut(a).is_none());
        assert!(s.get_mut(b).is_some());
        assert_ne!(b, RESERVED_TAG);
        assert_eq!(s.drain().len(), 1);
        assert_eq!(s.live, 0);
    }
}
