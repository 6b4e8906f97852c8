//! `hostd-vmm --dir <vm dir>`: the process of one VM, started by the `hostd` daemon.
//!
//! The same code as `hostd vmm`, in a binary of its own that links only the VMM, so each
//! VM process maps and relocates far less than the full daemon (no gRPC server, no
//! clap): this is most of a VM's memory overhead.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let dir = match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(dir), None) if flag == "--dir" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: hostd-vmm --dir <vm directory>  (started by hostd, not by hand)");
            std::process::exit(2);
        }
    };
    let level = std::env::var("HOSTD_VMM_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = hostd::supervisor::child::run(&dir) {
        tracing::error!(error = %e, "VM process");
        std::process::exit(1);
    }
}
