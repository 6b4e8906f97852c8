//! Test doubles for job unit tests: a ledger that applies commands to an in-memory state
//! (no Raft), and storaged / hostd doubles that record the calls they get.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proto::coordinator as pb;
use proto::host as hpb;
use proto::storage as spb;
use tonic::Status;
use tonic::codegen::tokio_stream;

use super::{Env, Ledger};
use crate::backend::{HostOps, ProgressStream, StorageOps};
use crate::state::PoolState;
use crate::state::command::*;

pub struct MemLedger {
    pub state: Mutex<PoolState>,
    next: Mutex<u64>,
    /// The proposer's clock commands are stamped with; unset: 1000 + the command's index.
    pub clock_ms: Mutex<Option<u64>>,
}

#[tonic::async_trait]
impl Ledger for MemLedger {
    fn view(&self, f: &mut dyn FnMut(&PoolState)) {
        f(&self.state.lock().unwrap())
    }

    async fn commit(&self, request_id: &str, op: Op) -> Result<CommandResult, Status> {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        let cmd = Command {
            request_id: request_id.to_owned(),
            at_ms: self.clock_ms.lock().unwrap().unwrap_or(1_000 + *n),
            task_id: format!("task-{n}"),
            op: Some(op),
            ..Default::default()
        };
        Ok(self.state.lock().unwrap().apply(*n, &cmd))
    }
}

#[derive(Default)]
pub struct FakeStorage {
    calls: Mutex<Vec<String>>,
    /// export id → (volume id, grants)
    exports: Mutex<BTreeMap<String, (String, Vec<String>)>>,
    fail: Mutex<Option<Status>>,
    /// What PoolUsage answers as free bytes.
    free: Mutex<u64>,
}

