//! Host network plumbing (`hostd::network`) against the real kernel: every test makes its
//! own unnamed network namespaces (one per "host", "VM" or outside peer) and runs the
//! module's netlink calls inside them, so nothing touches the machine's interfaces. A
//! namespace lives as long as its file descriptor (closed on drop) and takes its devices
//! with it. Needs root (CI is root); the wiring (veth pairs, addresses) is rtnetlink too.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use hostd::network::{
    Device, HostNetConfig, HostNetworks, NetworkError, NetworkKind, NetworkSpec, PeerChange,
    TAP_FLAGS, names,
};
use rtnetlink::{LinkBridge, LinkUnspec, LinkVeth};

/// A network namespace, alive while this value is.
struct Netns {
    fd: OwnedFd,
}

impl Netns {
    fn new() -> Netns {
        let fd = std::thread::spawn(|| {
            // SAFETY: unshare takes flags only; this thread is ours and ends right after.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            let path = c"/proc/thread-self/ns/net";
            // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            assert!(fd >= 0, "open ns: {}", std::io::Error::last_os_error());
            // SAFETY: fd was just opened and nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .join()
        .unwrap();
        Netns { fd }
    }

    /// Runs `f` on a thread inside this namespace; sockets it opens stay in it.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: fd is a network namespace descriptor this value owns; setns
                    // moves only the calling thread, which ends when `f` returns.
                    let rc = unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// Runs the future `f` makes on a current-thread runtime inside this namespace.
    fn block_on<T: Send, F: Future<Output = T>>(&self, f: impl FnOnce() -> F + Send) -> T {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }

    fn networks(&self, local: Option<IpAddr>) -> NetworksIn<'_> {
        NetworksIn {
            ns: self,
            config: HostNetConfig {
                vxlan_local: local,
                ..HostNetConfig::default()
            },
        }
    }

    fn devices(&self) -> Vec<Device> {
        self.networks(None)
            .call(|n| async move { n.devices().await })
            .unwrap()
    }

    fn device(&self, name: &str) -> Option<Device> {
        self.devices().into_iter().find(|d| d.name == name)
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.devices().into_iter().map(|d| d.name).collect();
        names.sort();
        names
    }
}

/// A [`HostNetworks`] made afresh inside a namespace for each call, as a restarted
/// `hostd` would make it.
struct NetworksIn<'a> {
    ns: &'a Netns,
    config: HostNetConfig,
}

impl NetworksIn<'_> {
    fn call<T: Send, F: Future<Output = Result<T, NetworkError>>>(
        &self,
        f: impl FnOnce(HostNetworks) -> F + Send,
    ) -> Result<T, NetworkError> {
        let config = self.config.clone();
        self.ns
            .block_on(|| async move { f(HostNetworks::new(config)?).await })
    }

    fn ensure(&self, spec: &NetworkSpec) -> Result<String, NetworkError> {
        self.call(|n| async move { n.ensure_network(spec).await })
    }

    fn peers(&self, spec: &NetworkSpec, peers: &[IpAddr]) -> Result<PeerChange, NetworkError> {
        self.call(|n| async move { n.set_private_peers(spec, peers).await })
    }

    fn current_peers(&self, spec: &NetworkSpec) -> Vec<IpAddr> {
        let mut peers = self
            .call(|n| async move { n.private_peers(spec).await })
            .unwrap();
        peers.sort();
        peers
    }

    fn plug(&self, spec: &NetworkSpec, vm: &str, vif: u16) -> Result<String, NetworkError> {
        self.call(|n| async move { n.plug_tap(spec, vm, vif).await })
    }
}

/// Wiring the tests do themselves, over rtnetlink in the namespace.
async fn wire<T>(f: impl AsyncFnOnce(&rtnetlink::Handle) -> Result<T, rtnetlink::Error>) -> T {
    let (connection, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(connection);
    f(&handle).await.unwrap()
}

async fn index_of(handle: &rtnetlink::Handle, name: &str) -> Result<u32, rtnetlink::Error> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await?;
    Ok(link.expect("link exists").header.index)
}

