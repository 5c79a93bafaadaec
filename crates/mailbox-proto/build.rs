//! Compiles `proto/*.proto` with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "../../proto/mailbox.proto",
        "../../proto/raft.proto",
        "../../proto/replication.proto",
        "../../proto/events.proto",
        "../../proto/accounts.proto",
        "../../proto/etcd/kv.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["../../proto"])?;
    tonic_build::configure()
        // `bytes` fields as `Bytes`: payload chunks and pushed segments are
        // sliced out of the received buffer and sent from what the segment
        // store read, instead of being copied into a `Vec` at each hop.
        .bytes(["."])
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