impl FakeStorage {
    pub fn set_free(&self, bytes: u64) {
        *self.free.lock().unwrap() = bytes;
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn position(&self, call: &str) -> Option<usize> {
        position(&self.calls(), call)
    }

    pub fn grant_now(&self, export: &str, iqn: &str) {
        let mut e = self.exports.lock().unwrap();
        let vol = export.trim_start_matches("e-").to_owned();
        e.entry(export.to_owned())
            .or_insert((vol, vec![]))
            .1
            .push(iqn.to_owned());
    }

    pub fn fail_with(&self, s: Status) {
        *self.fail.lock().unwrap() = Some(s);
    }

    fn call(&self, c: String) -> Result<(), Status> {
        self.calls.lock().unwrap().push(c);
        match self.fail.lock().unwrap().clone() {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }

    fn export(&self, id: &str, vol: &str, grants: &[String]) -> spb::Export {
        spb::Export {
            id: id.into(),
            volume_id: vol.into(),
            target_iqn: format!("iqn.target:{vol}"),
            lun: 0,
            portals: vec!["st:3260".into()],
            grants: grants
                .iter()
                .map(|g| spb::AccessGrant {
                    export_id: id.into(),
                    initiator_iqn: g.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

pub fn position(calls: &[String], call: &str) -> Option<usize> {
    calls.iter().position(|c| c == call)
}

fn vol(id: &str) -> spb::Volume {
    spb::Volume {
        id: id.into(),
        pool_id: "tp1".into(),
        name: id.into(),
        kind: spb::VolumeKind::Volume as i32,
        virtual_size_bytes: 1 << 30,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl StorageOps for FakeStorage {
    async fn create_pool(
        &self,
        _a: &str,
        r: spb::CreatePoolRequest,
    ) -> Result<spb::ThinPool, Status> {
        self.call(format!("create_pool:{}", r.name))?;
        Ok(spb::ThinPool {
            id: "tp1".into(),
            ..Default::default()
        })
    }
    async fn list_pools(&self, _a: &str) -> Result<Vec<spb::ThinPool>, Status> {
        self.call("list_pools".into())?;
        Ok(vec![])
    }
    async fn pool_usage(&self, _a: &str, _p: &str) -> Result<spb::PoolUsage, Status> {
        self.call("usage".into())?;
        Ok(spb::PoolUsage {
            free_bytes: *self.free.lock().unwrap(),
            ..Default::default()
        })
    }
    async fn create_volume(
        &self,
        _a: &str,
        r: spb::CreateVolumeRequest,
    ) -> Result<spb::Volume, Status> {
        self.call(format!("create_volume:{}", r.name))?;
        Ok(spb::Volume {
            labels: r.labels,
            virtual_size_bytes: r.virtual_size_bytes,
            ..vol(&format!("v-{}", r.name))
        })
    }
    async fn get_volume(&self, _a: &str, id: &str) -> Result<spb::Volume, Status> {
        self.call(format!("get_volume:{id}"))?;
        Ok(vol(id))
    }
    async fn list_volumes(&self, _a: &str, _p: &str) -> Result<Vec<spb::Volume>, Status> {
        self.call("list_volumes".into())?;
        Ok(vec![])
    }
    async fn resize_volume(
        &self,
        _a: &str,
        r: spb::ResizeVolumeRequest,
    ) -> Result<spb::Volume, Status> {
        self.call(format!("resize:{}", r.volume_id))?;
        Ok(vol(&r.volume_id))
    }
    async fn delete_volume(&self, _a: &str, id: &str, _f: bool) -> Result<(), Status> {
        self.call(format!("delete:{id}"))
    }
    async fn snapshot(
        &self,
        _a: &str,
        r: spb::CreateSnapshotRequest,
    ) -> Result<spb::Volume, Status> {
        self.call(format!("snapshot:{}", r.volume_id))?;
        Ok(spb::Volume {
            kind: spb::VolumeKind::Snapshot as i32,
            origin_id: r.volume_id.clone(),
            labels: r.labels,
            // By name: two snapshots of a volume are two volumes.
            ..vol(&format!("snap-{}", r.name))
        })
    }
    async fn clone_volume(
        &self,
        _a: &str,
        r: spb::CloneVolumeRequest,
    ) -> Result<spb::Volume, Status> {
        self.call(format!("clone:{}", r.source_id))?;
        Ok(spb::Volume {
            kind: spb::VolumeKind::Clone as i32,
            labels: r.labels,
            ..vol(&format!("clone-{}", r.source_id))
        })
    }
    async fn revert(&self, _a: &str, v: &str, s: &str) -> Result<spb::Volume, Status> {
        self.call(format!("revert:{v}:{s}"))?;
        Ok(vol(v))
    }
    async fn create_export(&self, _a: &str, volume_id: &str) -> Result<spb::Export, Status> {
        self.call(format!("export:{volume_id}"))?;
        let id = format!("e-{volume_id}");
        self.exports
            .lock()
            .unwrap()
            .insert(id.clone(), (volume_id.into(), vec![]));
        Ok(self.export(&id, volume_id, &[]))
    }
    async fn list_exports(&self, _a: &str, volume_id: &str) -> Result<Vec<spb::Export>, Status> {
        self.call(format!("list_exports:{volume_id}"))?;
        Ok(self
            .exports
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (v, _))| volume_id.is_empty() || v == volume_id)
            .map(|(id, (v, g))| self.export(id, v, g))
            .collect())
    }
    async fn grant(
        &self,
        _a: &str,
        export_id: &str,
        chap: &crate::chap::Secrets,
    ) -> Result<(), Status> {
        let iqn = chap.initiator.user.as_str();
        self.call(format!("grant:{export_id}:{iqn}"))?;
        let mut e = self.exports.lock().unwrap();
        let g = &mut e
            .get_mut(export_id)
            .ok_or_else(|| Status::not_found("no export"))?
            .1;
        if !g.iter().any(|x| x == iqn) {
            g.push(iqn.into());
        }
        Ok(())
    }
    async fn revoke(&self, _a: &str, export_id: &str, iqn: &str) -> Result<u32, Status> {
        self.call(format!("revoke:{export_id}:{iqn}"))?;
        let mut e = self.exports.lock().unwrap();
        let g = &mut e
            .get_mut(export_id)
            .ok_or_else(|| Status::not_found("no export"))?
            .1;
        let before = g.len();
        g.retain(|x| x != iqn);
        if g.len() == before {
            return Err(Status::not_found("no grant"));
        }
        Ok(1)
    }
    async fn changed_chunks(
        &self,
        _a: &str,
        r: spb::ListChangedChunksRequest,
    ) -> Result<spb::ListChangedChunksResponse, Status> {
        self.call(format!("changed_chunks:{}", r.target_snapshot_id))?;
        Ok(spb::ListChangedChunksResponse::default())
    }
}

#[derive(Default)]
pub struct FakeHosts {
    calls: Mutex<Vec<String>>,
    progress: Mutex<Vec<hpb::MigrationProgress>>,
    status: Mutex<Option<hpb::MigrationProgress>>,
    refuse: Mutex<Option<Status>>,
    /// What SaveVm and RestoreVm answer when set: an error.
    refuse_save: Mutex<Option<Status>>,
    refuse_restore: Mutex<Option<Status>>,
    /// What ListVms answers, per host address.
    listed: Mutex<BTreeMap<String, Vec<hpb::Vm>>>,
}

impl FakeHosts {
    pub fn refuse_save(&self, s: Status) {
        *self.refuse_save.lock().unwrap() = Some(s);
    }
    pub fn refuse_restore(&self, s: Status) {
        *self.refuse_restore.lock().unwrap() = Some(s);
    }
    /// Makes host `addr` list `vm` (as after a save or restore a previous leader asked for).
    pub fn lists(&self, addr: &str, vm: hpb::Vm) {
        self.listed
            .lock()
            .unwrap()
            .entry(addr.into())
            .or_default()
            .push(vm);
    }
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    /// What StartMigrationSend streams.
    pub fn migration(&self, p: Vec<hpb::MigrationProgress>) {
        *self.progress.lock().unwrap() = p;
    }
    /// What GetMigration answers.
    pub fn migration_status(&self, p: hpb::MigrationProgress) {
        *self.status.lock().unwrap() = Some(p);
    }
    pub fn refuse_migration(&self, s: Status) {
        *self.refuse.lock().unwrap() = Some(s);
    }
    fn call(&self, c: String) {
        self.calls.lock().unwrap().push(c);
    }
    fn vm(id: &str) -> hpb::Vm {
        hpb::Vm {
            id: id.into(),
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl HostOps for FakeHosts {
    async fn info(&self, a: &str) -> Result<hpb::HostInfo, Status> {
        self.call(format!("info:{a}"));
        Ok(hpb::HostInfo::default())
    }
    async fn metrics(&self, a: &str) -> Result<hpb::HostMetrics, Status> {
        self.call(format!("metrics:{a}"));
        Ok(hpb::HostMetrics::default())
    }
    async fn list_vms(&self, a: &str) -> Result<Vec<hpb::Vm>, Status> {
        self.call(format!("list:{a}"));
        Ok(self
            .listed
            .lock()
            .unwrap()
            .get(a)
            .cloned()
            .unwrap_or_default())
    }
    async fn create_vm(&self, a: &str, r: hpb::CreateVmRequest) -> Result<hpb::Vm, Status> {
        self.call(format!("create:{a}:{}", r.vm_id));
        Ok(Self::vm(&r.vm_id))
    }
    async fn start_vm(&self, a: &str, id: &str) -> Result<hpb::Vm, Status> {
        self.call(format!("start:{a}:{id}"));
        Ok(Self::vm(id))
    }
    async fn pause_vm(&self, a: &str, id: &str) -> Result<hpb::Vm, Status> {
        self.call(format!("pause:{a}:{id}"));
        Ok(Self::vm(id))
    }
    async fn resume_vm(&self, a: &str, id: &str) -> Result<hpb::Vm, Status> {
        self.call(format!("resume:{a}:{id}"));
        Ok(Self::vm(id))
    }
    async fn reboot_vm(&self, a: &str, id: &str, _f: bool) -> Result<hpb::Vm, Status> {
        self.call(format!("reboot:{a}:{id}"));
        Ok(Self::vm(id))
    }
    async fn shutdown_vm(&self, a: &str, id: &str, _f: bool) -> Result<hpb::Vm, Status> {
        self.call(format!("shutdown:{a}:{id}"));
        Ok(Self::vm(id))
    }
    async fn destroy_vm(&self, a: &str, id: &str) -> Result<(), Status> {
        self.call(format!("destroy:{a}:{id}"));
        Ok(())
    }
    async fn set_network_peers(
        &self,
        a: &str,
        n: hpb::NetworkAttachment,
    ) -> Result<hpb::SetNetworkPeersResponse, Status> {
        self.call(format!("peers:{a}:{}:{}", n.network_id, n.peers.join(",")));
        Ok(hpb::SetNetworkPeersResponse {
            present: true,
            ..Default::default()
        })
    }
    async fn prepare_migration_receive(
        &self,
        a: &str,
        r: hpb::PrepareMigrationReceiveRequest,
    ) -> Result<hpb::PrepareMigrationReceiveResponse, Status> {
        self.call(format!("prepare:{a}"));
        if let Some(s) = self.refuse.lock().unwrap().clone() {
            return Err(s);
        }
        Ok(hpb::PrepareMigrationReceiveResponse {
            address: "dst-mig:9000".into(),
            migration_id: format!("in-{}", r.vm_id),
            stream_version: 3,
        })
    }
    async fn start_migration_send(
        &self,
        a: &str,
        r: hpb::StartMigrationSendRequest,
    ) -> Result<ProgressStream, Status> {
        self.call(format!("send:{a}:v{}", r.destination_stream_version));
        let items: Vec<Result<hpb::MigrationProgress, Status>> = self
            .progress
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .map(Ok)
            .collect();
        Ok(Box::pin(tokio_stream::iter(items)))
    }
    async fn get_migration(&self, a: &str, id: &str) -> Result<hpb::MigrationProgress, Status> {
        self.call(format!("get_migration:{a}:{id}"));
        self.status
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Status::not_found("no such migration"))
    }
    async fn cancel_migration(&self, a: &str, id: &str) -> Result<(), Status> {
        self.call(format!("cancel:{a}:{id}"));
        Ok(())
    }
    async fn save_vm(&self, a: &str, r: hpb::SaveVmRequest) -> Result<hpb::SaveVmResponse, Status> {
        let vol = r.state_volume.map(|v| v.volume_id).unwrap_or_default();
        self.call(format!("save:{a}:{}:{vol}:{}", r.vm_id, r.resume));
        if let Some(s) = self.refuse_save.lock().unwrap().clone() {
            return Err(s);
        }
        Ok(hpb::SaveVmResponse {
            vm: Some(Self::vm(&r.vm_id)),
            pause_ms: 120,
            bytes_written: 64 << 20,
        })
    }
    async fn restore_vm(&self, a: &str, r: hpb::RestoreVmRequest) -> Result<hpb::Vm, Status> {
        let vol = r.state_volume.map(|v| v.volume_id).unwrap_or_default();
        let disks = r.config.map_or(0, |c| c.disks.len());
        self.call(format!("restore:{a}:{}:{vol}:disks={disks}", r.vm_id));
        if let Some(s) = self.refuse_restore.lock().unwrap().clone() {
            return Err(s);
        }
        Ok(Self::vm(&r.vm_id))
    }
}

/// A small pool for job tests.
pub struct World {
    pub ledger: Arc<MemLedger>,
    pub storage: Arc<FakeStorage>,
    pub hosts: Arc<FakeHosts>,
}

impl World {
    /// Hosts h1 and h2 (initiators iqn.h1, iqn.h2), repository sr1 with volume vol1, and
    /// VM vm1 (HA restart, disk vda on vol1) running on h1.
    pub fn two_hosts_one_running_vm() -> World {
        let mut s = PoolState::new("p", BTreeMap::new());
        // The pool's key, as the first user makes it: iSCSI grants derive CHAP from it.
        s.token_key = vec![7; 32];
        for h in ["h1", "h2"] {
            s.hosts.insert(
                h.into(),
                pb::Host {
                    id: h.into(),
                    name: h.into(),
                    address: format!("{h}:7000"),
                    state: pb::HostState::Enabled as i32,
                    info: Some(hpb::HostInfo {
                        initiator_iqn: format!("iqn.{h}"),
                        memory_total_bytes: 8 << 30,
                        memory_available_bytes: 8 << 30,
                        logical_cpus: 4,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
        }
        s.srs.insert(
            "sr1".into(),
            pb::StorageRepository {
                id: "sr1".into(),
                name: "sr1".into(),
                address: "st:1".into(),
                thin_pool_id: "tp1".into(),
                shared: true,
                reachable: true,
                ..Default::default()
            },
        );
        s.volumes.insert(
            "vol1".into(),
            spb::Volume {
                pool_id: "sr1".into(),
                ..vol("vol1")
            },
        );
        s.vms.insert(
            "vm1".into(),
            pb::Vm {
                id: "vm1".into(),
                host_id: "h1".into(),
                desired_power_state: hpb::PowerState::Running as i32,
                power_state: hpb::PowerState::Running as i32,
                spec: Some(pb::VmSpec {
                    name: "vm1".into(),
                    vcpus: 1,
                    memory_bytes: 256 << 20,
                    disks: vec![pb::VmDisk {
                        disk_id: "vda".into(),
                        volume_id: "vol1".into(),
                        read_only: false,
                        undo: false,
                    }],
                    ha_priority: pb::HaRestartPriority::Restart as i32,
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        s.rebuild_alloc();
        World {
            ledger: Arc::new(MemLedger {
                state: Mutex::new(s),
                next: Mutex::new(10),
                clock_ms: Mutex::new(None),
            }),
            storage: Arc::new(FakeStorage::default()),
            hosts: Arc::new(FakeHosts::default()),
        }
    }

    pub fn env(&self) -> Env {
        Env {
            ledger: self.ledger.clone(),
            storage: self.storage.clone(),
            hosts: self.hosts.clone(),
            backup_roots: Arc::from([]),
        }
    }

    /// Task `id` as the state has it.
    pub fn task(&self, id: &str) -> pb::Task {
        (*self.state().tasks[id]).clone()
    }

    /// Marks vm1 stopped on no host, as a shutdown leaves it.
    pub fn stop_vm1(&self) {
        let mut s = self.ledger.state.lock().unwrap();
        let vm = s.vms.get_mut("vm1").unwrap();
        vm.host_id.clear();
        vm.desired_power_state = hpb::PowerState::Stopped as i32;
        vm.power_state = hpb::PowerState::Stopped as i32;
    }

    /// Records `power` as VM `vm`'s host reported it.
    pub fn report_power(&self, vm: &str, power: hpb::PowerState) {
        let mut s = self.ledger.state.lock().unwrap();
        s.vms.get_mut(vm).unwrap().power_state = power as i32;
    }

    pub fn state(&self) -> PoolState {
        self.ledger.state.lock().unwrap().clone()
    }

    /// Commits the job's start; panics if the state machine refuses it.
    pub fn start_job(&self, job: Job) -> String {
        let mut s = self.ledger.state.lock().unwrap();
        let n = s.applied_index + 1;
        let task_id = format!("job-{n}");
        let r = s.apply(
            n,
            &Command {
                at_ms: 500,
                task_id: task_id.clone(),
                op: Some(Op::StartJob(job)),
                ..Default::default()
            },
        );
        assert_eq!(r.code, 0, "job refused: {}", r.message);
        task_id
    }

    /// Applies `op` as a person's command; its result.
    pub fn apply(&self, op: Op) -> CommandResult {
        let mut s = self.ledger.state.lock().unwrap();
        let n = s.applied_index + 1;
        s.apply(
            n,
            &Command {
                at_ms: 700,
                task_id: format!("t{n}"),
                op: Some(op),
                ..Default::default()
            },
        )
    }

    pub async fn drive(&self, task: &str) {
        super::drive(self.env(), task.to_owned()).await
    }

    pub fn record_output(&self, task: &str, k: &str, v: &str) {
        self.ledger
            .state
            .lock()
            .unwrap()
            .jobs
            .get_mut(task)
            .unwrap()
            .outputs
            .insert(k.into(), v.into());
    }

    pub fn cancel(&self, task: &str) {
        self.ledger
            .state
            .lock()
            .unwrap()
            .jobs
            .get_mut(task)
            .unwrap()
            .cancel_requested = true;
    }

    pub fn mark_unreachable(&self, host: &str) {
        self.ledger
            .state
            .lock()
            .unwrap()
            .hosts
            .get_mut(host)
            .unwrap()
            .state = pb::HostState::Unreachable as i32;
    }
}

pub fn migrate_job(vm: &str, from: &str, to: &str) -> Job {
    Job {
        spec: Some(JobSpec::MigrateVm(MigrateVmJob {
            vm_id: vm.into(),
            source_host_id: from.into(),
            destination_host_id: to.into(),
            downtime_budget_ms: 300,
            auto_converge: false,
            token: "tok".into(),
            evacuating_host_id: String::new(),
        })),
        ..Default::default()
    }
}