/// A veth pair `a_name` in `a`, `b_name` in `b`, both up.
fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    let b_fd = b.fd.as_raw_fd();
    a.block_on(|| {
        wire(async move |h| {
            h.link()
                .add(LinkVeth::new(a_name, b_name).build())
                .execute()
                .await?;
            let peer = index_of(h, b_name).await?;
            h.link()
                .set(LinkUnspec::new_with_index(peer).setns_by_fd(b_fd).build())
                .execute()
                .await?;
            let own = index_of(h, a_name).await?;
            h.link()
                .set(LinkUnspec::new_with_index(own).up().build())
                .execute()
                .await
        })
    });
    b.block_on(|| {
        wire(async move |h| {
            let own = index_of(h, b_name).await?;
            h.link()
                .set(LinkUnspec::new_with_index(own).up().build())
                .execute()
                .await
        })
    });
}

fn address(ns: &Netns, dev: &str, ip: Ipv4Addr) {
    ns.block_on(|| {
        wire(async move |h| {
            let index = index_of(h, dev).await?;
            h.address().add(index, IpAddr::V4(ip), 24).execute().await
        })
    });
}

fn enslave(ns: &Netns, dev: &str, bridge: &str) {
    ns.block_on(|| {
        wire(async move |h| {
            let index = index_of(h, dev).await?;
            let controller = index_of(h, bridge).await?;
            let message = LinkUnspec::new_with_index(index)
                .controller(controller)
                .up()
                .build();
            h.link().set(message).execute().await
        })
    });
}

/// A "VM" namespace whose `eth0` (address `ip`) is the other end of a veth port on
/// `bridge` in `host`: a port with carrier, unlike a tap nobody reads.
fn vm_on(host: &Netns, bridge: &str, port: &str, ip: Ipv4Addr) -> Netns {
    let vm = Netns::new();
    veth(host, port, &vm, "eth0");
    enslave(host, port, bridge);
    address(&vm, "eth0", ip);
    vm
}

/// Whether a UDP datagram from `from` (at `from_ip`) reaches `to` (at `to_ip`) and its
/// answer comes back, trying until `patience` has passed (the first tries wait for ARP).
fn udp_round_trip(
    from: &Netns,
    from_ip: Ipv4Addr,
    to: &Netns,
    to_ip: Ipv4Addr,
    patience: Duration,
) -> bool {
    let server = to.run(|| UdpSocket::bind((to_ip, 7000)).unwrap());
    let client = from.run(|| UdpSocket::bind((from_ip, 0)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + patience;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        client.send_to(b"hello", (to_ip, 7000)).unwrap();
        if let Ok((n, peer)) = server.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"hello");
            server.send_to(b"again", peer).unwrap();
            if let Ok(n) = client.recv(&mut buf) {
                assert_eq!(&buf[..n], b"again");
                return true;
            }
        }
    }
    false
}

fn spec(name: &str, kind: NetworkKind) -> NetworkSpec {
    NetworkSpec {
        name: name.into(),
        kind,
        vlan: None,
        mtu: 1500,
    }
}

fn external(name: &str, nic: &str, vlan: Option<u16>) -> NetworkSpec {
    NetworkSpec {
        vlan,
        ..spec(name, NetworkKind::External { nic: nic.into() })
    }
}

fn private(name: &str) -> NetworkSpec {
    NetworkSpec {
        mtu: 1450,
        ..spec(name, NetworkKind::Private)
    }
}

