//! The seed lab as one scenario, the way a XenServer + Openfiler lab is used, through
//! `poolctl` with one user per role: create the SR, a VM from a template, start it,
//! snapshot it twice (a parent and its child), write over its disk, revert it, delete the
//! snapshot it was reverted to (the child takes its parent), live-migrate it while it
//! dirties memory, evacuate its host, kill its host (HA restarts it elsewhere; the revived
//! host stays fenced from its disk), clone it, look at who may reach its disk, and destroy
//! everything. Each step is checked through the API and through the guest's own console;
//! each role is refused what it may not do.

use std::time::Duration;

use e2e_tests::pool::{
    Api, Pool, can_open, console_until, disk_chap, field, guest_elf, guest_vm, line_after, targets,
};
use e2e_tests::{Hostd, PoolArg, poolctl, secret_file, text, wait_for};
use proto::coordinator as pb;

/// Runs poolctl as the holder of `token`; whether it succeeded and its output.
fn run(p: &PoolArg, token: &str, args: &[&str]) -> (bool, String) {
    let o = poolctl(&p.as_token(token), args);
    (o.status.success(), text(&o))
}

struct Lab {
    pool: Pool,
    tokens: std::collections::HashMap<&'static str, String>,
}

impl Lab {
    fn ok(&self, role: &str, args: &[&str]) -> String {
        let (ok, out) = run(&self.pool.p, &self.tokens[role], args);
        assert!(
            ok,
            "{role}: poolctl {}: {out}\n{}",
            args.join(" "),
            self.pool.logs()
        );
        out
    }

    /// The call is refused for lack of a role, and says which role it needs.
    fn denied(&self, role: &str, args: &[&str], needs: &str) {
        let (ok, out) = run(&self.pool.p, &self.tokens[role], args);
        assert!(!ok, "{role} may not {}: {out}", args.join(" "));
        assert!(
            out.contains("PermissionDenied") && out.contains(needs),
            "{role}: {}: {out}",
            args.join(" ")
        );
    }

    /// The console line starting with `prefix` after the boot whose command line holds
    /// `boot` (each boot here carries a unique `boot=N` word, which the guest ignores).
    fn after_boot(&self, vm: &str, boot: &str, prefix: &str) -> String {
        console_until(
            &self.pool.p,
            Some(&self.tokens["vm-operator"]),
            vm,
            Duration::from_secs(60),
            |seen| line_after(seen, boot, prefix),
        )
        .unwrap_or_else(|| panic!("{vm}: {prefix:?} after {boot:?}\n{}", self.pool.logs()))
    }

    /// A heartbeat of boot `boot` with a sequence number above `after`, checked clean
    /// (bad=0: the guest found all its memory as it left it).
    fn heartbeat_after(&self, vm: &str, boot: &str, after: u64) -> u64 {
        let line = console_until(
            &self.pool.p,
            Some(&self.tokens["vm-operator"]),
            vm,
            Duration::from_secs(60),
            |seen| {
                // After a migration the console history starts on the new host, without
                // the boot's first lines; the heartbeat count goes on.
                let from = seen.find(boot).unwrap_or(0);
                let whole = &seen[..seen.rfind('\n')? + 1];
                whole[from.min(whole.len())..]
                    .lines()
                    .filter(|l| l.starts_with("HB seq=") && l.contains(" bad="))
                    .find(|l| seq(l) > after)
                    .map(str::to_owned)
            },
        )
        .unwrap_or_else(|| panic!("{vm}: a heartbeat after {after}\n{}", self.pool.logs()));
        assert!(line.contains(" bad=0"), "{vm}: {line}");
        seq(&line)
    }

    /// `PoolService` itself as the holder of `role`'s token.
    fn api(&self, role: &str) -> Api {
        Api::connect(&self.pool.p.as_token(&self.tokens[role]))
    }

    /// The JSON line of each of `vm`'s snapshots, by name.
    fn snapshots(&self, vm: &str) -> std::collections::HashMap<String, String> {
        self.ok("read-only", &["vm-snapshot-list", vm, "--json"])
            .lines()
            .filter(|l| l.contains("\"name\": "))
            .map(|l| (field(l, "name"), l.to_owned()))
            .collect()
    }

