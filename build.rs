//! Generates the CRI types, servers and clients from `proto/cri-api`, and the NRI message
//! types from `proto/nri` (see their READMEs).
//!
//! Debian's `protoc` (3.21) predates the `debug_redact` field option that `api.proto` puts on
//! `AuthConfig`'s secrets, so the file is compiled from a copy without it; the redaction it
//! asks for is kept by `AuthConfig`'s own `Debug` (in `src/cri.rs`).

use std::path::PathBuf;

const PROTO: &str = "proto/cri-api/runtime/v1/api.proto";
const NRI_PROTO: &str = "proto/nri/api.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let text = std::fs::read_to_string(PROTO)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("cri-api");
    let copy = out.join("runtime/v1/api.proto");
    std::fs::create_dir_all(copy.parent().ok_or("no parent")?)?;
    std::fs::write(&copy, text.replace(" [debug_redact = true]", ""))?;
    tonic_prost_build::configure()
        .build_transport(false)
        // Records keep CRI configs as JSON; fields added by a newer api.proto read as defaults.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        // `bytes` since v0.36; kept as text in records where it is UTF-8 (older records are).
        .field_attribute(
            "runtime.v1.KeyValue.value",
            "#[serde(with = \"crate::cri::text_or_bytes\")]",
        )
        .skip_debug(["runtime.v1.AuthConfig"])
        .compile_protos(&[copy], &[out])?;
    // NRI: messages only (its services are spoken over ttrpc by src/nri).
    println!("cargo:rerun-if-changed={NRI_PROTO}");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .build_transport(false)
        .compile_protos(&[NRI_PROTO], &["proto/nri"])?;
    Ok(())
}