#[test]
fn external_network_bridges_the_nic_and_plugs_taps() {
    let host = Netns::new();
    let outside = Netns::new();
    veth(&host, "nic0", &outside, "lan0");
    address(&outside, "lan0", Ipv4Addr::new(192, 168, 50, 1));
    let net = host.networks(None);

    let vlan10 = external("vlan10", "nic0", Some(10));
    let bridge = net.ensure(&vlan10).unwrap();
    assert_eq!(bridge, names::nic_bridge_name("nic0"));
    assert_eq!(net.ensure(&vlan10).unwrap(), bridge, "ensure is idempotent");
    // A second network over the same NIC (another tag) shares its bridge.
    let vlan20 = external("vlan20", "nic0", Some(20));
    assert_eq!(net.ensure(&vlan20).unwrap(), bridge);

    let br = host.device(&bridge).unwrap();
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert!(br.up);
    assert_eq!(br.mtu, 1500);
    let nic = host.device("nic0").unwrap();
    assert_eq!(
        nic.controller,
        Some(br.index),
        "the NIC is the bridge's port"
    );
    assert!(nic.up);

    let tap = net.plug(&vlan10, "vm-1", 0).unwrap();
    assert_eq!(tap, names::tap_name("vm-1", 0));
    assert_eq!(
        net.plug(&vlan10, "vm-1", 0).unwrap(),
        tap,
        "plugging again reuses the tap"
    );
    let other = net.plug(&vlan20, "vm-2", 3).unwrap();
    let t = host.device(&tap).unwrap();
    assert_eq!(t.kind.as_deref(), Some("tun"));
    assert_eq!(t.controller, Some(br.index));
    assert_eq!(t.mtu, 1500);
    assert!(t.up);

    // The VIF backend opens the tap with the flags it was made with.
    host.run(|| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: ifreq is plain data; all zeroes is valid.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(tap.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the one ifreq, alive across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        assert_eq!(rc, 0, "attach: {}", std::io::Error::last_os_error());
    });

    // A VM port on the bridge reaches the outside peer through the NIC.
    let vm = vm_on(&host, &bridge, "vmport", Ipv4Addr::new(192, 168, 50, 2));
    let (vm_ip, out_ip) = (
        Ipv4Addr::new(192, 168, 50, 2),
        Ipv4Addr::new(192, 168, 50, 1),
    );
    assert!(udp_round_trip(
        &vm,
        vm_ip,
        &outside,
        out_ip,
        Duration::from_secs(5)
    ));

    // In use (taps and the VM port): nothing is removed.
    let remove = |s: &NetworkSpec| net.call(|n| async move { n.remove_network_if_unused(s).await });
    assert!(!remove(&vlan10).unwrap());
    assert!(host.device(&bridge).is_some());
    let removed = net.call(|n| async move { n.unplug("vm-1").await }).unwrap();
    assert_eq!(removed, vec![tap.clone()]);
    assert!(host.device(&tap).is_none());
    assert!(
        net.call(|n| async move { n.unplug_vif("vm-2", 3).await })
            .unwrap()
    );
    assert!(host.device(&other).is_none());
    drop(vm);
    // The VM namespace took its veth end, and with it the host's end.
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.device("vmport").is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(remove(&vlan10).unwrap());
    assert!(host.device(&bridge).is_none());
    let nic = host.device("nic0").expect("the NIC stays");
    assert_eq!(nic.controller, None, "the NIC is released");
}

