//! A pool VM's network interfaces end to end through `HostService`: the daemon plugs each
//! interface's tap onto its network's bridge before the VM process starts, removes the
//! taps and the networks left unused when the VM goes, and a daemon starting after a
//! crash removes what the crash left; a VIF refuses (and counts, in the VM's metrics)
//! frames its guest sends from a MAC not its own. The daemon runs inside a network
//! namespace of the test's own (a thread moved into it with a current-thread runtime: its
//! netlink socket, its taps and its VM processes are all there), so nothing touches the
//! machine's interfaces; the namespace goes with its last thread. Needs root and KVM (CI
//! has both).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

mod common;

use common::*;
use hostd::network::{Device, HostNetConfig, HostNetworks, NetworkKind, NetworkSpec, names};
use proto::host::host_service_client::HostServiceClient;
use proto::host::*;
use rtnetlink::LinkUnspec;
use tonic::Code;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Runs `f` on a new thread in a new network namespace, on a current-thread runtime.
fn in_new_netns<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare takes flags only; it moves this thread, ours, which ends after `f`.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                loopback_up().await;
                f().await
            })
    })
    .join()
    .unwrap();
}

/// A new namespace's loopback starts down; the daemon serves on it.
async fn loopback_up() {
    let (conn, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(conn);
    handle
        .link()
        .set(LinkUnspec::new_with_index(1).up().build())
        .execute()
        .await
        .unwrap();
}

fn host_net() -> HostNetConfig {
    HostNetConfig {
        vxlan_local: Some(LOCAL),
        ..HostNetConfig::default()
    }
}

fn attachment(name: &str, kind: AttachmentKind, nic: &str, peers: &[&str]) -> NetworkAttachment {
    NetworkAttachment {
        network_id: format!("id-{name}"),
        name: name.into(),
        kind: kind as i32,
        nic: nic.into(),
        mtu: 1400,
        vni: 9,
        peers: peers.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

fn vif(id: &str, mac: &str, network: NetworkAttachment) -> NetConfig {
    NetConfig {
        id: id.into(),
        mac: mac.into(),
        mtu: 1400,
        network: Some(network),
        ..Default::default()
    }
}

fn find<'a>(devices: &'a [Device], name: &str) -> Option<&'a Device> {
    devices.iter().find(|d| d.name == name)
}

/// The names of the devices this module makes (bridges, VXLAN devices, taps).
fn owned(devices: &[Device]) -> Vec<String> {
    let mut names: Vec<String> = devices
        .iter()
        .filter(|d| names::parse(&d.name).is_some())
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    names
}

#[test]
fn vifs_are_plugged_before_the_vm_runs_and_removed_with_it() {
    in_new_netns(|| async {
        let probe = HostNetworks::new(host_net()).unwrap();
        // What a daemon killed with a VM running leaves: a network and the VM's tap.
        let stale = NetworkSpec {
            name: "left-behind".into(),
            kind: NetworkKind::Internal,
            vlan: None,
            mtu: 1500,
        };
        probe.ensure_network(&stale).await.unwrap();
        let ghost_tap = probe.plug_tap(&stale, "ghost", 0).await.unwrap();
        assert!(find(&probe.devices().await.unwrap(), &ghost_tap).is_some());

        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start_networked(
            Arc::new(Pki::new()),
            HOST,
            dir.path(),
            0,
            "127.0.0.1",
            "",
            Some(host_net()),
        )
        .await;
        // The daemon knows no VM "ghost": its tap and the network only it was on are gone.
        let devices = probe.devices().await.unwrap();
        assert_eq!(owned(&devices), Vec::<String>::new(), "{devices:?}");

        let mut c = d.client().await;
        let mut cfg = config("seed=3 mode=heartbeat hb_ms=20");
        cfg.nets = vec![
            vif(
                "eth0",
                "02:00:00:00:00:01",
                attachment("inside", AttachmentKind::Internal, "", &[]),
            ),
            vif(
                "eth1",
                "02:00:00:00:00:02",
                attachment("across", AttachmentKind::Private, "", &["192.0.2.7"]),
            ),
        ];

        // A network whose NIC this host lacks: refused, nothing made, no VM left.
        let mut bad = cfg.clone();
        bad.nets.push(vif(
            "eth2",
            "02:00:00:00:00:03",
            attachment("lan", AttachmentKind::External, "eth9", &[]),
        ));
        let err = c
            .create_vm(CreateVmRequest {
                vm_id: "vm-bad".into(),
                config: Some(bad),
                start: true,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(
            err.message()
                .contains("\"eth9\" does not exist on this host"),
            "{err}"
        );
        let devices = probe.devices().await.unwrap();
        assert_eq!(owned(&devices), Vec::<String>::new(), "{devices:?}");
        let listed = c.list_vms(ListVmsRequest::default()).await.unwrap();
        assert!(listed.into_inner().vms.is_empty());

        // A tap given with a network, and neither: refused before anything is made.
        let mut both = cfg.clone();
        both.nets[0].tap = "mytap".into();
        let mut neither = cfg.clone();
        neither.nets[0].network = None;
        for c_bad in [both, neither] {
            let err = c
                .create_vm(CreateVmRequest {
                    vm_id: "vm-bad".into(),
                    config: Some(c_bad),
                    start: false,
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        }

        let vm = create(&mut c, "vm-1", cfg, true).await;
        assert_eq!(vm.power_state, PowerState::Running as i32);
        // The VM's own config keeps its taps empty: this host's to plug at every start.
        assert!(vm.config.unwrap().nets.iter().all(|n| n.tap.is_empty()));
        let mut console = ConsoleReader::open(&mut c, "vm-1").await;
        assert!(console.wait_for("HB seq=3 ").await, "{}", console.text);

        let devices = probe.devices().await.unwrap();
        for (index, network) in [(0, "inside"), (1, "across")] {
            let tap = find(&devices, &names::tap_name("vm-1", index))
                .unwrap_or_else(|| panic!("no tap {index}: {devices:?}"));
            let bridge = find(&devices, &names::bridge_name(network)).unwrap();
            assert_eq!(tap.controller, Some(bridge.index), "{tap:?} {bridge:?}");
            assert!(tap.up && bridge.up, "{tap:?} {bridge:?}");
            assert_eq!((tap.mtu, bridge.mtu), (1400, 1400));
        }
        let vxlan = find(&devices, &names::vxlan_name("across")).unwrap();
        assert_eq!(vxlan.vxlan_local, Some(LOCAL));
        let across = NetworkSpec {
            name: "across".into(),
            kind: NetworkKind::Private,
            vlan: None,
            mtu: 1400,
        };
        assert_eq!(
            probe.private_peers(&across).await.unwrap(),
            ["192.0.2.7".parse::<IpAddr>().unwrap()]
        );

        c.destroy_vm(VmRequest {
            vm_id: "vm-1".into(),
        })
        .await
        .unwrap();
        let devices = probe.devices().await.unwrap();
        assert_eq!(owned(&devices), Vec::<String>::new(), "{devices:?}");

        // A guest that powers off by itself gives its tap back; a start plugs it again.
        let mut off = config("seed=1");
        off.nets = vec![vif(
            "eth0",
            "02:00:00:00:00:04",
            attachment("inside", AttachmentKind::Internal, "", &[]),
        )];
        create(&mut c, "vm-off", off, true).await;
        wait_state(&mut c, "vm-off", PowerState::Stopped).await;
        let deadline = std::time::Instant::now() + WAIT;
        while !owned(&probe.devices().await.unwrap()).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                probe.devices().await.unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        c.destroy_vm(VmRequest {
            vm_id: "vm-off".into(),
        })
        .await
        .unwrap();

        // Shut down, a VM's tap goes; started again, it is back on its bridge.
        let mut spin = config("then=spin");
        spin.nets = vec![vif(
            "eth0",
            "02:00:00:00:00:05",
            attachment("inside", AttachmentKind::Internal, "", &[]),
        )];
        create(&mut c, "vm-spin", spin, true).await;
        let tap = names::tap_name("vm-spin", 0);
        assert!(find(&probe.devices().await.unwrap(), &tap).is_some());
        c.shutdown_vm(ShutdownVmRequest {
            vm_id: "vm-spin".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(owned(&probe.devices().await.unwrap()), Vec::<String>::new());
        c.start_vm(VmRequest {
            vm_id: "vm-spin".into(),
        })
        .await
        .unwrap();
        let devices = probe.devices().await.unwrap();
        let bridge = find(&devices, &names::bridge_name("inside")).unwrap();
        assert_eq!(
            find(&devices, &tap).map(|t| t.controller),
            Some(Some(bridge.index)),
            "{devices:?}"
        );
        c.destroy_vm(VmRequest {
            vm_id: "vm-spin".into(),
        })
        .await
        .unwrap();
        assert_eq!(owned(&probe.devices().await.unwrap()), Vec::<String>::new());
    });
}

/// The `hostd` binary on loopback in the calling thread's namespace, not tying its VMs to
/// it; returns it and its address.
async fn hostd_binary(pki: &Pki, run_dir: &std::path::Path) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let host = pool_trust::Identity::Host(HOST.into());
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_hostd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--host-id",
            HOST,
            "--log",
            "info",
        ])
        .arg("--tls-dir")
        .arg(pki.dir_of(&host))
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--image-dir")
        .arg(
            std::path::Path::new(hostd::testguest::ELF_PATH)
                .parent()
                .unwrap(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(run_dir.join("hostd.log"))
                .unwrap(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(daemon.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the daemon prints its address")
        .unwrap()
        .unwrap();
    let addr = line
        .strip_prefix("hostd listening on ")
        .expect("address line")
        .to_owned();
    (daemon, addr)
}

/// Kills the VM processes a test started outside any daemon's care, however it ends.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill(2) of a VM process this test started through its daemon.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_daemon_restarted_after_a_crash_removes_what_no_vm_it_knows_uses() {
    in_new_netns(|| async {
        let probe = HostNetworks::new(host_net()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        pki.issue(&pool_trust::Identity::Host(HOST.into()), &["127.0.0.1"]);
        let member = pki.issue(&pool_trust::Identity::Member(1), &[]);
        let (mut daemon, addr) = hostd_binary(&pki, dir.path()).await;
        let mut c = connect_as(&addr, &member).await;
        let mut pids = KillOnDrop(Vec::new());
        for (vm, network, mac) in [
            ("stays", "inside", "02:00:00:00:01:01"),
            ("dies", "solo", "02:00:00:00:01:02"),
        ] {
            let mut cfg = config("then=spin");
            cfg.nets = vec![vif(
                "eth0",
                mac,
                attachment(network, AttachmentKind::Internal, "", &[]),
            )];
            let created = create(&mut c, vm, cfg, true).await;
            pids.0.push(created.vmm_pid);
        }
        let taps = [names::tap_name("stays", 0), names::tap_name("dies", 0)];
        let bridges = [names::bridge_name("inside"), names::bridge_name("solo")];
        let devices = probe.devices().await.unwrap();
        let mut all: Vec<String> = taps.iter().chain(&bridges).cloned().collect();
        all.sort();
        assert_eq!(owned(&devices), all, "{devices:?}");

        // The daemon dies at once, and so does one of its VMs: that VM's tap and the
        // network only it was on are left with nobody to remove them.
        daemon.start_kill().unwrap();
        daemon.wait().await.unwrap();
        // SAFETY: kill(2) of the VM process this test's daemon started.
        unsafe { libc::kill(pids.0[1] as i32, libc::SIGKILL) };
        while process_alive(pids.0[1]) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(owned(&probe.devices().await.unwrap()), all);

        // The next daemon finds "stays" again and keeps what it uses; the rest goes
        // before it serves.
        let (_daemon, addr) = hostd_binary(&pki, dir.path()).await;
        let devices = probe.devices().await.unwrap();
        let mut kept = vec![taps[0].clone(), bridges[0].clone()];
        kept.sort();
        assert_eq!(owned(&devices), kept, "{devices:?}");
        let tap = find(&devices, &taps[0]).unwrap();
        assert_eq!(
            tap.controller,
            Some(find(&devices, &bridges[0]).unwrap().index)
        );
        let mut c = connect_as(&addr, &member).await;
        let vms = c.list_vms(ListVmsRequest::default()).await.unwrap();
        let vms = vms.into_inner().vms;
        assert_eq!(vms.len(), 1, "{vms:?}");
        assert_eq!(vms[0].power_state, PowerState::Running as i32);
        // Found again, its interface is still this host's to plug (no tap in its config).
        let found = vms[0].config.clone().unwrap();
        assert!(found.nets[0].tap.is_empty(), "{found:?}");

        c.destroy_vm(VmRequest {
            vm_id: "stays".into(),
        })
        .await
        .unwrap();
        assert!(!process_alive(pids.0[0]));
        assert_eq!(owned(&probe.devices().await.unwrap()), Vec::<String>::new());
    });
}

/// A network namespace playing one host, alive while this value is (its descriptor).
struct Netns {
    fd: std::os::fd::OwnedFd,
}

impl Netns {
    fn new() -> Netns {
        use std::os::fd::FromRawFd;
        let fd = std::thread::spawn(|| {
            // SAFETY: unshare takes flags only; this thread is ours and ends right after.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            let path = c"/proc/thread-self/ns/net";
            // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            assert!(fd >= 0, "open ns: {}", std::io::Error::last_os_error());
            // SAFETY: fd was just opened and nothing else owns it.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
        })
        .join()
        .unwrap();
        Netns { fd }
    }

    /// Moves the calling thread into this namespace.
    fn enter(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: fd is a network namespace descriptor this value owns; setns moves only
        // the calling thread, one the caller made for this namespace.
        let rc = unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// The devices of this namespace.
    fn owned_devices(&self) -> Vec<String> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async {
                        let n = HostNetworks::new(HostNetConfig::default()).unwrap();
                        owned(&n.devices().await.unwrap())
                    })
            })
            .join()
            .unwrap()
        })
    }
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> u32 {
    use futures_util::TryStreamExt;
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    let link = links.try_next().await.unwrap().expect("link exists");
    link.header.index
}

/// A daemon of host `name` at `ip` on `dev` in `ns`, on a thread of its own there; it
/// stops (and its tied VMs with it) when the sender is dropped.
fn host_thread(
    ns: Arc<Netns>,
    pki: Arc<Pki>,
    name: &'static str,
    dev: &'static str,
    ip: Ipv4Addr,
) -> (
    std::sync::mpsc::Sender<()>,
    String,
    std::thread::JoinHandle<()>,
) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        ns.enter();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let daemon = rt.block_on(async {
            loopback_up().await;
            let (conn, h, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(conn);
            let index = link_index(&h, dev).await;
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .unwrap();
            h.address()
                .add(index, IpAddr::V4(ip), 24)
                .execute()
                .await
                .unwrap();
            let networks = HostNetConfig {
                vxlan_local: Some(IpAddr::V4(ip)),
                ..HostNetConfig::default()
            };
            let ip = ip.to_string();
            Daemon::start_networked(pki, name, dir.path(), 0, &ip, "", Some(networks)).await
        });
        addr_tx.send(daemon.addr.to_string()).unwrap();
        // Serves until the test is done: the runtime runs while this thread waits.
        rt.block_on(async {
            tokio::task::spawn_blocking(move || {
                let _ = stop_rx.recv();
            })
            .await
            .unwrap()
        });
        drop(daemon);
    });
    let addr = addr_rx.recv().unwrap();
    (stop_tx, addr, thread)
}

/// Two hosts, a veth between them: a VM on a private network migrates from one to the
/// other. The destination plugs its tap before the switchover (while it only listens);
/// the source gives its tap and network back once the VM has left.
#[test]
fn a_migrating_vm_is_plugged_on_the_destination_first_and_unplugged_on_the_source() {
    let (a, b) = (Arc::new(Netns::new()), Arc::new(Netns::new()));
    // The veth pair, made in a and its end moved to b.
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            a.enter();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let (conn, h, _) = rtnetlink::new_connection().unwrap();
                    tokio::spawn(conn);
                    h.link()
                        .add(rtnetlink::LinkVeth::new("ua", "ub").build())
                        .execute()
                        .await
                        .unwrap();
                    let peer = link_index(&h, "ub").await;
                    h.link()
                        .set(
                            LinkUnspec::new_with_index(peer)
                                .setns_by_fd(b.fd.as_raw_fd())
                                .build(),
                        )
                        .execute()
                        .await
                        .unwrap();
                })
        })
        .join()
        .unwrap();
    });
    let pki = Arc::new(Pki::new());
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2));
    let host_a = host_thread(a.clone(), pki.clone(), "host-a", "ua", ip_a);
    let host_b = host_thread(b.clone(), pki.clone(), "host-b", "ub", ip_b);
    let member = pki.issue(&pool_trust::Identity::Member(1), &[]);

    let (addr_a, addr_b) = (host_a.1.clone(), host_b.1.clone());
    let (a2, b2) = (a.clone(), b.clone());
    std::thread::spawn(move || {
        a2.enter();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let client = async |addr: &str, host: &str| {
                    let tls = member.client(&pool_trust::Identity::Host(host.into()));
                    connect_tls(addr, tls.unwrap()).await.unwrap()
                };
                let mut ca = client(&addr_a, "host-a").await;
                let mut cb = client(&addr_b, "host-b").await;
                let network = |peer: Ipv4Addr| {
                    attachment("across", AttachmentKind::Private, "", &[&peer.to_string()])
                };
                let mut cfg = config("then=spin");
                cfg.nets = vec![vif("eth0", "02:00:00:00:02:01", network(ip_b))];
                create(&mut ca, "mig", cfg.clone(), true).await;
                let tap = names::tap_name("mig", 0);
                let plugged = {
                    let mut v = vec![
                        tap.clone(),
                        names::bridge_name("across"),
                        names::vxlan_name("across"),
                    ];
                    v.sort();
                    v
                };
                assert_eq!(a2.owned_devices(), plugged);
                assert!(b2.owned_devices().is_empty());

                // The destination's config names the source as its peer.
                cfg.nets[0].network = Some(network(ip_a));
                let address = cb
                    .prepare_migration_receive(PrepareMigrationReceiveRequest {
                        vm_id: "mig".into(),
                        config: Some(cfg),
                        token: "a-long-token".into(),
                        source_host: "host-a".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .address;
                assert_eq!(b2.owned_devices(), plugged, "plugged before the switchover");
                let mut stream = ca
                    .start_migration_send(StartMigrationSendRequest {
                        vm_id: "mig".into(),
                        destination_address: address,
                        token: "a-long-token".into(),
                        destination_host: "host-b".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let mut last = None;
                while let Some(p) = tokio::time::timeout(WAIT, stream.message())
                    .await
                    .unwrap()
                    .unwrap()
                {
                    last = Some(p);
                }
                let last = last.unwrap();
                assert_eq!(last.phase(), MigrationPhase::Completed, "{last:?}");
                wait_state(&mut cb, "mig", PowerState::Running).await;
                let deadline = std::time::Instant::now() + WAIT;
                while !a2.owned_devices().is_empty() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{:?}",
                        a2.owned_devices()
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                assert_eq!(b2.owned_devices(), plugged);

                // A host joins the pool: the network's peers grow where it is carried.
                let mut grown = network(ip_a);
                grown.peers.push("192.0.2.9".into());
                let peers = |c: &mut HostServiceClient<_>, n: NetworkAttachment| {
                    let mut c = c.clone();
                    async move {
                        c.set_network_peers(SetNetworkPeersRequest { network: Some(n) })
                            .await
                            .map(|r| r.into_inner())
                    }
                };
                let r = peers(&mut cb, grown.clone()).await.unwrap();
                assert!(r.present);
                assert_eq!((r.added, r.removed), (vec!["192.0.2.9".to_owned()], vec![]));
                let r = peers(&mut ca, grown.clone()).await.unwrap();
                assert!(!r.present, "{r:?}");
                assert!(a2.owned_devices().is_empty());
                let mut internal = grown.clone();
                internal.kind = AttachmentKind::Internal as i32;
                let err = peers(&mut cb, internal).await.unwrap_err();
                assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
                let mut bad = grown;
                bad.peers = vec!["not-an-ip".into()];
                let err = peers(&mut cb, bad).await.unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{err}");

                cb.destroy_vm(VmRequest {
                    vm_id: "mig".into(),
                })
                .await
                .unwrap();
                assert!(b2.owned_devices().is_empty());
            })
    })
    .join()
    .unwrap();
    for (stop, _, thread) in [host_a, host_b] {
        drop(stop);
        thread.join().unwrap();
    }
}

const SPOOF_VIF_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x24, 0x01];
const SPOOF_FORGED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x66, 0x66];
const SPOOF_VIF_IP: &str = "10.78.0.2";
const SPOOF_FORGED_IP: [u8; 4] = [10, 78, 0, 9];

