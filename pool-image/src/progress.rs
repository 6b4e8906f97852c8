//! How far a package or disk image being prepared has got, as the web console's page
//! reads it (`GET /export/status`, JSON).

use serde::Serialize;

/// The steps of a preparation, in order; it ends `Ready` or `Failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Taking the VM snapshot that the disks are read from.
    Snapshot,
    /// Reading disk `disk` of `disks` over iSCSI.
    Reading,
    /// qemu-img making the read disk an image.
    Converting,
    /// Deleting what was taken for the purpose (the snapshot).
    Cleanup,
    Ready,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    /// The disk being worked on, counted from 1 (0 before the first).
    pub disk: u32,
    pub disks: u32,
    /// Bytes of the current disk read so far, of its `total`.
    pub read: u64,
    pub total: u64,
    /// What the current step waits on, if anything ("waiting: storaged at … unreachable").
    pub note: String,
    /// Why it failed (empty unless `Failed`).
    pub error: String,
    /// Once `Ready`: the download's file name and length.
    pub file: String,
    pub size: u64,
}

impl Progress {
    pub fn new(first: Phase, disks: u32) -> Progress {
        Progress {
            phase: first,
            disk: 0,
            disks,
            read: 0,
            total: 0,
            note: String::new(),
            error: String::new(),
            file: String::new(),
            size: 0,
        }
    }

    /// Starts disk `disk` (from 1) of `total` bytes.
    pub fn reading(&mut self, disk: u32, total: u64) {
        self.phase = Phase::Reading;
        self.disk = disk;
        self.read = 0;
        self.total = total;
    }

    pub fn fail(&mut self, error: impl Into<String>) {
        self.phase = Phase::Failed;
        self.error = error.into();
    }

    pub fn ready(&mut self, file: String, size: u64) {
        self.phase = Phase::Ready;
        self.file = file;
        self.size = size;
    }

    pub fn ended(&self) -> bool {
        matches!(self.phase, Phase::Ready | Phase::Failed)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a progress serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_the_page_expects() {
        let mut p = Progress::new(Phase::Snapshot, 2);
        assert!(!p.ended());
        p.reading(1, 4096);
        p.read = 1024;
        assert_eq!(
            p.to_json(),
            r#"{"phase":"reading","disk":1,"disks":2,"read":1024,"total":4096,"note":"","error":"","file":"","size":0}"#
        );
        p.fail("reading volume v: \"storaged\" down");
        assert!(p.ended());
        assert!(p.to_json().contains(r#""phase":"failed","#));
        assert!(
            p.to_json()
                .contains(r#""error":"reading volume v: \"storaged\" down""#)
        );
        p.ready("a.ova".into(), 10);
        assert!(p.ended() && p.to_json().contains(r#""file":"a.ova","size":10"#));
    }
}