    /// `vdi-list --json` as a read-only user.
    fn volumes(&self) -> String {
        self.ok("read-only", &["vdi-list", "--json"])
    }

    fn vm_line(&self, name: &str) -> String {
        self.pool
            .vm(name)
            .unwrap_or_else(|| panic!("{name} listed"))
    }

    fn host_line(&self, id: &str) -> String {
        let hosts = self.ok("read-only", &["host-list", "--json"]);
        hosts
            .lines()
            .find(|l| l.contains(&format!("\"id\": \"{id}\"")))
            .unwrap_or_else(|| panic!("host {id} listed: {hosts}"))
            .to_owned()
    }

    /// Which of our hostd processes the pool knows as host `id`.
    fn host_index(&self, id: &str) -> usize {
        let addr = field(&self.host_line(id), "address");
        self.pool
            .hosts
            .iter()
            .position(|h| h.addr == addr)
            .expect("a host of ours")
    }

    /// Waits until the VM runs on a host other than `not_on`; returns that host.
    fn running_elsewhere(&self, vm: &str, not_on: &str, limit: Duration) -> String {
        let line = wait_for(limit, || {
            self.pool.vm(vm).filter(|l| {
                l.contains("\"power\": \"running\"") && !field(l, "host").is_empty() && {
                    field(l, "host") != not_on
                }
            })
        })
        .unwrap_or_else(|| panic!("{vm} running off {not_on}\n{}", self.pool.logs()));
        field(&line, "host")
    }
}

