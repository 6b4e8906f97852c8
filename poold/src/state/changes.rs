//! What applying a command changed, object by object: the pool's change feed
//! (`WatchEvents`) is made of these.
//!
//! Each kind of object lives in a [`Tracked`] map. Reading it is reading a `BTreeMap`;
//! changing it goes through methods that keep, per key, the value it had before the first
//! change since the last [`PoolState::take_events`]. Taking the events compares each
//! kept value with the current one, so an object rewritten with the same value makes no
//! event and one changed and changed back makes none either. The cost is one clone of
//! each object a command touches, never a walk of the whole state.

use std::collections::BTreeMap;
use std::ops::Deref;

use proto::coordinator as pb;
use proto::coordinator::pool_event::Object;

use super::PoolState;
use super::machine::UserRecord;

/// A map of one kind of the pool's objects by id that remembers what it looked like
/// before it was changed.
#[derive(Clone)]
pub struct Tracked<V> {
    map: BTreeMap<String, V>,
    /// The value each touched key had before its first change (`None`: absent).
    before: BTreeMap<String, Option<V>>,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Tracked {
            map: BTreeMap::new(),
            before: BTreeMap::new(),
        }
    }
}

impl<V> Deref for Tracked<V> {
    type Target = BTreeMap<String, V>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

/// Two states are equal by their objects; what was touched since the last events is not
/// part of the state.
impl<V: PartialEq> PartialEq for Tracked<V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Tracked<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.map.fmt(f)
    }
}

impl<V: Clone> FromIterator<(String, V)> for Tracked<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        Tracked {
            map: iter.into_iter().collect(),
            before: BTreeMap::new(),
        }
    }
}

impl<V: Clone> Tracked<V> {
    fn touch(&mut self, key: &str) {
        if !self.before.contains_key(key) {
            self.before
                .insert(key.to_owned(), self.map.get(key).cloned());
        }
    }

    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        self.touch(&key);
        self.map.insert(key, value)
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        if !self.map.contains_key(key) {
            return None;
        }
        self.touch(key);
        self.map.remove(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        if !self.map.contains_key(key) {
            return None;
        }
        self.touch(key);
        self.map.get_mut(key)
    }

