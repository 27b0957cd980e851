//! Compiles proto/berth/v1 with protox (pure Rust, no protoc binary).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [
        "berth/v1/types.proto",
        "berth/v1/agent.proto",
        "berth/v1/operator.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A volume's data is decoded as a view of the received buffer, not copied out of it
        // (the target agent of a drain writes every byte as it came).
        .bytes(".berth.v1.VolumeData.data")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
