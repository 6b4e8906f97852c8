//! Compiles the `.proto` files with protox, a protobuf compiler written in Rust, so a fresh
//! machine builds this crate with cargo alone: no `protoc` binary, no `PROTOC` variable.

const PROTOS: [&str; 3] = [
    "proto/storage.proto",
    "proto/host.proto",
    "proto/pool.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