/// What the guest forges in its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forgery {
    /// Another source MAC.
    Mac,
    /// Its own MAC, another source IPv4 address, on a VIF locked to its own.
    Ip,
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Which of the guest's `udp_send` datagrams carry the forged source MAC: forged and
/// genuine take turns, forged first, while both remain (guest/virtio_net.c).
fn forged_frames(count: u64, forged: u64) -> Vec<bool> {
    let (mut f, mut g) = (0, 0);
    (0..count)
        .map(|_| {
            let forge = f < forged && (g == count - forged || f <= g);
            if forge {
                f += 1
            } else {
                g += 1
            }
            forge
        })
        .collect()
}

/// What a packet socket on every interface of the namespace saw while it ran: frames
/// from the forged MAC or IPv4 address, and the guest's genuine UDP datagrams to `port`.
#[derive(Debug, Default)]
struct Sniffed {
    forged: u64,
    genuine_udp: u64,
}

/// Reads every frame on every interface of the calling thread's namespace until `stop`.
fn sniff(stop: Arc<std::sync::atomic::AtomicBool>, port: u16) -> std::thread::JoinHandle<Sniffed> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let all = (libc::ETH_P_ALL as u16).to_be() as i32;
    // SAFETY: socket() takes no pointers; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: just opened, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a timeval that lives across the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    std::thread::spawn(move || {
        let mut seen = Sniffed::default();
        let mut buf = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 14 {
                continue;
            }
            let f = &buf[..n as usize];
            let ipv4 = f[12..14] == [0x08, 0x00] && f.len() >= 14 + 28;
            if f[6..12] == SPOOF_FORGED_MAC || (ipv4 && f[14 + 12..14 + 16] == SPOOF_FORGED_IP) {
                seen.forged += 1;
            } else if f[6..12] == SPOOF_VIF_MAC
                && ipv4
                && f[14 + 9] == 17
                && f[14 + 22..14 + 24] == port.to_be_bytes()
            {
                seen.genuine_udp += 1;
            }
        }
        seen
    })
}