#[test]
fn private_network_crosses_vxlan_between_hosts_and_isolates_other_networks() {
    let (host_a, host_b) = (Netns::new(), Netns::new());
    let (underlay_a, underlay_b) = (Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2));
    veth(&host_a, "under0", &host_b, "under1");
    address(&host_a, "under0", underlay_a);
    address(&host_b, "under1", underlay_b);
    let net_a = host_a.networks(Some(underlay_a.into()));
    let net_b = host_b.networks(Some(underlay_b.into()));
    let (red, blue) = (private("red"), private("blue"));
    let hosts: [IpAddr; 2] = [underlay_a.into(), underlay_b.into()];
    for net in [&net_a, &net_b] {
        for spec in [&red, &blue] {
            net.ensure(spec).unwrap();
            // Every host gets the whole list; its own address is left out.
            let change = net.peers(spec, &hosts).unwrap();
            assert_eq!(change.added.len(), 1);
            assert!(change.removed.is_empty());
        }
    }
    assert_eq!(net_a.current_peers(&red), vec![IpAddr::from(underlay_b)]);
    assert_eq!(net_b.current_peers(&blue), vec![IpAddr::from(underlay_a)]);

    let vxlan = host_a.device(&names::vxlan_name("red")).unwrap();
    let bridge = host_a.device(&red.bridge_name()).unwrap();
    assert_eq!(vxlan.kind.as_deref(), Some("vxlan"));
    assert_eq!(vxlan.vni, Some(names::vni("red")));
    assert_eq!(vxlan.vxlan_port, Some(4789));
    assert_eq!(vxlan.vxlan_local, Some(underlay_a.into()));
    assert_eq!(vxlan.controller, Some(bridge.index));
    assert_eq!((vxlan.mtu, bridge.mtu), (1450, 1450));
    assert!(vxlan.up && bridge.up);

    for (host, net, vm) in [(&host_a, &net_a, "vm-a"), (&host_b, &net_b, "vm-b")] {
        let tap = host.device(&net.plug(&red, vm, 0).unwrap()).unwrap();
        let bridge = host.device(&red.bridge_name()).unwrap();
        assert_eq!(
            (tap.mtu, tap.controller, tap.up),
            (1450, Some(bridge.index), true)
        );
    }

    let ip = |last| Ipv4Addr::new(10, 200, 0, last);
    let vm_a = vm_on(&host_a, &red.bridge_name(), "porta", ip(1));
    let vm_b = vm_on(&host_b, &red.bridge_name(), "portb", ip(2));
    let vm_c = vm_on(&host_b, &blue.bridge_name(), "portc", ip(3));
    assert!(
        udp_round_trip(&vm_a, ip(1), &vm_b, ip(2), Duration::from_secs(5)),
        "two VMs on one private network, on two hosts, reach each other"
    );
    let patience = Duration::from_millis(1500);
    assert!(
        !udp_round_trip(&vm_c, ip(3), &vm_a, ip(1), patience),
        "another network, another host"
    );
    assert!(
        !udp_round_trip(&vm_c, ip(3), &vm_b, ip(2), patience),
        "another network, same host"
    );

    // Without peers, the hosts no longer reach each other.
    net_a.peers(&red, &[]).unwrap();
    net_b.peers(&red, &[]).unwrap();
    assert!(!udp_round_trip(&vm_a, ip(1), &vm_b, ip(2), patience));
}

#[test]
fn set_private_peers_keeps_exactly_the_given_peers() {
    let host = Netns::new();
    let net = host.networks(Some(Ipv4Addr::new(10, 0, 0, 1).into()));
    let red = private("red");
    net.ensure(&red).unwrap();
    let p = |last| IpAddr::from(Ipv4Addr::new(10, 0, 0, last));

    let change = net.peers(&red, &[p(2), p(3), p(3)]).unwrap();
    assert_eq!(
        change,
        PeerChange {
            added: vec![p(2), p(3)],
            removed: vec![]
        }
    );
    assert_eq!(net.current_peers(&red), vec![p(2), p(3)]);
    let change = net.peers(&red, &[p(3), p(4)]).unwrap();
    assert_eq!(
        change,
        PeerChange {
            added: vec![p(4)],
            removed: vec![p(2)]
        }
    );
    assert_eq!(net.current_peers(&red), vec![p(3), p(4)]);
    assert_eq!(
        net.peers(&red, &[p(4), p(3)]).unwrap(),
        PeerChange::default()
    );

    // Bad peers are refused and change nothing.
    for bad in ["::1", "fd00::2", "224.0.0.1", "0.0.0.0", "127.0.0.1"] {
        let err = net.peers(&red, &[p(5), bad.parse().unwrap()]).unwrap_err();
        assert!(
            matches!(err, NetworkError::InvalidPeer { .. }),
            "{bad}: {err}"
        );
    }
    assert_eq!(net.current_peers(&red), vec![p(3), p(4)]);

    // Ensuring again keeps the peers; a changed VXLAN address makes the device again.
    net.ensure(&red).unwrap();
    assert_eq!(net.current_peers(&red), vec![p(3), p(4)]);
    let moved = host.networks(Some(Ipv4Addr::new(10, 0, 0, 9).into()));
    moved.ensure(&red).unwrap();
    let vxlan = host.device(&names::vxlan_name("red")).unwrap();
    assert_eq!(vxlan.vxlan_local, Some(p(9)));
    assert_eq!(moved.current_peers(&red), Vec::<IpAddr>::new());

    assert_eq!(moved.peers(&red, &[]).unwrap(), PeerChange::default());
    let internal = spec("inside", NetworkKind::Internal);
    net.ensure(&internal).unwrap();
    let err = net.peers(&internal, &[p(2)]).unwrap_err();
    assert!(matches!(err, NetworkError::NotPrivate { .. }), "{err}");
}