    /// Keeps only the objects `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &V) -> bool) {
        let gone: Vec<String> = self
            .map
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Changes the objects `pick` chooses with `change`; only those count as touched.
    pub fn update_where(&mut self, pick: impl Fn(&V) -> bool, mut change: impl FnMut(&mut V)) {
        let keys: Vec<String> = self
            .map
            .iter()
            .filter(|(_, v)| pick(v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(v) = self.get_mut(&k) {
                change(v);
            }
        }
    }

    /// Forgets what was touched: the current objects are the new starting point.
    pub fn settle(&mut self) {
        self.before.clear();
    }
}

impl<V: Clone + PartialEq> Tracked<V> {
    /// The objects that differ from before the first change, by id, with whether they
    /// existed before and their value now (`None`: deleted); forgets what was touched.
    fn take_changes(&mut self) -> Vec<(String, bool, Option<&V>)> {
        let before = std::mem::take(&mut self.before);
        before
            .into_iter()
            .filter(|(k, old)| old.as_ref() != self.map.get(k))
            .map(|(k, old)| {
                let now = self.map.get(&k);
                (k, old.is_some(), now)
            })
            .collect()
    }
}

/// The feed's bookkeeping beside the tracked maps. Not part of the state: two states are
/// equal whatever their marks.
#[derive(Clone, Debug, Default)]
pub struct FeedMarks {
    /// The settings or HA settings changed since the last events.
    pub pool_touched: bool,
    /// The id of the newest audit event already in the feed (ids are fixed-width hex, so
    /// they compare as text).
    pub audit_seen: String,
}

impl PartialEq for FeedMarks {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The event kind of audit records: changes only (a listing leaves them out; the audit
/// log is read with `ListAuditEvents`), for callers who may read the audit log.
pub const AUDIT_KIND: &str = "audit";

/// What an object of one kind looks like in the feed.
pub trait FeedObject {
    /// The event kind: "vm", "host"...
    const KIND: &'static str;
    fn object(&self) -> Object;
}

macro_rules! feed_object {
    ($t:ty, $kind:literal, $variant:ident, |$v:ident| $e:expr) => {
        impl FeedObject for $t {
            const KIND: &'static str = $kind;
            fn object(&self) -> Object {
                let $v = self;
                Object::$variant($e)
            }
        }
    };
}

feed_object!(pb::Host, "host", Host, |v| v.clone());
feed_object!(pb::StorageRepository, "sr", Sr, |v| v.clone());
feed_object!(proto::storage::Volume, "volume", Volume, |v| v.clone());
feed_object!(pb::Vm, "vm", Vm, |v| v.clone());
feed_object!(pb::Template, "template", Template, |v| v.clone());
feed_object!(Box<pb::Task>, "task", Task, |v| (**v).clone());
feed_object!(pb::VmSnapshot, "vm_snapshot", VmSnapshot, |v| v.clone());
feed_object!(pb::Network, "network", Network, |v| v.clone());
feed_object!(UserRecord, "user", User, |v| v.user.clone());
feed_object!(pb::Alert, "alert", Alert, |v| v.clone());

/// The event kind of the pool's own settings.
pub const POOL_KIND: &str = "pool";

/// Appends the events of one kind; whether an object of it came or went.
fn events_of<V: FeedObject + Clone + PartialEq>(
    map: &mut Tracked<V>,
    position: u64,
    out: &mut Vec<pb::PoolEvent>,
) -> bool {
    let mut counted = false;
    for (id, existed, now) in map.take_changes() {
        counted |= existed != now.is_some();
        out.push(pb::PoolEvent {
            position,
            kind: V::KIND.into(),
            id,
            deleted: now.is_none(),
            object: now.map(FeedObject::object),
        });
    }
    counted
}

/// Every object of a kind as events at `position`, for a client starting afresh.
fn listing_of<V: FeedObject>(map: &Tracked<V>, position: u64, out: &mut Vec<pb::PoolEvent>) {
    out.extend(map.iter().map(|(id, v)| pb::PoolEvent {
        position,
        kind: V::KIND.into(),
        id: id.clone(),
        deleted: false,
        object: Some(v.object()),
    }));
}

/// The pool's settings as the feed carries them.
pub fn pool_object(s: &PoolState) -> pb::Pool {
    pb::Pool {
        id: s.pool_id.clone(),
        settings: Some(s.settings.clone()),
        ha: Some(s.ha),
        host_count: s.hosts.len() as u32,
        vm_count: s.vms.len() as u32,
        ..Default::default()
    }
}

fn pool_event(s: &PoolState, position: u64) -> pb::PoolEvent {
    pb::PoolEvent {
        position,
        kind: POOL_KIND.into(),
        id: s.pool_id.clone(),
        deleted: false,
        object: Some(Object::Pool(pool_object(s))),
    }
}

impl PoolState {
    /// The changes since the last call, as events at `position` (the log index just
    /// applied): objects created or changed carry their new value, deleted ones none.
    /// The pool's own event comes first when its settings, HA settings or counts changed.
    pub fn take_events(&mut self, position: u64) -> Vec<pb::PoolEvent> {
        let mut out = Vec::new();
        let mut pool_changed = std::mem::take(&mut self.marks.pool_touched);
        // The pool's event carries the host and VM counts.
        pool_changed |= events_of(&mut self.hosts, position, &mut out);
        events_of(&mut self.srs, position, &mut out);
        events_of(&mut self.volumes, position, &mut out);
        events_of(&mut self.templates, position, &mut out);
        pool_changed |= events_of(&mut self.vms, position, &mut out);
        events_of(&mut self.vm_snapshots, position, &mut out);
        events_of(&mut self.networks, position, &mut out);
        events_of(&mut self.users, position, &mut out);
        events_of(&mut self.tasks, position, &mut out);
        events_of(&mut self.alerts, position, &mut out);
        let new_audit = self
            .audit
            .iter()
            .rev()
            .take_while(|a| a.id > self.marks.audit_seen)
            .count();
        for a in self.audit.range(self.audit.len() - new_audit..) {
            out.push(pb::PoolEvent {
                position,
                kind: AUDIT_KIND.into(),
                id: a.id.clone(),
                deleted: false,
                object: Some(Object::Audit(a.clone())),
            });
        }
        self.settle_audit();
        if pool_changed {
            out.insert(0, pool_event(self, position));
        }
        out
    }

    fn settle_audit(&mut self) {
        if let Some(last) = self.audit.back() {
            self.marks.audit_seen.clone_from(&last.id);
        }
    }

    /// Every object now, as events at the applied index: what a client starting afresh
    /// (or one whose position was compacted away) loads before the changes that follow.
    /// Users are left out unless `with_users`.
    pub fn listing(&self, with_users: bool) -> Vec<pb::PoolEvent> {
        let at = self.applied_index;
        let mut out = vec![pool_event(self, at)];
        listing_of(&self.hosts, at, &mut out);
        listing_of(&self.srs, at, &mut out);
        listing_of(&self.volumes, at, &mut out);
        listing_of(&self.templates, at, &mut out);
        listing_of(&self.vms, at, &mut out);
        listing_of(&self.vm_snapshots, at, &mut out);
        listing_of(&self.networks, at, &mut out);
        if with_users {
            listing_of(&self.users, at, &mut out);
        }
        listing_of(&self.tasks, at, &mut out);
        listing_of(&self.alerts, at, &mut out);
        out
    }

    /// Forgets what was touched (after building or loading a whole state).
    pub fn settle(&mut self) {
        self.hosts.settle();
        self.srs.settle();
        self.volumes.settle();
        self.templates.settle();
        self.vms.settle();
        self.vm_snapshots.settle();
        self.networks.settle();
        self.users.settle();
        self.tasks.settle();
        self.alerts.settle();
        self.marks.pool_touched = false;
        self.settle_audit();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::command::{ObjectId, Op};
    use crate::state::machine::tests::{cmd, create_vm, join, report, spec};

    /// (kind, id, deleted) of each event, all at `position`.
    fn seen(events: &[pb::PoolEvent], position: u64) -> Vec<(String, String, bool)> {
        assert!(events.iter().all(|e| e.position == position));
        events
            .iter()
            .map(|e| (e.kind.clone(), e.id.clone(), e.deleted))
            .collect()
    }

    fn ev(kind: &str, id: &str) -> (String, String, bool) {
        (kind.into(), id.into(), false)
    }

    #[test]
    fn each_command_yields_the_objects_it_changed_and_nothing_else() {
        let mut s = PoolState::new("p", BTreeMap::new());
        assert!(s.take_events(1).is_empty());
        s.apply(2, &cmd("j", 1, join("h1", "10.0.0.1:1")));
        let events = s.take_events(2);
        // A new host changes the pool's count: the pool's event first.
        assert_eq!(
            seen(&events, 2),
            [ev("pool", "p"), ev("host", "h1"), ev("task", "task-j")]
        );
        let Some(Object::Pool(pool)) = &events[0].object else {
            panic!("{:?}", events[0]);
        };
        assert_eq!(pool.host_count, 1);
        let Some(Object::Host(h)) = &events[1].object else {
            panic!("{:?}", events[1]);
        };
        assert_eq!(h.address, "10.0.0.1:1");

        s.apply(3, &cmd("r", 2, report("h1", 8, 4)));
        assert_eq!(
            seen(&s.take_events(3), 3),
            [ev("host", "h1"), ev("task", "task-r")]
        );

        // A VM placed on h1 changes h1's allocation too.
        s.apply(4, &cmd("c", 3, create_vm("vm1", spec("a", 1, 1), "h1")));
        let events = s.take_events(4);
        assert_eq!(
            seen(&events, 4),
            [
                ev("pool", "p"),
                ev("host", "h1"),
                ev("vm", "vm1"),
                ev("task", "task-c")
            ]
        );
        let Some(Object::Host(h)) = &events[1].object else {
            panic!("{:?}", events[1]);
        };
        assert_eq!(h.vm_ids, ["vm1"]);

        // A retried request changes nothing: no event.
        s.apply(5, &cmd("c", 4, create_vm("vm1", spec("a", 1, 1), "h1")));
        assert!(s.take_events(5).is_empty());
        // Neither does a refused one (an unknown VM).
        let refused = s.apply(
            6,
            &cmd("d0", 5, Op::DestroyVm(ObjectId { id: "nope".into() })),
        );
        assert_ne!(refused.code, 0);
        assert!(s.take_events(6).is_empty());

        s.apply(
            7,
            &cmd("d", 6, Op::DestroyVm(ObjectId { id: "vm1".into() })),
        );
        let events = s.take_events(7);
        let vm = events
            .iter()
            .find(|e| e.kind == "vm")
            .expect("the VM's event");
        assert!(vm.deleted && vm.object.is_none(), "{vm:?}");
        assert_eq!(events[0].kind, "pool", "the VM count changed");
        assert!(s.take_events(8).is_empty(), "taken once");
    }

    #[test]
    fn each_new_audit_record_is_an_event_once_and_never_in_a_listing() {
        let mut s = PoolState::new("p", BTreeMap::new());
        let mut c = cmd("j", 1, join("h1", "10.0.0.1:1"));
        c.method = "JoinHost".into();
        c.requested_by = "admin".into();
        s.apply(2, &c);
        let events = s.take_events(2);
        let audit: Vec<_> = events.iter().filter(|e| e.kind == AUDIT_KIND).collect();
        assert_eq!(audit.len(), 1, "{events:?}");
        let Some(Object::Audit(a)) = &audit[0].object else {
            panic!("{:?}", audit[0]);
        };
        assert_eq!(
            (a.method.as_str(), a.user_name.as_str()),
            ("JoinHost", "admin")
        );
        // A refusal recorded by the services is one too; nothing is repeated.
        s.apply(
            3,
            &cmd(
                "a",
                2,
                Op::Audit(pb::AuditEvent {
                    method: "DeleteVm".into(),
                    result: "PermissionDenied".into(),
                    ..Default::default()
                }),
            ),
        );
        let events = s.take_events(3);
        let audit: Vec<_> = events.iter().filter(|e| e.kind == AUDIT_KIND).collect();
        assert_eq!(audit.len(), 1, "{events:?}");
        assert!(audit[0].id > a.id);
        assert!(s.take_events(4).is_empty());
        assert!(s.listing(true).iter().all(|e| e.kind != AUDIT_KIND));
        // A state read from a snapshot does not send the old records again.
        let mut back = crate::state::snapshot::decode(&crate::state::snapshot::encode(&s)).unwrap();
        assert!(back.take_events(5).is_empty());
    }

    #[test]
    fn a_value_put_back_or_rewritten_the_same_is_no_change() {
        let mut m: Tracked<u32> = [("a".to_string(), 1)].into_iter().collect();
        m.insert("a".into(), 1);
        *m.get_mut("a").unwrap() = 5;
        *m.get_mut("a").unwrap() = 1;
        m.insert("b".into(), 2);
        m.remove("b");
        assert!(m.remove("nothing").is_none());
        assert!(m.take_changes().is_empty());
        m.update_where(|v| *v == 1, |v| *v = 3);
        m.retain(|_, v| *v != 3);
        assert_eq!(m.take_changes(), [("a".to_string(), true, None)]);
    }

    #[test]
    fn a_state_read_from_a_snapshot_starts_with_nothing_touched_and_lists_everything() {
        let mut s = PoolState::new("p", BTreeMap::new());
        s.apply(2, &cmd("j", 1, join("h1", "10.0.0.1:1")));
        s.apply(3, &cmd("c", 2, create_vm("vm1", spec("a", 1, 1), "")));
        let mut back = crate::state::snapshot::decode(&crate::state::snapshot::encode(&s)).unwrap();
        assert!(back.take_events(4).is_empty());
        let listing = back.listing(false);
        assert_eq!(
            seen(&listing, 3),
            [
                ev("pool", "p"),
                ev("host", "h1"),
                ev("vm", "vm1"),
                ev("task", "task-c"),
                ev("task", "task-j")
            ]
        );
    }
}
