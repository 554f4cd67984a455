//! Compiles `proto/dlb/v1/*.proto` into Rust with protox (a pure-Rust protobuf compiler, so a fresh
//! machine needs no `protoc`) and tonic-prost-build. The encoded file descriptor set is written next
//! to the generated code so `dlbd` can serve gRPC server reflection from it.
//!
//! A second pass generates only the server side of the services again (into `OUT_DIR/shared`),
//! with every message mapped to the types of the first pass except `ServerMessage`, which maps to
//! [`wire::Outbound`](src/wire.rs): a message that can carry bytes encoded once and shared by
//! every session (same wire format, so clients see a plain `ServerMessage`).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/dlb/v1/dlb.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("dlb_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds.clone())?;
    let shared = out.join("shared");
    std::fs::create_dir_all(&shared)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .extern_path(".dlb.v1.ServerMessage", "crate::wire::Outbound")
        .extern_path(".dlb.v1", "crate::proto")
        .out_dir(&shared)
        .compile_fds(fds)?;
    Ok(())
}