#[test]
fn cleanup_stale_removes_leftovers_and_leaves_foreign_devices() {
    let host = Netns::new();
    let other = Netns::new();
    let net = host.networks(Some(Ipv4Addr::new(10, 0, 0, 1).into()));
    let kept = &spec("kept", NetworkKind::Internal);
    let gone = private("gone");
    let orphan = spec("orphan", NetworkKind::Internal);
    net.ensure(kept).unwrap();
    net.ensure(&gone).unwrap();
    net.ensure(&orphan).unwrap();
    let known_tap = net.plug(kept, "vm-known", 0).unwrap();
    let crashed_kept = net.plug(kept, "vm-crashed", 0).unwrap();
    let crashed_gone = net.plug(&gone, "vm-crashed", 1).unwrap();
    // A VM the caller forgot the network of: its tap keeps that bridge.
    let on_orphan = net.plug(&orphan, "vm-known", 1).unwrap();
    // Foreign devices: a bridge whose name is close to ours, and a veth on our stale
    // bridge, which is released, not removed.
    host.block_on(|| {
        wire(async move |h| {
            h.link()
                .add(LinkBridge::new("pnbforeign00000").build())
                .execute()
                .await
        })
    });
    veth(&host, "fx0", &other, "fx1");
    enslave(&host, "fx0", &gone.bridge_name());

    let mut removed = net
        .call(|n| async move {
            n.cleanup_stale(&["vm-known"], std::slice::from_ref(kept))
                .await
        })
        .unwrap();
    removed.sort();
    let mut expected = vec![
        crashed_kept,
        crashed_gone,
        names::vxlan_name("gone"),
        gone.bridge_name(),
    ];
    expected.sort();
    assert_eq!(removed, expected);

    let names_left = host.names();
    for present in [
        &known_tap,
        &on_orphan,
        &kept.bridge_name(),
        &orphan.bridge_name(),
        "pnbforeign00000",
        "fx0",
    ] {
        assert!(
            names_left.iter().any(|n| n == present),
            "{present} stays: {names_left:?}"
        );
    }
    assert_eq!(host.device("fx0").unwrap().controller, None);

    // A second run finds nothing more; without the VM, its taps and bridges go too.
    let again = net
        .call(|n| async move { n.cleanup_stale(&["vm-known"], &[]).await })
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    let last = net
        .call(|n| async move { n.cleanup_stale(&[], &[]).await })
        .unwrap();
    assert_eq!(last.len(), 4, "{last:?}");
    let mut left = host.names();
    left.retain(|n| names::parse(n).is_some());
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bad_input_is_refused_and_creates_nothing() {
    let host = Netns::new();
    let outside = Netns::new();
    veth(&host, "nic0", &outside, "lan0");
    host.block_on(|| {
        wire(async move |h| {
            h.link()
                .add(LinkBridge::new("br-other").build())
                .execute()
                .await
        })
    });
    veth(&host, "nic1", &outside, "lan1");
    enslave(&host, "nic1", "br-other");
    let before = host.names();
    let net = host.networks(None);

    let err = net.ensure(&external("lan", "missing0", None)).unwrap_err();
    assert!(
        matches!(&err, NetworkError::NicMissing { nic, .. } if nic == "missing0"),
        "{err}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = net
        .ensure(&external("lan", "a-nic-name-too-long", None))
        .unwrap_err();
    assert!(
        matches!(
            err,
            NetworkError::InvalidName {
                what: "host NIC name",
                ..
            }
        ),
        "{err}"
    );
    let err = net.ensure(&external("lan", "nic1", None)).unwrap_err();
    assert!(
        matches!(&err, NetworkError::NicInUse { controller, .. } if controller == "br-other"),
        "{err}"
    );
    let err = net
        .ensure(&NetworkSpec {
            mtu: 9000,
            ..external("lan", "nic0", None)
        })
        .unwrap_err();
    assert!(
        matches!(err, NetworkError::NicMtuTooSmall { nic_mtu: 1500, .. }),
        "{err}"
    );
    let err = net
        .ensure(&external("lan", "nic0", Some(4095)))
        .unwrap_err();
    assert!(
        matches!(err, NetworkError::InvalidVlan { vlan: 4095, .. }),
        "{err}"
    );
    let err = net
        .ensure(&NetworkSpec {
            mtu: 20,
            ..spec("lan", NetworkKind::Internal)
        })
        .unwrap_err();
    assert!(matches!(err, NetworkError::InvalidMtu { .. }), "{err}");
    let err = net
        .ensure(&spec(&"n".repeat(65), NetworkKind::Internal))
        .unwrap_err();
    assert!(
        matches!(
            err,
            NetworkError::InvalidName {
                what: "network name",
                ..
            }
        ),
        "{err}"
    );
    let err = net.ensure(&private("red")).unwrap_err();
    assert!(matches!(err, NetworkError::NoVxlanLocal { .. }), "{err}");
    let err = net
        .plug(&spec("never", NetworkKind::Internal), "vm", 0)
        .unwrap_err();
    assert!(matches!(err, NetworkError::NetworkMissing { .. }), "{err}");
    let err = net
        .plug(&spec("never", NetworkKind::Internal), "", 0)
        .unwrap_err();
    assert!(
        matches!(err, NetworkError::InvalidName { what: "VM id", .. }),
        "{err}"
    );
    let err = net
        .plug(&spec("never", NetworkKind::Internal), "vm", 256)
        .unwrap_err();
    assert!(
        matches!(err, NetworkError::InvalidVifIndex { index: 256 }),
        "{err}"
    );
    let err = net.peers(&private("red"), &[]).unwrap_err();
    assert!(matches!(err, NetworkError::NoVxlanLocal { .. }), "{err}");
    let bad_port = HostNetConfig {
        vxlan_local: None,
        vxlan_port: 0,
    };
    let err = host
        .block_on(|| async move { HostNetworks::new(bad_port).err() })
        .unwrap();
    assert!(matches!(err, NetworkError::InvalidConfig { .. }), "{err}");
    assert_eq!(host.names(), before, "nothing was created or removed");

    // A VXLAN device that holds the VNI already (a foreign one here; two pool networks
    // whose names hash alike would meet the same) makes the kernel refuse ours after the
    // bridge was made: the bridge is removed again.
    let net = host.networks(Some(Ipv4Addr::new(10, 0, 0, 1).into()));
    host.block_on(|| {
        let vni = names::vni("second");
        wire(async move |h| {
            let message = rtnetlink::LinkVxlan::new("vx-foreign", vni)
                .port(4789)
                .build();
            h.link().add(message).execute().await
        })
    });
    let with_foreign = host.names();
    let err = net.ensure(&private("second")).unwrap_err();
    assert!(matches!(err, NetworkError::Netlink { .. }), "{err}");
    assert_eq!(
        host.names(),
        with_foreign,
        "the bridge made for it is removed again"
    );

    // A foreign device on one of our names is refused, not taken over.
    host.block_on(|| {
        let name = names::vxlan_name("third");
        wire(async move |h| h.link().add(LinkBridge::new(&name).build()).execute().await)
    });
    let with_squatter = host.names();
    let err = net.ensure(&private("third")).unwrap_err();
    assert!(
        matches!(
            err,
            NetworkError::Conflict {
                expected: "vxlan",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(host.names(), with_squatter);
}