fn seq(hb: &str) -> u64 {
    hb.split_whitespace()
        .find_map(|w| w.strip_prefix("seq="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_seed_lab_from_sr_to_destroy_with_every_role() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 3);
    pool.wait_hosts_enabled();

    // Users: the founding admin adds ada, a pool-admin; ada adds one per role.
    let p = pool.p.clone();
    let pw = |user: &str| secret_file(dir.path(), user, &format!("{user}-long-password"));
    let o = poolctl(
        &p,
        &[
            "user-add",
            "ada",
            "--password-file",
            &pw("ada"),
            "--role",
            "pool-admin",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let login = |user: &str| {
        let o = poolctl(&p, &["login", user, "--password-file", &pw(user)]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let mut tokens = std::collections::HashMap::new();
    tokens.insert("pool-admin", login("ada"));
    for (user, role) in [
        ("olga", "pool-operator"),
        ("vera", "vm-admin"),
        ("otto", "vm-operator"),
        ("rita", "read-only"),
    ] {
        let (ok, out) = run(
            &p,
            &tokens["pool-admin"],
            &[
                "user-add",
                user,
                "--password-file",
                &pw(user),
                "--role",
                role,
            ],
        );
        assert!(ok, "{out}");
        tokens.insert(role, login(user));
    }
    let mut pool = pool;
    pool.token = Some(tokens["pool-admin"].clone());
    let mut lab = Lab { pool, tokens };
    lab.denied(
        "pool-operator",
        &[
            "user-add",
            "mal",
            "--password-file",
            &pw("mal"),
            "--role",
            "read-only",
        ],
        "pool-admin",
    );
    let o = poolctl(&p.anonymous(), &["vm-list"]);
    assert!(!o.status.success(), "no token, no entry: {}", text(&o));

    // The pool-operator makes the SR and turns HA on; a vm-admin may not.
    let img = dir.path().join("sr1.img").display().to_string();
    let sr = [
        "sr-create",
        "sr1",
        &lab.pool.storaged.addr,
        "--file",
        &img,
        "--size",
        "1G",
    ];
    lab.denied("vm-admin", &sr, "pool-operator");
    lab.ok("pool-operator", &sr);
    lab.ok("pool-operator", &["pool-set", "--heartbeat-timeout", "2"]);
    lab.ok(
        "pool-operator",
        &["pool-ha-enable", "--failures", "1", "--timeout", "2"],
    );
    let srs = lab.ok("read-only", &["sr-list"]);
    assert!(srs.contains("sr1"), "{srs}");

    // The vm-admin makes a disk, a VM and a template of it; a vm-operator may not.
    lab.denied(
        "vm-operator",
        &["vdi-create", "base-disk", "--sr", "sr1", "--size", "16M"],
        "vm-admin",
    );
    lab.ok(
        "vm-admin",
        &["vdi-create", "base-disk", "--sr", "sr1", "--size", "16M"],
    );
    let elf = guest_elf(dir.path());
    lab.ok(
        "vm-admin",
        &guest_vm(
            "base",
            "base-disk",
            &elf,
            "seed=5 blk=rw mode=heartbeat hb_ms=200 boot=1",
            &[],
        ),
    );
    lab.ok("vm-admin", &["template-create", "guest", "base"]);
    lab.ok(
        "vm-admin",
        &[
            "vm-create",
            "web",
            "--template",
            "guest",
            "--memory",
            "64M",
            "--ha",
            "restart",
        ],
    );
    assert!(lab.vm_line("web").contains("\"power\": \"stopped\""));

    // Started by the vm-operator (read-only may not); the guest writes and checks its
    // disk (pattern 5) and beats.
    lab.denied("read-only", &["vm-start", "web"], "vm-operator");
    lab.ok("vm-operator", &["vm-start", "web"]);
    lab.pool
        .wait_vm("web", "\"power\": \"running\"", Duration::from_secs(60));
    let blk = lab.after_boot("web", "boot=1", "BLK done");
    assert!(blk.contains("result=ok"), "{blk}");
    lab.heartbeat_after("web", "boot=1", 0);

    // Snapshot while it runs (crash-consistent), then write over the disk (pattern 6).
    lab.denied("vm-operator", &["vm-snapshot", "web", "s1"], "vm-admin");
    lab.ok("vm-admin", &["vm-snapshot", "web", "s1"]);
    // A second one in a row is the first's child, and the VM's current snapshot.
    lab.ok("vm-admin", &["vm-snapshot", "web", "s2"]);
    let snaps = lab.snapshots("web");
    let (s1, s2) = (&snaps["s1"], &snaps["s2"]);
    assert_eq!(field(s1, "parent"), "", "{snaps:?}");
    assert_eq!(field(s2, "parent"), field(s1, "id"), "{snaps:?}");
    assert!(s2.contains("\"current\": true"), "{s2}");
    assert!(s1.contains("\"current\": false"), "{s1}");
    let s1_id = field(s1, "id");
    let reboot_with = |lab: &Lab, cmdline: &str| {
        lab.ok("vm-operator", &["vm-shutdown", "web"]);
        lab.pool
            .wait_vm("web", "\"power\": \"stopped\"", Duration::from_secs(60));
        lab.ok("vm-admin", &["vm-set", "web", "--cmdline", cmdline]);
        lab.ok("vm-operator", &["vm-start", "web"]);
        lab.pool
            .wait_vm("web", "\"power\": \"running\"", Duration::from_secs(60));
    };
    reboot_with(&lab, "seed=6 blk=write mode=heartbeat hb_ms=200 boot=2");
    let blk = lab.after_boot("web", "boot=2", "BLK done");
    assert!(blk.contains("result=ok"), "{blk}");
    // Pattern 5 is gone now: the write really reached the disk.
    reboot_with(&lab, "seed=5 blk=verify mode=heartbeat hb_ms=200 boot=3");
    let blk = lab.after_boot("web", "boot=3", "BLK done");
    assert!(blk.contains("result=fail"), "{blk}");

    // Revert (vm-admin only): the disk holds pattern 5 again.
    lab.ok("vm-operator", &["vm-shutdown", "web"]);
    lab.pool
        .wait_vm("web", "\"power\": \"stopped\"", Duration::from_secs(60));
    lab.denied("vm-operator", &["vm-revert", "web", "s1"], "vm-admin");
    lab.ok("vm-admin", &["vm-revert", "web", "s1"]);
    assert!(lab.snapshots("web")["s1"].contains("\"current\": true"));

    // Deleting s1 (vm-admin only) takes its disk snapshots off the storage and gives s2
    // its parent (none); the disk reverted from it is whole (boot 4 below verifies it).
    let web_id = field(&lab.vm_line("web"), "id");
    let listed = lab
        .api("read-only")
        .call(
            pb::ListVmSnapshotsRequest {
                vm_id: web_id,
                page: None,
            },
            |mut c, r| async move { c.list_vm_snapshots(r).await },
        )
        .expect("ListVmSnapshots");
    let s1_volumes: Vec<String> = listed
        .snapshots
        .iter()
        .find(|x| x.id == s1_id)
        .expect("s1 listed")
        .disk_snapshots
        .values()
        .cloned()
        .collect();
    assert_eq!(s1_volumes.len(), 1, "{listed:?}");
    let volumes = lab.volumes();
    assert!(
        s1_volumes.iter().all(|v| volumes.contains(v.as_str())),
        "{volumes}"
    );
    lab.denied("vm-operator", &["vm-snapshot-delete", "s1"], "vm-admin");
    lab.ok("vm-admin", &["vm-snapshot-delete", "s1"]);
    let snaps = lab.snapshots("web");
    assert!(!snaps.contains_key("s1"), "{snaps:?}");
    assert_eq!(field(&snaps["s2"], "parent"), "", "{snaps:?}");
    assert!(snaps["s2"].contains("\"current\": false"), "{snaps:?}");
    let volumes = lab.volumes();
    assert!(
        s1_volumes.iter().all(|v| !volumes.contains(v.as_str())),
        "s1's disk snapshots are gone: {volumes}"
    );
    let unknown = lab
        .api("vm-admin")
        .call(
            pb::DeleteVmSnapshotRequest {
                request_id: "delete-no-such-snapshot".into(),
                snapshot_id: "no-such-snapshot".into(),
            },
            |mut c, r| async move { c.delete_vm_snapshot(r).await },
        )
        .expect_err("an unknown snapshot");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    lab.ok(
        "vm-admin",
        &[
            "vm-set",
            "web",
            "--cmdline",
            "seed=5 blk=verify mode=heartbeat hb_ms=100 dirty_mib_s=16 dirty_mib=8 boot=4",
        ],
    );
    lab.ok("vm-operator", &["vm-start", "web"]);
    let line = lab
        .pool
        .wait_vm("web", "\"power\": \"running\"", Duration::from_secs(60));
    let blk = lab.after_boot("web", "boot=4", "BLK done");
    assert!(blk.contains("result=ok"), "reverted: {blk}");
    let mut beat = lab.heartbeat_after("web", "boot=4", 0);

    // Live migration while the guest dirties 16 MiB/s: same guest, another host, no
    // memory lost (bad=0), the beat goes on.
    let first = field(&line, "host");
    lab.denied("vm-operator", &["vm-migrate", "web"], "vm-admin");
    lab.ok("vm-admin", &["vm-migrate", "web"]);
    let second = lab.running_elsewhere("web", &first, Duration::from_secs(60));
    beat = lab.heartbeat_after("web", "boot=4", beat);

    // Evacuation (pool-operator): the host empties into maintenance, the VM lives on.
    lab.denied("vm-admin", &["host-evacuate", &second], "pool-operator");
    lab.ok("pool-operator", &["host-evacuate", &second]);
    let third = lab.running_elsewhere("web", &second, Duration::from_secs(60));
    let h = lab.host_line(&second);
    assert!(h.contains("\"state\": \"maintenance\""), "{h}");
    lab.heartbeat_after("web", "boot=4", beat);
    lab.ok("pool-operator", &["host-enable", &second]);

    // The host running it dies (SIGKILL, its VM with it): fenced at the storage, the VM
    // restarted elsewhere by HA, and the dead host, revived, cannot open the disk.
    let victim = lab.host_index(&third);
    let portal = lab.pool.storaged.iscsi.clone();
    let victim_iqn = lab.pool.hosts[victim].iqn.clone();
    let seen = targets(&portal, &victim_iqn);
    assert_eq!(seen.len(), 1, "web's disk is granted to its host: {seen:?}");
    // The disk's exports name that host by its initiator, logged in (read-only may look).
    let web_disk = field(&lab.vm_line("web"), "disks");
    let exports = lab.ok("read-only", &["vdi-exports", &web_disk, "--json"]);
    let host_row = exports
        .lines()
        .find(|l| l.contains(&format!("\"initiator\": \"{victim_iqn}\"")))
        .unwrap_or_else(|| panic!("{victim_iqn} granted: {exports}"));
    assert_eq!(
        field(host_row, "host"),
        field(&lab.host_line(&third), "name"),
        "{exports}"
    );
    assert!(!host_row.contains("\"sessions\": 0"), "{host_row}");
    let target = seen[0].clone();
    let web = field(&lab.pool.vm("web").expect("web listed"), "id");
    let victim_chap = disk_chap(&lab.pool.p, &lab.pool.hosts[victim].addr, &web);
    assert!(can_open(&portal, &target, &victim_iqn, Some(&victim_chap)));
    assert!(
        !can_open(&portal, &target, &victim_iqn, None),
        "an initiator name alone opens nothing"
    );
    lab.pool.hosts[victim].daemon.proc.kill();
    let fourth = lab.running_elsewhere("web", &third, Duration::from_secs(90));
    assert!(
        lab.host_line(&third).contains("\"state\": \"fenced\""),
        "{}",
        lab.host_line(&third)
    );
    // A new boot on the new host: the disk still holds pattern 5 (the verify passes).
    let blk = console_until(
        &lab.pool.p,
        Some(&lab.tokens["vm-operator"]),
        "web",
        Duration::from_secs(60),
        |seen| {
            // The restart's own boot: the last GUEST start line, then its BLK done.
            let from = seen.rfind("GUEST start")?;
            line_after(&seen[from..], "GUEST start", "BLK done")
        },
    )
    .unwrap_or_else(|| panic!("web booted again after HA\n{}", lab.pool.logs()));
    assert!(blk.contains("result=ok"), "{blk}");
    let name = lab.pool.hosts[victim].name.clone();
    let ip = lab.pool.hosts[victim]
        .addr
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    lab.pool.hosts[victim] = Hostd::start(dir.path(), &name, &ip, &lab.pool.p);
    assert!(
        !can_open(&portal, &target, &victim_iqn, Some(&victim_chap)),
        "the revived host's initiator is refused the disk"
    );
    let now = &lab.pool.hosts[lab.host_index(&fourth)];
    let now_chap = disk_chap(&lab.pool.p, &now.addr, &web);
    assert!(can_open(&portal, &target, &now.iqn, Some(&now_chap)));

    // A clone of the running VM (crash-consistent), started: its disk has pattern 5.
    lab.denied("vm-operator", &["vm-clone", "web", "web-copy"], "vm-admin");
    lab.ok("vm-admin", &["vm-clone", "web", "web-copy"]);
    lab.ok("vm-operator", &["vm-start", "web-copy"]);
    lab.pool.wait_vm(
        "web-copy",
        "\"power\": \"running\"",
        Duration::from_secs(60),
    );
    let blk = lab.after_boot("web-copy", "boot=4", "BLK done");
    assert!(blk.contains("result=ok"), "clone: {blk}");

    // Export and import: refused while the disk's VM runs; once it is stopped, its disk
    // goes out to a raw image and back in as a new disk, and a VM booted from that disk
    // finds pattern 5 on it.
    let disk = field(&lab.vm_line("web"), "disks");
    let image = dir.path().join("web.raw");
    let image_arg = image.display().to_string();
    let (ok, out) = run(
        &lab.pool.p,
        &lab.tokens["vm-admin"],
        &["vdi-export", &disk, &image_arg],
    );
    assert!(!ok && out.contains("shut it down"), "{out}");
    lab.ok("vm-operator", &["vm-shutdown", "web"]);
    lab.pool
        .wait_vm("web", "\"power\": \"stopped\"", Duration::from_secs(60));
    lab.denied(
        "vm-operator",
        &["vdi-export", &disk, &image_arg],
        "vm-admin",
    );
    lab.ok("vm-admin", &["vdi-export", &disk, &image_arg]);
    let len = std::fs::metadata(&image).unwrap().len();
    assert!(len >= 16 << 20, "the whole disk: {len} bytes");
    lab.ok(
        "vm-admin",
        &["vdi-import", &image_arg, "web-import", "--sr", "sr1"],
    );
    let again = dir.path().join("web-import.raw");
    lab.ok(
        "vm-admin",
        &["vdi-export", "web-import", &again.display().to_string()],
    );
    assert!(
        std::fs::read(&image).unwrap() == std::fs::read(&again).unwrap(),
        "export, import, export: the same bytes"
    );

    // Access opened for an initiator outside the pool is in the disk's exports (its ACL,
    // which read-only users may see) with no host and no CHAP secret; closed, it is gone.
    // (A disk no VM uses: a VM's start takes such access away.)
    let imported = lab
        .volumes()
        .lines()
        .find(|l| l.contains("\"name\": \"web-import\""))
        .map(|l| field(l, "id"))
        .expect("web-import listed");
    let outsider = "iqn.2026-11.org.pool.e2e:exports-probe";
    let access_request = pb::VolumeAccessRequest {
        volume_id: imported.clone(),
        initiator_iqn: outsider.into(),
    };
    let access = lab
        .api("vm-admin")
        .call(access_request.clone(), |mut c, r| async move {
            c.open_volume_access(r).await
        })
        .expect("OpenVolumeAccess");
    assert!(!access.chap_secret.is_empty() && !access.mutual_chap_secret.is_empty());
    let listed = lab
        .api("read-only")
        .call(
            pb::ListVolumeExportsRequest {
                volume_id: imported.clone(),
            },
            |mut c, r| async move { c.list_volume_exports(r).await },
        )
        .expect("ListVolumeExports");
    assert!(
        listed
            .exports
            .iter()
            .flat_map(|e| &e.grants)
            .any(|g| g.initiator_iqn == outsider && g.host_name.is_empty()),
        "{listed:?}"
    );
    let raw = format!("{listed:?}");
    assert!(
        !raw.contains(&access.chap_secret) && !raw.contains(&access.mutual_chap_secret),
        "no CHAP secret: {raw}"
    );
    let exports = lab.ok("read-only", &["vdi-exports", &imported, "--json"]);
    assert!(exports.contains(outsider), "{exports}");
    lab.api("vm-admin")
        .call(access_request, |mut c, r| async move {
            c.close_volume_access(r).await
        })
        .expect("CloseVolumeAccess");
    let exports = lab.ok("read-only", &["vdi-exports", &imported, "--json"]);
    assert!(!exports.contains(outsider), "revoked: {exports}");

    lab.ok(
        "vm-admin",
        &guest_vm(
            "imported",
            "web-import",
            &elf,
            "seed=5 blk=verify mode=heartbeat hb_ms=200 boot=5",
            &["--start"],
        ),
    );
    let blk = lab.after_boot("imported", "boot=5", "BLK done");
    assert!(blk.contains("result=ok"), "imported disk: {blk}");
    lab.ok("vm-operator", &["vm-start", "web"]);
    lab.pool
        .wait_vm("web", "\"power\": \"running\"", Duration::from_secs(60));

    // Destroy: refused while running and to a vm-operator; then everything goes.
    let (ok, out) = run(&lab.pool.p, &lab.tokens["vm-admin"], &["vm-destroy", "web"]);
    assert!(!ok, "a running VM is not destroyed: {out}");
    for vm in ["web", "web-copy", "imported"] {
        lab.ok("vm-operator", &["vm-shutdown", vm]);
        lab.pool
            .wait_vm(vm, "\"power\": \"stopped\"", Duration::from_secs(60));
        lab.denied("vm-operator", &["vm-destroy", vm], "vm-admin");
        lab.ok("vm-admin", &["vm-destroy", vm, "--delete-disks"]);
        assert!(lab.pool.vm(vm).is_none(), "{vm} destroyed");
    }

    // The audit log (pool-operator and up) names who did each of those things.
    lab.denied("vm-admin", &["audit-log"], "pool-operator");
    let audit = lab.ok("pool-operator", &["audit-log", "--json"]);
    for (user, method) in [
        ("olga", "CreateStorageRepository"),
        ("vera", "RevertVm"),
        ("vera", "DeleteVmSnapshot"),
        ("vera", "MigrateVm"),
        ("otto", "StartVm"),
        ("olga", "EvacuateHost"),
        ("vera", "DestroyVm"),
        ("vera", "OpenVolumeAccess"),
        ("otto", "StreamVmConsole"),
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(&format!("\"user\": \"{user}\"")) && l.contains(method)),
            "{user} {method} in the audit log:\n{audit}"
        );
    }
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"user\": \"rita\"") && l.contains("StartVm")),
        "the refused start is audited too"
    );
}