/// A VIF whose guest sends frames with a forged source MAC among its genuine ones: the
/// forged ones never reach the tap (a packet socket on every interface of the host's
/// namespace sees none, and a UDP socket on the bridge gets exactly the genuine
/// datagrams), and the VM's metrics count them as spoofed.
#[test]
fn a_vif_drops_and_counts_frames_with_a_forged_source_mac() {
    forged_frames_stay_behind(Forgery::Mac);
}

/// The same for a VIF locked to its address whose guest sends datagrams from another
/// one (with its own MAC).
#[test]
fn a_locked_vif_drops_and_counts_frames_from_a_forged_source_address() {
    forged_frames_stay_behind(Forgery::Ip);
}

fn forged_frames_stay_behind(forgery: Forgery) {
    in_new_netns(move || async move {
        const FORGED: u64 = 20;
        const GENUINE: u64 = 30;
        const PORT: u16 = 9000;
        let bridge_ip = Ipv4Addr::new(10, 78, 0, 1);
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start_networked(
            Arc::new(Pki::new()),
            HOST,
            dir.path(),
            0,
            "127.0.0.1",
            "",
            Some(host_net()),
        )
        .await;
        // The network made ahead of the VM, so its bridge has an address to receive on
        // (the daemon's plug finds it made).
        let probe = HostNetworks::new(host_net()).unwrap();
        let spec = NetworkSpec {
            name: "spoofnet".into(),
            kind: NetworkKind::Internal,
            vlan: None,
            mtu: 1400,
        };
        let bridge = probe.ensure_network(&spec).await.unwrap();
        let (conn, h, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        let index = link_index(&h, &bridge).await;
        h.address()
            .add(index, IpAddr::V4(bridge_ip), 24)
            .execute()
            .await
            .unwrap();
        let udp = std::net::UdpSocket::bind((bridge_ip, PORT)).unwrap();
        udp.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sniffer = sniff(stop.clone(), PORT);
        let receiver = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok(n) = udp.recv(&mut buf) {
                        assert!(n >= 8, "a datagram of {n} bytes");
                        got.push(u64::from_le_bytes(buf[..8].try_into().unwrap()));
                    }
                }
                got
            })
        };

        let mut c = d.client().await;
        let count = FORGED + GENUINE;
        let forge = match forgery {
            Forgery::Mac => format!("src_mac={}", mac_text(SPOOF_FORGED_MAC)),
            Forgery::Ip => format!("src_ip={}", Ipv4Addr::from(SPOOF_FORGED_IP)),
        };
        let mut cfg = config(&format!(
            "ip={SPOOF_VIF_IP}/24 udp_send={bridge_ip}:{PORT},size=64,count={count},pps=1000,\
             {forge},forged={FORGED}"
        ));
        let mut eth0 = vif(
            "eth0",
            &mac_text(SPOOF_VIF_MAC),
            attachment("spoofnet", AttachmentKind::Internal, "", &[]),
        );
        if forgery == Forgery::Ip {
            eth0.lock = Some(proto::host::AddressLock {
                ipv4: vec![SPOOF_VIF_IP.into()],
            });
        }
        cfg.nets = vec![eth0];
        create(&mut c, "vm-spoof", cfg, true).await;
        let mut console = ConsoleReader::open(&mut c, "vm-spoof").await;
        // The whole `NET send` line (the command line printed at boot holds its words).
        assert!(console.wait_for("NET send").await, "{}", console.text);
        let from = console.text.find("NET send").unwrap();
        assert!(console.wait_for_from("\n", from).await, "{}", console.text);
        let line = console.text[from..].lines().next().unwrap().to_owned();
        assert!(line.contains(&format!(" forged={FORGED}")), "{line}");
        assert!(line.contains(&format!("packets={count} ")), "{line}");
        // What is still in flight lands before the sockets stop reading.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut got = receiver.join().unwrap();
        let sniffed = sniffer.join().unwrap();

        got.sort_unstable();
        let genuine: Vec<u64> = forged_frames(count, FORGED)
            .iter()
            .enumerate()
            .filter(|(_, forged)| !**forged)
            .map(|(n, _)| n as u64)
            .collect();
        assert_eq!(genuine.len() as u64, GENUINE);
        assert_eq!(got, genuine, "the datagrams received are the genuine ones");
        assert_eq!(sniffed.forged, 0, "forged frames were seen");
        // The sniffer saw the genuine ones (on the tap and on the bridge), so it could
        // have seen forged ones.
        assert!(sniffed.genuine_udp >= GENUINE, "{sniffed:?}");

        let m = c
            .get_vm_metrics(VmRequest {
                vm_id: "vm-spoof".into(),
            })
            .await
            .unwrap()
            .into_inner();
        eprintln!("{line}\nsniffed {sniffed:?}\nmetrics {:?}", m.nics);
        assert_eq!(m.nics.len(), 1, "{m:?}");
        let nic = &m.nics[0];
        assert_eq!(
            (nic.nic_id.as_str(), nic.mac.as_str()),
            ("eth0", mac_text(SPOOF_VIF_MAC).as_str())
        );
        assert_eq!(nic.tx_spoofed, FORGED, "{nic:?}");
        assert_eq!(nic.tx_dropped, FORGED, "{nic:?}");
        // The genuine datagrams and at least one ARP request.
        assert!(nic.tx_packets > GENUINE, "{nic:?}");
        assert!(nic.tx_bytes >= GENUINE * (14 + 28 + 64), "{nic:?}");
        assert!(nic.rx_packets >= 1, "the ARP reply: {nic:?}");
        assert_eq!((nic.tx_errors, nic.invalid), (0, 0), "{nic:?}");

        c.destroy_vm(VmRequest {
            vm_id: "vm-spoof".into(),
        })
        .await
        .unwrap();
    });
}
