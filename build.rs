//! Compiles the wire contract with a pure-Rust protobuf compiler (protox), so
//! `cargo build` needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/credvault/v1/credvault.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    // For server reflection: the encoded descriptors, included by `proto`.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("credvault_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Its `secrets` map holds plaintext: `proto::debug` gives it a redacting `Debug`.
        .skip_debug(["credvault.v1.StoreRequest"])
        .compile_fds(descriptors)?;
    Ok(())
}
